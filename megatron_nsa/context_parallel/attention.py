"""`nsa_attention_cp`: NSA on a sequence sharded over a context-parallel group.

Each rank passes its share in the load-balanced layout (layout.py) and gets the NSA output of
exactly those tokens: the single-GPU nsa_attention on the whole sequence, sliced to the rank.
Per call (docs/design.md, "Context parallelism"):

1. halo exchange: each chunk gets the last w-1 window tokens and the last compressed-branch
   tokens (l-d, or l-1 with unaligned documents) of the chunk before it;
2. compression of the blocks whose last token is local; all-gather of the compressed K/V in
   global order;
3. the selection K/V all-gather starts (asynchronous) and runs under 4 and 5;
4. window branch; 5. compressed branch and top-n scoring with global (per-document) block ids;
6. selected attention over the gathered K/V; 7. gated combination, local.

Steps 1-2 come before 3 on purpose: NCCL runs the operations of one communicator in order, so
the small halo and compressed gathers must not queue behind the large one.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..compression import block_windows
from ..config import NSAConfig
from ..functional import branch_tensors, check_cu_seqlens, check_inputs, silenced_gates
from ..reference import RopeFn, num_compressed_blocks
from .branches import resolve_branches
from .exchange import make_exchange
from .halo import exchange_halos
from .layout import LoadBalancedLayout
from .segments import CPPlan, Segment, build_plan


def _extended(local: torch.Tensor, halo: torch.Tensor, seg: Segment, lo: int, hi: int, chunk_len: int):
    """Tokens [lo, hi) (global) of one row, lo >= chunk start - halo length, hi <= chunk end: [hi-lo, H, D]."""
    start = seg.chunk_start
    from_chunk = local[seg.row, seg.slot * chunk_len + max(lo, start) - start:seg.slot * chunk_len + hi - start]
    if lo >= start:
        return from_chunk
    halo_len = halo.shape[2]
    return torch.cat([halo[seg.row, seg.slot, halo_len - (start - lo):], from_chunk])


def _compress_local(k, v, k_halo, v_halo, plan: CPPlan, config: NSAConfig, compressor, rope: Optional[RopeFn]):
    """Compressed K/V of the blocks whose last token is in each local chunk: per slot [n, B, H, D]."""
    l, d = config.compress_block_size, config.compress_stride
    slots = []
    for slot in (0, 1):
        rows_k, rows_v = [], []
        for row in range(plan.batch):
            parts_k, parts_v = [], []
            for seg in plan.segments_of(row, slot):
                if seg.cmp_count == 0:
                    continue
                lo = seg.doc_start + seg.cmp_first * d
                hi = lo + (seg.cmp_count - 1) * d + l
                windows_k = block_windows(_extended(k, k_halo, seg, lo, hi, plan.chunk_len), l, d)  # [n, l, H, d_k]
                windows_v = block_windows(_extended(v, v_halo, seg, lo, hi, plan.chunk_len), l, d)
                if compressor is None:
                    ck, cv = windows_k.mean(dim=1), windows_v.mean(dim=1)
                else:
                    ck, cv = compressor.compress_k(windows_k), compressor.compress_v(windows_v)
                if rope is not None:
                    block_ids = torch.arange(seg.cmp_first, seg.cmp_first + seg.cmp_count, device=k.device)
                    ck = rope(ck, block_ids * d + l - 1)
                parts_k.append(ck)
                parts_v.append(cv)
            rows_k.append(torch.cat(parts_k) if parts_k else k.new_zeros(0, *k.shape[2:]))
            rows_v.append(torch.cat(parts_v) if parts_v else v.new_zeros(0, *v.shape[2:]))
        slots.append((torch.stack(rows_k, dim=1), torch.stack(rows_v, dim=1)))
    return slots


def nsa_attention_cp(
    q: torch.Tensor,
    k,
    v,
    gates: torch.Tensor,
    config: NSAConfig,
    cp_group,
    compressor=None,
    backend=None,
    compressed_rope: Optional[RopeFn] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    head_group_size: Optional[int] = None,
    exchange="allgather",
    node_size: Optional[int] = None,
) -> torch.Tensor:
    """NSA of this rank's share of a context-parallel sequence.

    q      [B, 2c, H_q, d_k]: this rank's tokens in the load-balanced layout (chunks r and 2C-1-r)
    k, v   [B, 2c, H_kv, d_k] / [B, 2c, H_kv, d_v], or (cmp, slc, win) triples when config.separate_kv
    gates  [B, 2c, H_q, 3]
    cp_group        the context-parallel process group (C ranks; the sequence has S = 2c * C tokens)
    compressor, compressed_rope   as in nsa_attention (RoPE positions: within-document position of
                    each block's last token)
    backend         'torch' | 'triton' | a branches.Branches object | None
    cu_seqlens      GLOBAL document boundaries [0, ..., S] (B must be 1); the same on every rank
    head_group_size at most this many KV heads gathered at a time (None: all); bounds the
                    gathered buffer to S * head_group_size * (d_k + d_v) values
    exchange        a mode of exchange.EXCHANGES ('allgather', 'ring', 'hierarchical', 'fetch') or a
                    KVExchange object; all give the same result
    node_size       CP ranks per node for exchange='hierarchical' (a divisor of C); ignored otherwise
    returns [B, 2c, H_q, d_v]
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    if config.compression != "mean" and compressor is None:
        raise ValueError(f"config.compression={config.compression!r} needs a compressor (a KVCompressor); got None")
    ks = branch_tensors("k", k, config.separate_kv)
    vs = branch_tensors("v", v, config.separate_kv)
    check_inputs(q, ks, vs, gates, None, config)
    gates = silenced_gates(gates)  # inside functional.silenced_branches(...)
    batch, local_len, _, _ = q.shape
    num_kv_heads = ks[0].shape[2]
    if head_group_size is None:
        head_group_size = num_kv_heads
    if isinstance(head_group_size, bool) or not isinstance(head_group_size, int) or head_group_size < 1:
        raise ValueError(f"head_group_size={head_group_size!r} is not allowed: it must be None or an integer >= 1")
    exchange = make_exchange(exchange, cp_group, node_size)
    cp_size, rank = exchange.comm.size, exchange.comm.rank
    if local_len % 2 != 0:
        raise ValueError(f"q has {local_len} local tokens; the load-balanced layout gives each rank 2 equal chunks")
    layout = LoadBalancedLayout(local_len * cp_size, cp_size, config)
    bounds = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, batch, layout.seq_len, q.device)
    branches = resolve_branches(backend, q.device)

    in_dtype = q.dtype
    compute = branches.compute_dtype(in_dtype)
    q, gates = q.to(compute), gates.to(compute)
    (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win) = [[t.to(compute) for t in group] for group in (ks, vs)]
    scale = config.scale_for(q.shape[-1])
    plan = build_plan(layout, rank, batch, bounds, config)
    chunk_len = plan.chunk_len

    # 1. halos (one exchange for every tensor that needs one)
    if config.separate_kv:
        halo_k_cmp, halo_v_cmp, halo_k_win, halo_v_win = exchange_halos(
            exchange.comm, chunk_len, (plan.cmp_halo, plan.cmp_halo, plan.win_halo, plan.win_halo),
            k_cmp, v_cmp, k_win, v_win)
    else:
        halo_len = max(plan.cmp_halo, plan.win_halo)
        halo_k_win, halo_v_win = exchange_halos(exchange.comm, chunk_len, (halo_len, halo_len), k_win, v_win)
        halo_k_cmp, halo_v_cmp = halo_k_win, halo_v_win

    # 2. compressed K/V: local blocks, then all of them in global order, [N_cmp, B, H_kv, d]
    local_cmp = _compress_local(k_cmp, v_cmp, halo_k_cmp, halo_v_cmp, plan, config, compressor, compressed_rope)
    head_dim_k = k_cmp.shape[-1]
    (ck0, cv0), (ck1, cv1) = local_cmp
    compressed = exchange.gather_compressed(torch.cat([ck0, cv0], -1), torch.cat([ck1, cv1], -1), plan)
    compressed_k, compressed_v = compressed[..., :head_dim_k].contiguous(), compressed[..., head_dim_k:].contiguous()

    # 3. selection K/V start moving
    selection = exchange.begin_selection(k_slc, v_slc, plan, branches, config, scale, head_group_size)

    # Per-segment queries: views of one split (see CPPlan.split_tokens)
    q_parts = plan.split_tokens(q)

    # 4. window branch
    win_out = []
    for seg, q_part in zip(plan.segments, q_parts):
        lo = max(seg.doc_start, seg.q_start - plan.win_halo)
        keys = _extended(k_win, halo_k_win, seg, lo, seg.q_end, chunk_len)
        values = _extended(v_win, halo_v_win, seg, lo, seg.q_end, chunk_len)
        out, _ = branches.window_attention(q_part, keys, values, seg.query_positions(q.device),
                                           lo - seg.doc_start, config, scale)
        win_out.append(out)

    # 5. compressed branch and top-n
    cmp_out, selected = [], []
    for seg, q_part in zip(plan.segments, q_parts):
        q_pos = seg.query_positions(q.device)
        blocks = slice(seg.cmp_offset, seg.cmp_offset + num_compressed_blocks(seg.doc_len, config))
        out, _, scores = branches.compressed_attention(q_part, compressed_k[blocks, seg.row],
                                                       compressed_v[blocks, seg.row], q_pos, config, scale)
        cmp_out.append(out)
        selected.append(branches.select_blocks(scores, q_pos, plan.num_slc(seg, config), num_kv_heads, config))

    # 6. selection branch over the gathered K/V
    selected_block_idx = plan.join_tokens(selected)  # [B, 2c, H_kv, n]
    slc_out = exchange.selected_attention(q, k_slc, v_slc, selected_block_idx, selection)

    # 7. gated combination, per segment, so that only the combined output is concatenated
    combined = [branches.gated_combine(gates_part, cmp_part, slc_part, win_part)
                for gates_part, cmp_part, slc_part, win_part
                in zip(plan.split_tokens(gates), cmp_out, plan.split_tokens(slc_out), win_out)]
    out = plan.join_tokens(combined)
    exchange.on_output(out, selection)
    return out.to(in_dtype)
