"""experiments/selection_overlap.py: the count of distinct blocks per tile of neighbouring tokens."""
from __future__ import annotations

import pytest
import torch

from experiments.selection_overlap import distinct_blocks_per_tile


def brute_force(idx, tokens, first_row):
    counts = []
    rows = idx.shape[0] - first_row
    for start in range(first_row, first_row + rows - rows % tokens, tokens):
        for head in range(idx.shape[1]):
            picked = {int(b) for b in idx[start:start + tokens, head].flatten() if b >= 0}
            counts.append(len(picked))
    return sum(counts) / len(counts)


@pytest.mark.parametrize("tokens", [1, 2, 4, 8])
@pytest.mark.parametrize("first_row", [0, 3])
def test_distinct_blocks_match_a_set_count(tokens, first_row):
    generator = torch.Generator().manual_seed(tokens * 10 + first_row)
    idx = torch.randint(0, 12, (37, 3, 5), generator=generator)  # [T, H_kv, n], repeats across tokens
    idx[torch.rand(idx.shape, generator=generator) < 0.2] = -1  # unused slots
    assert distinct_blocks_per_tile(idx, tokens, first_row) == pytest.approx(brute_force(idx, tokens, first_row))


def test_no_whole_tile_is_an_error():
    with pytest.raises(ValueError, match="no whole tile of 8 tokens after row 4 of 10 rows"):
        distinct_blocks_per_tile(torch.zeros(10, 1, 2, dtype=torch.int64), 8, 4)
