"""Tensor descriptors for tiles streamed through a kernel's loop (TMA, the Hopper copy engine).

A descriptor views a packed [rows, H, d] tensor as [rows, H * d] and reads [block_rows, d] boxes of it
(rows past the tensor's end read as 0). The band and top-n kernels take them where their launch
parameter TMA is set and every tensor allows it; otherwise they read through pointers, as on GPUs before
Hopper. A box holds whole tiles: the kernels zero, or mask out, the rows a tile must not use.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .constants import ALIGN_BYTES, INTERPRETED

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side descriptors: pointers only
    TensorDescriptor = None


def _describable(x: torch.Tensor) -> bool:
    """Whether a [rows, H, d] tensor fits a descriptor of [rows, H * d] with [., d] boxes."""
    d = x.shape[2]
    item = x.element_size()
    return (x.shape[0] > 0 and d >= 16 and d & (d - 1) == 0 and x.stride(2) == 1 and x.stride(1) == d
            and x.data_ptr() % ALIGN_BYTES == 0 and (x.stride(0) * item) % ALIGN_BYTES == 0)


def _engine_present(device: torch.device) -> bool:
    """An NVIDIA GPU with the copy engine (compute capability 9 or later: Hopper), or the interpreter, which
    runs descriptors too. ROCm reports its own capability numbers through the same call: not taken."""
    if INTERPRETED:
        return True
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_descriptors(tensors: List[torch.Tensor], block_rows: int, enabled: bool) -> Optional[list]:
    """Descriptors of each [rows, H, d] tensor with [block_rows, d] boxes, or None when the kernel must use
    pointers: TMA not enabled, no copy engine (before Hopper), or a tensor a descriptor cannot take (d not
    a power of two >= 16, heads not adjacent, an unaligned base or row stride, no rows)."""
    if not enabled or TensorDescriptor is None or not _engine_present(tensors[0].device):
        return None
    if not all(_describable(x) for x in tensors):
        return None
    return [TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [block_rows, x.shape[2]])
            for x in tensors]


def streamed(tensors: List[torch.Tensor], block_rows: int, enabled: bool) -> Tuple[list, bool]:
    """(what a kernel streams in tiles of block_rows rows: the descriptors where TMA applies, else the
    tensors themselves; the kernel's TMA flag)."""
    descriptors = tma_descriptors(tensors, block_rows, enabled)
    return (list(tensors) if descriptors is None else descriptors), descriptors is not None
