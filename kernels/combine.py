"""The gated combination o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (NSA_SPEC.md, Eq. 5), fused.

Forward reads the three branch outputs once; backward reads dO and the branch outputs once and
writes the three branch gradients and dgates. Rows are (token, query head) pairs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .delta import row_tile

# rows per program; the CPU interpreter pays per program, so it takes larger tiles
BLOCK_R = 256 if os.environ.get("TRITON_INTERPRET") == "1" else 16


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
def _combine_bwd(G_, C, S, W, DO, DG, DC, DS, DW, num_rows,
                 DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows, row_ok, mask, offs = row_tile(num_rows, DV, BLOCK_R, BLOCK_DV)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    g_cmp = tl.load(G_ + rows * 3, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(G_ + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(G_ + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(DC + offs, (g_cmp[:, None] * do).to(DC.dtype.element_ty), mask=mask)
    tl.store(DS + offs, (g_slc[:, None] * do).to(DS.dtype.element_ty), mask=mask)
    tl.store(DW + offs, (g_win[:, None] * do).to(DW.dtype.element_ty), mask=mask)
    tl.store(DG + rows * 3, tl.sum(do * tl.load(C + offs, mask=mask, other=0.0).to(tl.float32), 1), mask=row_ok)
    tl.store(DG + rows * 3 + 1, tl.sum(do * tl.load(S + offs, mask=mask, other=0.0).to(tl.float32), 1), mask=row_ok)
    tl.store(DG + rows * 3 + 2, tl.sum(do * tl.load(W + offs, mask=mask, other=0.0).to(tl.float32), 1), mask=row_ok)


class GatedCombine(torch.autograd.Function):
    """gates [T, H, 3]; cmp / slc / win [T, H, d_v] (contiguous, one dtype) -> [T, H, d_v]."""

    @staticmethod
    def forward(ctx, gates, cmp_out, slc_out, win_out):
        out = torch.empty_like(cmp_out)
        num_rows, dv = cmp_out.shape[0] * cmp_out.shape[1], cmp_out.shape[2]
        if num_rows:
            _combine_fwd[(triton.cdiv(num_rows, BLOCK_R),)](
                gates, cmp_out, slc_out, win_out, out, num_rows, DV=dv, BLOCK_R=BLOCK_R,
                BLOCK_DV=triton.next_power_of_2(dv), num_warps=4)
        ctx.save_for_backward(gates, cmp_out, slc_out, win_out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gates, cmp_out, slc_out, win_out = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        num_rows, dv = cmp_out.shape[0] * cmp_out.shape[1], cmp_out.shape[2]
        d_gates = torch.empty(gates.shape, device=gates.device, dtype=torch.float32)
        d_cmp, d_slc, d_win = torch.empty_like(cmp_out), torch.empty_like(slc_out), torch.empty_like(win_out)
        if num_rows:
            _combine_bwd[(triton.cdiv(num_rows, BLOCK_R),)](
                gates, cmp_out, slc_out, win_out, grad_out, d_gates, d_cmp, d_slc, d_win, num_rows,
                DV=dv, BLOCK_R=BLOCK_R, BLOCK_DV=triton.next_power_of_2(dv), num_warps=4)
        return d_gates.to(gates.dtype), d_cmp, d_slc, d_win


def gated_combine(gates, cmp_out, slc_out, win_out):
    return GatedCombine.apply(gates.contiguous(), cmp_out.contiguous(), slc_out.contiguous(), win_out.contiguous())
