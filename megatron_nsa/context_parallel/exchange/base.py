"""What every K/V exchange shares: the `KVExchange` interface, the chunk-ordered all-gather of
compressed tokens and its reduce-scatter, and the helpers the modes build on (slot packing, KV-head
groups, the backward's delta). Each mode lives in a module of its own (allgather.py, ring.py,
hierarchical.py, fetch.py); the package's __init__ holds the registry.
"""
from __future__ import annotations

import abc
from typing import List, Sequence, Tuple

import torch

from ..comm import Communicator
from ..layout import LoadBalancedLayout
from ..segments import CPPlan


# ---------------------------------------------------------------------------------------------
# Chunk-ordered all-gather and its reduce-scatter


def global_chunk_rows(layout: LoadBalancedLayout, counts: Sequence[int], slot_rows: int, device) -> torch.Tensor:
    """Rows of a rank-major gather buffer [C * 2 * slot_rows] that form the global sequence.

    Chunk j holds counts[j] valid rows at the start of its owner's slot; the result lists them
    chunk after chunk, [sum(counts)] int64.
    """
    order = layout.rank_major_chunk_order()
    return torch.cat([order[j] * slot_rows + torch.arange(counts[j], device=device) for j in range(len(counts))])


class PendingGather:
    """An all-gather in flight; wait() returns the gathered tensor in global order."""

    def __init__(self, received: torch.Tensor, work, rows: torch.Tensor):
        self.received, self.work, self.rows = received, work, rows

    def wait(self) -> torch.Tensor:
        self.work.wait()
        gathered = self.received.index_select(0, self.rows)
        self.received = None
        return gathered


def start_chunk_gather(comm: Communicator, layout: LoadBalancedLayout, local: torch.Tensor, counts: Sequence[int],
                       kind: str, async_op: bool = True) -> PendingGather:
    """Gather local [2 * slot_rows, ...] (slot 0 rows, then slot 1 rows, zero-padded) from every rank."""
    received = local.new_empty(comm.size * local.shape[0], *local.shape[1:])
    work = comm.all_gather(received, local, kind, async_op=async_op)
    return PendingGather(received, work, global_chunk_rows(layout, counts, local.shape[0] // 2, local.device))


def reduce_scatter_chunks(comm: Communicator, layout: LoadBalancedLayout, grad: torch.Tensor, counts: Sequence[int],
                          slot_rows: int, kind: str) -> torch.Tensor:
    """Backward of the chunk gather: grad [sum(counts), ...] in global order -> this rank's [2 * slot_rows, ...]."""
    rows = global_chunk_rows(layout, counts, slot_rows, grad.device)
    full = grad.new_zeros(comm.size * 2 * slot_rows, *grad.shape[1:])
    full.index_copy_(0, rows, grad)
    mine = grad.new_empty(2 * slot_rows, *grad.shape[1:])
    comm.reduce_scatter(mine, full, kind)
    return mine


def pack_slots(slot0: torch.Tensor, slot1: torch.Tensor, slot_rows: int) -> torch.Tensor:
    """[n0, ...], [n1, ...] -> [2 * slot_rows, ...], each slot zero-padded to slot_rows."""
    packed = slot0.new_zeros(2 * slot_rows, *slot0.shape[1:])
    packed[:slot0.shape[0]] = slot0
    packed[slot_rows:slot_rows + slot1.shape[0]] = slot1
    return packed


def head_groups(num_kv_heads: int, head_group_size: int) -> List[Tuple[int, int]]:
    """KV-head ranges [h0, h1) of at most head_group_size heads, exchanged one after the other."""
    step = min(head_group_size, num_kv_heads)
    return [(h0, min(h0 + step, num_kv_heads)) for h0 in range(0, num_kv_heads, step)]


class _GatherCompressed(torch.autograd.Function):
    """Compressed tokens of both local chunks -> all compressed tokens in global order (differentiable)."""

    @staticmethod
    def forward(ctx, comm, plan: CPPlan, slot0, slot1):
        counts = plan.chunk_cmp_counts
        slot_rows = max(counts)
        ctx.comm, ctx.plan, ctx.slot_rows, ctx.sizes = comm, plan, slot_rows, (slot0.shape[0], slot1.shape[0])
        local = pack_slots(slot0, slot1, slot_rows)
        return start_chunk_gather(comm, plan.layout, local, counts, "compressed fwd", async_op=False).wait()

    @staticmethod
    def backward(ctx, grad):
        mine = reduce_scatter_chunks(ctx.comm, ctx.plan.layout, grad.contiguous(), ctx.plan.chunk_cmp_counts,
                                     ctx.slot_rows, "compressed bwd")
        n0, n1 = ctx.sizes
        return None, None, mine[:n0], mine[ctx.slot_rows:ctx.slot_rows + n1]


# ---------------------------------------------------------------------------------------------
# The interface


class KVExchange(abc.ABC):
    """Moves K/V between the ranks of one context-parallel group (see the module docstring)."""

    mode: str

    def __init__(self, comm: Communicator):
        self.comm = comm

    def gather_compressed(self, slot0: torch.Tensor, slot1: torch.Tensor, plan: CPPlan) -> torch.Tensor:
        """Compressed tokens whose last token is in this rank's chunks ([n0, ...], [n1, ...]) ->
        every compressed token in global order, [plan.num_cmp, ...]. Differentiable."""
        return _GatherCompressed.apply(self.comm, plan, slot0, slot1)

    @abc.abstractmethod
    def begin_selection(self, k: torch.Tensor, v: torch.Tensor, plan: CPPlan, branches, config, scale: float,
                        head_group_size: int):
        """Called at the layer's entry with the local selection-branch k [B, 2c, H_kv, d_k], v [.., d_v]:
        start moving them. Returns a handle for selected_attention."""

    @abc.abstractmethod
    def selected_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selected_block_idx: torch.Tensor,
                           handle) -> torch.Tensor:
        """The selection branch of the local queries q [B, 2c, H_q, d_k] with global block ids
        selected_block_idx [B, 2c, H_kv, n] (per document). Returns [B, 2c, H_q, d_v], differentiable
        in q, k, v."""

    def on_output(self, out: torch.Tensor, handle) -> None:
        """Called with the layer's gated output (e.g. to start backward communication early)."""


# ---------------------------------------------------------------------------------------------
# The backward's delta, shared by the modes


# Values of a [rows, H_q, d_v] part of the local rows: bounds the float32 temporaries of delta here and, in
# ring.py, of merging partial outputs (forward) and of the per-call gradients (backward).
ROW_PART_ELEMENTS = 1 << 25


def softmax_delta(grad_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """rowsum(grad_out * out) [B, T, H] of [B, T, H, d_v] tensors, in float32 (or wider): the term of the
    attention backward that needs the output. A part of the rows at a time, so that the float32
    temporaries stay small (whole, they are twice the size of the local queries' output)."""
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    delta = out.new_empty(out.shape[:-1], dtype=acc_dtype)
    step = max(1, ROW_PART_ELEMENTS // (out.shape[2] * out.shape[3]))
    for row in range(out.shape[0]):
        for lo in range(0, out.shape[1], step):
            rows = (row, slice(lo, lo + step))
            delta[rows] = (grad_out[rows].to(acc_dtype) * out[rows].to(acc_dtype)).sum(-1)
    return delta
