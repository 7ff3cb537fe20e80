"""An auxiliary loss that teaches NSA's block scores where the selected branch would look (not in the paper).

NSA ranks the selection blocks by the compressed attention's probabilities (Eq. 9-10); the top-n choice
passes no gradient, so the scores learn only through the compressed branch's own output. This loss
gives them a direct signal, as DeepSeek-V3.2's sparse attention trains its indexer: for some query
positions of each sequence it takes the attention that the selected branch's queries and keys would give
every key before the query (full causal attention, no selection), sums it over the G heads of a KV group
and over each selection block's tokens, and measures the Kullback-Leibler divergence of the block scores
from that target. Both sides are restricted to the blocks the ranking decides (not forced, not after
the query's block) and normalized there. The target and the queries are detached, and the layer projects
the compressed keys for the loss from its detached input: the gradient reaches the compressed-key
projection and the compression phi alone.

    loss = mean over (sequence, sampled query, KV group) of KL(target || scores)

Sampled queries: `queries` positions per sequence (or packed document), evenly spaced and ending at its
last token; a position with fewer than two blocks to rank adds nothing.
"""
from __future__ import annotations

from typing import Optional

import torch

from .config import NSAConfig
from .reference import (
    RopeFn,
    block_scores,
    cat_block_rows,
    compressed_block_positions,
    compressed_keys,
    in_selection_order,
    masked_attention,
    num_selection_blocks,
    sequence_spans,
)

# Elements of one chunk of the target's score tensor (all heads); bounds peak memory at long context.
_TARGET_CHUNK_ELEMENTS = 1 << 26


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The loss's arithmetic: float32 for half-precision inputs, else their own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sampled_positions(seq_len: int, queries: int, device=None) -> torch.Tensor:
    """min(queries, seq_len) query positions of a sequence, evenly spaced, the last one seq_len - 1."""
    count = min(queries, seq_len)
    return torch.arange(1, count + 1, device=device) * seq_len // count - 1


def rankable_blocks(q_pos: torch.Tensor, num_slc: int, config: NSAConfig) -> torch.Tensor:
    """[Tq, N_slc] bool: the blocks whose order the selection decides for a query at each position: at or
    before the query's block, neither among the first select_init_blocks nor among the select_local_blocks
    ending at the query's block."""
    ordered = in_selection_order(torch.zeros(q_pos.shape[0], 1, num_slc, device=q_pos.device), q_pos, config)
    return torch.isfinite(ordered[:, 0])


