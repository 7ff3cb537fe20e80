"""phi: maps the l keys (or values) of one compressed block to one token (NSA_SPEC.md, Eq. 7).

Parameters are shared across heads. 'mean' has none; 'linear' and 'mlp' add a learned
intra-block position embedding to each of the l tokens, flatten the block and map it back
to one head-dim vector.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import COMPRESSION_KINDS


def block_windows(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """The compressed blocks of one sequence: x [T, H, D] -> [N_cmp, l, H, D], block i = tokens [i*d, i*d + l)."""
    if x.shape[0] < block_size:
        return x.new_zeros((0, block_size) + tuple(x.shape[1:]))
    return x.unfold(0, block_size, stride).permute(0, 3, 1, 2)


class _BlockMap(nn.Module):
    """One phi for one of K or V: [N, l, H, D] -> [N, H, D]."""

    def __init__(self, kind: str, block_size: int, head_dim: int, hidden: Optional[int], device=None, dtype=None):
        super().__init__()
        self.kind = kind
        if kind == "mean":
            return
        factory = {"device": device, "dtype": dtype}
        self.pos_emb = nn.Parameter(torch.zeros(block_size, head_dim, **factory))
        flat = block_size * head_dim
        if kind == "linear":
            self.proj = nn.Linear(flat, head_dim, bias=False, **factory)
        else:
            width = hidden if hidden is not None else 2 * head_dim
            self.proj = nn.Sequential(
                nn.Linear(flat, width, **factory), nn.GELU(), nn.Linear(width, head_dim, **factory)
            )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.kind == "mean":
            return
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.kind == "linear":
            # Start near average pooling, so that training begins from the parameter-free phi.
            block_size, head_dim = self.pos_emb.shape
            weight = self.proj.weight
            mean_pool = torch.eye(head_dim, device=weight.device, dtype=weight.dtype).repeat(1, block_size) / block_size
            weight.copy_(mean_pool + 0.02 * torch.randn_like(weight) / block_size**0.5)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return windows.mean(dim=1)
        n, l, h, dim = windows.shape
        shifted = windows + self.pos_emb[None, :, None, :].to(windows.dtype)
        flat = shifted.permute(0, 2, 1, 3).reshape(n, h, l * dim)  # [N, H, l*D]
        return self.proj(flat.to(self.pos_emb.dtype)).to(windows.dtype)


class KVCompressor(nn.Module):
    """The compression phi for keys and values, shared across heads.

    kind: 'mean' | 'linear' | 'mlp'. head_dim_k / head_dim_v may differ (e.g. 192 / 128).
    """

    def __init__(
        self,
        kind: str,
        block_size: int,
        head_dim_k: int,
        head_dim_v: int,
        hidden: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kind not in COMPRESSION_KINDS:
            raise ValueError(f"compression={kind!r} is not allowed; choose one of {COMPRESSION_KINDS}")
        self.kind = kind
        self.block_size = block_size
        self.k_map = _BlockMap(kind, block_size, head_dim_k, hidden, device, dtype)
        self.v_map = _BlockMap(kind, block_size, head_dim_v, hidden, device, dtype)

    @classmethod
    def from_config(cls, config, head_dim_k: int, head_dim_v: int, device=None, dtype=None) -> "KVCompressor":
        return cls(
            config.compression, config.compress_block_size, head_dim_k, head_dim_v,
            config.compress_mlp_hidden, device=device, dtype=dtype,
        )

    def compress_k(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [N, l, H, d_k] -> [N, H, d_k]"""
        return self.k_map(windows)

    def compress_v(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [N, l, H, d_v] -> [N, H, d_v]"""
        return self.v_map(windows)
