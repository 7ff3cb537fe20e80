"""The qk head dim d_k as two power-of-two column parts, so that d_k = 192 costs 192 columns, not 256.

Triton tiles have power-of-two widths. Part a is the largest power of two <= d_k (DK_A), part b
covers the rest, padded to a power of two and masked to d_k (DK_B): 192 = 128 + 64, 96 = 64 + 32,
48 = 32 + 16. DK_B = 0 when d_k is a power of two: part b is then compiled out and stands as the
scalar 0 wherever a helper returns it. Both parts are at least 16 wide (a GPU dot's smallest inner
dimension), so 24 = 16 + 16 with 8 of part b's columns used, and d_k < 16 is one part of 16.

Q K^T is the sum of the parts' dots; dQ and dK are accumulated, and stored, part by part.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .constants import MIN_PART


def qk_parts(head_dim: int) -> dict:
    """{'DK_A': width of part a, 'DK_B': width of part b or 0} for a qk head dim."""
    part_a = max(MIN_PART, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - part_a
    return dict(DK_A=part_a, DK_B=max(MIN_PART, triton.next_power_of_2(rest)) if rest > 0 else 0)


def tile_width(head_dim_qk: int, head_dim_v: int = 1) -> int:
    """Columns of a kernel's widest row tile (Q's parts together, or d_v padded): what launch_params keys on."""
    parts = qk_parts(head_dim_qk)
    return max(parts["DK_A"] + parts["DK_B"], triton.next_power_of_2(head_dim_v))


@triton.jit
def load_qk(row_ptrs, row_ok, DK: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr):
    """Rows [R, d_k] starting at row_ptrs [R] as (part a [R, DK_A], part b [R, DK_B] or 0); 0 where not row_ok."""
    cols_a = tl.arange(0, DK_A)
    part_a = tl.load(row_ptrs[:, None] + cols_a[None, :], mask=row_ok[:, None] & (cols_a[None, :] < DK), other=0.0)
    part_b = 0.0
    if DK_B > 0:
        cols_b = DK_A + tl.arange(0, DK_B)
        part_b = tl.load(row_ptrs[:, None] + cols_b[None, :], mask=row_ok[:, None] & (cols_b[None, :] < DK),
                         other=0.0)
    return part_a, part_b


@triton.jit
def store_qk(row_ptrs, part_a, part_b, row_ok, DK: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr):
    """Store the parts of rows [R, d_k] at row_ptrs [R] (in the pointers' dtype), where row_ok."""
    cols_a = tl.arange(0, DK_A)
    tl.store(row_ptrs[:, None] + cols_a[None, :], part_a.to(row_ptrs.dtype.element_ty),
             mask=row_ok[:, None] & (cols_a[None, :] < DK))
    if DK_B > 0:
        cols_b = DK_A + tl.arange(0, DK_B)
        tl.store(row_ptrs[:, None] + cols_b[None, :], part_b.to(row_ptrs.dtype.element_ty),
                 mask=row_ok[:, None] & (cols_b[None, :] < DK))


@triton.jit
def store_or_add_qk(row_ptrs, part_a, part_b, row_ok, DK: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr,
                    ADD: tl.constexpr):
    """store_qk, or with ADD the rows already there plus the parts (in float32, then stored in the
    pointers' dtype): one kernel adds its share of a gradient that another wrote first."""
    if ADD:
        old_a, old_b = load_qk(row_ptrs, row_ok, DK, DK_A, DK_B)
        part_a += old_a.to(tl.float32)
        if DK_B > 0:
            part_b += old_b.to(tl.float32)
    store_qk(row_ptrs, part_a, part_b, row_ok, DK, DK_A, DK_B)


@triton.jit
def zeros_qk(ROWS: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr):
    """fp32 accumulators for the parts of rows [ROWS, d_k]."""
    part_b = 0.0
    if DK_B > 0:
        part_b = tl.zeros([ROWS, DK_B], tl.float32)
    return tl.zeros([ROWS, DK_A], tl.float32), part_b


@triton.jit
def dot_qk(q_a, q_b, k_a, k_b, DK_B: tl.constexpr):
    """q @ k^T [R, N] (fp32) for q [R, d_k] and k [N, d_k] given as parts."""
    s = tl.dot(q_a, tl.trans(k_a))
    if DK_B > 0:
        s = tl.dot(q_b, tl.trans(k_b), s)
    return s


@triton.jit
def acc_qk(acc_a, acc_b, p, x_a, x_b, DK_B: tl.constexpr):
    """The parts of acc + p @ x, for p [R, N] and acc [R, d_k], x [N, d_k] given as parts."""
    acc_a = tl.dot(p, x_a, acc_a)
    if DK_B > 0:
        acc_b = tl.dot(p, x_b, acc_b)
    return acc_a, acc_b
