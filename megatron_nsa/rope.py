"""Rotary position embedding (RoPE) at arbitrary positions, on any device (never calls torch.cuda).

Convention (Megatron-Core's non-interleaved RoPE): the angle row of position p holds
[p*f_0 .. p*f_{r/2-1}, p*f_0 .. p*f_{r/2-1}] with f_i = base^(-2i/r). The first r dims of a head
are rotated in halves (x1 = dims [0, r/2), x2 = dims [r/2, r)):
    x1' = x1 cos - x2 sin,   x2' = x2 cos + x1 sin
and the remaining dims pass through unchanged.

NSA needs angles at positions that are not a contiguous range (each compressed key is rotated
at its block's last token), so `Rotary` looks angles up by position, either from Megatron's
precomputed table (GPTModel's `rotary_pos_emb`, [S, 1, 1, r]) or from a base.
"""
from __future__ import annotations

from typing import Optional

import torch


def rotary_angles(positions: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """positions [N] -> angles [N, rot_dim] (float32)."""
    inv_freq = base ** (-torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float32) / rot_dim)
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [N, rot_dim / 2]
    return torch.cat([freqs, freqs], dim=-1)


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate the first angles.shape[-1] dims of x [N, ..., D] by angles [N, r].

    cos / sin are taken in float32 and applied in x's dtype (as Megatron-Core does), so that no
    float32 copy of a long sequence's q / k is ever made.
    """
    rot_dim = angles.shape[-1]
    angles = angles.view(angles.shape[0], *([1] * (x.dim() - 2)), rot_dim)
    cos, sin = torch.cos(angles).to(x.dtype), torch.sin(angles).to(x.dtype)
    rotated, passed = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = rotated.chunk(2, dim=-1)
    out = rotated * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, passed], dim=-1) if passed.shape[-1] else out


class Rotary:
    """Rotates tensors whose dim 0 is indexed by token positions.

    Build with `from_base(base, rot_dim)` (angles computed on the fly) or `from_table(table)`
    (Megatron's rotary_pos_emb [S, 1, 1, r] or [S, r]: row p holds the angles of position p).
    Calling `rotary(x, positions)` matches megatron_nsa.reference.RopeFn.
    """

    def __init__(self, rot_dim: int, base: Optional[float] = None, table: Optional[torch.Tensor] = None,
                 covered_positions: int = 0):
        if (base is None) == (table is None):
            raise ValueError("Rotary needs exactly one of base= or table=")
        if rot_dim < 2 or rot_dim % 2:
            raise ValueError(f"rot_dim={rot_dim} is not allowed: it must be an even integer >= 2")
        self.rot_dim = rot_dim
        self.base = base
        self.table = table
        self.covered_positions = covered_positions  # callers promise positions below this (0: no promise)

    @classmethod
    def from_base(cls, base: float, rot_dim: int) -> "Rotary":
        return cls(rot_dim, base=base)

    @classmethod
    def from_table(cls, table: torch.Tensor) -> "Rotary":
        if table.dim() == 4:
            if table.shape[1:3] != (1, 1):
                raise ValueError(f"rotary table must be [S, 1, 1, r] (one row per position), got {tuple(table.shape)}")
            table = table.view(table.shape[0], table.shape[-1])
        if table.dim() != 2:
            raise ValueError(f"rotary table must be [S, 1, 1, r] or [S, r], got {tuple(table.shape)}")
        return cls(table.shape[-1], table=table)

    def covering(self, num_positions: int) -> "Rotary":
        """This rotary for positions 0..num_positions-1 only, checked against the table once, here on the
        host: its calls skip the per-call range check, a read of the positions' maximum that waits for
        the GPU. Positions beyond it are the caller's error (an index error on the device)."""
        if self.table is not None and num_positions > self.table.shape[0]:
            raise ValueError(
                f"positions 0..{num_positions - 1} need a rotary table of at least {num_positions} rows; "
                f"it has {self.table.shape[0]}"
            )
        return Rotary(self.rot_dim, base=self.base, table=self.table, covered_positions=num_positions)

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N] (int) -> angles [N, rot_dim] float32."""
        if self.table is None:
            return rotary_angles(positions, self.rot_dim, self.base)
        if not self.covered_positions and positions.numel() and int(positions.max()) >= self.table.shape[0]:
            raise ValueError(
                f"position {int(positions.max())} is beyond the rotary table of {self.table.shape[0]} positions"
            )
        return self.table.index_select(0, positions.to(self.table.device)).to(torch.float32)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < self.rot_dim:
            raise ValueError(f"cannot rotate {self.rot_dim} dims of a head with {x.shape[-1]} dims")
        return apply_rotary(x, self.angles(positions))
