"""'ring' exchange: selection K/V travel a ring of point-to-point transfers; memory O(chunk).

A rank's *piece* is its two chunks of selection K/V, [B, 2, h + c, H_group, d], each chunk
preceded by the h tokens before it (h = 0 unless packed documents start off the l' grid: then a
selection block may straddle a chunk edge, and h <= l'-1 halo tokens put every block whole in the
piece of the chunk holding its last token). Ranks form the ring r -> r+1. KV heads go round in
groups of head_group_size, one group's full ring after the other, so that the pieces in memory
hold only one group's heads; the next group's first transfer starts during the last step of the
one before.

Compressed tokens go first (every rank needs all of them before top-n): an all-gather done as C-1
ring steps of send/recv, blocking (S/d tokens: small); its backward is a ring reduce-scatter.

Forward, rank r, steps t = 0..C-1: the visiting piece is rank (r-t)'s. At the start of step t
rank r starts (one batch_isend_irecv) passing the visiting piece to r+1 and receiving the next
one from r-1; then it attends, per document piece of its queries and per visiting chunk, only to
the blocks its queries selected whose last token lies in that chunk (block ids and query
positions shifted to the keys' first block, other ids -1), and merges the partial (out_c, lse_c)
into the running (O, L) by log-sum-exp, a part of the query rows at a time (ROW_PART_ELEMENTS
bounds the float32 temporaries; O is kept in the output dtype, L in float32); then it waits for
the transfer. So the transfer of step t+1 runs under the attention of step t, and the first one
under the window and compressed branches (it starts in begin_selection). Memory: the local piece,
the visiting one, the arriving one, and O, L of the local queries; no buffer of the whole sequence.

Backward: the pieces go round again on the same schedule. With the merged L and
delta = rowsum(dO * O), P = exp(S - L) restricted to a piece's keys is that piece's share of the
whole softmax, so each piece's dQ, dK, dV come straight from the selected-attention backward
(Branches.selected_attention_backward) given L and delta: nothing of the forward is recomputed.
dQ stays local. The dK/dV accumulator of a piece follows the piece one step behind: while rank r
attends to the visiting piece it receives that piece's accumulator (the contributions of the
ranks it visited before, its owner's excepted) from r-1, adds its own contribution, and passes it
on at the next step; after the last step every rank receives the accumulator of its own piece and
adds its own contribution: C-1 transfers of dK/dV per piece, as in a ring reduce-scatter. Only
the last one of each head group is not hidden under attention.

'hierarchical' (hierarchical.py) runs the same schedule with nodes of m ranks in place
of ranks: at each step a node's m pieces are all-gathered inside the node, and each rank passes
only the one piece it carries across nodes, so that inter-node traffic per rank falls by m.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch

from ..branches import finite_or_zero
from ..comm import Communicator
from ..halo import exchange_halos
from ..segments import CPPlan
from .base import ROW_PART_ELEMENTS, KVExchange, global_chunk_rows, head_groups, pack_slots, softmax_delta

# ---------------------------------------------------------------------------------------------
# Compressed tokens: all-gather and reduce-scatter as C-1 ring steps


class _RingGatherCompressed(torch.autograd.Function):
    """Compressed tokens of both local chunks -> all compressed tokens in global order (differentiable)."""

    @staticmethod
    def forward(ctx, comm: Communicator, plan: CPPlan, slot0, slot1):
        counts = plan.chunk_cmp_counts
        slot_rows = max(counts)
        ctx.comm, ctx.plan, ctx.slot_rows, ctx.sizes = comm, plan, slot_rows, (slot0.shape[0], slot1.shape[0])
        size, rank = comm.size, comm.rank
        local = pack_slots(slot0, slot1, slot_rows)  # [2 * slot_rows, B, H, D]
        ranks = local.new_empty(size, *local.shape)  # rank-major, as an all-gather would fill it
        ranks[rank] = local
        for step in range(size - 1):  # pass on what arrived last step
            comm.exchange([(ranks[(rank - step) % size], (rank + 1) % size)],
                          [(ranks[(rank - step - 1) % size], (rank - 1) % size)], "compressed fwd")
        rows = global_chunk_rows(plan.layout, counts, slot_rows, local.device)
        return ranks.flatten(0, 1).index_select(0, rows)

    @staticmethod
    def backward(ctx, grad):
        comm, plan, slot_rows = ctx.comm, ctx.plan, ctx.slot_rows
        size, rank = comm.size, comm.rank
        rows = global_chunk_rows(plan.layout, plan.chunk_cmp_counts, slot_rows, grad.device)
        full = grad.new_zeros(size * 2 * slot_rows, *grad.shape[1:])
        full.index_copy_(0, rows, grad.contiguous())
        full = full.view(size, 2 * slot_rows, *grad.shape[1:])
        partial = full[(rank - 1) % size].clone()  # step s sends the partial sum of rank (r-s-1)'s rows
        for step in range(size - 1):
            arrived = torch.empty_like(partial)
            comm.exchange([(partial, (rank + 1) % size)], [(arrived, (rank - 1) % size)], "compressed bwd")
            partial = arrived.add_(full[(rank - step - 2) % size])
        n0, n1 = ctx.sizes
        return None, None, partial[:n0], partial[slot_rows:slot_rows + n1]


# ---------------------------------------------------------------------------------------------
# Who holds what


@dataclasses.dataclass(frozen=True)
class RingTopology:
    """C ranks in nodes of m consecutive ranks; rank r = node * m + local. A rank carries one piece
    across nodes: at step t, that of rank ((node - t) mod N) * m + local."""

    size: int
    rank: int
    node_size: int

    @property
    def num_nodes(self) -> int:
        return self.size // self.node_size

    @property
    def node(self) -> int:
        return self.rank // self.node_size

    @property
    def local(self) -> int:
        return self.rank % self.node_size

    @property
    def next_rank(self) -> int:
        return (self.rank + self.node_size) % self.size

    @property
    def prev_rank(self) -> int:
        return (self.rank - self.node_size) % self.size

    @property
    def node_ranks(self) -> List[int]:
        return [self.node * self.node_size + j for j in range(self.node_size)]

    @property
    def lag(self) -> int:
        """Steps between attending to a piece and passing its finished gradient accumulator on."""
        return 1 if self.node_size == 1 else 2

    def owner(self, step: int, local: int) -> int:
        """The rank whose piece node-rank `local` carries at `step`."""
        return ((self.node - step) % self.num_nodes) * self.node_size + local


def straddle_halo(plan: CPPlan, select_block_size: int) -> int:
    """Tokens before a chunk that a selection block ending in it may start at: max over chunk edges
    inside a document of (edge - document start) mod l'; 0 when documents start on the l' grid."""
    need = 0
    for start, end in plan.docs:
        for chunk in range(1, plan.layout.num_chunks):
            edge = plan.layout.chunk_start(chunk)
            if start < edge < end:
                need = max(need, (edge - start) % select_block_size)
    return need


@dataclasses.dataclass(frozen=True)
class PieceWork:
    """Local queries of one document piece against the blocks of one visiting chunk.

    Blocks [first_block, end_block) of the document (those whose last token is in the chunk,
    cut at the last query's block) are keys[...] of the piece's slot; the queries are rows (the
    segment's queries at or after block first_block), at q_pos relative to that block's start.
    """

    row: int
    rows: slice
    slot: int
    keys: slice
    first_block: int
    end_block: int
    q_pos: torch.Tensor

    def block_ids(self, selected_block_idx: torch.Tensor) -> torch.Tensor:
        """Document block ids [Tq, H_kv, n] -> ids within these keys, -1 for blocks elsewhere
        (neither backend needs the -1 at the end: each slot is read on its own)."""
        inside = (selected_block_idx >= self.first_block) & (selected_block_idx < self.end_block)
        return (selected_block_idx - self.first_block).masked_fill(~inside, -1)


def piece_work(plan: CPPlan, owner: int, halo: int, select_block_size: int, device) -> List[PieceWork]:
    """What this rank's queries attend to in rank `owner`'s piece."""
    lp, chunk_len = select_block_size, plan.chunk_len
    work = []
    for seg in plan.segments:
        last_block = (seg.q_end - 1 - seg.doc_start) // lp  # nothing after the last query's block
        for slot, chunk in enumerate(plan.layout.chunks_of(owner)):
            start = plan.layout.chunk_start(chunk)
            if seg.doc_end <= start or seg.doc_start >= start + chunk_len:
                continue
            first = max(0, (start - seg.doc_start) // lp)
            past_chunk = start + chunk_len - seg.doc_start
            end = past_chunk // lp if past_chunk < seg.doc_len else -(-seg.doc_len // lp)
            end = min(end, last_block + 1)
            if first >= end:
                continue
            key_lo = seg.doc_start + first * lp
            key_hi = seg.doc_start + min(end * lp, seg.doc_len)
            q_lo = max(seg.q_start, key_lo)
            local = seg.local_slice(chunk_len)
            work.append(PieceWork(
                row=seg.row, rows=slice(local.start + q_lo - seg.q_start, local.stop), slot=slot,
                keys=slice(key_lo - start + halo, key_hi - start + halo), first_block=first, end_block=end,
                q_pos=torch.arange(q_lo - key_lo, seg.q_end - key_lo, device=device)))
    return work


# ---------------------------------------------------------------------------------------------
# The visiting pieces, fetched ahead


class _PieceStream:
    """The pieces every step attends to, brought by point-to-point batches one step ahead.

    Batch s brings what step s needs: with m = 1, the piece carried at step s (from the previous
    rank); with m > 1, the node all-gather of the pieces carried at step s and the piece carried
    at step s+1 (from the previous node). Batch s starts once batch s-1 is done.
    """

    def __init__(self, run: "_RingRun", own_k: torch.Tensor, own_v: torch.Tensor, kind: str):
        self.run, self.kind = run, kind
        self.topo = run.topo
        self.carried: Dict[int, tuple] = {0: (own_k, own_v)}
        self.gathered: Dict[int, list] = {}
        self.pending: Dict[int, object] = {}
        self.issued = -1

    def _ops(self, step: int):
        topo = self.topo
        sends, recvs = [], []
        if topo.node_size > 1:
            k, v = self.carried[step]
            pieces = []
            for local, peer in enumerate(topo.node_ranks):
                if peer == topo.rank:
                    pieces.append((k, v))
                    continue
                got = (torch.empty_like(k), torch.empty_like(v))
                sends += [(k, peer), (v, peer)]
                recvs += [(got[0], peer), (got[1], peer)]
                pieces.append(got)
            self.gathered[step] = pieces
        arriving = step + topo.lag - 1
        if 1 <= arriving < topo.num_nodes:
            k, v = self.carried[arriving - 1]
            got = (torch.empty_like(k), torch.empty_like(v))
            sends += [(k, topo.next_rank), (v, topo.next_rank)]
            recvs += [(got[0], topo.prev_rank), (got[1], topo.prev_rank)]
            self.carried[arriving] = got
        if topo.node_size == 1:
            self.gathered[step] = [self.carried[step]]
        return sends, recvs

    def issue(self, step: int) -> None:
        """Start batch `step` (batch step-1 must be done) unless issued or past the last step."""
        if step <= self.issued or step >= self.topo.num_nodes:
            return
        self.issued = step
        sends, recvs = self._ops(step)
        if recvs:
            self.pending[step] = self.run.comm.start_exchange(sends, recvs, self.kind)

    def start(self) -> None:
        """Batch 0, and batch 1 too when batch 0 moves nothing (m = 1)."""
        self.issue(0)
        if 0 not in self.pending:
            self.issue(1)

    def wait(self, step: int) -> None:
        work = self.pending.pop(step, None)
        if work is not None:
            work.wait()

    def visiting(self, step: int):
        """[(owner rank, k piece, v piece)] of step `step` (its batch done)."""
        return [(self.topo.owner(step, local), k, v) for local, (k, v) in enumerate(self.gathered[step])]

    def release(self, step: int) -> None:
        """Forget what only steps <= `step` need (the carried piece of `step` is passed on in batch step+1)."""
        self.gathered.pop(step, None)
        self.carried.pop(step - 1, None)


# ---------------------------------------------------------------------------------------------
# One layer call


class _RingRun:
    """State of one layer call's selection branch (forward and backward)."""

    def __init__(self, exchange: "NodeRingExchange", plan: CPPlan, branches, config, scale: float, k, v,
                 head_group_size: int):
        self.comm = exchange.comm
        self.topo = RingTopology(self.comm.size, self.comm.rank, exchange.node_size)
        self.plan, self.branches, self.config, self.scale = plan, branches, config, scale
        self.head_groups = head_groups(k.shape[2], head_group_size)
        self.halo = straddle_halo(plan, config.select_block_size)
        self.k_halo = self.v_halo = None
        if self.halo:  # differentiable: their gradients go back to the ranks they came from
            self.k_halo, self.v_halo = exchange_halos(self.comm, plan.chunk_len, (self.halo, self.halo), k, v)
        self._work: Dict[int, List[PieceWork]] = {}
        self.first_stream: Optional[_PieceStream] = self.stream(0, k, v, self.k_halo, self.v_halo, "selection fwd")

    def stream(self, group: int, k, v, k_halo, v_halo, kind: str) -> "_PieceStream":
        """The started piece stream of KV-head group `group`."""
        stream = _PieceStream(self, *self.own_piece(group, k, v, k_halo, v_halo), kind)
        stream.start()
        return stream

    def own_piece(self, group: int, k, v, k_halo, v_halo):
        """Local [B, 2c, H, d] (+ halos [B, 2, h, H, d]) -> the group's pieces [B, 2, h + c, H_group, d],
        detached, contiguous."""
        h0, h1 = self.head_groups[group]
        pieces = []
        for x, halo in ((k, k_halo), (v, v_halo)):
            x = x.detach()[:, :, h0:h1].unflatten(1, (2, self.plan.chunk_len))
            pieces.append(torch.cat([halo.detach()[..., h0:h1, :], x], dim=2) if halo is not None else x.contiguous())
        return pieces

    def work(self, owner: int, device) -> List[PieceWork]:
        if owner not in self._work:
            self._work[owner] = piece_work(self.plan, owner, self.halo, self.config.select_block_size, device)
        return self._work[owner]

    def row_parts(self, work: PieceWork, row_size: int) -> List[slice]:
        """work's query rows in parts of at most ROW_PART_ELEMENTS / row_size rows (slices into work.rows)."""
        count = work.rows.stop - work.rows.start
        step = max(1, ROW_PART_ELEMENTS // row_size)
        return [slice(lo, min(lo + step, count)) for lo in range(0, count, step)]


def _query_rows(work: PieceWork, part: slice):
    """Index of a part's query rows in [B, 2c, ...] tensors."""
    return work.row, slice(work.rows.start + part.start, work.rows.start + part.stop)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, out_c: torch.Tensor, lse_c: torch.Tensor) -> None:
    """Fold a partial result (out_c [T, H, d_v], lse_c [T, H]) into the running (out, lse), in place;
    lse is float32 or wider, out any dtype (the sum is formed in float32 or wider). Rows without keys so far or in the
    partial (lse -inf) stay exact, without NaNs."""
    lse_c = lse_c.to(lse.dtype)
    merged = torch.logaddexp(lse, lse_c)
    ref = finite_or_zero(merged)
    acc_dtype = torch.promote_types(out.dtype, torch.float32)
    mixed = out.to(acc_dtype, copy=True).mul_(torch.exp(lse - ref)[..., None])
    mixed.addcmul_(out_c.to(acc_dtype), torch.exp(lse_c - ref)[..., None])
    out.copy_(mixed)
    lse.copy_(merged)


class _RingSelected(torch.autograd.Function):
    """Selection branch of the local queries over the pieces as they go round (module docstring),
    KV-head group after KV-head group."""

    @staticmethod
    def forward(ctx, run: _RingRun, q, k, v, k_halo, v_halo, idx):
        out = q.new_zeros(*q.shape[:3], v.shape[3])  # O [B, 2c, H_q, d_v]
        lse_dtype = torch.promote_types(q.dtype, torch.float32)
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=lse_dtype)  # L [B, 2c, H_q]
        group_size = q.shape[2] // k.shape[2]
        stream, run.first_stream = run.first_stream, None
        for group, (h0, h1) in enumerate(run.head_groups):
            heads = slice(h0 * group_size, h1 * group_size)
            q_group, idx_group = q[:, :, heads], idx[:, :, h0:h1]
            out_group, lse_group = out[:, :, heads], lse[:, :, heads]
            row_size = q_group.shape[2] * v.shape[3]
            next_stream = None
            for step in range(run.topo.num_nodes):
                stream.wait(step)
                stream.issue(step + 1)
                if step == run.topo.num_nodes - 1 and group + 1 < len(run.head_groups):
                    next_stream = run.stream(group + 1, k, v, k_halo, v_halo, "selection fwd")
                for owner, k_piece, v_piece in stream.visiting(step):
                    for work in run.work(owner, q.device):
                        keys = (work.row, work.slot, work.keys)
                        for part in run.row_parts(work, row_size):
                            rows = _query_rows(work, part)
                            out_c, lse_c = run.branches.selected_attention(
                                q_group[rows], k_piece[keys], v_piece[keys], work.block_ids(idx_group[rows]),
                                work.q_pos[part], run.config, run.scale)
                            merge_partial(out_group[rows], lse_group[rows], out_c, lse_c)
                stream.release(step)
            stream = next_stream
        ctx.run = run
        ctx.save_for_backward(q, k, v, k_halo, v_halo, idx, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        run = ctx.run
        q, k, v, k_halo, v_halo, idx, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = softmax_delta(grad_out, out)  # rowsum(dO * O) [B, 2c, H_q] float32
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        grad_k_halo = torch.zeros_like(k_halo) if run.halo else None
        grad_v_halo = torch.zeros_like(v_halo) if run.halo else None
        group_size = q.shape[2] // k.shape[2]
        stream = run.stream(0, k, v, k_halo, v_halo, "selection bwd")
        for group, (h0, h1) in enumerate(run.head_groups):
            heads = slice(h0 * group_size, h1 * group_size)
            start_next = None
            if group + 1 < len(run.head_groups):
                start_next = lambda g=group + 1: run.stream(g, k, v, k_halo, v_halo, "selection bwd")  # noqa: E731
            shares = _GroupShares(run, q[:, :, heads], idx[:, :, h0:h1], lse[:, :, heads], delta[:, :, heads],
                                  grad_out[:, :, heads], grad_q[:, :, heads])
            (grad_k_piece, grad_v_piece), stream = _ring_backward_group(run, stream, shares, start_next)
            grad_k[:, :, h0:h1] = grad_k_piece[:, :, run.halo:].flatten(1, 2)
            grad_v[:, :, h0:h1] = grad_v_piece[:, :, run.halo:].flatten(1, 2)
            if run.halo:
                grad_k_halo[..., h0:h1, :] = grad_k_piece[:, :, :run.halo]
                grad_v_halo[..., h0:h1, :] = grad_v_piece[:, :, :run.halo]
        return None, grad_q, grad_k, grad_v, grad_k_halo, grad_v_halo, None


@dataclasses.dataclass
class _GroupShares:
    """One KV-head group's view of the local queries for the backward: q, selected ids, the merged
    lse and delta = rowsum(dO * O), dO, and the dQ accumulator (a view into grad_q)."""

    run: _RingRun
    q: torch.Tensor
    idx: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    grad_out: torch.Tensor
    grad_q: torch.Tensor

    def piece_grads(self, owner: int, k_piece: torch.Tensor, v_piece: torch.Tensor):
        """This rank's dK/dV of one visiting piece (returned); its dQ is added to grad_q.

        With the merged lse and delta, each piece's share of the gradients comes straight from the
        selected-attention backward: no partial output is recomputed or kept."""
        run = self.run
        grad_k, grad_v = torch.zeros_like(k_piece), torch.zeros_like(v_piece)
        row_size = self.q.shape[2] * max(self.q.shape[3], self.grad_out.shape[3])
        for work in run.work(owner, k_piece.device):
            keys = (work.row, work.slot, work.keys)
            for part in run.row_parts(work, row_size):
                rows = _query_rows(work, part)
                dq, dk, dv = run.branches.selected_attention_backward(
                    self.q[rows], k_piece[keys], v_piece[keys], work.block_ids(self.idx[rows]), work.q_pos[part],
                    run.config, run.scale, self.grad_out[rows], self.lse[rows], self.delta[rows])
                self.grad_q[rows] += dq
                grad_k[keys] += dk
                grad_v[keys] += dv
        return grad_k, grad_v


def _ring_backward_group(run: _RingRun, stream: "_PieceStream", shares: _GroupShares, start_next):
    """The ring backward of one KV-head group: the group's pieces go round again while each rank adds
    its share of their dK/dV to accumulators that follow them (module docstring). Returns the
    finished (dK, dV) of this rank's own piece of the group and the next group's stream, started by
    start_next() at the last step (None when start_next is None)."""
    topo, comm = run.topo, run.comm
    own_k, own_v = stream.carried[0]
    zeros = lambda: (torch.zeros_like(own_k), torch.zeros_like(own_v))  # noqa: E731
    contrib: Dict[int, list] = {}  # step -> this rank's dK/dV of each visiting piece
    from_node: Dict[int, list] = {}  # step -> node peers' dK/dV of the piece carried at step
    # step -> accumulator of the carried piece from the previous node; the chain of a piece starts
    # at the node after its owner's (step 1) and ends back at the owner, who adds its node's part
    # (step 0) last: C/m - 1 hops across nodes, as in a ring reduce-scatter
    arrived: Dict[int, tuple] = {0: None, 1: None}
    finished: Dict[int, tuple] = {}  # step -> accumulator of the carried piece, this node's part added
    num_steps, lag = topo.num_nodes, topo.lag
    grads_in_flight, next_stream = None, None
    for step in range(num_steps + lag):
        if grads_in_flight is not None:
            grads_in_flight.wait()
            grads_in_flight = None
        ready = step - lag  # the accumulator complete once batch step-1 is done
        if 0 <= ready < num_steps:
            total = arrived.pop(ready) or zeros()
            parts = [contrib.pop(ready)[topo.local]] + from_node.pop(ready, [])
            finished[ready] = tuple(sum(p[i] for p in parts) + total[i] for i in range(2))
        if step < num_steps:
            stream.wait(step)
            stream.issue(step + 1)
            if step == num_steps - 1 and start_next is not None:
                next_stream = start_next()
        sends, recvs = [], []
        if topo.node_size > 1 and 0 <= step - 1 < num_steps:  # reduce last step's pieces inside the node
            mine = contrib[step - 1]
            from_node[step - 1] = []
            for local, peer in enumerate(topo.node_ranks):
                if peer == topo.rank:
                    continue
                got = zeros()
                sends += [(mine[local][0], peer), (mine[local][1], peer)]
                recvs += [(got[0], peer), (got[1], peer)]
                from_node[step - 1].append(got)
        if num_steps > 1:
            if 1 <= ready < num_steps:
                done = finished.pop(ready)
                sends += [(done[0], topo.next_rank), (done[1], topo.next_rank)]
            if 2 <= ready + 1 <= num_steps:
                got = zeros()
                recvs += [(got[0], topo.prev_rank), (got[1], topo.prev_rank)]
                arrived[ready + 1] = got
        if sends or recvs:
            grads_in_flight = comm.start_exchange(sends, recvs, "selection bwd grad")
        if step < num_steps:
            contrib[step] = [shares.piece_grads(owner, k_piece, v_piece)
                             for owner, k_piece, v_piece in stream.visiting(step)]
            stream.release(step)
    if grads_in_flight is not None:
        grads_in_flight.wait()
    grad_k_piece, grad_v_piece = finished.pop(0)
    if num_steps > 1:
        from_ring = arrived.pop(num_steps)
        grad_k_piece, grad_v_piece = grad_k_piece + from_ring[0], grad_v_piece + from_ring[1]
    return (grad_k_piece, grad_v_piece), next_stream


# ---------------------------------------------------------------------------------------------
# The exchanges


class NodeRingExchange(KVExchange):
    """The ring schedule over nodes of `node_size` consecutive CP ranks (1: 'ring')."""

    mode = "ring"

    def __init__(self, comm: Communicator, node_size: int = 1):
        super().__init__(comm)
        self.node_size = node_size

    def gather_compressed(self, slot0, slot1, plan):
        return _RingGatherCompressed.apply(self.comm, plan, slot0, slot1)

    def begin_selection(self, k, v, plan, branches, config, scale, head_group_size):
        """Starts the first transfers (of the first KV-head group)."""
        return _RingRun(self, plan, branches, config, scale, k, v, head_group_size)

    def selected_attention(self, q, k, v, selected_block_idx, handle):
        return _RingSelected.apply(handle, q, k, v, handle.k_halo, handle.v_halo, selected_block_idx)


class RingExchange(NodeRingExchange):
    mode = "ring"

    def __init__(self, comm: Communicator):
        super().__init__(comm, node_size=1)
