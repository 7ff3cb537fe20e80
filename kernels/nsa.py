"""NSA on packed sequences with the Triton kernels: the three branches and the gated combination.

One autograd function runs them all, so that the backward shares work between them: the gated
combination's backward, which holds each branch's d_b and o_b anyway, also gives each branch its
delta = rowsum(d_b * o_b) (no pass over d_b and o_b per branch), and the three dQ kernels add into
one dQ tensor in turn (no dQ per branch and no sums of them).
"""
from __future__ import annotations

import torch

from .band import band_backward, band_forward
from .combine import combine_backward, combine_forward
from .layout import Layout
from .params import KernelParams
from .selected import selected_backward, selected_forward
from .topk import select_blocks


class NSACore(torch.autograd.Function):
    """Arguments as nsa_core's, with the K/V pairs unpacked. Returns out and, not differentiable, the
    branch outputs, their lse and the selected blocks."""

    @staticmethod
    def forward(ctx, q, k_slc, v_slc, k_win, v_win, compressed_k, compressed_v, gates, layout, params):
        cmp_out, cmp_lse = band_forward(q, compressed_k, compressed_v, layout, "compressed", params)
        selected_block_idx = select_blocks(q, compressed_k, cmp_lse, layout, params)
        slc_out, slc_lse, (union_tokens, union) = selected_forward(q, k_slc, v_slc, selected_block_idx, layout,
                                                                   params)
        win_out, win_lse = band_forward(q, k_win, v_win, layout, "window", params)
        out = combine_forward(gates, cmp_out, slc_out, win_out)
        ctx.save_for_backward(q, k_slc, v_slc, k_win, v_win, compressed_k, compressed_v, gates, cmp_out, cmp_lse,
                              slc_out, slc_lse, win_out, win_lse, selected_block_idx, union)
        ctx.layout, ctx.params, ctx.union_tokens = layout, params, union_tokens
        intermediates = (cmp_out, cmp_lse, slc_out, slc_lse, win_out, win_lse, selected_block_idx)
        ctx.mark_non_differentiable(*intermediates)
        ctx.set_materialize_grads(False)  # no zero gradients for the intermediates (three of them out's size)
        return (out,) + intermediates

    @staticmethod
    def backward(ctx, grad_out, *unused_grads):
        (q, k_slc, v_slc, k_win, v_win, compressed_k, compressed_v, gates, cmp_out, cmp_lse, slc_out, slc_lse,
         win_out, win_lse, selected_block_idx, union) = ctx.saved_tensors
        layout, params = ctx.layout, ctx.params
        d_gates, d_cmp, d_slc, d_win, delta = combine_backward(gates, cmp_out, slc_out, win_out,
                                                               grad_out.contiguous(), with_delta=True)
        # window first, compressed last (as autograd would order the branches): the compressed branch's
        # dK/dV per query head then runs after the other branches' dO are freed
        dq, dk_win, dv_win = band_backward(q, k_win, v_win, layout, "window", params, d_win, win_lse, delta[2])
        del d_win  # each branch's dO is freed once its backward is done
        _, dk_slc, dv_slc = selected_backward(q, k_slc, v_slc, selected_block_idx, layout, params, d_slc, slc_lse,
                                              delta[1], forward_union=(ctx.union_tokens, union), dq=dq)
        del d_slc
        _, d_compressed_k, d_compressed_v = band_backward(q, compressed_k, compressed_v, layout, "compressed", params,
                                                          d_cmp, cmp_lse, delta[0], dq=dq)
        return (dq, dk_slc, dv_slc, dk_win, dv_win, d_compressed_k, d_compressed_v, d_gates.to(gates.dtype),
                None, None)


def nsa_core(q, kv_slc, kv_win, compressed_kv, gates, layout: Layout, params: KernelParams,
             return_intermediates: bool = False):
    """q [T, H_q, d_k]; kv_slc / kv_win (k [T, H_kv, d_k], v [T, H_kv, d_v]); compressed_kv
    (k [N_cmp, H_kv, d_k], v [N_cmp, H_kv, d_v]) packed per document as the layout's compressed keys;
    gates [T, H_q, 3]; layout: packed_documents(...).

    Returns out [T, H_q, d_v] (and a dict of per-branch results when asked).
    """
    tensors = [t.contiguous() for t in (q, *kv_slc, *kv_win, *compressed_kv, gates)]
    out, *intermediates = NSACore.apply(*tensors, layout, params)
    if not return_intermediates:
        return out
    names = ("cmp_out", "cmp_lse", "slc_out", "slc_lse", "win_out", "win_lse", "selected_block_idx")
    return out, dict(zip(names, intermediates))


__all__ = ["nsa_core"]
