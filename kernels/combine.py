"""The gated combination o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (docs/semantics.md; the NSA
paper, Eq. 5), fused.

Forward reads the three branch outputs once; backward reads dO and the branch outputs once and
writes the three branch gradients and dgates (and, for nsa_core, each branch's softmax-backward
delta). Rows are (token, query head) pairs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import COMBINE_ROWS
from .delta import row_tile


@triton.jit
def _combine_fwd(G_, C, S, W, O, num_rows, DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows, row_ok, mask, offs = row_tile(num_rows, DV, BLOCK_R, BLOCK_DV)
    g_cmp = tl.load(G_ + rows * 3, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(G_ + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(G_ + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    out = g_cmp[:, None] * tl.load(C + offs, mask=mask, other=0.0).to(tl.float32)
    out += g_slc[:, None] * tl.load(S + offs, mask=mask, other=0.0).to(tl.float32)
    out += g_win[:, None] * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _branch_bwd(G_, OUT, D_OUT, DG, DELTA, do, rows, row_ok, mask, offs, branch: tl.constexpr, num_rows,
                WITH_DELTA: tl.constexpr):
    """One branch b of the combination's backward: d_b = g_b * dO, dgates_b = rowsum(dO * o_b), and with
    WITH_DELTA delta_b = rowsum(d_b * o_b) from d_b as stored (so that it matches the d_b the branch's
    backward reads) into DELTA[b]."""
    gate = tl.load(G_ + rows * 3 + branch, mask=row_ok, other=0.0).to(tl.float32)
    out = tl.load(OUT + offs, mask=mask, other=0.0).to(tl.float32)
    d_out = (gate[:, None] * do).to(D_OUT.dtype.element_ty)
    tl.store(D_OUT + offs, d_out, mask=mask)
    tl.store(DG + rows * 3 + branch, tl.sum(do * out, 1), mask=row_ok)
    if WITH_DELTA:
        tl.store(DELTA + branch * num_rows + rows, tl.sum(d_out.to(tl.float32) * out, 1), mask=row_ok)


@triton.jit
def _combine_bwd(G_, C, S, W, DO, DG, DC, DS, DW, DELTA, num_rows,
                 DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, WITH_DELTA: tl.constexpr):
    rows, row_ok, mask, offs = row_tile(num_rows, DV, BLOCK_R, BLOCK_DV)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    _branch_bwd(G_, C, DC, DG, DELTA, do, rows, row_ok, mask, offs, 0, num_rows, WITH_DELTA)
    _branch_bwd(G_, S, DS, DG, DELTA, do, rows, row_ok, mask, offs, 1, num_rows, WITH_DELTA)
    _branch_bwd(G_, W, DW, DG, DELTA, do, rows, row_ok, mask, offs, 2, num_rows, WITH_DELTA)


def combine_forward(gates, cmp_out, slc_out, win_out):
    """gates [T, H, 3]; cmp / slc / win [T, H, d_v] (contiguous, one dtype) -> out [T, H, d_v]."""
    out = torch.empty_like(cmp_out)
    num_rows, dv = cmp_out.shape[0] * cmp_out.shape[1], cmp_out.shape[2]
    if num_rows:
        _combine_fwd[(triton.cdiv(num_rows, COMBINE_ROWS),)](
            G_=gates, C=cmp_out, S=slc_out, W=win_out, O=out, num_rows=num_rows, DV=dv, BLOCK_R=COMBINE_ROWS,
            BLOCK_DV=triton.next_power_of_2(dv), num_warps=4)
    return out


def combine_backward(gates, cmp_out, slc_out, win_out, grad_out, with_delta=False):
    """(dgates [T, H, 3] float32, d_cmp, d_slc, d_win, delta) from dO [T, H, d_v] (contiguous). With
    `with_delta`, delta [3, T, H] float32 holds each branch's rowsum(d_b * o_b), the term its attention
    backward needs first (else None)."""
    num_rows, dv = cmp_out.shape[0] * cmp_out.shape[1], cmp_out.shape[2]
    d_gates = torch.empty(gates.shape, device=gates.device, dtype=torch.float32)
    d_cmp, d_slc, d_win = torch.empty_like(cmp_out), torch.empty_like(slc_out), torch.empty_like(win_out)
    delta = torch.empty(3, *cmp_out.shape[:2], device=gates.device, dtype=torch.float32) if with_delta else None
    if num_rows:
        _combine_bwd[(triton.cdiv(num_rows, COMBINE_ROWS),)](
            G_=gates, C=cmp_out, S=slc_out, W=win_out, DO=grad_out, DG=d_gates, DC=d_cmp, DS=d_slc, DW=d_win,
            DELTA=delta, num_rows=num_rows, DV=dv, BLOCK_R=COMBINE_ROWS, BLOCK_DV=triton.next_power_of_2(dv),
            WITH_DELTA=with_delta, num_warps=4)
    return d_gates, d_cmp, d_slc, d_win, delta


class GatedCombine(torch.autograd.Function):
    """gates [T, H, 3]; cmp / slc / win [T, H, d_v] (contiguous, one dtype) -> [T, H, d_v]."""

    @staticmethod
    def forward(ctx, gates, cmp_out, slc_out, win_out):
        ctx.save_for_backward(gates, cmp_out, slc_out, win_out)
        return combine_forward(gates, cmp_out, slc_out, win_out)

    @staticmethod
    def backward(ctx, grad_out):
        gates, cmp_out, slc_out, win_out = ctx.saved_tensors
        d_gates, d_cmp, d_slc, d_win, _ = combine_backward(gates, cmp_out, slc_out, win_out, grad_out.contiguous())
        return d_gates.to(gates.dtype), d_cmp, d_slc, d_win


def gated_combine(gates, cmp_out, slc_out, win_out):
    return GatedCombine.apply(gates.contiguous(), cmp_out.contiguous(), slc_out.contiguous(), win_out.contiguous())
