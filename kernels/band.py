"""Flash attention over a "band" of keys: the sliding-window and the compressed branches.

Key j of a document sits at position j*KEY_STRIDE + KEY_OFFSET; query t sees it when
    position <= t   and   (WINDOW == 0 or position > t - WINDOW).
- window branch:     keys are tokens,            KEY_STRIDE=1, KEY_OFFSET=0,     WINDOW=w
- compressed branch: keys are compressed blocks, KEY_STRIDE=d, KEY_OFFSET=l-1,   WINDOW=0
A query with no visible key gets output 0 and lse -inf.

Forward and dQ: one program per (query head, query tile), the last tiles first. dK/dV: one program
per (KV head, key tile), looping over the G query heads of the group, so no atomics are needed.
Each program walks its tiles in three runs: masked, unmasked (tiles every row of the program sees
whole: `_key_walk`, `_unmasked_query_tiles`), masked; only tiles on the causal edge, the window's far
edge or a segment end pay for the visibility mask.
Q and K rows (and dQ, dK) are handled as two power-of-two column parts when d_k is not a power of
two (kernels/qk_parts.py). Tile sizes, warps and stages come from kernels/tuning.py.

Streamed tiles (K/V in the forward and dQ, Q/dO in dK/dV) are read through tensor descriptors (TMA on
Hopper) when the launch parameter TMA is set and the tensors allow it (kernels/tma.py): a descriptor reads
whole tiles, so on the masked tiles the rows past a segment's end are zeroed after the load, and the
result does not depend on what those rows hold.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import LN2, LOG2E
from .delta import row_dot
from .layout import Layout
from .params import KernelParams
from .qk_parts import acc_qk, dot_qk, load_qk, qk_parts, store_or_add_qk, store_qk, tile_width, zeros_qk
from .tma import streamed
from .tuning import launch_params


@triton.jit
def _first_key(t_lo, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr):
    if WINDOW == 0:
        return 0
    return tl.maximum(t_lo - WINDOW + 1 - KEY_OFFSET, 0) // KEY_STRIDE


@triton.jit
def _end_key(t_hi, k_len, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr):
    end = tl.where(t_hi >= KEY_OFFSET, (t_hi - KEY_OFFSET) // KEY_STRIDE + 1, 0)
    return tl.minimum(end, k_len)


@triton.jit
def _visible(t, key_pos, WINDOW: tl.constexpr):
    ok = key_pos[None, :] <= t[:, None]
    if WINDOW > 0:
        ok = ok & (key_pos[None, :] > t[:, None] - WINDOW)
    return ok


@triton.jit
def _key_walk(t_first, t_last, k_len, k_first, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr,
              WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys a query tile (positions t_first..t_last) walks: [j_lo, j_hi) in tiles of BLOCK_N from j_lo.
    Returns (j_lo, j_hi, a, b, n): tiles [a, b) hold only keys every query of the tile sees (no mask
    needed), n tiles in all; tiles before a and from b on need the mask."""
    j_lo = tl.maximum(_first_key(t_first, KEY_STRIDE, KEY_OFFSET, WINDOW) - k_first, 0)
    j_hi = _end_key(t_last, k_len + k_first, KEY_STRIDE, KEY_OFFSET) - k_first
    num_tiles = tl.maximum(tl.cdiv(j_hi - j_lo, BLOCK_N), 0)
    seen_by_all_hi = _end_key(t_first, k_len + k_first, KEY_STRIDE, KEY_OFFSET) - k_first  # keys at or before t_first
    tile_a = 0
    if WINDOW > 0:  # keys after t_last - WINDOW
        seen_by_all_lo = tl.maximum(_first_key(t_last, KEY_STRIDE, KEY_OFFSET, WINDOW) - k_first, 0)
        tile_a = tl.minimum(tl.cdiv(tl.maximum(seen_by_all_lo - j_lo, 0), BLOCK_N), num_tiles)
    tile_b = tl.maximum(seen_by_all_hi - j_lo, 0) // BLOCK_N
    return j_lo, j_hi, tile_a, tl.minimum(tl.maximum(tile_b, tile_a), num_tiles), num_tiles


