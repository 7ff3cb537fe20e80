"""delta = rowsum(dO * O) in float32, the softmax-backward term every attention backward needs first.

One pass over dO and O in their own dtype; no full-size float32 temporaries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import ROW_DOT_ROWS


@triton.jit
def row_tile(num_rows, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_R rows of a contiguous [num_rows, D] tensor: (rows [BLOCK_R] int64, row_ok
    [BLOCK_R], mask [BLOCK_R, BLOCK_D], element offsets [BLOCK_R, BLOCK_D])."""
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    return rows, row_ok, row_ok[:, None] & (cols[None, :] < D), rows[:, None] * D + cols[None, :]


@triton.jit
def _row_dot(A, B, OUT, num_rows, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, mask, offs = row_tile(num_rows, D, BLOCK_R, BLOCK_D)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + rows, tl.sum(a * b, 1), mask=row_ok)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) in float32 for two tensors of one shape [..., D]; returns [...]."""
    if a.shape != b.shape:
        raise ValueError(f"row_dot needs two tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[:-1], device=a.device, dtype=torch.float32)
    num_rows, dim = out.numel(), a.shape[-1]
    if num_rows:
        _row_dot[(triton.cdiv(num_rows, ROW_DOT_ROWS),)](A=a, B=b, OUT=out, num_rows=num_rows, D=dim,
                                                        BLOCK_R=ROW_DOT_ROWS, BLOCK_D=triton.next_power_of_2(dim))
    return out


def row_dot_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The oracle for row_dot."""
    return (a.float() * b.float()).sum(-1)
