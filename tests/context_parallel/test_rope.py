"""Megatron's per-CP-rank rotary table, looked up at global positions."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa.context_parallel import LoadBalancedLayout
from megatron_nsa.context_parallel.rope import RankTableRotary
from megatron_nsa.rope import Rotary, rotary_angles


@pytest.mark.parametrize("cp_size", [2, 4])
def test_rank_table_rotates_like_the_full_table(cp_size):
    seq_len, rot_dim = 2 * cp_size * 16, 8
    layout = LoadBalancedLayout(seq_len, cp_size)
    full = Rotary.from_table(rotary_angles(torch.arange(seq_len), rot_dim, 100.0))  # [S, r]
    gen = torch.Generator().manual_seed(cp_size)
    for rank in range(cp_size):
        sliced = RankTableRotary(Rotary.from_table(layout.shard(full.table, rank, dim=0)), layout, rank)
        positions = layout.positions(rank)[torch.randperm(2 * layout.chunk_len, generator=gen)]
        x = torch.randn(positions.numel(), 3, rot_dim + 2, generator=gen)
        torch.testing.assert_close(sliced(x, positions), full(x, positions), rtol=0, atol=0)


def test_rank_table_rejects_positions_of_another_rank():
    layout = LoadBalancedLayout(64, 2)
    table = layout.shard(rotary_angles(torch.arange(64), 4, 100.0), 0, dim=0)
    sliced = RankTableRotary(Rotary.from_table(table), layout, rank=0)
    with pytest.raises(ValueError, match="position 16 is not on CP rank 0"):
        sliced(torch.randn(2, 1, 4), torch.tensor([3, 16]))
