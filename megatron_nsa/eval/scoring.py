"""Teacher-forced answer scoring: one forward pass per batch of samples.

A sample is answered correctly when, for every answer token at position p, the argmax of the model's
prediction at p - 1 (over the tokenizer's real vocabulary, not the padding) is that token.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Sequence

import numpy
import torch

from .haystack import NeedleSample

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] int64 -> logits [b, s, V]


@dataclasses.dataclass
class CellScore:
    samples: int
    correct: int  # samples with every answer token right
    answer_tokens: int
    correct_tokens: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples

    @property
    def token_accuracy(self) -> float:
        return self.correct_tokens / self.answer_tokens


def answer_hits(logits_fn: LogitsFn, samples: Sequence[NeedleSample], vocab_size: int,
                device: torch.device) -> List[numpy.ndarray]:
    """Per sample: [answer length] bool, whether each answer token is the argmax prediction."""
    lengths = {len(s.tokens) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples of one batch must have one length, got {sorted(lengths)}")
    tokens = torch.as_tensor(numpy.stack([s.tokens for s in samples]), device=device)  # [b, s]
    with torch.no_grad():
        logits = logits_fn(tokens)  # [b, s, V]
    hits = []
    for row, sample in enumerate(samples):
        positions = torch.as_tensor(sample.answer_positions, device=device)
        predicted = logits[row, positions - 1, :vocab_size].argmax(dim=-1)
        hits.append((predicted == tokens[row, positions]).cpu().numpy())
    return hits


def score_cell(logits_fn: LogitsFn, samples: Sequence[NeedleSample], vocab_size: int, device: torch.device,
               batch_size: int) -> CellScore:
    correct = answer_tokens = correct_tokens = 0
    for start in range(0, len(samples), batch_size):
        for hit in answer_hits(logits_fn, samples[start:start + batch_size], vocab_size, device):
            correct += bool(hit.all())
            answer_tokens += hit.size
            correct_tokens += int(hit.sum())
    return CellScore(len(samples), correct, answer_tokens, correct_tokens)
