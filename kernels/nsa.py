"""NSA on packed sequences with the Triton kernels: the three branches and the gated combination.

One autograd function runs them all, so that the backward shares work between them: the gated
combination's backward, which holds each branch's d_b and o_b anyway, also gives each branch its
delta = rowsum(d_b * o_b) (no pass over d_b and o_b per branch), and the three dQ kernels add into
one dQ tensor in turn (no dQ per branch and no sums of them).

On the GPU the branches' independent kernels can run on two CUDA streams (launch parameter STREAMS of
"branches", kernels/tuning.py): the window forward beside the compressed -> top-n -> selected chain,
and the three dK/dV kernels beside the three dQ kernels. The selected kernels are bound by memory
bandwidth and the others by the matrix units, so a pair shares the GPU better than either alone. Each
kernel computes what it computes alone, and dQ is summed in the same order: the result is bitwise the
one-stream result.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from .band import band_backward_dkdv, band_backward_dq, band_forward
from .combine import combine_backward, combine_forward
from .layout import Layout
from .params import KernelParams
from .selected import selected_backward_dkdv, selected_backward_dq, selected_forward
from .topk import select_blocks
from .tuning import launch_params

_side_streams: Dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> Optional[torch.cuda.Stream]:
    """The stream the independent branch kernels run on beside the current one, or None to run
    everything on the current stream (not a CUDA device, or STREAMS=1)."""
    if device.type != "cuda" or launch_params("branches", 0)["STREAMS"] < 2:
        return None
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]


@contextlib.contextmanager
def _beside(side: Optional[torch.cuda.Stream]) -> Iterator[None]:
    """Run the block's kernels on `side` after the work queued so far on the current stream (or on the
    current stream when side is None). Tensors made in the block must go through _join afterwards."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def _join(side: Optional[torch.cuda.Stream], *tensors: torch.Tensor) -> None:
    """Let the current stream wait for `side`'s work, and keep the memory of the tensors made there from
    being reused before the current stream is done with them."""
    if side is None:
        return
    current = torch.cuda.current_stream(side.device)
    current.wait_stream(side)
    for tensor in tensors:
        tensor.record_stream(current)


class NSACore(torch.autograd.Function):
    """Arguments as nsa_core's, with the K/V pairs unpacked. Returns out and, not differentiable, the
    branch outputs, their lse and the selected blocks."""

    @staticmethod
    def forward(ctx, q, k_slc, v_slc, k_win, v_win, compressed_k, compressed_v, gates, layout, params):
        side = _side_stream(q.device)
        with _beside(side):
            win_out, win_lse = band_forward(q, k_win, v_win, layout, "window", params)
        cmp_out, cmp_lse = band_forward(q, compressed_k, compressed_v, layout, "compressed", params)
        selected_block_idx = select_blocks(q, compressed_k, cmp_lse, layout, params)
        slc_out, slc_lse, (union_tokens, union) = selected_forward(q, k_slc, v_slc, selected_block_idx, layout,
                                                                   params)
        _join(side, win_out, win_lse)
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
        side = _side_stream(q.device)
        # dK/dV of the three branches (beside the dQ kernels when there is a side stream; the compressed
        # branch's first, the longest to pair with the selected dQ's memory-bound walk)
        with _beside(side):
            d_compressed_k, d_compressed_v = band_backward_dkdv(q, compressed_k, compressed_v, layout, "compressed",
                                                                params, d_cmp, cmp_lse, delta[0])
            dk_win, dv_win = band_backward_dkdv(q, k_win, v_win, layout, "window", params, d_win, win_lse, delta[2])
            dk_slc, dv_slc = selected_backward_dkdv(q, k_slc, v_slc, selected_block_idx, layout, params, d_slc,
                                                    slc_lse, delta[1])
        # dQ: the window's, then the selected and the compressed branches' added to it in turn
        dq = band_backward_dq(q, k_win, v_win, layout, "window", params, d_win, win_lse, delta[2])
        dq = selected_backward_dq(q, k_slc, v_slc, selected_block_idx, layout, params, d_slc, slc_lse, delta[1],
                                  forward_union=(ctx.union_tokens, union), dq=dq)
        dq = band_backward_dq(q, compressed_k, compressed_v, layout, "compressed", params, d_cmp, cmp_lse, delta[0],
                              dq=dq)
        _join(side, d_compressed_k, d_compressed_v, dk_win, dv_win, dk_slc, dv_slc)
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
