"""Megatron's load-balanced context-parallel layout and batch sharding.

The sequence of S tokens is cut into 2C chunks of c = S / (2C) tokens; CP rank r holds chunks
r and 2C-1-r, in that order (its "slot 0" and "slot 1"), so that every rank gets the same
causal work. This is the layout of megatron.core.utils.get_batch_on_this_cp_rank.

NSA needs each chunk to be a whole number of selection blocks (so that a block never spans
two ranks) and at least one window long (so that a chunk's window halo comes from one chunk).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch

# Batch entries with a sequence dimension (dim 1) that a rank keeps only its share of.
SEQUENCE_KEYS = ("tokens", "labels", "position_ids", "loss_mask")


def check_cp_sequence(seq_len: int, cp_size: int, config=None) -> int:
    """Check that S tokens can be sharded over cp_size ranks for NSA; return the chunk length S / (2C).

    Raises ValueError naming the numbers when S is not a multiple of 2*C*l' or a chunk is shorter
    than the window w. Without a config only divisibility by 2C is checked.
    """
    for name, value in (("seq_len", seq_len), ("context_parallel_size", cp_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")
    unit = 2 * cp_size * (config.select_block_size if config is not None else 1)
    if seq_len % unit != 0:
        lower, upper = (seq_len // unit) * unit, (seq_len // unit + 1) * unit
        detail = f" * select_block_size l'={config.select_block_size}" if config is not None else ""
        raise ValueError(
            f"sequence length {seq_len} cannot be sharded over context_parallel_size={cp_size}: it must be a "
            f"multiple of 2 * {cp_size}{detail} = {unit} (2C chunks, each a whole number of selection blocks); "
            f"nearest allowed lengths: {lower or unit} and {upper}"
        )
    chunk_len = seq_len // (2 * cp_size)
    if config is not None and chunk_len < config.window_size:
        raise ValueError(
            f"sequence length {seq_len} over context_parallel_size={cp_size} gives chunks of {seq_len} / {2 * cp_size}"
            f" = {chunk_len} tokens, shorter than window_size w={config.window_size}; the window halo of a chunk "
            f"must come from the one chunk before it: use a sequence length >= 2 * {cp_size} * {config.window_size}"
            f" = {2 * cp_size * config.window_size} or a smaller context_parallel_size"
        )
    return chunk_len


class LoadBalancedLayout:
    """Where every token of an S-token sequence lives over C context-parallel ranks."""

    def __init__(self, seq_len: int, cp_size: int, config=None):
        self.chunk_len = check_cp_sequence(seq_len, cp_size, config)
        self.seq_len = seq_len
        self.cp_size = cp_size
        self.num_chunks = 2 * cp_size

    def check_rank(self, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.cp_size:
            raise ValueError(f"cp_rank={rank!r} is not allowed: it must be an integer in [0, {self.cp_size})")

    def chunks_of(self, rank: int) -> Tuple[int, int]:
        """The chunks rank `rank` holds, in its slot order."""
        return rank, self.num_chunks - 1 - rank

    def owner(self, chunk: int) -> Tuple[int, int]:
        """(rank, slot) holding chunk `chunk`."""
        return (chunk, 0) if chunk < self.cp_size else (self.num_chunks - 1 - chunk, 1)

    def chunk_start(self, chunk: int) -> int:
        return chunk * self.chunk_len

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global token positions of rank's local tokens, [2c] int64."""
        self.check_rank(rank)
        offsets = torch.arange(self.chunk_len, device=device)
        return torch.cat([self.chunk_start(chunk) + offsets for chunk in self.chunks_of(rank)])

    def rank_major_chunk_order(self) -> list:
        """For every global chunk j, its index in the rank-major list [rank 0 slot 0, rank 0 slot 1, rank 1 ...]."""
        return [2 * rank + slot for rank, slot in map(self.owner, range(self.num_chunks))]

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """This rank's share of x along dim (size S): [.., S, ..] -> [.., 2c, ..]."""
        self.check_rank(rank)
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"dimension {dim} of a tensor of shape {tuple(x.shape)} is not the sequence "
                             f"length {self.seq_len}")
        chunks = x.unflatten(dim, (self.num_chunks, self.chunk_len))
        index = torch.tensor(self.chunks_of(rank), device=x.device)
        return chunks.index_select(dim, index).flatten(dim, dim + 1)

    def unshard(self, shards, dim: int = 1) -> torch.Tensor:
        """Inverse of shard: the C ranks' shares (in rank order) -> the whole sequence along dim."""
        if len(shards) != self.cp_size:
            raise ValueError(f"unshard needs {self.cp_size} shards (one per rank), got {len(shards)}")
        pieces = [None] * self.num_chunks
        for rank, shard in enumerate(shards):
            for slot, chunk in enumerate(self.chunks_of(rank)):
                pieces[chunk] = shard.narrow(dim, slot * self.chunk_len, self.chunk_len)
        return torch.cat(pieces, dim=dim)


def shard_batch_for_rank(batch: Dict[str, Optional[torch.Tensor]], cp_size: int, cp_rank: int, config=None,
                         keys: Iterable[str] = SEQUENCE_KEYS) -> Dict[str, Optional[torch.Tensor]]:
    """This CP rank's share of a batch: entries named in `keys` ([B, S, ...]) are cut along dim 1.

    Other entries (e.g. cu_seqlens, which stays global: every rank needs all document
    boundaries) are passed through unchanged; None values stay None.
    """
    keys = tuple(keys)
    lengths = {name: value.shape[1] for name, value in batch.items() if name in keys and value is not None}
    if not lengths:
        raise ValueError(f"batch has none of the sequence entries {keys}; got keys {sorted(batch)}")
    if len(set(lengths.values())) != 1:
        raise ValueError(f"batch entries disagree on the sequence length (dim 1): {lengths}")
    layout = LoadBalancedLayout(next(iter(lengths.values())), cp_size, config)
    layout.check_rank(cp_rank)
    return {name: layout.shard(value, cp_rank) if name in lengths else value for name, value in batch.items()}
