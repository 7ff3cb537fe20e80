"""Selected-block attention, group-centric (NSA paper, section 3.4).

Forward and dQ: one program per (tile of query tokens, KV head) loads the G query heads of the
group for each of the tile's tokens together and streams the union of the tokens' selected K/V
blocks (l' tokens each), each block once; a row sees a block's keys when its token picked the block,
causal inside the block that holds the token. A tile has one token when G >= 16 (the paper's
group-centric kernel); for smaller groups it has ROWS // G tokens (G rounded up to a power of two;
launch parameter ROWS, 16 by default), so that the matrix units get full tiles instead of G rows
padded to 16, and a block that neighbouring tokens share (the forced initial and local blocks at
least) is read once for them all.
The union of each tile is built on the host side (`tile_block_union`).

dK/dV: no atomics. The selection is inverted on the host side into, per (KV head, block), the
sorted list of query tokens that picked it; long lists are cut into pieces of at most
PIECE tokens. One program per piece accumulates that piece's contribution, and a second pass
sums the pieces of each block in a fixed order, so the result is bitwise reproducible.

Q and K rows, dQ, dK and the partial dK are handled as two power-of-two column parts when d_k is
not a power of two (kernels/qk_parts.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .constants import LN2, LOG2E, PIECE
from .delta import row_dot
from .layout import Layout, max_pieces, segment_of
from .params import KernelParams
from .qk_parts import acc_qk, dot_qk, load_qk, qk_parts, store_or_add_qk, store_qk, tile_width, zeros_qk
from .tuning import launch_params


@triton.jit
def _used_slots(ROW, N: tl.constexpr, N_P2: tl.constexpr):
    """Number of used slots of a list whose used entries come first, then -1s, so that loops over
    the slots stop there (a context-parallel piece may leave most slots unused)."""
    slots = tl.arange(0, N_P2)
    ids = tl.load(ROW + slots, mask=slots < N, other=-1)
    return tl.sum((ids >= 0).to(tl.int32), 0)


@triton.jit
def _tile_rows(tile, kv_head, num_rows, RowPos, G: tl.constexpr, GP: tl.constexpr, TOKENS: tl.constexpr):
    """The rows of one program: TOKENS consecutive query tokens x the G heads of a KV group (row r is
    token r // GP, head r % GP). Returns (token [R] int64, head [R], row_ok [R], position [R]: -1 where
    a row is not ok)."""
    offs_r = tl.arange(0, TOKENS * GP)
    token = tile.to(tl.int64) * TOKENS + offs_r // GP
    row_ok = (token < num_rows) & (offs_r % GP < G)
    head = kv_head * G + offs_r % GP
    t = tl.load(RowPos + token, mask=row_ok, other=-1)
    return token, head, row_ok, t


@triton.jit
def _tile_selection(IDX, TILE_BLOCKS, RowKeyStart, RowSlcStart, tile, kv_head, token, row_ok, sit, sih, stt, sth,
                    TOKENS: tl.constexpr, N_SELECT: tl.constexpr, N_SELECT_P2: tl.constexpr):
    """What a program needs to walk its blocks: (its union's pointer, and for one token the key row of
    its document's first token, for several the [R, N_SELECT_P2] global block ids each row's token
    picked (-1: unused slot or dead row))."""
    union = TILE_BLOCKS + tile.to(tl.int64) * stt + kv_head * sth
    doc_start = 0
    token_block_ids = 0
    if TOKENS == 1:
        doc_start = tl.load(RowKeyStart + tile)
    else:
        slots = tl.arange(0, N_SELECT_P2)
        ids = tl.load(IDX + token[:, None] * sit + kv_head * sih + slots[None, :],
                      mask=row_ok[:, None] & (slots[None, :] < N_SELECT), other=-1)
        first = tl.load(RowSlcStart + token, mask=row_ok, other=0)
        token_block_ids = tl.where(ids >= 0, ids + first[:, None], -1)
    return union, doc_start, token_block_ids


@triton.jit
def _union_block(UNION, step, BlockDocs, num_blocks, doc_start, token_block_ids, t, row_ok,
                 SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, PARTS: tl.constexpr, TOKENS: tl.constexpr):
    """Step `step` of the walk over the program's union: part step % PARTS (BLOCK_N keys) of its block
    step // PARTS. Returns (key rows [BLOCK_N] int64, key_ok [BLOCK_N], visible [R, BLOCK_N]).
    A row sees a key when its token selected the block and the key is not after the token. One token:
    UNION holds its block ids within its document, whose first key row is doc_start. Several tokens:
    global block ids, placed through BlockDocs."""
    block = tl.load(UNION + step // PARTS)
    offs_n = (step % PARTS) * BLOCK_N + tl.arange(0, BLOCK_N)  # key offsets within the block
    if TOKENS == 1:
        pos = block * SLC_BLOCK + offs_n
        krow = (doc_start + pos).to(tl.int64)
        key_ok = (offs_n < SLC_BLOCK) & (pos <= tl.max(t, 0))
        visible = key_ok[None, :] & row_ok[:, None]
    else:
        doc = tl.load(BlockDocs + block)
        local_block = tl.load(BlockDocs + num_blocks + block)
        doc_end = tl.load(BlockDocs + 2 * num_blocks + block)
        pos = local_block * SLC_BLOCK + offs_n
        krow = (doc + pos).to(tl.int64)
        key_ok = (offs_n < SLC_BLOCK) & (krow < doc_end)
        picked = tl.sum((token_block_ids == block).to(tl.int32), 1) > 0
        visible = key_ok[None, :] & (pos[None, :] <= t[:, None]) & row_ok[:, None] & picked[:, None]
    return krow, key_ok, visible


@triton.jit
def _selected_fwd(
    Q, K, V, O, LSE, IDX, TILE_BLOCKS, RowPos, RowKeyStart, RowSlcStart, BlockDocs,
    sqt, sqh, skt, skh, svt, svh, sot, soh, slt, slh, sit, sih, stt, sth,
    qk_scale, num_rows, num_blocks,
    G: tl.constexpr, GP: tl.constexpr, TOKENS: tl.constexpr, N_SELECT: tl.constexpr, N_SELECT_P2: tl.constexpr,
    N_UNION: tl.constexpr, N_UNION_P2: tl.constexpr, SLC_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr,
    BLOCK_DV: tl.constexpr, PARTS: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    token, heads, row_ok, t = _tile_rows(tile, kv_head, num_rows, RowPos, G, GP, TOKENS)
    union, doc_start, token_block_ids = _tile_selection(IDX, TILE_BLOCKS, RowKeyStart, RowSlcStart, tile, kv_head,
                                                        token, row_ok, sit, sih, stt, sth, TOKENS, N_SELECT,
                                                        N_SELECT_P2)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_a, q_b = load_qk(Q + token * sqt + heads * sqh, row_ok, DK, DK_A, DK_B)
    m_i = tl.full([TOKENS * GP], float("-inf"), tl.float32)
    l_i = tl.zeros([TOKENS * GP], tl.float32)
    acc = tl.zeros([TOKENS * GP, BLOCK_DV], tl.float32)
    for step in range(0, _used_slots(union, N_UNION, N_UNION_P2) * PARTS):
        krow, key_ok, visible = _union_block(union, step, BlockDocs, num_blocks, doc_start, token_block_ids, t,
                                             row_ok, SLC_BLOCK, BLOCK_N, PARTS, TOKENS)
        k_a, k_b = load_qk(K + krow * skt + kv_head * skh, key_ok, DK, DK_A, DK_B)
        v = tl.load(V + krow[:, None] * svt + kv_head * svh + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: no NaN
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row with no visible key gives 0 (and lse -inf)
    tl.store(O + token[:, None] * sot + heads[:, None] * soh + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + token * slt + heads * slh, (m_i + tl.log2(l_i)) * LN2, mask=row_ok)


@triton.jit
def _selected_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, IDX, TILE_BLOCKS, RowPos, RowKeyStart, RowSlcStart, BlockDocs,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, slt, slh, sit, sih, stt, sth, sdqt, sdqh,
    qk_scale, sm_scale, num_rows, num_blocks,
    G: tl.constexpr, GP: tl.constexpr, TOKENS: tl.constexpr, N_SELECT: tl.constexpr, N_SELECT_P2: tl.constexpr,
    N_UNION: tl.constexpr, N_UNION_P2: tl.constexpr, SLC_BLOCK: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr,
    BLOCK_DV: tl.constexpr, PARTS: tl.constexpr, ADD_DQ: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    token, heads, row_ok, t = _tile_rows(tile, kv_head, num_rows, RowPos, G, GP, TOKENS)
    union, doc_start, token_block_ids = _tile_selection(IDX, TILE_BLOCKS, RowKeyStart, RowSlcStart, tile, kv_head,
                                                        token, row_ok, sit, sih, stt, sth, TOKENS, N_SELECT,
                                                        N_SELECT_P2)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_a, q_b = load_qk(Q + token * sqt + heads * sqh, row_ok, DK, DK_A, DK_B)
    do = tl.load(DO + token[:, None] * sdot + heads[:, None] * sdoh + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse2 = tl.load(LSE + token * slt + heads * slh, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + token * slt + heads * slh, mask=row_ok, other=0.0)
    dq_a, dq_b = zeros_qk(TOKENS * GP, DK_A, DK_B)
    for step in range(0, _used_slots(union, N_UNION, N_UNION_P2) * PARTS):
        krow, key_ok, visible = _union_block(union, step, BlockDocs, num_blocks, doc_start, token_block_ids, t,
                                             row_ok, SLC_BLOCK, BLOCK_N, PARTS, TOKENS)
        k_a, k_b = load_qk(K + krow * skt + kv_head * skh, key_ok, DK, DK_A, DK_B)
        v = tl.load(V + krow[:, None] * svt + kv_head * svh + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq_a, dq_b = acc_qk(dq_a, dq_b, ds.to(k_a.dtype), k_a, k_b, DK_B)
    store_or_add_qk(DQ + token * sdqt + heads * sdqh, dq_a * sm_scale, dq_b * sm_scale, row_ok, DK, DK_A, DK_B,
                    ADD_DQ)


@triton.jit
def _selected_bwd_dkdv_pieces(
    Q, K, V, DO, LSE, DELTA, PDK, PDV, PieceKey, PieceStart, PieceEnd, QueryList, BlockDocStart, RowPos,
    sqt, sqh, skt, skh, svt, svh, sdot, sdoh, slt, slh,
    qk_scale, num_blocks,
    G: tl.constexpr, GP: tl.constexpr, SLC_BLOCK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    TQ: tl.constexpr, BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Partial dK/dV of one (KV head, block) from one piece of its query list -> PDK/PDV[piece]
    (a PDK row: part a's DK_A columns, then part b's DK_B)."""
    piece = tl.program_id(0).to(tl.int64)
    key = tl.load(PieceKey + piece)  # kv_head * num_blocks + global block id
    kv_head = key // num_blocks
    block = key % num_blocks
    doc = tl.load(BlockDocStart + block)  # (first token row of the doc, block id within the doc)
    local_block = tl.load(BlockDocStart + num_blocks + block)
    first = tl.load(PieceStart + piece)
    last = tl.load(PieceEnd + piece)
    if last <= first:  # a padding piece (_invert_selection): not summed
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = local_block * SLC_BLOCK + offs_n
    krow = (doc + pos).to(tl.int64)
    doc_end = tl.load(BlockDocStart + 2 * num_blocks + block)
    col_ok = (offs_n < SLC_BLOCK) & (krow < doc_end)
    k_a, k_b = load_qk(K + krow * skt + kv_head * skh, col_ok, DK, DK_A, DK_B)
    v = tl.load(V + krow[:, None] * svt + kv_head * svh + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk_a, dk_b = zeros_qk(BLOCK_N, DK_A, DK_B)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    offs_r = tl.arange(0, TQ * GP)  # row r: query entry r // GP, head r % GP of the group
    for i0 in range(first, last, TQ):
        entry = i0 + offs_r // GP
        r_ok = (entry < last) & (offs_r % GP < G)
        qrow = tl.load(QueryList + entry, mask=r_ok, other=0).to(tl.int64)
        head = kv_head * G + offs_r % GP
        t = tl.load(RowPos + qrow, mask=r_ok, other=0)
        q_a, q_b = load_qk(Q + qrow * sqt + head * sqh, r_ok, DK, DK_A, DK_B)
        do = tl.load(DO + qrow[:, None] * sdot + head[:, None] * sdoh + offs_dv[None, :],
                     mask=r_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse2 = tl.load(LSE + qrow * slt + head * slh, mask=r_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + qrow * slt + head * slh, mask=r_ok, other=0.0)
        s = dot_qk(q_a, q_b, k_a, k_b, DK_B) * qk_scale
        ok = r_ok[:, None] & col_ok[None, :] & (pos[None, :] <= t[:, None])
        p = tl.where(ok, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk_a, dk_b = acc_qk(dk_a, dk_b, tl.trans(ds.to(q_a.dtype)), q_a, q_b, DK_B)
    all_rows = offs_n < BLOCK_N
    store_qk(PDK + (piece * BLOCK_N + offs_n) * (DK_A + DK_B), dk_a, dk_b, all_rows, DK_A + DK_B, DK_A, DK_B)
    tl.store(PDV + piece * BLOCK_N * BLOCK_DV + offs_n[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def _selected_bwd_dkdv_sum(
    PDK, PDV, DK_, DV_, PiecesOfKey, BlockDocStart,
    sdkt, sdkh, sdvt, sdvh, sm_scale, num_blocks,
    SLC_BLOCK: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DK_A: tl.constexpr, DK_B: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """dK/dV of one (KV head, block) = the sum of its pieces, in piece order."""
    key = tl.program_id(0).to(tl.int64)
    kv_head = key // num_blocks
    block = key % num_blocks
    doc = tl.load(BlockDocStart + block)
    local_block = tl.load(BlockDocStart + num_blocks + block)
    doc_end = tl.load(BlockDocStart + 2 * num_blocks + block)
    p_lo = tl.load(PiecesOfKey + key)
    p_hi = tl.load(PiecesOfKey + key + 1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    all_rows = offs_n < BLOCK_N
    dk_a, dk_b = zeros_qk(BLOCK_N, DK_A, DK_B)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for piece in range(p_lo, p_hi):
        part_a, part_b = load_qk(PDK + (piece * BLOCK_N + offs_n) * (DK_A + DK_B), all_rows, DK_A + DK_B, DK_A, DK_B)
        dk_a += part_a
        dk_b += part_b
        dv += tl.load(PDV + piece * BLOCK_N * BLOCK_DV + offs_n[:, None] * BLOCK_DV + offs_dv[None, :])
    pos = local_block * SLC_BLOCK + offs_n
    krow = (doc + pos).to(tl.int64)
    ok = (offs_n < SLC_BLOCK) & (krow < doc_end)
    store_qk(DK_ + krow * sdkt + kv_head * sdkh, dk_a * sm_scale, dk_b * sm_scale, ok, DK, DK_A, DK_B)
    tl.store(DV_ + krow[:, None] * sdvt + kv_head * sdvh + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=ok[:, None] & (offs_dv[None, :] < DV))


def used_slots_first(selected_block_idx: torch.Tensor) -> torch.Tensor:
    """[T, H_kv, n] ids with -1 anywhere -> the same ids per row, -1 slots moved last (order kept)."""
    order = torch.sort((selected_block_idx < 0).to(torch.int8), dim=-1, stable=True).indices
    return selected_block_idx.gather(-1, order)


def _invert_selection(selected_block_idx, row_slc_start, num_blocks: int):
    """Per (KV head, global block): the sorted query rows that selected it, cut into pieces. Sizes are
    host-known upper bounds, so nothing waits for the GPU: pieces past the real ones are empty.

    Returns query_list [E], piece_key/start/end [P], pieces_of_key [H_kv*num_blocks + 1] (int32/int64).
    """
    tokens, num_kv_heads, n = selected_block_idx.shape
    device = selected_block_idx.device
    num_keys = num_kv_heads * num_blocks
    idx = selected_block_idx.to(torch.int64)
    head = torch.arange(num_kv_heads, device=device)[None, :, None]
    key = torch.where(idx >= 0, head * num_blocks + row_slc_start.to(torch.int64)[:, None, None] + idx, num_keys)
    row = torch.arange(tokens, device=device)[:, None, None].expand_as(idx)
    # sort by (key, row): rows are ascending already within a key after a stable sort on key; unused
    # slots (key num_keys) sort last
    key, order = torch.sort(key.flatten(), stable=True)
    query_list = row.flatten()[order].to(torch.int32)
    key_ids = torch.arange(num_keys, device=device)
    key_start = torch.searchsorted(key, key_ids)
    counts = torch.searchsorted(key, key_ids, right=True) - key_start
    pieces_per_key = torch.div(counts + PIECE - 1, PIECE, rounding_mode="floor")
    pieces_of_key = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(pieces_per_key, 0)])
    piece_ids = torch.arange(max_pieces(key.numel(), num_keys, PIECE), device=device)
    piece_key = segment_of(pieces_of_key, piece_ids).clamp(max=max(num_keys - 1, 0))
    real = piece_ids < pieces_of_key[-1]
    piece_start = key_start[piece_key] + (piece_ids - pieces_of_key[:-1][piece_key]) * PIECE
    piece_end = torch.where(real, torch.minimum(piece_start + PIECE, key_start[piece_key] + counts[piece_key]), 0)
    return query_list, piece_key, torch.where(real, piece_start, 0), piece_end, pieces_of_key


def _dims(q, v, select_block: int) -> dict:
    return dict(SLC_BLOCK=select_block, DK=q.shape[2], DV=v.shape[2], BLOCK_N=triton.next_power_of_2(select_block),
                **qk_parts(q.shape[2]), BLOCK_DV=triton.next_power_of_2(v.shape[2]))


def _launch(kernel: str, q, v) -> dict:
    return launch_params(kernel, tile_width(q.shape[2], v.shape[2]))


def tokens_per_tile(group: int, rows: int) -> int:
    """Query tokens per program of the forward / dQ kernels: as many as fill `rows` rows with the
    G heads of a group (padded to a power of two), at least one."""
    return max(1, rows // triton.next_power_of_2(group))


def tile_block_union(selected_block_idx: torch.Tensor, row_slc_start: torch.Tensor, tokens: int) -> torch.Tensor:
    """[ceil(T / tokens), H_kv, tokens * n] int32: per tile of `tokens` consecutive query rows and KV
    head, the global ids of the blocks the tile's rows selected, each once and ascending, then -1. A
    one-token tile is its row's selection as it is (block ids within the document, used slots first)."""
    if tokens == 1:
        return selected_block_idx.to(torch.int32)
    idx = selected_block_idx.to(torch.int64)  # [T, H_kv, n]
    num_rows, num_kv_heads, n = idx.shape
    unused = torch.iinfo(torch.int64).max  # sorts after every block id
    global_ids = torch.where(idx >= 0, idx + row_slc_start.to(torch.int64)[:, None, None], unused)
    pad_rows = -num_rows % tokens
    global_ids = torch.cat([global_ids, global_ids.new_full((pad_rows, num_kv_heads, n), unused)])
    per_tile = global_ids.view(-1, tokens, num_kv_heads, n).transpose(1, 2).reshape(-1, num_kv_heads, tokens * n)
    per_tile = per_tile.sort(-1).values
    repeat = torch.zeros_like(per_tile, dtype=torch.bool)
    repeat[..., 1:] = per_tile[..., 1:] == per_tile[..., :-1]
    per_tile = torch.where(repeat, unused, per_tile).sort(-1).values
    return torch.where(per_tile == unused, -1, per_tile).to(torch.int32)


def _tiled_launch(kernel: str, q, v, group: int, params: KernelParams, dims: dict) -> tuple:
    """(launch parameters without ROWS and KEYS, the kernel's constexprs: `dims` with the tile's, tokens
    per tile). A step of the walk covers KEYS keys of a block (the whole block when KEYS is larger), so
    that a program's K/V tiles, and the shared memory that holds them, can be smaller than a block."""
    launch = _launch(kernel, q, v)
    tokens = tokens_per_tile(group, launch.pop("ROWS"))
    keys_per_step = min(launch.pop("KEYS"), dims["BLOCK_N"])
    n = params.select_count
    constexprs = dict(dims, BLOCK_N=keys_per_step, PARTS=-(-params.select_block // keys_per_step),
                      G=group, GP=triton.next_power_of_2(group), TOKENS=tokens, N_SELECT=n,
                      N_SELECT_P2=triton.next_power_of_2(n), N_UNION=tokens * n,
                      N_UNION_P2=triton.next_power_of_2(tokens * n))
    return launch, constexprs, tokens


def _selection_tables(layout: Layout) -> dict:
    """The layout's tables the forward and dQ kernels read, by kernel argument name."""
    if layout.block_docs is None:
        raise ValueError("the selected branch needs a layout with its selection tables: packed_documents(), or "
                         "document_piece(..., select_block=...)")
    return dict(RowPos=layout.row_pos, RowKeyStart=layout.row_key_start, RowSlcStart=layout.row_slc_start,
                BlockDocs=layout.block_docs, num_blocks=layout.num_blocks)


def selected_forward(q, k, v, selected_block_idx, layout: Layout, params: KernelParams):
    """(out [T, H_q, d_v], lse [T, H_q] float32, (tokens per tile, the tiles' block union)) of selected
    attention; the last is what selected_backward can reuse. Arguments as SelectedAttention's."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    tables = _selection_tables(layout)
    out = torch.empty(q.shape[0], num_q_heads, v.shape[2], device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[0], num_q_heads, device=q.device, dtype=torch.float32)
    launch, constexprs, tokens = _tiled_launch("selected_fwd", q, v, group, params, _dims(q, v, params.select_block))
    union = tile_block_union(selected_block_idx, layout.row_slc_start, tokens)
    if q.shape[0]:
        _selected_fwd[(union.shape[0], num_kv_heads)](
            Q=q, K=k, V=v, O=out, LSE=lse, IDX=selected_block_idx, TILE_BLOCKS=union, **tables,
            sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), svt=v.stride(0), svh=v.stride(1),
            sot=out.stride(0), soh=out.stride(1), slt=lse.stride(0), slh=lse.stride(1),
            sit=selected_block_idx.stride(0), sih=selected_block_idx.stride(1), stt=union.stride(0),
            sth=union.stride(1), qk_scale=params.scale * LOG2E.value, num_rows=q.shape[0], **constexprs, **launch,
        )
    return out, lse, (tokens, union)


class SelectedAttention(torch.autograd.Function):
    """q [T, H_q, d_k]; k, v [T, H_kv, d]; selected_block_idx [T, H_kv, n] (block ids within each document,
    per row the used slots first, then -1: top-n's order; used_slots_first() makes any selection so)."""

    @staticmethod
    def forward(ctx, q, k, v, selected_block_idx, layout, params):
        out, lse, forward_union = selected_forward(q, k, v, selected_block_idx, layout, params)
        tokens, union = forward_union
        ctx.save_for_backward(q, k, v, out, lse, selected_block_idx, union)
        ctx.layout, ctx.params, ctx.tokens = layout, params, tokens
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, selected_block_idx, union = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        delta = row_dot(grad_out, out)  # [T, H_q]
        if grad_lse is not None:  # d lse / d s = p, so a gradient on lse shifts delta
            delta = delta - grad_lse
        dq, dk, dv = selected_backward(q, k, v, selected_block_idx, ctx.layout, ctx.params, grad_out, lse, delta,
                                       forward_union=(ctx.tokens, union))
        return dq, dk, dv, None, None, None


def selected_backward(q, k, v, selected_block_idx, layout: Layout, params: KernelParams, grad_out, lse, delta,
                      forward_union=None, dq=None):
    """(dQ, dK, dV) of selected attention given dO [T, H_q, d_v], the softmax's lse [T, H_q] and
    delta = rowsum(dO * O) - dlse [T, H_q] (float32). With the lse and delta of a softmax that also
    spans keys elsewhere, these are this block set's share of that attention's gradients.
    `forward_union`: optional (tokens, tile_block_union(...)) the forward built, reused when dQ tiles as
    many tokens. `dq`: a [T, H_q, d_k] gradient that this branch's dQ is added to (returned), instead of
    a new tensor: the sum is taken in float32 and rounded to dq's dtype once."""
    dims = _dims(q, v, params.select_block)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    tables = _selection_tables(layout)
    add_dq = dq is not None
    dq = dq if add_dq else torch.empty_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if q.shape[0] == 0:
        return dq, dk, dv
    launch, constexprs, tokens = _tiled_launch("selected_dq", q, v, group, params, dims)
    if forward_union is not None and forward_union[0] == tokens:
        union = forward_union[1]
    else:
        union = tile_block_union(selected_block_idx, layout.row_slc_start, tokens)
    _selected_bwd_dq[(union.shape[0], num_kv_heads)](
        Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, DQ=dq, IDX=selected_block_idx, TILE_BLOCKS=union, **tables,
        sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), svt=v.stride(0), svh=v.stride(1),
        sdot=grad_out.stride(0), sdoh=grad_out.stride(1), slt=lse.stride(0), slh=lse.stride(1),
        sit=selected_block_idx.stride(0), sih=selected_block_idx.stride(1), stt=union.stride(0), sth=union.stride(1),
        sdqt=dq.stride(0), sdqh=dq.stride(1), qk_scale=params.scale * LOG2E.value, sm_scale=params.scale,
        num_rows=q.shape[0], **constexprs, **launch, ADD_DQ=add_dq,
    )
    num_blocks = layout.num_blocks
    group_pad = triton.next_power_of_2(group)
    query_list, piece_key, piece_start, piece_end, pieces_of_key = _invert_selection(
        selected_block_idx, layout.row_slc_start, num_blocks)
    num_pieces = piece_key.numel()
    partial_dk = torch.empty(num_pieces, dims["BLOCK_N"], dims["DK_A"] + dims["DK_B"], device=q.device,
                             dtype=torch.float32)
    partial_dv = torch.empty(num_pieces, dims["BLOCK_N"], dims["BLOCK_DV"], device=q.device, dtype=torch.float32)
    if num_pieces:
        dkdv_launch = _launch("selected_dkdv", q, v)
        rows = dkdv_launch.pop("ROWS")
        _selected_bwd_dkdv_pieces[(num_pieces,)](
            Q=q, K=k, V=v, DO=grad_out, LSE=lse, DELTA=delta, PDK=partial_dk, PDV=partial_dv, PieceKey=piece_key,
            PieceStart=piece_start, PieceEnd=piece_end, QueryList=query_list, BlockDocStart=layout.block_docs,
            RowPos=layout.row_pos, sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
            svt=v.stride(0), svh=v.stride(1), sdot=grad_out.stride(0), sdoh=grad_out.stride(1),
            slt=lse.stride(0), slh=lse.stride(1), qk_scale=params.scale * LOG2E.value, num_blocks=num_blocks,
            G=group, GP=group_pad, TQ=max(1, rows // group_pad), **dkdv_launch, **dims,
        )
    _selected_bwd_dkdv_sum[(num_kv_heads * num_blocks,)](
        PDK=partial_dk, PDV=partial_dv, DK_=dk, DV_=dv, PiecesOfKey=pieces_of_key, BlockDocStart=layout.block_docs,
        sdkt=dk.stride(0), sdkh=dk.stride(1), sdvt=dv.stride(0), sdvh=dv.stride(1), sm_scale=params.scale,
        num_blocks=num_blocks, num_warps=4, **dims,
    )
    return dq, dk, dv


def selected_attention(q, k, v, selected_block_idx, layout: Layout, params: KernelParams):
    """Returns (out [T, H_q, d_v], lse [T, H_q]). `layout`: packed_documents(...) or
    document_piece(..., select_block=...)."""
    return SelectedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                   selected_block_idx.contiguous(), layout, params)