@triton.jit
def _key_tile(K, V, k_doc, kv_head, skt, skh, svt, svh, j0, j_hi, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
              MASKED: tl.constexpr, TMA: tl.constexpr):
    """Keys j0..j0+BLOCK_N (of those below j_hi): their index, validity, K parts and V (0 where not valid).
    TMA: K and V are descriptors of [rows, H_kv * d] (one part: d_k a power of two)."""
    keys = j0 + tl.arange(0, BLOCK_N)
    key_ok = keys < j_hi
    if TMA:
        k_a = K.load([k_doc + j0, kv_head * DK])
        k_b = 0.0
        v = V.load([k_doc + j0, kv_head * DV])
        if MASKED:
            k_a = tl.where(key_ok[:, None], k_a, 0.0)
            v = tl.where(key_ok[:, None], v, 0.0)
    else:
        krow = (k_doc + keys).to(tl.int64)
        k_a, k_b = load_qk(K + krow * skt + kv_head * skh, key_ok, DK, DK_A, DK_B)
        offs_dv = tl.arange(0, BLOCK_DV)
        v = tl.load(V + krow[:, None] * svt + kv_head * svh + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return keys, key_ok, k_a, k_b, v


@triton.jit
def _fwd_step(q_a, q_b, m_i, l_i, acc, K, V, k_doc, k_first, kv_head, skt, skh, svt, svh, j0, j_hi, t, qk_scale,
              KEY_STRIDE: tl.constexpr,
              KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
              MASKED: tl.constexpr, TMA: tl.constexpr):
    """One key tile of the online softmax. MASKED=False: every query sees every key of the tile."""
    keys, key_ok, k_a, k_b, v = _key_tile(K, V, k_doc, kv_head, skt, skh, svt, svh, j0, j_hi, DK, DV, BLOCK_N,
                                          DK_A, DK_B, BLOCK_DV, MASKED, TMA)
    s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
    if MASKED:
        ok = _visible(t, (keys + k_first) * KEY_STRIDE + KEY_OFFSET, WINDOW) & key_ok[None, :]
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = m_new
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, rows64, row_ok, head, sqt, sqh, sdot, sdoh, slt, slh, DK: tl.constexpr,
                DV: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr):
    """What a backward needs of query rows: Q parts, dO, lse in log2 units (+inf where a row has no key)
    and delta; zeros where not row_ok."""
    offs_dv = tl.arange(0, BLOCK_DV)
    q_a, q_b = load_qk(Q + rows64 * sqt + head * sqh, row_ok, DK, DK_A, DK_B)
    do = tl.load(DO + rows64[:, None] * sdot + head * sdoh + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2, delta = _row_stats(LSE, DELTA, rows64, row_ok, head, slt, slh)
    return q_a, q_b, do, lse2, delta


@triton.jit
def _row_stats(LSE, DELTA, rows64, row_ok, head, slt, slh):
    """lse of query rows in log2 units (+inf where a row has no key or is not row_ok) and delta (0 there)."""
    lse = tl.load(LSE + rows64 * slt + head * slh, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + rows64 * slt + head * slh, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, K, V, k_doc, k_first, kv_head, skt, skh, svt, svh, j0, j_hi, t,
             qk_scale, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr, DK: tl.constexpr,
             DV: tl.constexpr,
             BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
             MASKED: tl.constexpr, TMA: tl.constexpr):
    """One key tile of dQ. MASKED=False: every query sees every key of the tile."""
    keys, key_ok, k_a, k_b, v = _key_tile(K, V, k_doc, kv_head, skt, skh, svt, svh, j0, j_hi, DK, DV, BLOCK_N,
                                          DK_A, DK_B, BLOCK_DV, MASKED, TMA)
    s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        ok = _visible(t, (keys + k_first) * KEY_STRIDE + KEY_OFFSET, WINDOW) & key_ok[None, :]
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return acc_qk(dq_a, dq_b, ds.to(k_a.dtype), k_a, k_b, DK_B)


@triton.jit
def _band_fwd(
    Q, K, V, O, LSE, TileStart, TileEnd, TileSeg, CuQ, CuK, QPos0, KFirst,
    sqt, sqh, skt, skh, svt, svh, sot, soh, slt, slh,
    qk_scale,
    G: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # later query tiles see more keys: start them first
    kv_head = head // G
    start = tl.load(TileStart + tile)
    end = tl.load(TileEnd + tile)
    if end <= start:  # a padding tile (layout.tiles)
        return
    seg = tl.load(TileSeg + tile)
    q_doc = tl.load(CuQ + seg)
    k_doc = tl.load(CuK + seg)
    k_len = tl.load(CuK + seg + 1) - k_doc

    q_pos0 = tl.load(QPos0 + seg)  # position of the segment's first query
    k_first = tl.load(KFirst + seg)  # key index (in key units) of the segment's first key
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    t = rows - q_doc + q_pos0
    offs_dv = tl.arange(0, BLOCK_DV)
    rows64 = rows.to(tl.int64)
    q_a, q_b = load_qk(Q + rows64 * sqt + head * sqh, row_ok, DK, DK_A, DK_B)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    j_lo, j_hi, tile_a, tile_b, num_tiles = _key_walk(start - q_doc + q_pos0, end - 1 - q_doc + q_pos0, k_len,
                                                      k_first, KEY_STRIDE, KEY_OFFSET, WINDOW, BLOCK_N)
    for tile_j in range(0, tile_a):
        m_i, l_i, acc = _fwd_step(q_a, q_b, m_i, l_i, acc, K, V, k_doc, k_first, kv_head, skt, skh, svt, svh,
                                  j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                                  DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, True, TMA)
    for tile_j in range(tile_a, tile_b):
        m_i, l_i, acc = _fwd_step(q_a, q_b, m_i, l_i, acc, K, V, k_doc, k_first, kv_head, skt, skh, svt, svh,
                                  j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                                  DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, False, TMA)
    for tile_j in range(tile_b, num_tiles):
        m_i, l_i, acc = _fwd_step(q_a, q_b, m_i, l_i, acc, K, V, k_doc, k_first, kv_head, skt, skh, svt, svh,
                                  j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                                  DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, True, TMA)

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + rows64[:, None] * sot + head * soh + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + rows64 * slt + head * slh, lse, mask=row_ok)


@triton.jit
def _band_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, TileStart, TileEnd, TileSeg, CuQ, CuK, QPos0, KFirst,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, slt, slh, sdqt, sdqh,
    qk_scale, sm_scale,
    G: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr, ADD_DQ: tl.constexpr,
):
    head = tl.program_id(0)
    tile = tl.num_programs(1) - 1 - tl.program_id(1)  # later query tiles see more keys: start them first
    kv_head = head // G
    start = tl.load(TileStart + tile)
    end = tl.load(TileEnd + tile)
    if end <= start:  # a padding tile (layout.tiles)
        return
    seg = tl.load(TileSeg + tile)
    q_doc = tl.load(CuQ + seg)
    k_doc = tl.load(CuK + seg)
    k_len = tl.load(CuK + seg + 1) - k_doc

    q_pos0 = tl.load(QPos0 + seg)  # position of the segment's first query
    k_first = tl.load(KFirst + seg)  # key index (in key units) of the segment's first key
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    t = rows - q_doc + q_pos0
    rows64 = rows.to(tl.int64)
    q_a, q_b, do, lse2, delta = _query_rows(Q, DO, LSE, DELTA, rows64, row_ok, head, sqt, sqh, sdot, sdoh, slt, slh,
                                            DK, DV, DK_A, DK_B, BLOCK_DV)

    dq_a, dq_b = zeros_qk(BLOCK_M, DK_A, DK_B)
    j_lo, j_hi, tile_a, tile_b, num_tiles = _key_walk(start - q_doc + q_pos0, end - 1 - q_doc + q_pos0, k_len,
                                                      k_first, KEY_STRIDE, KEY_OFFSET, WINDOW, BLOCK_N)
    for tile_j in range(0, tile_a):
        dq_a, dq_b = _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, K, V, k_doc, k_first, kv_head, skt, skh,
                              svt, svh, j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                              DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, True, TMA)
    for tile_j in range(tile_a, tile_b):
        dq_a, dq_b = _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, K, V, k_doc, k_first, kv_head, skt, skh,
                              svt, svh, j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                              DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, False, TMA)
    for tile_j in range(tile_b, num_tiles):
        dq_a, dq_b = _dq_step(q_a, q_b, do, lse2, delta, dq_a, dq_b, K, V, k_doc, k_first, kv_head, skt, skh,
                              svt, svh, j_lo + tile_j * BLOCK_N, j_hi, t, qk_scale, KEY_STRIDE, KEY_OFFSET, WINDOW,
                              DK, DV, BLOCK_N, DK_A, DK_B, BLOCK_DV, True, TMA)
    store_or_add_qk(DQ + rows64 * sdqt + head * sdqh, dq_a * sm_scale, dq_b * sm_scale, row_ok, DK, DK_A, DK_B,
                    ADD_DQ)


