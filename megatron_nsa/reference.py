"""The pure-PyTorch NSA reference: the oracle every kernel and parallel layout is tested against.

Readable, differentiable, runs on CPU and GPU. One sequence at a time (a batch row, or one
packed document); queries processed in chunks so that memory stays
O(T * (T/d + n*l' + w)) per head. Half-precision inputs are computed in float32.

Conventions (docs/semantics.md, 0-indexed):
- compressed block i covers tokens [i*d, i*d + l); query t sees it when i*d + l - 1 <= t;
  its representative position (for RoPE) is its last token, i*d + l - 1.
- selection block j covers tokens [j*l', (j+1)*l'); its score is the overlap-weighted sum of
  compressed probabilities (`selection_overlap_weights`), summed over the G heads of a KV group.
- query heads are grouped: query head h uses KV head h // G.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.utils.checkpoint

from .compression import KVCompressor, block_windows
from .config import NSAConfig

# Elements of one chunk's score tensor (all heads); bounds the reference's peak memory.
_CHUNK_ELEMENTS = 1 << 23

RopeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class NSAIntermediates:
    """Per-branch results of the reference, [T, H_q, ...] rows in input token order (batch flattened)."""

    cmp_out: torch.Tensor  # [B*T, H_q, d_v]
    cmp_lse: torch.Tensor  # [B*T, H_q], -inf where no compressed block is visible
    slc_out: torch.Tensor
    slc_lse: torch.Tensor
    win_out: torch.Tensor
    win_lse: torch.Tensor
    selected_block_idx: torch.Tensor  # [B*T, H_kv, n] int64, ascending, -1 padded
    # [B*T, H_kv, N_slc]: ranked_block_scores of each query (+inf forced, -inf not selectable);
    # N_slc is the longest sequence's, -inf past a shorter one's blocks
    ranked_block_scores: torch.Tensor


# ---------------------------------------------------------------------------------------------
# Block geometry


def num_compressed_blocks(seq_len: int, config: NSAConfig) -> int:
    """Compressed blocks of a sequence: i = 0 .. floor((T - l) / d)."""
    l, d = config.compress_block_size, config.compress_stride
    return 0 if seq_len < l else (seq_len - l) // d + 1


def num_selection_blocks(seq_len: int, config: NSAConfig) -> int:
    return -(-seq_len // config.select_block_size)


def compressed_block_positions(num_blocks: int, config: NSAConfig, device=None) -> torch.Tensor:
    """Representative position of each compressed block (its last token): i*d + l - 1."""
    idx = torch.arange(num_blocks, device=device)
    return idx * config.compress_stride + config.compress_block_size - 1


def selection_overlap_weights(num_cmp: int, num_slc: int, config: NSAConfig, device=None, dtype=None) -> torch.Tensor:
    """weight[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d: how compressed block i scores selection block j.

    The single place of this convention (docs/semantics.md, Eq. 9). Shape [N_cmp, N_slc].
    """
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    cmp_start = torch.arange(num_cmp, device=device)[:, None] * d
    slc_start = torch.arange(num_slc, device=device)[None, :] * lp
    overlap = (torch.minimum(cmp_start + l, slc_start + lp) - torch.maximum(cmp_start, slc_start)).clamp(min=0)
    return (overlap.to(torch.float64) / d).to(dtype or torch.float32)


# ---------------------------------------------------------------------------------------------
# Attention over an explicit key set


def masked_attention(scores: torch.Tensor, mask: torch.Tensor, values_fn: Callable[[torch.Tensor], torch.Tensor]):
    """Softmax over the last dim of `scores` restricted to `mask`; rows with no key give 0 and lse -inf.

    Returns (values_fn(probs), lse, probs). The max used for stability is detached (exact gradient).
    """
    masked = scores.masked_fill(~mask, float("-inf"))
    if masked.shape[-1] == 0:  # no keys at all (e.g. a document shorter than one compressed block)
        row_max = masked.new_zeros(masked.shape[:-1] + (1,))
    else:
        row_max = masked.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    exp = torch.exp(masked - row_max)
    denom = exp.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    safe_denom = torch.where(has_key, denom, torch.ones_like(denom))
    probs = exp / safe_denom
    lse = torch.where(has_key, row_max + torch.log(safe_denom), torch.full_like(denom, float("-inf")))
    return values_fn(probs), lse.squeeze(-1), probs


def _query_chunks(num_queries: int, elements_per_query: int):
    step = max(1, _CHUNK_ELEMENTS // max(1, elements_per_query))
    for start in range(0, num_queries, step):
        yield slice(start, min(num_queries, start + step))


def _grouped(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, H_q, D] -> [T, H_kv, G, D]"""
    t, hq, dim = q.shape
    return q.view(t, num_kv_heads, hq // num_kv_heads, dim)


# ---------------------------------------------------------------------------------------------
# Branches (one sequence; positions are token indices within that sequence)


def compress_sequence(k: torch.Tensor, v: torch.Tensor, config: NSAConfig, compressor: Optional[KVCompressor],
                      rope: Optional[RopeFn] = None):
    """k [T, H_kv, d_k], v [T, H_kv, d_v] -> compressed k [N_cmp, H_kv, d_k], v [N_cmp, H_kv, d_v].

    `rope(x, positions)` rotates the compressed keys at their representative positions.
    """
    v_windows = block_windows(v, config.compress_block_size, config.compress_stride)  # [N_cmp, l, H_kv, d_v]
    compressed_v = v_windows.mean(dim=1) if compressor is None else compressor.compress_v(v_windows)
    return compressed_keys(k, config, compressor, rope), compressed_v


def compressed_keys(k: torch.Tensor, config: NSAConfig, compressor: Optional[KVCompressor] = None,
                    rope: Optional[RopeFn] = None) -> torch.Tensor:
    """k [T, H_kv, d_k] (un-rotated) -> the sequence's compressed keys [N_cmp, H_kv, d_k], rotated at their
    blocks' last tokens when `rope` is given."""
    windows = block_windows(k, config.compress_block_size, config.compress_stride)  # [N_cmp, l, H_kv, d_k]
    keys = windows.mean(dim=1) if compressor is None else compressor.compress_k(windows)
    if rope is not None and keys.shape[0] > 0:
        keys = rope(keys, compressed_block_positions(keys.shape[0], config, k.device))
    return keys


def compressed_attention(q, compressed_k, compressed_v, q_pos, config: NSAConfig, scale: float):
    """Attention of queries at positions q_pos to the compressed blocks wholly in their past.

    q [Tq, H_q, d_k]; compressed_k/v [N_cmp, H_kv, d]; q_pos [Tq] int64.
    Returns out [Tq, H_q, d_v], lse [Tq, H_q], probs [Tq, H_q, N_cmp].
    """
    num_kv_heads, num_cmp = compressed_k.shape[1], compressed_k.shape[0]
    block_end = compressed_block_positions(num_cmp, config, q.device)  # [N_cmp]
    outs, lses, probs_all = [], [], []
    for rows in _query_chunks(q.shape[0], q.shape[1] * max(1, num_cmp)):
        qg = _grouped(q[rows], num_kv_heads)  # [c, H_kv, G, d_k]
        scores = torch.einsum("chgd,nhd->chgn", qg, compressed_k) * scale
        mask = (block_end[None, :] <= q_pos[rows][:, None])[:, None, None, :]
        out, lse, probs = masked_attention(
            scores, mask.expand_as(scores), lambda p: torch.einsum("chgn,nhd->chgd", p, compressed_v)
        )
        outs.append(out.flatten(1, 2))
        lses.append(lse.flatten(1, 2))
        probs_all.append(probs.flatten(1, 2))
    return torch.cat(outs), torch.cat(lses), torch.cat(probs_all)


def block_scores(cmp_probs: torch.Tensor, num_slc: int, num_kv_heads: int, config: NSAConfig) -> torch.Tensor:
    """Importance of each selection block (Eq. 9-10): cmp_probs [Tq, H_q, N_cmp] -> [Tq, H_kv, N_slc]."""
    tq, hq, num_cmp = cmp_probs.shape
    weights = selection_overlap_weights(num_cmp, num_slc, config, cmp_probs.device, cmp_probs.dtype)
    head_scores = cmp_probs @ weights  # [Tq, H_q, N_slc]
    return head_scores.view(tq, num_kv_heads, hq // num_kv_heads, num_slc).sum(dim=2)


@torch.no_grad()
def ranked_block_scores(cmp_probs: torch.Tensor, q_pos: torch.Tensor, num_slc: int, num_kv_heads: int,
                        config: NSAConfig) -> torch.Tensor:
    """The block scores as the selection ranks them: cmp_probs [Tq, H_q, N_cmp] -> [Tq, H_kv, N_slc], the
    importance of each block (Eq. 9-10), +inf for forced blocks (the first n_init and the n_local ending at
    the one holding t), -inf for blocks after t's."""
    return in_selection_order(block_scores(cmp_probs, num_slc, num_kv_heads, config), q_pos, config)


def in_selection_order(scores: torch.Tensor, q_pos: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Per-block scores [Tq, H_kv, N_slc] of queries at q_pos with the selection's rules applied: +inf for
    forced blocks, -inf for blocks after the query's."""
    num_slc = scores.shape[-1]
    block = torch.arange(num_slc, device=q_pos.device)[None, :]
    current = (q_pos // config.select_block_size)[:, None]  # block holding t
    valid = block <= current
    forced = valid & ((block < config.select_init_blocks) | (block > current - config.select_local_blocks))
    return torch.where(forced[:, None, :], float("inf"), torch.where(valid[:, None, :], scores, float("-inf")))


@torch.no_grad()
def top_blocks(ranked: torch.Tensor, q_pos: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """The n best blocks of ranked_block_scores' result [Tq, H_kv, N_slc]: selected_block_idx [Tq, H_kv, n]
    int64, ascending block ids, -1 for unused slots; ties go to the lower block id."""
    n, num_slc = config.select_count, ranked.shape[-1]
    current = (q_pos // config.select_block_size)[:, None]  # block holding t
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n]  # [Tq, H_kv, <=n]
    slot = torch.arange(order.shape[-1], device=q_pos.device)
    in_use = slot[None, None, :] < torch.clamp(current + 1, max=n)[:, :, None]
    chosen = torch.where(in_use, order, num_slc)  # unused slots sort last
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == num_slc, -1, chosen)
    if chosen.shape[-1] < n:
        chosen = torch.nn.functional.pad(chosen, (0, n - chosen.shape[-1]), value=-1)
    return chosen


def select_blocks(cmp_probs: torch.Tensor, q_pos: torch.Tensor, num_slc: int, num_kv_heads: int, config: NSAConfig):
    """Top-n selection blocks per query and KV head (docs/semantics.md, Eq. 9-12).

    cmp_probs [Tq, H_q, N_cmp]. Returns selected_block_idx [Tq, H_kv, n] int64: ascending block ids,
    -1 for unused slots. Forced blocks (first n_init, the n_local ending at the one holding t) always
    win; blocks after t's are never chosen; ties go to the lower block id.
    """
    return top_blocks(ranked_block_scores(cmp_probs, q_pos, num_slc, num_kv_heads, config), q_pos, config)


def selected_attention(q, k, v, selected_block_idx, q_pos, config: NSAConfig, scale: float):
    """Attention to the tokens of the selected blocks, causal inside the block that holds t.

    q [Tq, H_q, d_k]; k/v [Tk, H_kv, d] (positions 0..Tk-1); selected_block_idx [Tq, H_kv, n].
    Returns out [Tq, H_q, d_v], lse [Tq, H_q].
    """
    lp = config.select_block_size
    tk, num_kv_heads, head_dim_k, head_dim_v = k.shape[0], k.shape[1], k.shape[2], v.shape[2]
    num_slc = -(-tk // lp)
    pad = num_slc * lp - tk

    def block_table(x):  # [T, H_kv, D] -> one row per (KV head, block): [H_kv * N_slc, l' * D]
        blocks = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(num_slc, lp, num_kv_heads, -1)
        return blocks.permute(2, 0, 1, 3).reshape(num_kv_heads * num_slc, -1)

    k_table, v_table = block_table(k), block_table(v)
    head_row = (torch.arange(num_kv_heads, device=q.device) * num_slc)[None, :, None]
    offset = torch.arange(lp, device=q.device)

    def attend(q_rows, idx, pos):  # one chunk of queries; recomputed in backward (gathered K/V not kept)
        safe_idx = idx.clamp(min=0)
        c, n = idx.shape[0], idx.shape[2]
        rows = head_row + safe_idx  # [c, H_kv, n]
        k_sel = torch.nn.functional.embedding(rows, k_table).view(c, num_kv_heads, n * lp, head_dim_k)
        v_sel = torch.nn.functional.embedding(rows, v_table).view(c, num_kv_heads, n * lp, head_dim_v)
        qg = _grouped(q_rows, num_kv_heads)  # [c, H_kv, G, d_k]
        scores = torch.einsum("chgd,chmd->chgm", qg, k_sel) * scale
        key_pos = (safe_idx[..., None] * lp + offset).view(c, num_kv_heads, n * lp)
        mask = ((idx >= 0).repeat_interleave(lp, dim=-1) & (key_pos <= pos[:, None, None]) & (key_pos < tk))
        out, lse, _ = masked_attention(
            scores, mask[:, :, None].expand_as(scores), lambda p: torch.einsum("chgm,chmd->chgd", p, v_sel)
        )
        return out.flatten(1, 2), lse.flatten(1, 2)

    outs, lses = [], []
    per_query = num_kv_heads * config.select_count * lp * (head_dim_k + head_dim_v + 2 * q.shape[1] // num_kv_heads)
    for rows in _query_chunks(q.shape[0], per_query):
        args = (q[rows], selected_block_idx[rows], q_pos[rows])
        if torch.is_grad_enabled():
            out, lse = torch.utils.checkpoint.checkpoint(attend, *args, use_reentrant=False)
        else:
            out, lse = attend(*args)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def window_attention(q, k, v, q_pos, k_start: int, config: NSAConfig, scale: float):
    """Attention to the w most recent tokens, [max(0, t-w+1), t].

    q [Tq, H_q, d_k] at positions q_pos; k/v [Tk, H_kv, d] at positions k_start .. k_start+Tk-1.
    Returns out [Tq, H_q, d_v], lse [Tq, H_q].
    """
    w = config.window_size
    num_kv_heads = k.shape[1]
    outs, lses = [], []
    for rows in _query_chunks(q.shape[0], q.shape[1] * (w + 1024)):
        pos = q_pos[rows]
        lo = max(0, int(pos.min()) - w + 1 - k_start)
        hi = min(k.shape[0], int(pos.max()) + 1 - k_start)
        key_pos = torch.arange(lo, hi, device=q.device) + k_start  # [Tw]
        qg = _grouped(q[rows], num_kv_heads)
        scores = torch.einsum("chgd,khd->chgk", qg, k[lo:hi]) * scale
        mask = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - w)
        out, lse, _ = masked_attention(
            scores, mask[:, None, None, :].expand_as(scores), lambda p: torch.einsum("chgk,khd->chgd", p, v[lo:hi])
        )
        outs.append(out.flatten(1, 2))
        lses.append(lse.flatten(1, 2))
    return torch.cat(outs), torch.cat(lses)


# ---------------------------------------------------------------------------------------------
# One sequence, then the batched / packed entry


def nsa_sequence(q, kv_cmp, kv_slc, kv_win, gates, config: NSAConfig, compressor=None, rope: Optional[RopeFn] = None):
    """NSA for one whole sequence. q [T, H_q, d_k]; kv_* (k [T, H_kv, d_k], v [T, H_kv, d_v]); gates [T, H_q, 3].

    Returns out [T, H_q, d_v] and the per-branch results.
    """
    seq_len, num_kv_heads = q.shape[0], kv_slc[0].shape[1]
    scale = config.scale_for(q.shape[-1])
    q_pos = torch.arange(seq_len, device=q.device)
    compressed_k, compressed_v = compress_sequence(*kv_cmp, config, compressor, rope)
    cmp_out, cmp_lse, cmp_probs = compressed_attention(q, compressed_k, compressed_v, q_pos, config, scale)
    ranked = ranked_block_scores(cmp_probs.detach(), q_pos, num_selection_blocks(seq_len, config), num_kv_heads,
                                 config)  # [T, H_kv, N_slc]
    idx = top_blocks(ranked, q_pos, config)
    slc_out, slc_lse = selected_attention(q, *kv_slc, idx, q_pos, config, scale)
    win_out, win_lse = window_attention(q, *kv_win, q_pos, 0, config, scale)
    out = gates[..., 0:1] * cmp_out + gates[..., 1:2] * slc_out + gates[..., 2:3] * win_out
    return out, NSAIntermediates(cmp_out, cmp_lse, slc_out, slc_lse, win_out, win_lse, idx, ranked)


def sequence_spans(batch: int, seq_len: int, cu_seqlens: Optional[torch.Tensor]):
    """(batch row, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(b, 0, seq_len) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def compress_packed(k, v, cu_seqlens, config: NSAConfig, compressor=None, rope: Optional[RopeFn] = None):
    """Compressed K/V of packed documents: k [T, H_kv, d_k], v [T, H_kv, d_v] -> each document's blocks, in order."""
    bounds = cu_seqlens.tolist()
    parts = [compress_sequence(k[s:e], v[s:e], config, compressor, rope) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def nsa_reference(q, kv_cmp, kv_slc, kv_win, gates, config: NSAConfig, cu_seqlens=None, compressor=None,
                  rope: Optional[RopeFn] = None, return_intermediates: bool = False):
    """Batched / packed NSA. q [B, T, H_q, d_k]; kv_* pairs of [B, T, H_kv, d]; gates [B, T, H_q, 3].

    With cu_seqlens (B == 1), every document [cu[i], cu[i+1]) is an independent sequence.
    Returns out [B, T, H_q, d_v] (and NSAIntermediates when asked).
    """
    in_dtype = q.dtype
    compute = torch.float32 if in_dtype in (torch.float16, torch.bfloat16) else in_dtype
    batch, seq_len = q.shape[:2]
    up = lambda t: t.to(compute)  # noqa: E731
    outs, parts = [], []
    for b, start, end in sequence_spans(batch, seq_len, cu_seqlens):
        doc = slice(start, end)
        pick = lambda pair: (up(pair[0][b, doc]), up(pair[1][b, doc]))  # noqa: E731
        out, inter = nsa_sequence(up(q[b, doc]), pick(kv_cmp), pick(kv_slc), pick(kv_win), up(gates[b, doc]),
                                  config, compressor, rope)
        outs.append(out)
        if return_intermediates:
            parts.append(inter)
    out = torch.cat(outs).view(batch, seq_len, q.shape[2], -1).to(in_dtype)
    if not return_intermediates:
        return out
    merged = NSAIntermediates(*[(cat_block_rows if f.name == "ranked_block_scores" else torch.cat)(
        [getattr(p, f.name) for p in parts]) for f in dataclasses.fields(NSAIntermediates)])
    return out, merged


def cat_block_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """Per-block rows of several sequences [T_i, H_kv, N_slc_i] -> one [sum T_i, H_kv, max N_slc], -inf past a
    sequence's own blocks (never selectable)."""
    num_slc = max(part.shape[-1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, num_slc - part.shape[-1]), value=float("-inf"))
                      for part in parts])
