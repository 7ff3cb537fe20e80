"""megatron_nsa.eval.selections: the recorder sees the selections either NSA path computes, stacked by
layer; the needle diagnostic counts a layer's KV head as a hit exactly when its selection holds a block of
the needle."""
from __future__ import annotations

import numpy
import pytest
import torch

from megatron_nsa import NSAConfig, nsa_attention
from megatron_nsa import reference as R
from megatron_nsa.eval.haystack import NeedleSample
from megatron_nsa.eval.selections import QuestionSelections, needle_blocks, recorded_selections, stack_layers

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=3, window_size=16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_recorded_selections_are_the_reference_selections_in_call_order(nsa_inputs, backend):
    """Two calls of a batch of two sequences each: the recorder holds the reference's selections, and
    stack_layers puts them as [calls, batch, T, H_kv, n]; afterwards the paths are left as they were."""
    if backend == "triton":
        pytest.importorskip("nsa_kernels")
    calls = [nsa_inputs(2, 112, 4, 2, 16, 16, False, seed, dtype=torch.float32) for seed in (3, 4)]
    originals = [R.select_blocks]
    if backend == "triton":
        import nsa_kernels.nsa as triton_nsa
        originals.append(triton_nsa.select_blocks)
    with recorded_selections() as records:
        for q, ks, vs, gates in calls:
            nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend=backend)
    assert R.select_blocks is originals[0]
    if backend == "triton":
        assert triton_nsa.select_blocks is originals[1]
        assert len(records) == len(calls)  # one per call: the batch is packed
    else:
        assert len(records) == 2 * len(calls)  # one per sequence
    stacked = stack_layers(records, len(calls), 2, 112)
    assert stacked.shape == (2, 2, 112, 2, 3) and stacked.dtype == torch.int64
    for call, (q, ks, vs, gates) in enumerate(calls):
        kv = (ks[0], vs[0])
        _, inter = R.nsa_reference(q, kv, kv, kv, gates, CONFIG, return_intermediates=True)
        assert torch.equal(stacked[call].reshape(-1, 2, 3), inter.selected_block_idx.long())


def test_stack_layers_names_what_does_not_fit():
    with pytest.raises(ValueError, match="recorded no selections"):
        stack_layers([], 2, 1, 8)
    with pytest.raises(ValueError, match=r"recorded 15 selection rows, expected 2 layers x 1 sequences x 8 tokens = 16"):
        stack_layers([torch.zeros(15, 1, 2, dtype=torch.int64)], 2, 1, 8)


def sample(length, needle_start, needle_length=2, answer_length=1):
    tokens = numpy.arange(length)
    return NeedleSample(tokens, numpy.arange(length - answer_length, length), needle_start, needle_length,
                        length - needle_length - 2, 0.5)


def test_needle_blocks_cover_every_needle_token():
    assert list(needle_blocks(sample(100, 30), 16)) == [1]
    assert list(needle_blocks(sample(100, 31), 16)) == [1, 2]  # tokens 31 and 32 straddle blocks 1 and 2
    assert list(needle_blocks(sample(100, 20, needle_length=40), 16)) == [1, 2, 3]


def test_question_selections_hit_exactly_where_a_needle_block_is_selected():
    """A fake two-layer NSA model: its logits function calls the (patched) select_blocks once per layer
    with chosen selections; the diagnostic reads them at the question's last token."""
    num_layers, seq_len, kv_heads, n = 2, 40, 3, 2
    generator = torch.Generator().manual_seed(int(numpy.random.default_rng().integers(1 << 30)))
    chosen = torch.randint(0, 3, (num_layers, 2, seq_len, kv_heads, n), generator=generator)  # blocks 0..2
    question = seq_len - 1 - 2  # predicts the first of the two answer tokens
    chosen[0, 0, question, 0] = torch.tensor([0, 2])  # sample 0 (needle block 0): a hit in layer 0, head 0
    chosen[1, 0, question, 0] = torch.tensor([1, 2])  # and a miss in layer 1, head 0
    chosen[:, :, question + 1] = 0  # the next position selects block 0 everywhere: it must not be read

    def logits_fn(tokens):
        for layer in range(num_layers):
            R.select_blocks(chosen[layer].reshape(-1, kv_heads, n))
        return torch.randn(*tokens.shape, 5)

    original = R.select_blocks
    R.select_blocks = lambda idx: idx  # the recorder wraps whatever select_blocks is
    try:
        cell = [sample(seq_len, start, answer_length=2) for start in (3, 18)]  # needle blocks [0] and [1]
        tracked = QuestionSelections(logits_fn, num_layers)
        tracked.start_cell(cell)
        tracked(torch.zeros(2, seq_len, dtype=torch.int64))
        hits = tracked.needle_hits(cell, select_block_size=16)
    finally:
        R.select_blocks = original
    expected = torch.stack([(chosen[:, row, question] == block).any(-1) for row, block in enumerate((0, 1))])
    assert hits.shape == (2, num_layers, kv_heads) and torch.equal(hits, expected)
    assert 0 < hits.float().mean() < 1
    with pytest.raises(ValueError, match="selections of 2 samples recorded for 3 samples"):
        tracked.needle_hits(cell + cell[:1], select_block_size=16)