@triton.jit
def _unmasked_query_tiles(t_lo, t_hi, first_pos, last_pos, full_key_tile, WINDOW: tl.constexpr,
                          BLOCK_M: tl.constexpr):
    """A key tile (positions first_pos..last_pos) walks queries [t_lo, t_hi) in tiles of BLOCK_M from t_lo.
    Returns (a, b, n): query tiles [a, b) see every key of the tile (no mask needed), n tiles in all.
    A key tile with invalid keys (not full_key_tile) is masked throughout."""
    num_tiles = tl.maximum(tl.cdiv(t_hi - t_lo, BLOCK_M), 0)
    tile_a = tl.minimum(tl.cdiv(tl.maximum(last_pos - t_lo, 0), BLOCK_M), num_tiles)  # from the last key on
    tile_b = tl.maximum(t_hi - t_lo, 0) // BLOCK_M  # whole query tiles
    if WINDOW > 0:  # queries before first_pos + WINDOW
        tile_b = tl.minimum(tile_b, tl.maximum(first_pos + WINDOW - t_lo, 0) // BLOCK_M)
    tile_b = tl.where(full_key_tile, tl.minimum(tl.maximum(tile_b, tile_a), num_tiles), tile_a)
    return tile_a, tile_b, num_tiles


@triton.jit
def _dkdv_step(k_a, k_b, v, key_pos, key_ok, dk_a, dk_b, dv, Q, DO, LSE, DELTA, head, q_doc, q_pos0, t0, t_hi,
               sqt, sqh, sdot, sdoh, slt, slh, qk_scale, WINDOW: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               BLOCK_M: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
               MASKED: tl.constexpr, TMA: tl.constexpr):
    """One query tile (positions t0..t0+BLOCK_M) of a key tile's dK, dV. MASKED=False: every query of the
    tile sees every key. TMA: Q and DO are descriptors of [rows, H_q * d] (one part: d_k a power of two)."""
    t = t0 + tl.arange(0, BLOCK_M)
    row_ok = t < t_hi
    rows64 = (q_doc + t - q_pos0).to(tl.int64)
    if TMA:
        q_a = Q.load([q_doc + t0 - q_pos0, head * DK])
        q_b = 0.0
        do = DO.load([q_doc + t0 - q_pos0, head * DV])
        if MASKED:
            q_a = tl.where(row_ok[:, None], q_a, 0.0)
            do = tl.where(row_ok[:, None], do, 0.0)
        lse2, delta = _row_stats(LSE, DELTA, rows64, row_ok, head, slt, slh)
    else:
        q_a, q_b, do, lse2, delta = _query_rows(Q, DO, LSE, DELTA, rows64, row_ok, head, sqt, sqh, sdot, sdoh,
                                                slt, slh, DK, DV, DK_A, DK_B, BLOCK_DV)
    s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    if MASKED:
        ok = _visible(t, key_pos, WINDOW) & key_ok[None, :] & row_ok[:, None]
        p = tl.where(ok, p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dk_a, dk_b = acc_qk(dk_a, dk_b, tl.trans(ds.to(q_a.dtype)), q_a, q_b, DK_B)
    return dk_a, dk_b, dv


@triton.jit
def _band_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK_, DV_, TileStart, TileEnd, TileSeg, CuQ, CuK, QPos0, KFirst,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, slt, slh, sdkt, sdkh, sdvt, sdvh,
    qk_scale, sm_scale,
    G: tl.constexpr, KEY_STRIDE: tl.constexpr, KEY_OFFSET: tl.constexpr, WINDOW: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT_HEADS: tl.constexpr, TMA: tl.constexpr,
):
    # SPLIT_HEADS: one program per (query head, key tile) writing that head's share to DK_/DV_[g]
    # (summed over g afterwards); otherwise one program per (KV head, key tile) looping over the group.
    tile = tl.program_id(1)
    if SPLIT_HEADS:
        kv_head = tl.program_id(0) // G
        g_lo = tl.program_id(0) % G
        g_hi = g_lo + 1
        DK_ += g_lo * sdkh
        DV_ += g_lo * sdvh
    else:
        kv_head = tl.program_id(0)
        g_lo = 0
        g_hi = G
    k_start = tl.load(TileStart + tile)
    k_end = tl.load(TileEnd + tile)
    if k_end <= k_start:  # a padding tile (layout.tiles)
        return
    seg = tl.load(TileSeg + tile)
    q_doc = tl.load(CuQ + seg)
    q_len = tl.load(CuQ + seg + 1) - q_doc
    k_doc = tl.load(CuK + seg)
    q_pos0 = tl.load(QPos0 + seg)
    k_first = tl.load(KFirst + seg)

    keys = k_start - k_doc + k_first + tl.arange(0, BLOCK_N)  # key index in key units
    krow = k_start + tl.arange(0, BLOCK_N)
    key_ok = krow < k_end
    key_pos = keys * KEY_STRIDE + KEY_OFFSET
    offs_dv = tl.arange(0, BLOCK_DV)
    krow64 = krow.to(tl.int64)
    k_a, k_b = load_qk(K + krow64 * skt + kv_head * skh, key_ok, DK, DK_A, DK_B)
    v = tl.load(V + krow64[:, None] * svt + kv_head * svh + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)

    dk_a, dk_b = zeros_qk(BLOCK_N, DK_A, DK_B)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    # query positions that can see this key tile, within the segment's queries
    first_pos = (k_start - k_doc + k_first) * KEY_STRIDE + KEY_OFFSET
    t_lo = tl.maximum(first_pos, q_pos0)
    last_pos = (k_end - 1 - k_doc + k_first) * KEY_STRIDE + KEY_OFFSET
    t_hi = q_pos0 + q_len
    if WINDOW > 0:
        t_hi = tl.minimum(t_hi, last_pos + WINDOW)
    tile_a, tile_b, num_tiles = _unmasked_query_tiles(t_lo, t_hi, first_pos, last_pos, k_end - k_start == BLOCK_N,
                                                      WINDOW, BLOCK_M)
    for g in range(g_lo, g_hi):
        head = kv_head * G + g
        for tile_t in range(0, tile_a):
            dk_a, dk_b, dv = _dkdv_step(k_a, k_b, v, key_pos, key_ok, dk_a, dk_b, dv, Q, DO, LSE, DELTA, head,
                                        q_doc, q_pos0, t_lo + tile_t * BLOCK_M, t_hi, sqt, sqh, sdot, sdoh, slt, slh,
                                        qk_scale, WINDOW, DK, DV, BLOCK_M, DK_A, DK_B, BLOCK_DV, True, TMA)
        for tile_t in range(tile_a, tile_b):
            dk_a, dk_b, dv = _dkdv_step(k_a, k_b, v, key_pos, key_ok, dk_a, dk_b, dv, Q, DO, LSE, DELTA, head,
                                        q_doc, q_pos0, t_lo + tile_t * BLOCK_M, t_hi, sqt, sqh, sdot, sdoh, slt, slh,
                                        qk_scale, WINDOW, DK, DV, BLOCK_M, DK_A, DK_B, BLOCK_DV, False, TMA)
        for tile_t in range(tile_b, num_tiles):
            dk_a, dk_b, dv = _dkdv_step(k_a, k_b, v, key_pos, key_ok, dk_a, dk_b, dv, Q, DO, LSE, DELTA, head,
                                        q_doc, q_pos0, t_lo + tile_t * BLOCK_M, t_hi, sqt, sqh, sdot, sdoh, slt, slh,
                                        qk_scale, WINDOW, DK, DV, BLOCK_M, DK_A, DK_B, BLOCK_DV, True, TMA)
    out_head = kv_head * G if SPLIT_HEADS else kv_head  # split: DK_ is [T, H_kv * G (kv-major), D]
    store_qk(DK_ + krow64 * sdkt + out_head * sdkh, dk_a * sm_scale, dk_b * sm_scale, key_ok, DK, DK_A, DK_B)
    tl.store(DV_ + krow64[:, None] * sdvt + out_head * sdvh + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < DV))


