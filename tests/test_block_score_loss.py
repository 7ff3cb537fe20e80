"""The block score loss (megatron_nsa/block_score_loss.py) against a query-by-query computation written out
here, its gradient path, packed documents and bad input."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_nsa import KVCompressor, NSAConfig
from megatron_nsa.block_score_loss import (
    block_score_loss,
    ranked_target_scores,
    sampled_positions,
    sequence_block_score_loss,
)

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4,
                   select_init_blocks=1, select_local_blocks=2, window_size=32)


def random_inputs(batch=2, seq_len=150, q_heads=4, kv_heads=2, dim=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, q_heads, dim, generator=g, dtype=dtype)
    k_cmp = torch.randn(batch, seq_len, kv_heads, dim, generator=g, dtype=dtype)
    k_slc = torch.randn(batch, seq_len, kv_heads, dim, generator=g, dtype=dtype)
    return q, k_cmp, k_slc


def loss_by_hand(q, k_cmp, k_slc, config: NSAConfig, queries: int) -> float:
    """Mean KL over (sequence, sampled query, KV head), one query and block at a time, mean compression."""
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    batch, seq_len, q_heads, dim = q.shape
    kv_heads = k_slc.shape[2]
    group = q_heads // kv_heads
    scale = 1 / math.sqrt(dim)
    count = min(queries, seq_len)
    positions = [i * seq_len // count - 1 for i in range(1, count + 1)]
    num_cmp = (seq_len - l) // d + 1
    num_slc = -(-seq_len // lp)
    total, terms = 0.0, 0
    for b in range(batch):
        ck = torch.stack([k_cmp[b, i * d:i * d + l].mean(0) for i in range(num_cmp)])  # [N_cmp, H_kv, D]
        for t in positions:
            current = t // lp
            blocks = [j for j in range(num_slc)
                      if config.select_init_blocks <= j <= current - config.select_local_blocks]
            if len(blocks) < 2:
                continue
            for h in range(kv_heads):
                target, predicted = [0.0] * num_slc, [0.0] * num_slc
                for head in range(h * group, (h + 1) * group):
                    p = torch.softmax(k_slc[b, :t + 1, h] @ q[b, t, head] * scale, 0)
                    for s in range(t + 1):
                        target[s // lp] += p[s].item()
                    visible = [i for i in range(num_cmp) if i * d + l - 1 <= t]
                    pc = torch.softmax(ck[visible, h] @ q[b, t, head] * scale, 0)
                    for i, prob in zip(visible, pc.tolist()):
                        for j in range(num_slc):
                            overlap = max(0, min(i * d + l, (j + 1) * lp) - max(i * d, j * lp))
                            predicted[j] += prob * overlap / d
                t_sum = sum(target[j] for j in blocks)
                p_sum = sum(predicted[j] for j in blocks)
                total += sum(target[j] / t_sum * math.log((target[j] / t_sum) / (predicted[j] / p_sum))
                             for j in blocks)
                terms += 1
    return total / terms


def test_loss_matches_a_query_by_query_computation():
    q, k_cmp, k_slc = random_inputs()
    loss = block_score_loss(q, k_cmp, k_slc, CONFIG, queries=12)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() > 1e-3  # random keys: the two distributions differ
    assert loss.item() == pytest.approx(loss_by_hand(q, k_cmp, k_slc, CONFIG, 12), rel=1e-5)


def test_sampled_positions_are_evenly_spaced_and_end_at_the_last_token():
    positions = sampled_positions(150, 12)
    assert positions.tolist() == [i * 150 // 12 - 1 for i in range(1, 13)]
    assert positions[-1] == 149 and bool((positions.diff() > 0).all())
    assert sampled_positions(10, 64).tolist() == list(range(10))  # more queries than tokens: every token


def test_gradient_reaches_the_compressed_keys_and_the_compressor_only():
    q, k_cmp, k_slc = (t.float().requires_grad_() for t in random_inputs())
    compressor = KVCompressor("mlp", CONFIG.compress_block_size, 8, 8, hidden=16)
    config = dataclasses.replace(CONFIG, compression="mlp")
    block_score_loss(q, k_cmp, k_slc, config, queries=16, compressor=compressor).backward()
    assert q.grad is None and k_slc.grad is None  # the queries and the target are detached
    assert k_cmp.grad.abs().max() > 0
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in compressor.k_map.parameters())
    assert all(p.grad is None for p in compressor.v_map.parameters())


def test_training_the_compressed_keys_lowers_the_loss():
    q, k_cmp, k_slc = random_inputs(batch=1, dtype=torch.float32)
    k_cmp.requires_grad_()
    optimizer = torch.optim.Adam([k_cmp], lr=0.05)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = block_score_loss(q, k_cmp, k_slc, CONFIG, queries=32)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_packed_documents_are_separate_sequences():
    q, k_cmp, k_slc = random_inputs(batch=1, seq_len=170)
    cu_seqlens = torch.tensor([0, 70, 170])
    loss = block_score_loss(q, k_cmp, k_slc, CONFIG, queries=10, cu_seqlens=cu_seqlens)
    parts = [sequence_block_score_loss(q[0, s:e], k_cmp[0, s:e], k_slc[0, s:e], CONFIG, 10) for s, e in [(0, 70),
                                                                                                        (70, 170)]]
    assert all(n > 0 for _, n in parts)
    expected = sum(kl for kl, _ in parts) / sum(n for _, n in parts)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # a document is not the batch row's prefix: the second one alone differs from the row's tail
    whole = block_score_loss(q, k_cmp, k_slc, CONFIG, queries=10)
    assert abs(whole.item() - loss.item()) > 1e-4


def test_short_sequences_give_zero():
    q, k_cmp, k_slc = random_inputs(seq_len=40)  # blocks 0-2: nothing left to rank after the forced ones
    assert block_score_loss(q, k_cmp, k_slc, CONFIG, queries=8).item() == 0.0


@pytest.mark.parametrize("queries", [0, -3, 2.5, True])
def test_bad_query_count_is_refused(queries):
    q, k_cmp, k_slc = random_inputs(seq_len=40)
    with pytest.raises(ValueError, match=rf"queries={queries!r} is not allowed: it must be an integer >= 1"):
        block_score_loss(q, k_cmp, k_slc, CONFIG, queries=queries)


def test_half_precision_inputs_give_a_float32_loss():
    q, k_cmp, k_slc = random_inputs()
    exact = block_score_loss(q, k_cmp, k_slc, CONFIG, queries=12)
    half = block_score_loss(q.bfloat16(), k_cmp.bfloat16(), k_slc.bfloat16(), CONFIG, queries=12)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(exact.item(), rel=0.05)  # inputs rounded to 8 bits of mantissa


def test_ranked_target_scores_at_some_positions_are_those_rows_of_all():
    q, _, k_slc = random_inputs(batch=1, seq_len=170)
    cu_seqlens = torch.tensor([0, 70, 170])
    every = ranked_target_scores(q, k_slc, CONFIG, cu_seqlens)  # [170, H_kv, N_slc]
    some = ranked_target_scores(q, k_slc, CONFIG, cu_seqlens, positions=[5, 69])
    assert every.shape == (170, 2, 7) and some.shape == (4, 2, 7)
    assert torch.equal(some, every[[5, 69, 75, 139]])
    assert torch.isinf(every[5, :, 1:]).all() and (every[5, :, 0] == float("inf")).all()  # block 0 forced, 1+ later