@torch.no_grad()
def target_block_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, block_len: int,
                           scale: float) -> torch.Tensor:
    """Full causal attention of queries q [Tq, H_q, d_k] at q_pos to keys k [T, H_kv, d_k], summed over each
    KV group's heads and over each selection block's block_len tokens: [Tq, H_kv, ceil(T / block_len)]
    (rows sum to G)."""
    seq_len, num_kv_heads = k.shape[0], k.shape[1]
    group = q.shape[1] // num_kv_heads
    num_slc = -(-seq_len // block_len)
    key_pos = torch.arange(seq_len, device=k.device)
    out = []
    step = max(1, _TARGET_CHUNK_ELEMENTS // max(1, q.shape[1] * seq_len))
    for start in range(0, q.shape[0], step):
        rows = slice(start, start + step)
        qg = q[rows].reshape(-1, num_kv_heads, group, q.shape[2])  # [c, H_kv, G, d_k]
        scores = torch.einsum("chgd,thd->chgt", qg, k) * scale
        mask = (key_pos[None, :] <= q_pos[rows][:, None])[:, None, None, :]
        _, _, probs = masked_attention(scores, mask.expand_as(scores), lambda p: None)
        per_key = probs.sum(dim=2)  # [c, H_kv, T]
        padded = torch.nn.functional.pad(per_key, (0, num_slc * block_len - seq_len))
        out.append(padded.view(per_key.shape[0], num_kv_heads, num_slc, block_len).sum(dim=-1))
    return torch.cat(out)


def sequence_block_score_loss(q, k_cmp, k_slc, config: NSAConfig, queries: int, compressor=None,
                              rope: Optional[RopeFn] = None):
    """(summed KL over the sampled queries and KV groups, their count) of one sequence.
    q [T, H_q, d_k] and k_slc [T, H_kv, d_k] as the selected branch uses them (rotated); k_cmp [T, H_kv, d_k]
    the compressed branch's keys before compression."""
    seq_len, num_kv_heads = q.shape[0], k_slc.shape[1]
    scale = config.scale_for(q.shape[-1])
    num_slc = num_selection_blocks(seq_len, config)
    q_pos = sampled_positions(seq_len, queries, q.device)
    rankable = rankable_blocks(q_pos, num_slc, config)  # [R, N_slc]
    keep = rankable.sum(dim=1) >= 2
    compute = compute_dtype(q.dtype)
    if not bool(keep.any()):
        return q.new_zeros((), dtype=compute), 0
    q_pos, rankable = q_pos[keep], rankable[keep]
    q_rows = q.detach()[q_pos].to(compute)  # [R, H_q, d_k]
    target = target_block_attention(q_rows, k_slc.detach().to(compute), q_pos, config.select_block_size, scale)

    keys = compressed_keys(k_cmp, config, compressor, rope).to(compute)  # [N_cmp, H_kv, d_k]
    qg = q_rows.view(q_rows.shape[0], num_kv_heads, -1, q_rows.shape[-1])
    scores = torch.einsum("chgd,nhd->chgn", qg, keys) * scale
    visible = compressed_block_positions(keys.shape[0], config, q.device)[None, :] <= q_pos[:, None]
    _, _, probs = masked_attention(scores, visible[:, None, None, :].expand_as(scores), lambda p: None)
    predicted = block_scores(probs.flatten(1, 2), num_slc, num_kv_heads, config)  # [R, H_kv, N_slc]

    mask = rankable[:, None, :]
    target = torch.where(mask, target, 0.0)
    tiny = torch.finfo(compute).tiny
    target = target / target.sum(dim=-1, keepdim=True).clamp_min(tiny)
    predicted = torch.where(mask, predicted, 0.0)
    predicted = predicted / predicted.sum(dim=-1, keepdim=True).clamp_min(tiny)
    log_ratio = torch.log(target.clamp_min(tiny)) - torch.log(predicted.clamp_min(tiny))
    kl = torch.where(target > 0, target * log_ratio, 0.0).sum(dim=-1)  # [R, H_kv]
    return kl.sum(), kl.numel()


def block_score_loss(q, k_cmp, k_slc, config: NSAConfig, queries: int, cu_seqlens=None, compressor=None,
                     rope: Optional[RopeFn] = None) -> torch.Tensor:
    """The mean KL of the block scores from the selected branch's block attention (module docstring), a
    scalar (float32 for half-precision inputs, else their dtype) whose gradient reaches k_cmp and the
    compressor.

    q [B, T, H_q, d_k], k_slc [B, T, H_kv, d_k] rotated as the selected branch uses them; k_cmp
    [B, T, H_kv, d_k] the compressed branch's keys before compression (`rope` rotates compressed keys);
    cu_seqlens: packed documents (B == 1), each one sequence.
    """
    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries={queries!r} is not allowed: it must be an integer >= 1")
    total, count = q.new_zeros((), dtype=compute_dtype(q.dtype)), 0
    for b, start, end in sequence_spans(q.shape[0], q.shape[1], cu_seqlens):
        doc = slice(start, end)
        kl_sum, n = sequence_block_score_loss(q[b, doc], k_cmp[b, doc], k_slc[b, doc], config, queries,
                                              compressor, rope)
        total, count = total + kl_sum, count + n
    return total / max(count, 1)


@torch.no_grad()
def ranked_target_scores(q, k_slc, config: NSAConfig, cu_seqlens=None, positions=None) -> torch.Tensor:
    """The loss's target for every query, as the selection would rank it: [B * T, H_kv, N_slc] (rows in batch-then-
    token order, as recorded_block_scores'), +inf for forced blocks, -inf for blocks a query cannot select and
    past a shorter document's blocks. q [B, T, H_q, d_k], k_slc [B, T, H_kv, d_k] as the selected branch uses
    them. `positions`: the queries at these token indices of each sequence alone ([B * len(positions), ...])."""
    scale, compute = config.scale_for(q.shape[-1]), compute_dtype(q.dtype)
    parts = []
    for b, start, end in sequence_spans(q.shape[0], q.shape[1], cu_seqlens):
        q_pos = torch.arange(end - start, device=q.device)
        if positions is not None:
            q_pos = q_pos[torch.as_tensor(positions, device=q.device)]
        target = target_block_attention(q[b, start + q_pos].to(compute), k_slc[b, start:end].to(compute), q_pos,
                                        config.select_block_size, scale)
        parts.append(in_selection_order(target, q_pos, config))
    return cat_block_rows(parts)


class _AttachedLoss(torch.autograd.Function):
    """`output` unchanged; in backward, `loss` also gets the gradient `weight`, so that the backward pass of the
    model's loss adds weight * d loss / d parameters to every parameter's gradient."""

    @staticmethod
    def forward(ctx, output, loss, weight: float):
        ctx.save_for_backward(loss)
        ctx.weight = weight
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.weight), None


def attach_loss(output: torch.Tensor, loss: torch.Tensor, weight: float) -> torch.Tensor:
    """`output`, carrying `loss` into the backward pass with gradient `weight` (no change to the forward)."""
    return _AttachedLoss.apply(output, loss, weight)