def _geometry(kind: str, params: KernelParams):
    """(KEY_STRIDE, KEY_OFFSET, WINDOW) of a branch."""
    if kind == "window":
        return 1, 0, params.window
    if kind == "compressed":
        return params.compress_stride, params.compress_block - 1, 0
    raise ValueError(f"kind={kind!r} is not allowed; choose 'window' or 'compressed'")


def _key_rows(kind: str):
    """Which rows of the layout are a branch's keys."""
    return "keys" if kind == "window" else "compressed"


def _blocks(kernel: str, kind: str, dk: int, dv: int) -> dict:
    return dict(launch_params(f"{kernel}/{kind}", tile_width(dk, dv)), **qk_parts(dk),
                BLOCK_DV=triton.next_power_of_2(dv))


def _streamed(tensors, blocks: dict, block_rows: str):
    """tma.streamed for tiles of blocks[block_rows] rows; takes the TMA launch parameter out of blocks."""
    return streamed(tensors, blocks[block_rows], blocks.pop("TMA", False))


def band_forward(q, k, v, layout: Layout, kind: str, params: KernelParams):
    """(out [T, H_q, d_v], lse [T, H_q] float32) of band attention; arguments as band_attention's."""
    cu_q, q_pos0, _ = layout.bounds("queries")
    cu_k, k_first, _ = layout.bounds(_key_rows(kind))
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    key_stride, key_offset, window = _geometry(kind, params)
    blocks = _blocks("band_fwd", kind, q.shape[2], v.shape[2])
    (k_in, v_in), tma = _streamed([k, v], blocks, "BLOCK_N")
    out = torch.empty(q.shape[0], num_q_heads, v.shape[2], device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[0], num_q_heads, device=q.device, dtype=torch.float32)
    tile_start, tile_end, tile_seg = layout.tiles("queries", blocks["BLOCK_M"], q.shape[0])
    if tile_start.numel():
        _band_fwd[(num_q_heads, tile_start.numel())](
            Q=q, K=k_in, V=v_in, O=out, LSE=lse, TileStart=tile_start, TileEnd=tile_end, TileSeg=tile_seg,
            CuQ=cu_q, CuK=cu_k, QPos0=q_pos0, KFirst=k_first,
            sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), svt=v.stride(0), svh=v.stride(1),
            sot=out.stride(0), soh=out.stride(1), slt=lse.stride(0), slh=lse.stride(1),
            qk_scale=params.scale * LOG2E.value, G=num_q_heads // num_kv_heads, KEY_STRIDE=key_stride,
            KEY_OFFSET=key_offset, WINDOW=window, DK=q.shape[2], DV=v.shape[2], **blocks, TMA=tma,
        )
    return out, lse


