"""'allgather' exchange: the selection K/V of the whole sequence, gathered asynchronously from the
layer's entry, KV heads a group at a time; backward gathers them again, runs the selected-attention
backward from the forward's log-sum-exp and reduce-scatters dK/dV. Memory O(sequence) per head group,
fewest steps: the default for context-parallel groups inside one node.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from ..segments import CPPlan
from .base import KVExchange, PendingGather, head_groups, reduce_scatter_chunks, softmax_delta, start_chunk_gather


@dataclasses.dataclass
class _SelectionRun:
    """State of one layer call's selection branch, shared by forward, the backward prefetch and backward."""

    exchange: "AllGatherExchange"
    plan: CPPlan
    branches: object
    config: object
    scale: float
    head_groups: List[Tuple[int, int]]  # KV-head ranges [h0, h1)
    k: torch.Tensor  # local [B, 2c, H_kv, d_k], detached
    v: torch.Tensor
    pending: Optional[Tuple[PendingGather, PendingGather]] = None

    def start(self, group: int, kind: str) -> Tuple[PendingGather, PendingGather]:
        h0, h1 = self.head_groups[group]
        counts = [self.plan.chunk_len] * self.plan.layout.num_chunks
        comm, layout = self.exchange.comm, self.plan.layout
        # [2c, B, h, D]: sequence-major, so that each rank's share is one contiguous block
        return tuple(start_chunk_gather(comm, layout, x[:, :, h0:h1].transpose(0, 1).contiguous(), counts, kind)
                     for x in (self.k, self.v))

    def prefetch_for_backward(self) -> None:
        if self.pending is None:
            self.pending = self.start(0, "selection bwd gather")

    def take_pending(self, kind: str) -> Tuple[PendingGather, PendingGather]:
        pending, self.pending = self.pending, None
        return pending if pending is not None else self.start(0, kind)

    def segments(self):
        """Per segment: (segment, its queries' rows in the local [2c] axis, its document's rows in the
        global [S] axis)."""
        for seg in self.plan.segments:
            yield seg, seg.local_slice(self.plan.chunk_len), slice(seg.doc_start, seg.doc_end)

    def attend(self, seg, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor):
        """Selected attention of one segment's queries q [Tq, G*h, d_k] (block ids idx [Tq, h, n]) over
        its document's k [T_doc, h, d_k], v [T_doc, h, d_v] of one KV-head group. Returns
        (out [Tq, G*h, d_v], lse [Tq, G*h])."""
        return self.branches.selected_attention(q, k, v, idx, seg.query_positions(q.device), self.config, self.scale)

    def attend_backward(self, seg, q, k, v, idx, grad_out, lse, delta):
        """(dq, dk, dv) of attend's arguments from its grad_out, its lse and delta = rowsum(grad_out * out)."""
        return self.branches.selected_attention_backward(q, k, v, idx, seg.query_positions(q.device), self.config,
                                                         self.scale, grad_out, lse, delta)


class _AllGatherSelected(torch.autograd.Function):
    """Selection branch over the gathered sequence, head group by head group.

    Forward waits for group g's gather and starts group g+1's before attending; it keeps the
    output and each query's log-sum-exp (float32, [B, 2c, H_q]), not the gathered K/V. Backward
    gathers them again and runs the selected-attention backward segment by segment from that lse
    and delta = rowsum(dO * O) (Branches.selected_attention_backward: fused with the Triton
    branches, nothing of the forward recomputed), then reduce-scatters the gathered dK/dV back to
    their owners.
    """

    @staticmethod
    def forward(ctx, run: _SelectionRun, q, k, v, idx):
        groups = run.head_groups
        group_size = q.shape[2] // k.shape[2]
        out = q.new_empty(*q.shape[:3], v.shape[3])  # [B, 2c, H_q, d_v]: segments tile the local rows
        lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))  # [B, 2c, H_q]
        pending = run.take_pending("selection fwd")
        for g, (h0, h1) in enumerate(groups):
            k_full, v_full = (p.wait() for p in pending)
            if g + 1 < len(groups):
                pending = run.start(g + 1, "selection fwd")
            heads = slice(h0 * group_size, h1 * group_size)
            for seg, rows, doc in run.segments():
                q_rows = (seg.row, rows, heads)
                out[q_rows], lse[q_rows] = run.attend(seg, q[q_rows], k_full[doc, seg.row], v_full[doc, seg.row],
                                                      idx[seg.row, rows, h0:h1])
            del k_full, v_full
        ctx.run = run
        ctx.save_for_backward(q, k, v, idx, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        run = ctx.run
        q, k, v, idx, out, lse = ctx.saved_tensors
        comm, layout, chunk_len = run.exchange.comm, run.plan.layout, run.plan.chunk_len
        counts = [chunk_len] * layout.num_chunks
        group_size = q.shape[2] // k.shape[2]
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        delta = softmax_delta(grad_out, out)  # [B, 2c, H_q]
        pending = run.take_pending("selection bwd gather")
        for g, (h0, h1) in enumerate(run.head_groups):
            k_full, v_full = (p.wait() for p in pending)
            if g + 1 < len(run.head_groups):
                pending = run.start(g + 1, "selection bwd gather")
            heads = slice(h0 * group_size, h1 * group_size)
            grad_k_full, grad_v_full = torch.zeros_like(k_full), torch.zeros_like(v_full)  # [S, B, h, d]
            for seg, rows, doc in run.segments():
                q_rows = (seg.row, rows, heads)
                dq, dk, dv = run.attend_backward(seg, q[q_rows], k_full[doc, seg.row], v_full[doc, seg.row],
                                                 idx[seg.row, rows, h0:h1], grad_out[q_rows], lse[q_rows],
                                                 delta[q_rows])
                grad_q[q_rows] = dq  # segments' query rows are disjoint and tile the local rows
                # Accumulate: the rank's two chunks can hold two segments of one document, both reading its K/V.
                grad_k_full[doc, seg.row] += dk
                grad_v_full[doc, seg.row] += dv
            del k_full, v_full
            for grad_local, grad_full in ((grad_k, grad_k_full), (grad_v, grad_v_full)):
                mine = reduce_scatter_chunks(comm, layout, grad_full, counts, chunk_len, "selection bwd reduce-scatter")
                grad_local[:, :, h0:h1] = mine.transpose(0, 1)
            del grad_k_full, grad_v_full
        return None, grad_q, grad_k, grad_v, None


class AllGatherExchange(KVExchange):
    mode = "allgather"

    def begin_selection(self, k, v, plan, branches, config, scale, head_group_size):
        groups = head_groups(k.shape[2], head_group_size)
        run = _SelectionRun(self, plan, branches, config, scale, groups, k.detach(), v.detach())
        run.pending = run.start(0, "selection fwd")
        return run

    def selected_attention(self, q, k, v, selected_block_idx, handle):
        return _AllGatherSelected.apply(handle, q, k, v, selected_block_idx)

    def on_output(self, out, handle) -> None:
        """Start re-gathering the first head group as soon as backward reaches the layer output."""
        if out.requires_grad:
            out.register_hook(lambda grad: handle.prefetch_for_backward())
