"""The 'fetch' exchange: each rank receives only the selection blocks its queries selected.

Unit of transfer: an *item*, the l' tokens of one aligned selection block of the row (global
tokens [g*l', (g+1)*l')) for one KV head, K and V side by side ([l', d_k + d_v]). Chunks are whole
numbers of l', so an item has one owner. A document's own blocks start at its first token, so
with packed documents a document block can straddle two items (and two ranks): it is fetched as
both.

Per KV-head group (head_group_size heads at a time), after top-n:
1. the needed items: for every (KV head, document block) its queries selected, the 1 or 2 items
   covering it; those owned by another rank are requested (all-to-all of counts, then of ids);
2. the owners send those items (all-to-all), group g+1's transfer running under group g's
   attention;
3. per segment, a compact K/V: the document blocks that any head of the group selected (U,
   ascending), l' rows each, read from the rank's own items, the received ones, or a zero item;
   the block ids are remapped to positions in U and the query positions to
   q' = pos(current block in U) * l' + q mod l'. Selected blocks never lie after the query's
   own block, so every selected block before it stays wholly visible and the causal mask inside
   the query's own block is unchanged (a query whose own block is not selected sees only
   earlier blocks, which stay before q'): the branch function computes exactly what it computes
   on the whole document.
Forward keeps the output and each query's log-sum-exp (float32, [B, 2c, H_q]), not the items.
Backward fetches the items again, runs the selected-attention backward per segment from that lse
and delta = rowsum(dO * O) (Branches.selected_attention_backward: fused with the Triton branches,
nothing of the forward recomputed), adds each segment's dK/dV into the group's item gradients, and
sends each received item's dK/dV back to its owner (all-to-all), which adds them requester by
requester in rank order (a fixed order: the result does not depend on timing).

What overlaps with what: the ids are known only after top-n, so unlike 'allgather' nothing moves
under the window, compressed and scoring branches; the counts and ids exchanges are exposed
(small), each group's K/V transfer runs under the previous group's attention, and backward's
first re-fetch starts when the gradient reaches the layer output (on_output).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from ..segments import CPPlan
from .base import KVExchange, head_groups, softmax_delta


@dataclasses.dataclass
class SegmentView:
    """One segment's compact K/V: token rows into the group's flat item buffer and remapped ids."""

    rows: slice  # the segment's queries in the local token axis
    row: int  # batch row
    token_index: Optional[torch.Tensor]  # [|U| * l', h] int64 rows of the flat source ([items * l', D]); None: no block
    block_idx: torch.Tensor  # [Tq, h, n] positions in U, -1 unused
    q_pos: torch.Tensor  # [Tq] positions in the compact key axis


@dataclasses.dataclass
class GroupFetch:
    """What one KV-head group [h0, h1) requests and serves, and how its compact K/V are built."""

    heads: Tuple[int, int]
    request_keys: torch.Tensor  # [M] item keys requested, grouped by owner rank (ascending)
    recv_splits: List[int]  # [C] items received from each rank
    serve_items: torch.Tensor  # [Ms] local item index of each item served, grouped by requester rank
    serve_splits: List[int]  # [C] items served to each rank
    num_local_items: int
    views: List[SegmentView]

    @property
    def num_received(self) -> int:
        return self.request_keys.numel()


class _Geometry:
    """Item bookkeeping of one rank: keys (row, head in group, aligned block g) and local item indices."""

    def __init__(self, plan: CPPlan, heads: int, select_block_size: int):
        layout = plan.layout
        self.lp = select_block_size
        self.chunk_len = layout.chunk_len
        self.cp_size = layout.cp_size
        self.batch = plan.batch
        self.heads = heads
        self.row_blocks = layout.seq_len // select_block_size  # aligned blocks of a row
        self.chunk_blocks = layout.chunk_len // select_block_size
        self.local_blocks = 2 * self.chunk_blocks
        self.num_local_items = plan.batch * heads * self.local_blocks

    def key(self, row, head, block):
        return (row * self.heads + head) * self.row_blocks + block

    def owner(self, block: torch.Tensor) -> torch.Tensor:
        chunk = block // self.chunk_blocks
        return torch.where(chunk < self.cp_size, chunk, 2 * self.cp_size - 1 - chunk)

    def local_item(self, keys: torch.Tensor) -> torch.Tensor:
        """Index in the owner's local item list of each key (on the owner)."""
        block = keys % self.row_blocks
        row_head = keys // self.row_blocks
        chunk = block // self.chunk_blocks
        slot = (chunk >= self.cp_size).long()
        local_block = slot * self.chunk_blocks + block - chunk * self.chunk_blocks
        return row_head * self.local_blocks + local_block

    def local_keys(self, rank: int, device) -> torch.Tensor:
        """Keys of this rank's own items, in local item order, [num_local_items]."""
        chunks = torch.tensor([rank, 2 * self.cp_size - 1 - rank], device=device)
        blocks = (chunks[:, None] * self.chunk_blocks + torch.arange(self.chunk_blocks, device=device)).reshape(-1)
        row_head = torch.arange(self.batch * self.heads, device=device)
        return (row_head[:, None] * self.row_blocks + blocks[None, :]).reshape(-1)


