"""Teacher-forced needle scoring against model stubs whose predictions are computed from their input:
a reader that finds the fact only within its last `window` tokens must score 1 exactly on the samples
whose needle lies inside that window, and 0 elsewhere; one wrong answer token fails a sample."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa.eval.haystack import TEXT_VALUE_DIGITS, needle_samples
from megatron_nsa.data.retrieval import RetrievalFormat
from megatron_nsa.eval.scoring import answer_hits, score_cell

FMT = RetrievalFormat(num_keys=1000, num_values=50)
VOCAB = FMT.vocab_size
PADDED_VOCAB = VOCAB + 60
DEVICE = torch.device("cpu")


def random_text(num_tokens, rng):
    return rng.integers(ord("a"), ord("z") + 1, size=num_tokens)


def windowed_reader(window: int):
    """logits_fn for the retrieval format: at the question (the row's second-to-last token, a key), look for
    that key among the last `window` tokens before it and predict the token after it (from the input only:
    the answer token the teacher-forced input carries is never read). Elsewhere: token 0."""

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        logits = torch.zeros(batch, length, PADDED_VOCAB)
        logits[:, :, 0] = 1.0
        question = length - 2
        for row in range(batch):
            seen = tokens[row, max(0, question - window):question]
            found = torch.nonzero(seen == tokens[row, question]).flatten()
            if len(found):
                logits[row, question, :] = 0.0
                logits[row, question, tokens[row, max(0, question - window) + int(found[0]) + 1]] = 10.0
        logits[:, :, VOCAB:] = 20.0  # the padded vocabulary's columns: the scorer must ignore them
        return logits

    return logits_fn


def text_reader(wrong_last_digit: bool):
    """logits_fn for the text format: predicts the needle's digits after the question, the last one wrong
    when asked."""

    def logits_fn(tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        logits = torch.zeros(batch, length, PADDED_VOCAB)
        for row in range(batch):
            text = bytes(tokens[row].to(torch.uint8).tolist())
            value = text[text.index(b" is ") + 4:][:TEXT_VALUE_DIGITS]
            if wrong_last_digit:
                value = value[:-1] + bytes([ord("0") + (value[-1] - ord("0") + 1) % 10])
            for offset, digit in enumerate(value):
                logits[row, length - TEXT_VALUE_DIGITS - 1 + offset, digit] = 10.0
        return logits

    return logits_fn


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_reader_that_sees_everything_scores_one(batch_size):
    samples = needle_samples("retrieval", 400, 0.0, 5, seed=1, fmt=FMT) + \
        needle_samples("retrieval", 400, 0.5, 5, seed=1, fmt=FMT)
    score = score_cell(windowed_reader(window=10_000), samples, VOCAB, DEVICE, batch_size)
    assert (score.samples, score.correct, score.accuracy, score.token_accuracy) == (10, 10, 1.0, 1.0)


def test_accuracy_follows_the_needle_depth_for_a_windowed_reader():
    length, window = 600, 200
    for depth in (0.0, 0.3, 0.6, 0.7, 0.8, 1.0):
        samples = needle_samples("retrieval", length, depth, 4, seed=2, fmt=FMT)
        inside = [s.needle_start >= length - 2 - window for s in samples]
        score = score_cell(windowed_reader(window), samples, VOCAB, DEVICE, batch_size=2)
        assert score.correct == sum(inside), (depth, [s.needle_start for s in samples])
    assert score.accuracy == 1.0  # depth 100%: right before the question
    far = score_cell(windowed_reader(window), needle_samples("retrieval", length, 0.0, 4, seed=2, fmt=FMT),
                     VOCAB, DEVICE, batch_size=4)
    assert far.accuracy == 0.0 and far.token_accuracy < 0.5


def test_one_wrong_token_fails_the_sample_but_counts_the_others():
    samples = needle_samples("text", 300, 0.5, 6, seed=4, fmt=FMT, filler_source=random_text)
    assert score_cell(text_reader(False), samples, VOCAB, DEVICE, batch_size=6).accuracy == 1.0
    score = score_cell(text_reader(True), samples, VOCAB, DEVICE, batch_size=6)
    assert score.correct == 0
    assert score.token_accuracy == pytest.approx((TEXT_VALUE_DIGITS - 1) / TEXT_VALUE_DIGITS)
    hits = answer_hits(text_reader(True), samples[:2], VOCAB, DEVICE)
    assert [h.tolist() for h in hits] == [[True] * (TEXT_VALUE_DIGITS - 1) + [False]] * 2


def test_batches_of_one_length_only():
    samples = needle_samples("retrieval", 300, 0.5, 1, seed=0, fmt=FMT) + \
        needle_samples("retrieval", 310, 0.5, 1, seed=0, fmt=FMT)
    with pytest.raises(ValueError, match=r"one length, got \[300, 310\]"):
        answer_hits(windowed_reader(10), samples, VOCAB, DEVICE)
