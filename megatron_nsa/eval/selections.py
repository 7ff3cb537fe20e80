"""Which blocks NSA's selection branch picks at a needle question: the selected_block_idx of every layer
(recorded with megatron_nsa.functional.recorded_selections) and the diagnostic built on it: does the top-n
at the question include the block holding the needle?

A needle the model does not find was either never selected (the compressed scores did not rank its block
among the top n, so the selected branch cannot see it; only the window and the blurred compressed branch
can) or selected and not used. The share of layers x KV heads whose selection at the question holds the
needle's block tells the two apart. On the torch backend the needle block's rank among the blocks by their
scores (recorded_block_scores; 1 = the highest, the selection keeps ranks <= n) grades the miss: a rank just
past n is a near miss, a rank near half the candidate blocks is chance.
"""
from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence

import torch

from megatron_nsa.functional import recorded_block_scores, recorded_selections, recorded_target_scores

from .haystack import NeedleSample


def stack_layers(records: Sequence[torch.Tensor], num_layers: int, batch: int, seq_len: int) -> torch.Tensor:
    """The records of one forward pass of `batch` sequences of `seq_len` tokens (each one document) as
    [num_layers, batch, seq_len, H_kv, ...]: one record per layer, in order, each [batch * seq_len, H_kv, ...]
    (selected blocks [..., n] or block scores [..., N_slc])."""
    if not records:
        raise ValueError("the forward pass recorded no selections: the model has no NSA layer on this path")
    rows = torch.cat(list(records))  # [num_layers * batch * seq_len, H_kv, n]
    if rows.shape[0] != num_layers * batch * seq_len:
        raise ValueError(f"recorded {rows.shape[0]} selection rows, expected {num_layers} layers x {batch} sequences "
                         f"x {seq_len} tokens = {num_layers * batch * seq_len}")
    return rows.view(num_layers, batch, seq_len, *rows.shape[1:])


def needle_blocks(sample: NeedleSample, select_block_size: int) -> range:
    """Selection blocks holding a token of the needle."""
    return range(sample.needle_start // select_block_size,
                 (sample.needle_start + sample.needle_length - 1) // select_block_size + 1)


def block_rank(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Rank of `block` in the selection's order: scores [..., N_slc] (ranked_block_scores) -> [...] int64,
    1 + the blocks ranked before it (a higher score, or the same score and a lower id)."""
    own = scores[..., block:block + 1]
    before = (scores > own).sum(-1) + (scores[..., :block] == own).sum(-1)
    return before + 1


class QuestionSelections:
    """A logits function that also keeps, per forward pass, every layer's selection at the question's last
    token (the position that predicts the first answer token; the same for every sample of a needle cell),
    and with `scores` (torch backend) the block scores there and the block score loss's target (where the
    selected branch's queries and keys would attend without selection).

        tracked = QuestionSelections(loaded.logits, num_layers)
        score_cell(tracked, cell, ...)       # batches in order, as the cell's samples
        hits = tracked.needle_hits(cell, select_block_size)
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], num_layers: int, scores: bool = False):
        self.logits_fn = logits_fn
        self.num_layers = num_layers
        self.scores = scores
        self.batches: List[torch.Tensor] = []  # each [num_layers, batch, H_kv, n]
        self.score_batches: List[torch.Tensor] = []  # each [num_layers, batch, H_kv, N_slc]
        self.target_batches: List[torch.Tensor] = []  # each [num_layers, batch, H_kv, N_slc]
        self.answer_length = 1

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, seq_len = tokens.shape
        question = seq_len - 1 - self.answer_length
        with contextlib.ExitStack() as stack:
            records = stack.enter_context(recorded_selections())
            if self.scores:
                score_records = stack.enter_context(recorded_block_scores())
                target_records = stack.enter_context(recorded_target_scores(positions=[question]))
            logits = self.logits_fn(tokens)
        at_question = lambda rows: stack_layers(rows, self.num_layers, batch, seq_len)[:, :, question]  # noqa: E731
        self.batches.append(at_question(records))
        if self.scores:
            self.score_batches.append(at_question(score_records))
            self.target_batches.append(stack_layers(target_records, self.num_layers, batch, 1)[:, :, 0])
        return logits

    def start_cell(self, samples: Sequence[NeedleSample]) -> None:
        """Forget earlier batches; the cell's samples share their length and answer length."""
        self.batches = []
        self.score_batches = []
        self.target_batches = []
        self.answer_length = len(samples[0].answer_positions)

    def needle_hits(self, samples: Sequence[NeedleSample], select_block_size: int) -> torch.Tensor:
        """[samples, num_layers, H_kv] bool: whether that layer's KV head selected a block of the needle at
        the question, for the samples the batches since start_cell held, in order."""
        selected = torch.cat(self.batches, dim=1).transpose(0, 1)  # [samples, num_layers, H_kv, n]
        if selected.shape[0] != len(samples):
            raise ValueError(f"selections of {selected.shape[0]} samples recorded for {len(samples)} samples")
        hits = torch.zeros(selected.shape[:3], dtype=torch.bool)
        for row, sample in enumerate(samples):
            for block in needle_blocks(sample, select_block_size):
                hits[row] |= (selected[row] == block).any(-1)
        return hits

    def needle_ranks(self, samples: Sequence[NeedleSample], select_block_size: int) -> torch.Tensor:
        """[samples, num_layers, H_kv] int64: the best rank of a needle block in that layer's KV head at the
        question (block_rank; selected when <= n), for the samples since start_cell, in order."""
        return self._ranks(self.score_batches, samples, select_block_size)

    def needle_target_ranks(self, samples: Sequence[NeedleSample], select_block_size: int) -> torch.Tensor:
        """The same rank by the block score loss's target: where a selection that had learned from the selected
        branch's own queries and keys would put the needle's block."""
        return self._ranks(self.target_batches, samples, select_block_size)

    def _ranks(self, batches: List[torch.Tensor], samples: Sequence[NeedleSample], select_block_size: int):
        if not self.scores:
            raise ValueError("needle ranks need QuestionSelections(..., scores=True)")
        scores = torch.cat(batches, dim=1).transpose(0, 1)  # [samples, num_layers, H_kv, N_slc]
        if scores.shape[0] != len(samples):
            raise ValueError(f"block scores of {scores.shape[0]} samples recorded for {len(samples)} samples")
        ranks = torch.empty(scores.shape[:3], dtype=torch.int64)
        for row, sample in enumerate(samples):
            ranks[row] = torch.stack([block_rank(scores[row], block)
                                      for block in needle_blocks(sample, select_block_size)]).min(0).values
        return ranks
