"""How remote K/V reach a rank: one small interface, `KVExchange`, with one mode per class.

Every mode gathers the compressed K/V in global order (every rank needs all of them before top-n
scoring). Modes differ in how the selection branch gets its keys:

- 'allgather' (here): the selection K/V of the whole sequence, gathered asynchronously from the
  layer's entry, KV heads a group at a time; backward re-gathers them, runs the selected-attention
  backward from the forward's log-sum-exp and reduce-scatters dK/dV.
- 'ring' (exchange_ring.py): K/V chunks travel a ring of point-to-point transfers while each rank
  attends to the visiting chunk, merging partial results by log-sum-exp; memory O(chunk).
- 'hierarchical' (exchange_hierarchical.py): all-gather inside a node, ring across nodes.
- 'fetch' (exchange_fetch.py, when present): each rank fetches only the blocks its queries selected.

Each mode subclasses KVExchange and implements begin_selection / selected_attention;
`build_exchange` is the registry.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib.util
from typing import List, Optional, Sequence, Tuple

import torch

from .comm import Communicator
from .layout import LoadBalancedLayout
from .segments import CPPlan

_FETCH_MODULE = __name__ + "_fetch"
# Modes that make_exchange builds; 'fetch' while its module is missing is only planned.
PLANNED_EXCHANGE_MODES = () if importlib.util.find_spec(_FETCH_MODULE) is not None else ("fetch",)
EXCHANGE_MODES = tuple(m for m in ("allgather", "ring", "fetch", "hierarchical") if m not in PLANNED_EXCHANGE_MODES)


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


def check_exchange_mode(mode) -> None:
    """Raise for a mode name make_exchange cannot build, naming it and the allowed ones."""
    if mode in PLANNED_EXCHANGE_MODES:
        raise NotImplementedError(f"exchange mode {mode!r} is planned but not implemented; available: {EXCHANGE_MODES}")
    if mode not in EXCHANGE_MODES:
        raise ValueError(f"exchange={mode!r} is not allowed; choose one of {EXCHANGE_MODES} or a KVExchange object")


def build_exchange(mode: str, comm: Communicator, node_size: Optional[int] = None) -> KVExchange:
    """The KVExchange of `mode` on a given Communicator (e.g. a LocalCommunicator for timing).

    node_size: CP ranks per node, for 'hierarchical' only (a divisor of the CP size); ignored otherwise.
    """
    check_exchange_mode(mode)
    if mode == "allgather":
        return AllGatherExchange(comm)
    if mode == "ring":
        from .exchange_ring import RingExchange

        return RingExchange(comm)
    if mode == "hierarchical":
        from .exchange_hierarchical import HierarchicalExchange

        return HierarchicalExchange(comm, node_size)
    fetch = importlib.import_module(_FETCH_MODULE)
    return fetch.FetchExchange(comm)


def make_exchange(mode, cp_group, node_size: Optional[int] = None) -> KVExchange:
    """A KVExchange for `mode` (one of EXCHANGE_MODES, or a KVExchange object, returned as is) on cp_group."""
    if isinstance(mode, KVExchange):
        return mode
    check_exchange_mode(mode)
    return build_exchange(mode, Communicator(cp_group), node_size)


# ---------------------------------------------------------------------------------------------
# 'allgather'


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


# Values of a [rows, H_q, d_v] part of the local rows: bounds the float32 temporaries of delta here and, in
# exchange_ring.py, of merging partial outputs (forward) and of the per-call gradients (backward).
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