def to_items(x: torch.Tensor, lp: int) -> torch.Tensor:
    """Local [B, 2c, h, D] -> items [B * h * 2c/l', l', D] (row, head, local block order)."""
    batch, local_len, heads, dim = x.shape
    return x.reshape(batch, local_len // lp, lp, heads, dim).permute(0, 3, 1, 2, 4).reshape(-1, lp, dim)


def from_items(items: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """Inverse of to_items: [B * h * 2c/l', l', D] -> [B, 2c, h, D]."""
    _, lp, dim = items.shape
    return items.reshape(batch, heads, -1, lp, dim).permute(0, 2, 3, 1, 4).reshape(batch, -1, heads, dim)


def plan_group(comm, plan: CPPlan, idx: torch.Tensor, heads: Tuple[int, int], config) -> GroupFetch:
    """Needed items of one head group from its selected ids idx [B, 2c, h, n]; exchanges counts and ids."""
    device = idx.device
    lp = config.select_block_size
    geo = _Geometry(plan, idx.shape[2], lp)
    chunk_len = plan.chunk_len
    head_ids = torch.arange(idx.shape[2], device=device)
    needed, per_segment = [], []
    for seg in plan.segments:
        rows = seg.local_slice(chunk_len)
        seg_idx = idx[seg.row, rows]  # [Tq, h, n]
        used = seg_idx >= 0
        num_doc_blocks = -(-seg.doc_len // lp)
        pairs = torch.unique((head_ids[None, :, None] * num_doc_blocks + seg_idx)[used])  # (head, doc block)
        head, doc_block = pairs // num_doc_blocks, pairs % num_doc_blocks
        first = seg.doc_start + doc_block * lp
        last = torch.clamp(first + lp, max=seg.doc_end) - 1
        for token in (first, last):
            needed.append(geo.key(seg.row, head, token // lp))
        per_segment.append((seg, rows, seg_idx, used))
    keys = torch.unique(torch.cat(needed)) if needed else torch.zeros(0, dtype=torch.long, device=device)
    owners = geo.owner(keys % geo.row_blocks)
    remote = owners != comm.rank
    order = torch.sort(owners[remote] * (geo.batch * geo.heads * geo.row_blocks) + keys[remote]).indices
    request_keys = keys[remote][order]
    recv_counts = torch.bincount(owners[remote], minlength=comm.size)

    serve_counts = torch.empty_like(recv_counts)
    ones = [1] * comm.size
    comm.all_to_all(serve_counts, recv_counts, ones, ones, "fetch ids").wait()
    recv_splits, serve_splits = recv_counts.tolist(), serve_counts.tolist()
    serve_keys = request_keys.new_empty(sum(serve_splits))
    comm.all_to_all(serve_keys, request_keys, serve_splits, recv_splits, "fetch ids").wait()

    # where each item sits in the source buffer [local items, received items, one zero item]
    num_local, num_received = geo.num_local_items, request_keys.numel()
    zero_item = num_local + num_received
    source_of = torch.full((geo.batch * geo.heads * geo.row_blocks,), zero_item, dtype=torch.long, device=device)
    source_of[geo.local_keys(comm.rank, device)] = torch.arange(num_local, device=device)
    source_of[request_keys] = num_local + torch.arange(num_received, device=device)

    views = []
    offsets = torch.arange(lp, device=device)
    for seg, rows, seg_idx, used in per_segment:
        blocks = torch.unique(seg_idx[used])  # U: document blocks any head selected, ascending
        q_pos = seg.query_positions(device)
        compact_q_pos = torch.searchsorted(blocks, q_pos // lp) * lp + q_pos % lp
        compact_idx = torch.where(used, torch.searchsorted(blocks, seg_idx.clamp(min=0)), -1)
        if blocks.numel() == 0:
            views.append(SegmentView(rows, seg.row, None, compact_idx, compact_q_pos))
            continue
        doc_pos = (blocks[:, None] * lp + offsets).reshape(-1)  # [|U| l'] positions in the document
        token = seg.doc_start + doc_pos.clamp(max=seg.doc_len - 1)  # rows past the document's end: zero item below
        item = source_of[geo.key(seg.row, head_ids[None, :], (token // lp)[:, None])]  # [|U| l', h]
        token_index = item * lp + (token % lp)[:, None]
        token_index = torch.where((doc_pos < seg.doc_len)[:, None], token_index, zero_item * lp)
        views.append(SegmentView(rows, seg.row, token_index, compact_idx, compact_q_pos))
    return GroupFetch(heads, request_keys, recv_splits, geo.local_item(serve_keys), serve_splits, num_local, views)


class PendingItems:
    """An item transfer in flight; wait() returns the received items [M, l', D]."""

    def __init__(self, received: torch.Tensor, work):
        self.received, self.work = received, work

    def wait(self) -> torch.Tensor:
        self.work.wait()
        received, self.received = self.received, None
        return received


@dataclasses.dataclass
class _FetchRun:
    """One layer call's selection branch: shared by forward, the backward prefetch and backward."""

    exchange: "FetchExchange"
    plan: CPPlan
    branches: object
    config: object
    scale: float
    head_groups: List[Tuple[int, int]]
    k: torch.Tensor  # local [B, 2c, H_kv, d_k], detached
    v: torch.Tensor
    groups: Optional[List[GroupFetch]] = None  # filled in forward, once the selection is known
    pending: Optional[PendingItems] = None

    def local_items(self, group: int) -> torch.Tensor:
        """This rank's items of a head group, K and V side by side: [B * h * 2c/l', l', d_k + d_v]."""
        h0, h1 = self.head_groups[group]
        kv = torch.cat([self.k[:, :, h0:h1], self.v[:, :, h0:h1]], dim=-1)
        return to_items(kv, self.config.select_block_size)

    def start(self, group: int, kind: str) -> PendingItems:
        fetch = self.groups[group]
        served = self.local_items(group).index_select(0, fetch.serve_items)
        received = served.new_empty(fetch.num_received, *served.shape[1:])
        work = self.exchange.comm.all_to_all(received, served, fetch.recv_splits, fetch.serve_splits, kind,
                                             async_op=True)
        return PendingItems(received, work)

    def prefetch_for_backward(self) -> None:
        if self.pending is None and self.groups is not None:
            self.pending = self.start(0, "fetch bwd")

    def take_pending(self, kind: str) -> PendingItems:
        pending, self.pending = self.pending, None
        return pending if pending is not None else self.start(0, kind)

    def segment_kv(self, source: torch.Tensor, view: SegmentView, head_dim_k: int):
        """One segment's compact k [|U| l', h, d_k] and v [|U| l', h, d_v] from the flat source [items * l', D]."""
        compact = source[view.token_index]  # [|U| l', h, D]
        return compact[..., :head_dim_k], compact[..., head_dim_k:]


def _source(local_items: torch.Tensor, received: torch.Tensor) -> torch.Tensor:
    """[local items, received items, one zero item] flattened to token rows: [(L + M + 1) * l', D]."""
    zero = local_items.new_zeros(1, *local_items.shape[1:])
    return torch.cat([local_items, received, zero]).flatten(0, 1)


class _FetchSelected(torch.autograd.Function):
    """Selection branch over fetched blocks, head group by head group (see the module docstring)."""

    @staticmethod
    def forward(ctx, run: _FetchRun, q, k, v, idx):
        comm, head_dim_k = run.exchange.comm, k.shape[3]
        group_size = q.shape[2] // k.shape[2]
        run.groups = [plan_group(comm, run.plan, idx[:, :, h0:h1], (h0, h1), run.config) for h0, h1 in run.head_groups]
        out = q.new_empty(*q.shape[:3], v.shape[3])  # [B, 2c, H_q, d_v]: segments tile the local rows
        lse = q.new_empty(q.shape[:3], dtype=torch.promote_types(q.dtype, torch.float32))  # [B, 2c, H_q]
        pending = run.start(0, "fetch fwd")
        for g, (h0, h1) in enumerate(run.head_groups):
            received = pending.wait()
            if g + 1 < len(run.head_groups):
                pending = run.start(g + 1, "fetch fwd")
            heads = slice(h0 * group_size, h1 * group_size)
            source = _source(run.local_items(g), received)
            for view in run.groups[g].views:
                q_rows = (view.row, view.rows, heads)
                if view.token_index is None:  # no query of the segment selected a block
                    out[q_rows], lse[q_rows] = 0.0, float("-inf")
                    continue
                out[q_rows], lse[q_rows] = run.branches.selected_attention(
                    q[q_rows], *run.segment_kv(source, view, head_dim_k), view.block_idx, view.q_pos, run.config,
                    run.scale)
            del received, source
        ctx.run = run
        ctx.save_for_backward(q, k, v, idx, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        run = ctx.run
        q, k, v, idx, out, lse = ctx.saved_tensors
        comm, lp, head_dim_k = run.exchange.comm, run.config.select_block_size, k.shape[3]
        batch, group_size = q.shape[0], q.shape[2] // k.shape[2]
        grad_q, grad_k, grad_v = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = softmax_delta(grad_out, out)  # [B, 2c, H_q]
        returns = []  # (group, received grads, work) in flight back to the owners
        pending = run.take_pending("fetch bwd")
        for g, (h0, h1) in enumerate(run.head_groups):
            fetch = run.groups[g]
            received = pending.wait()
            if g + 1 < len(run.head_groups):
                pending = run.start(g + 1, "fetch bwd")
            heads = slice(h0 * group_size, h1 * group_size)
            source = _source(run.local_items(g), received)
            grad_source = torch.zeros_like(source)  # [(L + M + 1) * l', D]
            for view in fetch.views:
                if view.token_index is None:
                    continue
                q_rows = (view.row, view.rows, heads)
                dq, dk, dv = run.branches.selected_attention_backward(
                    q[q_rows], *run.segment_kv(source, view, head_dim_k), view.block_idx, view.q_pos, run.config,
                    run.scale, grad_out[q_rows], lse[q_rows], delta[q_rows])
                grad_q[q_rows] = dq  # segments' query rows are disjoint
                # add, not copy: segments share items, and padding rows all point at the zero item
                token_rows = view.token_index.reshape(-1)
                grad_source[:, :head_dim_k].index_add_(0, token_rows, dk.reshape(-1, head_dim_k))
                grad_source[:, head_dim_k:].index_add_(0, token_rows, dv.reshape(-1, dv.shape[-1]))
            grad_items = grad_source.view(-1, lp, source.shape[-1])
            grad_local = grad_items[:fetch.num_local_items].clone()
            grad_received = grad_items[fetch.num_local_items:-1].contiguous()
            back = grad_received.new_empty(len(fetch.serve_items), lp, source.shape[-1])
            work = comm.all_to_all(back, grad_received, fetch.serve_splits, fetch.recv_splits, "fetch bwd return",
                                   async_op=True)
            returns.append((g, grad_local, back, grad_received, work))
            del received, source, grad_source
        for g, grad_local, back, _, work in returns:
            work.wait()
            fetch = run.groups[g]
            start = 0
            for count in fetch.serve_splits:  # requester by requester, in rank order
                grad_local.index_add_(0, fetch.serve_items[start:start + count], back[start:start + count])
                start += count
            h0, h1 = run.head_groups[g]
            grad_kv = from_items(grad_local, batch, h1 - h0)
            grad_k[:, :, h0:h1] = grad_kv[..., :head_dim_k]
            grad_v[:, :, h0:h1] = grad_kv[..., head_dim_k:]
        return None, grad_q, grad_k, grad_v, None


class FetchExchange(KVExchange):
    mode = "fetch"

    def begin_selection(self, k, v, plan, branches, config, scale, head_group_size):
        """Nothing moves yet: the blocks to fetch are known only after top-n."""
        return _FetchRun(self, plan, branches, config, scale, head_groups(k.shape[2], head_group_size),
                         k.detach(), v.detach())

    def selected_attention(self, q, k, v, selected_block_idx, handle):
        return _FetchSelected.apply(handle, q, k, v, selected_block_idx)

    def on_output(self, out, handle) -> None:
        """Start re-fetching the first head group as soon as backward reaches the layer output."""
        if out.requires_grad:
            out.register_hook(lambda grad: handle.prefetch_for_backward())
