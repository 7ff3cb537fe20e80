"""Load-balanced layout, batch sharding and the errors for sequence lengths that do not fit."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import NSAConfig
from megatron_nsa.context_parallel import LoadBalancedLayout, check_cp_sequence, shard_batch_for_rank
from megatron_nsa.context_parallel.halo import SELF, halo_routes
from megatron_nsa.context_parallel.segments import blocks_ending_in

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4, window_size=24)


def _random_batch(seq_len, seed):
    gen = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 1000, (2, seq_len), generator=gen),
        "labels": torch.randint(0, 1000, (2, seq_len), generator=gen),
        "position_ids": torch.randperm(seq_len, generator=gen).repeat(2, 1),
        "loss_mask": torch.rand(2, seq_len, generator=gen),
    }


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_shards_match_megatron_and_cover_the_sequence(cp_size, monkeypatch):
    from megatron.core.utils import get_batch_on_this_cp_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)  # megatron reads the fake group's size

    seq_len = 2 * cp_size * 32
    batch = _random_batch(seq_len, seed=cp_size)
    layout = LoadBalancedLayout(seq_len, cp_size, CONFIG)
    shards = []
    for rank in range(cp_size):
        mine = shard_batch_for_rank(dict(batch, cu_seqlens=None), cp_size, rank, CONFIG)
        assert mine["cu_seqlens"] is None
        megatron = get_batch_on_this_cp_rank(dict(batch), cp_group=_FakeGroup(cp_size, rank))
        for key in batch:
            torch.testing.assert_close(mine[key], megatron[key], rtol=0, atol=0)
        torch.testing.assert_close(mine["position_ids"][0], batch["position_ids"][0][layout.positions(rank)])
        shards.append(mine["tokens"])
    torch.testing.assert_close(layout.unshard(shards), batch["tokens"], rtol=0, atol=0)


class _FakeGroup:
    """Enough of a process group for megatron's get_pg_size / get_pg_rank."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_rank_chunks_and_owners():
    layout = LoadBalancedLayout(2 * 4 * 32, 4, CONFIG)
    assert [layout.chunks_of(r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    for chunk in range(8):
        rank, slot = layout.owner(chunk)
        assert layout.chunks_of(rank)[slot] == chunk


def test_halo_routes_connect_each_chunk_to_the_one_before():
    for cp_size in (1, 2, 3, 4):
        layout = LoadBalancedLayout(2 * cp_size * 32, cp_size, CONFIG)
        arrivals = {}
        for rank in range(cp_size):
            sends, recvs = halo_routes(cp_size, rank)
            for my_slot, peer, peer_slot in sends:
                target = rank if peer == SELF else peer
                arrivals[layout.chunks_of(target)[peer_slot]] = layout.chunks_of(rank)[my_slot]
                if peer != SELF:
                    assert (rank, peer_slot) in halo_routes(cp_size, peer)[1]
        assert arrivals == {chunk: chunk - 1 for chunk in range(1, 2 * cp_size)}


def test_blocks_ending_in_partitions_each_documents_blocks():
    l, d = CONFIG.compress_block_size, CONFIG.compress_stride
    for doc_start, doc_end in [(0, 128), (5, 77), (13, 20), (30, 36)]:
        seen = []
        for lo in range(0, 128, 16):
            first, count = blocks_ending_in(doc_start, doc_end, lo, lo + 16, CONFIG)
            for i in range(first, first + count):
                assert lo <= doc_start + i * d + l - 1 < lo + 16
            seen.extend(range(first, first + count))
        assert seen == list(range(max(0, (doc_end - doc_start - l) // d + 1)))


def test_length_not_a_multiple_of_2_c_lprime_is_rejected_with_the_numbers():
    with pytest.raises(ValueError, match=r"sequence length 200 .*context_parallel_size=2.*2 \* 2 \* select_block_size "
                                         r"l'=16 = 64.*192 and 256"):
        check_cp_sequence(200, 2, CONFIG)


def test_chunk_shorter_than_window_is_rejected_with_the_numbers():
    with pytest.raises(ValueError, match=r"chunks of 64 / 4 = 16 tokens, shorter than window_size w=24.*"
                                         r">= 2 \* 2 \* 24 = 96"):
        check_cp_sequence(64, 2, CONFIG)
    assert check_cp_sequence(128, 2, CONFIG) == 32


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="context_parallel_size=0"):
        check_cp_sequence(64, 0, CONFIG)
    with pytest.raises(ValueError, match=r"cp_rank=2 .*\[0, 2\)"):
        shard_batch_for_rank(_random_batch(128, 0), 2, 2, CONFIG)
    batch = _random_batch(128, 0)
    batch["labels"] = batch["labels"][:, :64]
    with pytest.raises(ValueError, match="disagree on the sequence length"):
        shard_batch_for_rank(batch, 2, 0, CONFIG)
