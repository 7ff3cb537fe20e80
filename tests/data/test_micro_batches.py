"""micro_batches: the global sample order across data-parallel ranks, resumption by sample index, and the
same batches whether worker processes build them or the training process does."""
import itertools

import pytest
import torch

from megatron_nsa.data.datasets import micro_batches
from megatron_nsa.data.retrieval import TRAIN_STREAM, RetrievalDataset, RetrievalFormat

FMT = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=4, single_facts=2)
CPU = torch.device("cpu")


def take(dataset, first_sample, micro_batch_size, dp_rank, dp_size, num_workers, count):
    batches = micro_batches(dataset, first_sample, micro_batch_size, dp_rank, dp_size, CPU, num_workers=num_workers)
    return list(itertools.islice(batches, count))


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


def test_ranks_take_consecutive_slices_of_each_global_batch():
    dataset = RetrievalDataset(FMT, seq_length=40, num_samples=13, seed=3, stream=TRAIN_STREAM)
    micro, dp = 2, 3
    per_rank = [take(dataset, 5, micro, rank, dp, 0, 3) for rank in range(dp)]
    for step in range(3):
        for rank in range(dp):
            first = 5 + step * micro * dp + rank * micro
            expected = torch.stack([torch.as_tensor(dataset[(first + i) % 13]["tokens"]) for i in range(micro)])
            assert torch.equal(per_rank[rank][step]["tokens"], expected)


@pytest.mark.parametrize("num_workers", [1, 2])
def test_workers_build_the_same_batches_in_the_same_order(num_workers):
    dataset = RetrievalDataset(FMT, seq_length=64, num_samples=50, seed=7, stream=TRAIN_STREAM)
    in_process = take(dataset, 11, 4, 1, 2, 0, 9)
    assert_same(take(dataset, 11, 4, 1, 2, num_workers, 9), in_process)
    # a run resumed at sample 11 + 3 * 8 reads what the uninterrupted run read from its fourth batch on
    assert_same(take(dataset, 11 + 3 * 8, 4, 1, 2, num_workers, 6), in_process[3:])
