"""Launch parameters of the kernels (tile sizes, warps, pipeline stages), in one table.

`launch_params(kernel, width)` gives the parameters one launch uses, for a kernel whose widest row
tile has `width` columns (kernels/qk_parts.py: tile_width; d_k = 192 is 128 + 64 = 192 columns, d_k =
256 is 256). `benchmarks/tune_kernels.py` times alternatives on a GPU through `overrides(...)`; the
defaults are its choices on an H100 (benchmarks/results/tune_kernels_*.md). The CPU interpreter
(TRITON_INTERPRET=1) gets small tiles so that tests stay fast (and, for top-n, so that a short
document already spans several tiles of selection blocks).

Kernels: band_fwd / band_dq / band_dkdv (per kind: 'window' or 'compressed'), selected_fwd,
selected_dq, selected_dkdv, topk. ROWS of selected_fwd / selected_dq: query rows per program (tokens x
the G heads of a group; one token when G >= ROWS), KEYS: keys per step of their walk over a selected
block (a block of l' keys takes l' / KEYS steps); ROWS of selected_dkdv and topk: rows per query tile.
TMA (band kernels, topk): read the streamed tiles through tensor descriptors where the tensors allow it
(kernels/tma.py). The selected forward / dQ read through pointers: their gathered blocks measured slower
through descriptors on the H100.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator

from .constants import INTERPRETED

# tiles up to 128 columns (the H100 sweep's winners)
_DEFAULTS: Dict[str, dict] = {
    "band_fwd/window": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True),
    "band_fwd/compressed": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
    "band_dq/window": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
    "band_dq/compressed": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True),
    # dK/dV: Q and dO tiles read through pointers (through descriptors they measured slower on the H100)
    "band_dkdv/window": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, TMA=False),
    "band_dkdv/compressed": dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, TMA=False),
    "selected_fwd": dict(ROWS=16, KEYS=32, num_warps=1, num_stages=2),
    "selected_dq": dict(ROWS=16, KEYS=32, num_warps=1, num_stages=2),
    "selected_dkdv": dict(ROWS=64, num_warps=4, num_stages=3),
    "topk": dict(ROWS=256, BLOCKS=16, num_warps=4, num_stages=2, TMA=True),
}

# tiles of 129..192 columns (d_k = 192 = 128 + 64, the paper's shape), where they differ from the
# above: the H100 sweep's winners at 64/4/192/128
# (benchmarks/results/tune_kernels_h100_64-4-192-128.md)
_WIDE: Dict[str, dict] = {
    "band_fwd/window": dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    "band_dkdv/window": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "band_dkdv/compressed": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    "selected_fwd": dict(ROWS=16, KEYS=64, num_warps=4, num_stages=2),
    "selected_dq": dict(ROWS=16, KEYS=64, num_warps=2, num_stages=2),  # KEYS not swept at this width
    "selected_dkdv": dict(ROWS=128, num_warps=8, num_stages=2),
    "topk": dict(ROWS=256, BLOCKS=16, num_warps=8, num_stages=2),
}

# tiles wider than 192 columns (up to 256): smaller tiles, where they differ from _DEFAULTS
_SMALL_BAND_TILES = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
_WIDEST: Dict[str, dict] = {
    "band_fwd/window": _SMALL_BAND_TILES, "band_fwd/compressed": _SMALL_BAND_TILES,
    "band_dq/window": _SMALL_BAND_TILES, "band_dq/compressed": _SMALL_BAND_TILES,
    "selected_fwd": dict(ROWS=16, KEYS=64, num_warps=4, num_stages=2),
    "selected_dq": dict(ROWS=16, KEYS=64, num_warps=4, num_stages=2),
    "selected_dkdv": dict(ROWS=64, num_warps=4, num_stages=2),
    "topk": dict(ROWS=128, BLOCKS=16, num_warps=8, num_stages=2),
}

_INTERPRETER = {
    "band": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, TMA=True),
    "selected_fwd": dict(ROWS=16, KEYS=64, num_warps=4, num_stages=1),
    "selected_dq": dict(ROWS=16, KEYS=64, num_warps=4, num_stages=1),
    "selected_dkdv": dict(ROWS=64, num_warps=4, num_stages=1),
    "topk": dict(ROWS=16, BLOCKS=4, num_warps=4, num_stages=1, TMA=True),
}

_overrides: Dict[str, dict] = {}


def launch_params(kernel: str, width: int) -> dict:
    """Parameters of `kernel` whose widest row tile has `width` columns (a copy; overrides applied)."""
    if INTERPRETED:
        family = "band" if kernel.startswith("band") else kernel
        params = dict(_INTERPRETER.get(family, dict(num_warps=4, num_stages=1)))
    else:
        wide = _WIDEST if width > 192 else _WIDE if width > 128 else {}
        params = dict(wide.get(kernel, _DEFAULTS[kernel]))
    params.update(_overrides.get(kernel, {}))
    return params


@contextlib.contextmanager
def overrides(kernel: str, **params) -> Iterator[None]:
    """Launch `kernel` with `params` replacing its defaults inside the block (for tuning sweeps)."""
    previous = _overrides.get(kernel)
    _overrides[kernel] = params
    try:
        yield
    finally:
        if previous is None:
            _overrides.pop(kernel)
        else:
            _overrides[kernel] = previous
