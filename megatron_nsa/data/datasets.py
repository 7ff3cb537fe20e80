"""A recipe's tokenizer and its training and validation data, through megatron.core.datasets.

`recipe` below is a training recipe (megatron_nsa.training.config.Recipe); only its `data`, `retrieval`
and `training.seed` settings are read. Sources: `stdlib` (the Python standard library's sources as an
indexed dataset, built on first use in the cache directory), `indexed` (your .bin/.idx prefixes, optionally
weighted: a blend), `mock` (random tokens), `retrieval` (the synthetic key/value task of
megatron_nsa.data.retrieval, generated on the fly).
Validation uses the same blend with `data.split`'s second share of the documents.

Each data-parallel rank reads its own micro-batches by global sample index, so the position in the data is
just the number of samples consumed: resuming at step k restarts at sample k * global_batch_size.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Dict, Iterator

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from .build_dataset import build_indexed_dataset, dataset_exists, parse_blend, stdlib_source_files
from .retrieval import RetrievalFormat, retrieval_datasets
from .tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, build_tokenizer

Batch = Dict[str, torch.Tensor]


def recipe_tokenizer(recipe):
    """The tokenizer a recipe's model is built for: data.tokenizer, and for data.source=retrieval the byte
    tokenizer with the task's key and value ids reserved (the recipe checks make sure it is bytes)."""
    if recipe.data.source != "retrieval":
        return build_tokenizer(recipe.data.tokenizer)
    return ByteTokenizer(reserved_ids=RetrievalFormat.of(recipe.retrieval).vocab_size - BYTE_VOCAB_SIZE)


def cache_dir(recipe) -> str:
    return os.path.abspath(os.path.expanduser(
        recipe.data.cache_dir or os.environ.get("MEGATRON_NSA_CACHE") or "~/.cache/megatron_nsa"
    ))


def stdlib_prefix(recipe, tokenizer) -> str:
    """Where the standard-library corpus for this interpreter and tokenizer lives."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    if recipe.data.tokenizer == "bytes":
        tag = "bytes"
    else:
        tag = "hf-" + hashlib.md5(tokenizer.unique_identifiers["path"].encode(), usedforsecurity=False).hexdigest()[:10]
    return os.path.join(cache_dir(recipe), f"stdlib-{version}-{tag}")


def ensure_stdlib_dataset(recipe, tokenizer) -> str:
    """Build the standard-library corpus once per node (local rank 0), then every rank uses it."""
    prefix = stdlib_prefix(recipe, tokenizer)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and not dataset_exists(prefix):
        num_tokens = build_indexed_dataset(stdlib_source_files(), prefix, tokenizer)
        print(f"built the standard-library corpus {prefix}.bin/.idx ({num_tokens} tokens)", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return prefix


def build_datasets(recipe, tokenizer, num_train_samples: int, num_valid_samples: int):
    """(train, validation) datasets; validation is None when the split leaves it no documents."""
    data = recipe.data
    if data.source == "retrieval":
        return retrieval_datasets(recipe, num_train_samples, num_valid_samples)
    if data.source == "mock":
        blend = None
    elif data.source == "stdlib":
        blend = ([ensure_stdlib_dataset(recipe, tokenizer)], None)
    else:
        blend = parse_blend(data.paths)
    config = GPTDatasetConfig(
        random_seed=recipe.training.seed,
        sequence_length=data.seq_length,
        blend=blend,
        split=data.split,
        path_to_cache=os.path.join(cache_dir(recipe), "gpt_dataset_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    dataset_class = MockGPTDataset if data.source == "mock" else GPTDataset
    sizes = [num_train_samples, num_valid_samples, 0]
    train, valid, _ = BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, config).build()
    return train, valid


class _GlobalOrder(torch.utils.data.Sampler):
    """Endless lists of sample indices, one micro-batch each, in the global order of micro_batches()."""

    def __init__(self, num_samples: int, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.num_samples, self.first_sample = num_samples, first_sample
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size

    def __iter__(self):
        sample = self.first_sample
        while True:
            start = sample + self.dp_rank * self.micro_batch_size
            yield [(start + i) % self.num_samples for i in range(self.micro_batch_size)]
            sample += self.micro_batch_size * self.dp_size


def _stack(items) -> Batch:
    return {key: torch.stack([torch.as_tensor(numpy.asarray(item[key])) for item in items])
            for key in ("tokens", "labels", "loss_mask", "position_ids")}


def micro_batches(dataset, first_sample: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  device: torch.device, num_workers: int = 0) -> Iterator[Batch]:
    """Endless micro-batches for one data-parallel rank, from global sample `first_sample` on.

    Global sample order: consecutive groups of micro_batch_size * dp_size samples; rank r takes the r-th slice.
    With num_workers > 0, that many worker processes build the next micro-batches while the caller trains
    (the same batches in the same order: a sample is a pure function of its index).
    """
    order = _GlobalOrder(len(dataset), first_sample, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, collate_fn=_stack, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    for batch in loader:
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}
