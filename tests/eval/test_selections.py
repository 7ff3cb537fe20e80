"""megatron_nsa.eval.selections: the recorded selections stacked by layer; the needle diagnostic counts a
layer's KV head as a hit exactly when its selection (the reference's) holds a block of the needle, and ranks
the needle's block so that a rank <= n is exactly a hit."""
from __future__ import annotations

import numpy
import pytest
import torch

from megatron_nsa import NSAConfig, nsa_attention
from megatron_nsa import reference as R
from megatron_nsa.eval.haystack import NeedleSample
from megatron_nsa.eval.selections import QuestionSelections, block_rank, needle_blocks, stack_layers

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=5, window_size=16)


def test_stack_layers_names_what_does_not_fit():
    with pytest.raises(ValueError, match="recorded no selections"):
        stack_layers([], 2, 1, 8)
    with pytest.raises(ValueError,
                       match=r"recorded 15 selection rows, expected 2 layers x 1 sequences x 8 tokens = 16"):
        stack_layers([torch.zeros(15, 1, 2, dtype=torch.int64)], 2, 1, 8)


def sample(length, needle_start, needle_length=2, answer_length=1):
    tokens = numpy.arange(length)
    return NeedleSample(tokens, numpy.arange(length - answer_length, length), needle_start, needle_length,
                        length - needle_length - 2, 0.5)


def test_needle_blocks_cover_every_needle_token():
    assert list(needle_blocks(sample(100, 30), 16)) == [1]
    assert list(needle_blocks(sample(100, 31), 16)) == [1, 2]  # tokens 31 and 32 straddle blocks 1 and 2
    assert list(needle_blocks(sample(100, 20, needle_length=40), 16)) == [1, 2, 3]


