"""benchmarks/selection_overlap.py: the count of distinct blocks per tile of neighbouring tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from selection_overlap import distinct_blocks_per_tile  # noqa: E402


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


def test_recorded_selections_are_the_reference_selections_in_call_order(nsa_inputs):
    """The recorder sees the selections of the Triton path (interpreter on CPU), one per call, equal to
    the reference's; afterwards the path is left as it was."""
    pytest.importorskip("nsa_kernels")
    import nsa_kernels.nsa as nsa_module
    from megatron_nsa import NSAConfig, nsa_attention
    from megatron_nsa import reference as R
    from selection_overlap import recorded_selections

    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=3,
                       window_size=16)
    calls = [nsa_inputs(1, 112, 4, 2, 16, 16, False, seed, dtype=torch.float32) for seed in (3, 4)]
    original = nsa_module.select_blocks
    with recorded_selections() as records:
        for q, ks, vs, gates in calls:
            nsa_attention(q, ks[0], vs[0], gates, config, backend="triton")
    assert nsa_module.select_blocks is original
    assert len(records) == len(calls)
    for recorded, (q, ks, vs, gates) in zip(records, calls):
        kv = (ks[0], vs[0])
        _, inter = R.nsa_reference(q, kv, kv, kv, gates, config, return_intermediates=True)
        assert recorded.shape == (112, 2, 3)
        assert torch.equal(recorded.long(), inter.selected_block_idx.long())