def band_backward(q, k, v, layout: Layout, kind: str, params: KernelParams, grad_out, lse, delta, dq=None):
    """(dQ, dK, dV) of band attention from dO [T, H_q, d_v] (contiguous), the forward's lse and
    delta = rowsum(dO * O) - dlse, both [T, H_q] float32 and contiguous. `dq`: a [T, H_q, d_k] gradient
    that this branch's dQ is added to (returned), instead of a new tensor: the sum is taken in float32
    and rounded to dq's dtype once."""
    key_rows = _key_rows(kind)
    cu_q, q_pos0, _ = layout.bounds("queries")
    cu_k, k_first, _ = layout.bounds(key_rows)
    key_stride, key_offset, window = _geometry(kind, params)
    blocks = _blocks("band_dq", kind, q.shape[2], v.shape[2])
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    add_dq = dq is not None
    dq = dq if add_dq else torch.empty_like(q)
    common = dict(CuQ=cu_q, CuK=cu_k, QPos0=q_pos0, KFirst=k_first, qk_scale=params.scale * LOG2E.value,
                  sm_scale=params.scale, G=group, KEY_STRIDE=key_stride, KEY_OFFSET=key_offset, WINDOW=window,
                  DK=q.shape[2], DV=v.shape[2])
    (k_in, v_in), tma = _streamed([k, v], blocks, "BLOCK_N")
    tile_start, tile_end, tile_seg = layout.tiles("queries", blocks["BLOCK_M"], q.shape[0])
    if tile_start.numel():
        _band_bwd_dq[(num_q_heads, tile_start.numel())](
            Q=q, K=k_in, V=v_in, DO=grad_out, LSE=lse, DELTA=delta, DQ=dq, TileStart=tile_start, TileEnd=tile_end,
            TileSeg=tile_seg, sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
            svt=v.stride(0), svh=v.stride(1), sdot=grad_out.stride(0), sdoh=grad_out.stride(1),
            slt=lse.stride(0), slh=lse.stride(1), sdqt=dq.stride(0), sdqh=dq.stride(1),
            **common, **blocks, TMA=tma, ADD_DQ=add_dq,
        )
    # Compressed keys are few and each is seen by many queries: split the group's heads over
    # programs (partial dK/dV per head, summed below in a fixed order). Window keys are many.
    split = window == 0 and group > 1
    kv_blocks = _blocks("band_dkdv", kind, q.shape[2], v.shape[2])
    heads_out = num_q_heads if split else num_kv_heads
    dk = torch.empty(k.shape[0], heads_out, k.shape[2], device=k.device, dtype=torch.float32 if split else k.dtype)
    dv = torch.empty(v.shape[0], heads_out, v.shape[2], device=v.device, dtype=torch.float32 if split else v.dtype)
    (q_in, grad_out_in), tma = _streamed([q, grad_out], kv_blocks, "BLOCK_M")
    tile_start, tile_end, tile_seg = layout.tiles(key_rows, kv_blocks["BLOCK_N"], k.shape[0])
    if tile_start.numel():
        # dK/dV reads lse and delta of a query tile for one head: stored head-major, those values are
        # contiguous
        lse_by_head = lse.t().contiguous().t()  # [T, H_q], strides (1, T)
        delta_by_head = delta.t().contiguous().t()
        _band_bwd_dkdv[(heads_out, tile_start.numel())](
            Q=q_in, K=k, V=v, DO=grad_out_in, LSE=lse_by_head, DELTA=delta_by_head, DK_=dk, DV_=dv,
            TileStart=tile_start, TileEnd=tile_end, TileSeg=tile_seg,
            sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), svt=v.stride(0), svh=v.stride(1),
            sdot=grad_out.stride(0), sdoh=grad_out.stride(1), slt=lse_by_head.stride(0), slh=lse_by_head.stride(1),
            sdkt=dk.stride(0), sdkh=dk.stride(1), sdvt=dv.stride(0), sdvh=dv.stride(1),
            **common, **kv_blocks, SPLIT_HEADS=split, TMA=tma,
        )
    if split:
        dk = dk.view(k.shape[0], num_kv_heads, group, k.shape[2]).sum(2).to(k.dtype)
        dv = dv.view(v.shape[0], num_kv_heads, group, v.shape[2]).sum(2).to(v.dtype)
    return dq, dk, dv


class BandAttention(torch.autograd.Function):
    """Arguments as band_attention's (q, k, v contiguous)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, kind, params):
        out, lse = band_forward(q, k, v, layout, kind, params)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.kind, ctx.params = layout, kind, params
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = row_dot(grad_out, out)  # [T, H_q]
        if grad_lse is not None:  # d lse / d s = p, so a gradient on lse shifts delta
            delta = delta - grad_lse
        dq, dk, dv = band_backward(q, k, v, ctx.layout, ctx.kind, ctx.params, grad_out, lse, delta)
        return dq, dk, dv, None, None, None


def band_attention(q, k, v, layout: Layout, kind: str, params: KernelParams):
    """Window (kind='window') or compressed (kind='compressed') attention. Returns (out [T, H_q, d_v], lse [T, H_q]).

    q [T, H_q, d_k] holds the layout's queries; k [Tk, H_kv, d_k], v [Tk, H_kv, d_v] its token keys
    (window) or its compressed keys (compressed), segment by segment.
    """
    return BandAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), layout, kind, params)
