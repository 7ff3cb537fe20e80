"""Fused block importance and top-n selection (docs/semantics.md; the NSA paper, Eq. 9-12).

One program per (query tile, KV head). The tile's rows are (token, head) pairs for the G query
heads of the group, so Q is read once and one dot serves the whole group. The program walks the
selection blocks in tiles of BS blocks; for each it recomputes the compressed probabilities from
the compressed branch's lse, sums them over the group, maps them onto selection blocks by the
overlap rule, and merges the tile into a running top-n kept in registers (by sorting, with no
data-dependent loop). No [T x blocks] score tensor is written: the only output is
selected_block_idx [T, H_kv, n].

The compressed keys are read through a tensor descriptor (kernels/tma.py) where the launch parameter TMA
is set and the tensor allows it.

Ranking key (int64): float bits of the score << 32 | (2^31 - 1 - block), so that a larger score
wins and, among equal scores, the lower block id wins. Forced blocks score +inf; blocks after
the query's own are invalid (key -1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import INT32_MAX, INT64_MAX, LOG2E
from .layout import Layout
from .params import KernelParams
from .qk_parts import dot_qk, load_qk, qk_parts, tile_width
from .tma import streamed
from .tuning import launch_params


@triton.jit
def _load_rows(Q, LSE, rows64, heads, ok, sqt, sqh, slt, slh, DK: tl.constexpr, DK_A: tl.constexpr,
               DK_B: tl.constexpr):
    """Q rows [R, d_k] as parts (see qk_parts) and their lse in log2 units ([R]; +inf where a row has no
    compressed key)."""
    q_a, q_b = load_qk(Q + rows64 * sqt + heads * sqh, ok, DK, DK_A, DK_B)
    lse = tl.load(LSE + rows64 * slt + heads * slh, mask=ok, other=float("-inf"))
    return q_a, q_b, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _topk_kernel(
    Q, CK, LSE, IDX, TileStart, TileEnd, TileSeg, CuQ, CuC, QPos0,
    sqt, sqh, skt, skh, slt, slh, sit, sih,
    qk_scale,
    G: tl.constexpr, HC: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
    SLC_BLOCK: tl.constexpr, N_SELECT: tl.constexpr, N_INIT: tl.constexpr, N_LOCAL: tl.constexpr,
    DK: tl.constexpr, BLOCK_T: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BS: tl.constexpr,
    BN: tl.constexpr, TMA: tl.constexpr,
):
    # The tile's rows are (token, head) pairs, token-major: BLOCK_T tokens x HC heads of the group, so
    # one dot serves every head and the group sum is a reshape. HEAD_CHUNKS > 1 (G > HC) walks the
    # group HC heads at a time; with one chunk Q and lse stay in registers for the whole walk.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    start = tl.load(TileStart + tile)
    end = tl.load(TileEnd + tile)
    if end <= start:  # a padding tile (layout.tiles)
        return
    seg = tl.load(TileSeg + tile)
    q_doc = tl.load(CuQ + seg)
    c_doc = tl.load(CuC + seg)
    c_len = tl.load(CuC + seg + 1) - c_doc
    q_pos0 = tl.load(QPos0 + seg)  # position of the segment's first query
    HEAD_CHUNKS: tl.constexpr = (G + HC - 1) // HC
    CMP_PER_SLC: tl.constexpr = SLC_BLOCK // CMP_STRIDE

    tokens = start + tl.arange(0, BLOCK_T)
    token_ok = tokens < end
    t = tokens - q_doc + q_pos0
    current = t // SLC_BLOCK  # selection block holding t
    offs_r = tl.arange(0, BLOCK_T * HC)
    row_token = start + offs_r // HC  # [R] token row of each tile row
    row_t = row_token - q_doc + q_pos0
    row_g = offs_r % HC
    offs_bn = tl.arange(0, BN)
    offs_bs = tl.arange(0, BS)
    rows64 = row_token.to(tl.int64)

    if HEAD_CHUNKS == 1:
        q_kept_a, q_kept_b, lse2_kept = _load_rows(Q, LSE, rows64, kv_head * G + row_g,
                                                   (row_token < end) & (row_g < G), sqt, sqh, slt, slh, DK, DK_A, DK_B)

    # running top-n keys [BLOCK_T, BS] (BS >= n), sorted descending; the BS - n padding slots in front
    # hold the largest key, so they are never replaced
    best = tl.where(offs_bs[None, :] < BS - N_SELECT, tl.full([BLOCK_T, BS], INT64_MAX, tl.int64), -1)
    carry = tl.zeros([BLOCK_T], tl.float32)
    j_end = (end - 1 - q_doc + q_pos0) // SLC_BLOCK + 1
    for j0 in range(0, j_end, BS):
        # compressed blocks starting inside selection blocks [j0, j0 + BS)
        cmp_idx = j0 * CMP_PER_SLC + offs_bn
        cmp_ok = (offs_bn < BS * CMP_PER_SLC) & (cmp_idx < c_len)
        visible = ((cmp_idx * CMP_STRIDE + CMP_BLOCK - 1)[None, :] <= row_t[:, None]) & cmp_ok[None, :]
        if TMA:  # rows past cmp_ok hold other keys: their probabilities are masked out by `visible` below
            ck_a = CK.load([c_doc + j0 * CMP_PER_SLC, kv_head * DK])
            ck_b = 0.0
        else:
            crow = (c_doc + cmp_idx).to(tl.int64)
            ck_a, ck_b = load_qk(CK + crow * skt + kv_head * skh, cmp_ok, DK, DK_A, DK_B)
        prob_sum = tl.zeros([BLOCK_T, BN], tl.float32)
        for chunk in range(HEAD_CHUNKS):
            if HEAD_CHUNKS == 1:
                q_a, q_b, lse2 = q_kept_a, q_kept_b, lse2_kept
            else:
                g = chunk * HC + row_g
                q_a, q_b, lse2 = _load_rows(Q, LSE, rows64, kv_head * G + g, (row_token < end) & (g < G),
                                            sqt, sqh, slt, slh, DK, DK_A, DK_B)
            s = dot_qk(q_a, q_b, ck_a, ck_b, DK_B) * qk_scale  # [R, BN]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            prob_sum += tl.sum(tl.reshape(p, [BLOCK_T, HC, BN]), 1)
        # overlap (in stride units) of compressed block i with selection block j
        cmp_lo = cmp_idx * CMP_STRIDE
        slc = j0 + offs_bs
        overlap = tl.minimum(cmp_lo[:, None] + CMP_BLOCK, (slc[None, :] + 1) * SLC_BLOCK) \
            - tl.maximum(cmp_lo[:, None], slc[None, :] * SLC_BLOCK)
        weight = tl.maximum(overlap, 0).to(tl.float32) / CMP_STRIDE  # [BN, BS]
        score = tl.dot(prob_sum, weight, input_precision="ieee")  # [BLOCK_T, BS]
        score = tl.where(offs_bs[None, :] == 0, score + carry[:, None], score)
        next_lo = (j0 + BS) * SLC_BLOCK
        spill = tl.maximum(tl.minimum(cmp_lo + CMP_BLOCK, next_lo + SLC_BLOCK) - tl.maximum(cmp_lo, next_lo), 0)
        carry = tl.sum(prob_sum * (spill.to(tl.float32) / CMP_STRIDE)[None, :], 1)

        valid = slc[None, :] <= current[:, None]
        forced = valid & ((slc[None, :] < N_INIT) | (slc[None, :] > current[:, None] - N_LOCAL))
        score = tl.where(forced, float("inf"), score)
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        key = (bits << 32) | (-slc[None, :] + INT32_MAX).to(tl.int64)
        key = tl.where(valid, key, -1)
        # merge this tile into the running top-n. best is sorted descending and the tile's keys ascending,
        # so their elementwise maximum holds the n largest of both (a bitonic split); sorting it again
        # keeps best descending. No data-dependent loop: every row does the same work.
        best = tl.sort(tl.maximum(best, tl.sort(key, 1)), 1, descending=True)

    kept = (best >= 0) & (best != INT64_MAX)
    block = tl.where(kept, -(best & INT32_MAX) + INT32_MAX, INT32_MAX).to(tl.int32)
    block = tl.sort(block, 1)
    block = tl.where(block == INT32_MAX, -1, block)
    tl.store(IDX + tokens.to(tl.int64)[:, None] * sit + kv_head * sih + offs_bs[None, :], block,
             mask=token_ok[:, None] & (offs_bs[None, :] < N_SELECT))


def select_blocks(q, compressed_k, cmp_lse, layout: Layout, params: KernelParams):
    """selected_block_idx [T, H_kv, n] int32 (ascending, -1 padded) for the layout's queries q [T, H_q, d_k],
    from its compressed keys compressed_k [N_cmp, H_kv, d_k] and the compressed branch's lse [T, H_q]."""
    cu_q, q_pos0, _ = layout.bounds("queries")
    cu_cmp, _, _ = layout.bounds("compressed")
    num_q_heads, num_kv_heads, head_dim = q.shape[1], compressed_k.shape[1], q.shape[2]
    n = params.select_count
    idx = torch.empty(q.shape[0], num_kv_heads, n, device=q.device, dtype=torch.int32)
    group = num_q_heads // num_kv_heads
    heads_per_chunk = min(triton.next_power_of_2(group), 16)
    launch = launch_params("topk", tile_width(head_dim))
    block_t = max(16, launch.pop("ROWS") // heads_per_chunk)  # tile rows: block_t tokens x heads_per_chunk heads
    bs = max(launch.pop("BLOCKS"), triton.next_power_of_2(n))  # blocks per tile = width of the running top-n
    cmp_per_slc = params.select_block // params.compress_stride
    bn = triton.next_power_of_2(bs * cmp_per_slc)  # compressed keys per tile
    (ck_in,), tma = streamed([compressed_k], bn, launch.pop("TMA", False))
    tile_start, tile_end, tile_seg = layout.tiles("queries", block_t, q.shape[0])
    if tile_start.numel():
        _topk_kernel[(tile_start.numel(), num_kv_heads)](
            Q=q, CK=ck_in, LSE=cmp_lse, IDX=idx, TileStart=tile_start, TileEnd=tile_end, TileSeg=tile_seg,
            CuQ=cu_q, CuC=cu_cmp, QPos0=q_pos0, sqt=q.stride(0), sqh=q.stride(1), skt=compressed_k.stride(0),
            skh=compressed_k.stride(1), slt=cmp_lse.stride(0), slh=cmp_lse.stride(1), sit=idx.stride(0),
            sih=idx.stride(1), qk_scale=params.scale * LOG2E.value,
            G=group, HC=heads_per_chunk, CMP_BLOCK=params.compress_block, CMP_STRIDE=params.compress_stride,
            SLC_BLOCK=params.select_block, N_SELECT=n, N_INIT=params.init_blocks, N_LOCAL=params.local_blocks,
            DK=head_dim, BLOCK_T=block_t, **qk_parts(head_dim), BS=bs, BN=bn, TMA=tma, **launch,
        )
    return idx