def test_question_selections_hit_exactly_where_a_needle_block_is_selected(nsa_inputs):
    """A two-layer NSA stand-in: its logits function runs nsa_attention once per layer on random inputs; the
    diagnostic must read each layer's selection at the question's last token, as the reference selects it."""
    num_layers, batch, seq_len, kv_heads = 2, 2, 128, 2
    seed = int(numpy.random.default_rng().integers(1 << 30))
    layers = [nsa_inputs(batch, seq_len, 4, kv_heads, 16, 16, False, seed + layer, dtype=torch.float32)
              for layer in range(num_layers)]
    question = seq_len - 1 - 2  # predicts the first of the two answer tokens

    def logits_fn(tokens):
        for q, ks, vs, gates in layers:
            nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
        return torch.randn(*tokens.shape, 5)

    selected = []  # [layer] -> [batch, H_kv, n] at the question, from the reference
    for q, ks, vs, gates in layers:
        kv = (ks[0], vs[0])
        _, inter = R.nsa_reference(q, kv, kv, kv, gates, CONFIG, return_intermediates=True)
        selected.append(inter.selected_block_idx.view(batch, seq_len, kv_heads, -1)[:, question].long())
    # sample 0's needle in a block layer 0 / head 0 selected, sample 1's in one it did not (and no early block)
    chosen = [int(b) for b in selected[0][0, 0] if b > 0]
    missed = [b for b in range(1, question // 16) if b not in selected[0][1, 0].tolist()]
    cell = [sample(seq_len, chosen[0] * 16 + 3, answer_length=2), sample(seq_len, missed[0] * 16 + 3, answer_length=2)]
    tracked = QuestionSelections(logits_fn, num_layers)
    tracked.start_cell(cell)
    tracked(torch.zeros(batch, seq_len, dtype=torch.int64))
    hits = tracked.needle_hits(cell, select_block_size=16)
    expected = torch.stack([torch.stack([(layer_sel[row] == block).any(-1) for layer_sel in selected])
                            for row, block in enumerate((chosen[0], missed[0]))])
    assert hits.shape == (batch, num_layers, kv_heads) and torch.equal(hits, expected)
    assert hits[0, 0, 0] and not hits[1, 0, 0]
    with pytest.raises(ValueError, match="selections of 2 samples recorded for 3 samples"):
        tracked.needle_hits(cell + cell[:1], select_block_size=16)


def test_block_rank_orders_as_the_selection_does():
    inf = float("inf")
    scores = torch.tensor([[inf, 0.2, 0.5, 0.2, 0.1, inf, -inf]])
    assert [block_rank(scores, b).item() for b in range(7)] == [1, 4, 3, 5, 6, 2, 7]  # ties: lower id first
    assert block_rank(scores[0], 2).shape == ()


def test_needle_rank_is_within_n_exactly_where_the_needle_is_selected(nsa_inputs):
    """On random inputs at several lengths the needle's block rank is <= n exactly where needle_hits says it
    was selected, in every layer and KV head; ranks are past the forced blocks elsewhere."""
    num_layers, batch, seq_len, kv_heads = 2, 3, 192, 2
    seed = int(numpy.random.default_rng().integers(1 << 30))
    layers = [nsa_inputs(batch, seq_len, 4, kv_heads, 16, 16, False, seed + layer, dtype=torch.float32)
              for layer in range(num_layers)]

    def logits_fn(tokens):
        for q, ks, vs, gates in layers:
            nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
        return torch.randn(*tokens.shape, 5)

    cell = [sample(seq_len, start) for start in (5, 70, 120)]
    tracked = QuestionSelections(logits_fn, num_layers, scores=True)
    tracked.start_cell(cell)
    tracked(torch.zeros(batch, seq_len, dtype=torch.int64))
    hits = tracked.needle_hits(cell, select_block_size=16)
    ranks = tracked.needle_ranks(cell, select_block_size=16)
    assert ranks.shape == hits.shape == (batch, num_layers, kv_heads)
    assert torch.equal(ranks <= CONFIG.select_count, hits)
    assert (ranks[0] == 1).all()  # block 0 is the forced initial block, ranked first
    assert (ranks[1:] > CONFIG.select_init_blocks).all()
    with pytest.raises(ValueError, match="need QuestionSelections"):
        QuestionSelections(logits_fn, num_layers).needle_ranks(cell, 16)


def test_target_rank_puts_a_planted_needle_first_after_the_forced_blocks():
    """Keys at the needle's tokens made to match the question's queries: by the block score loss's target (the
    selected branch's attention without selection) the needle's block ranks right after the 3 forced blocks in
    every layer and KV head, whatever the block scores say; a sample without the planted key ranks it lower."""
    num_layers, batch, seq_len, q_heads, kv_heads, dim = 2, 2, 128, 4, 2, 16
    question = seq_len - 1 - 1
    g = torch.Generator().manual_seed(int(numpy.random.default_rng().integers(1 << 30)))
    layers = []
    for _ in range(num_layers):
        q = torch.randn(batch, seq_len, q_heads, dim, generator=g)
        k = torch.randn(batch, seq_len, kv_heads, dim, generator=g)
        for head in range(kv_heads):  # sample 0: token 50 (block 3) answers the question's queries
            k[0, 50, head] = 3.0 * q[0, question, 2 * head:2 * head + 2].sum(0)
        layers.append((q, k, torch.randn(batch, seq_len, kv_heads, dim, generator=g),
                       torch.rand(batch, seq_len, q_heads, 3, generator=g)))

    def logits_fn(tokens):
        for q, k, v, gates in layers:
            nsa_attention(q, k, v, gates, CONFIG, backend="torch")
        return torch.randn(*tokens.shape, 5)

    cell = [sample(seq_len, 50, needle_length=1), sample(seq_len, 50, needle_length=1)]
    tracked = QuestionSelections(logits_fn, num_layers, scores=True)
    tracked.start_cell(cell)
    tracked(torch.zeros(batch, seq_len, dtype=torch.int64))
    target_ranks = tracked.needle_target_ranks(cell, select_block_size=16)
    assert target_ranks.shape == (batch, num_layers, kv_heads)
    assert (target_ranks[0] == 4).all()  # forced: block 0 and the 2 local blocks (6, 7)
    assert (target_ranks[1] > 4).any()
