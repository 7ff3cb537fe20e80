"""RoPE under context parallelism with Megatron's per-rank rotary table.

Each rank holds chunks r and 2C-1-r, so its tokens sit at global positions that are not
0..2c-1. With CP > 1 and unpacked input, Megatron's GPTModel slices its rotary table
(rotary_pos_emb) to this rank's tokens, so the table is indexed by local row; `RankTableRotary`
translates global positions to those rows. Compressed keys are rotated at their block's last
token, which is always local (a block is compressed on the rank holding its last token), so the
sliced table suffices.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from .layout import LoadBalancedLayout


class RankTableRotary:
    """Wraps a rotary (fn(x, positions)) whose table rows are this rank's tokens in local order."""

    def __init__(self, rotary, layout: LoadBalancedLayout, rank: int):
        self.rotary, self.layout, self.rank = rotary, layout, rank

    def local_rows(self, positions: torch.Tensor) -> torch.Tensor:
        """Global positions [N] (on this rank) -> rows of the local table [N]."""
        chunk_len, cp_size = self.layout.chunk_len, self.layout.cp_size
        chunk = torch.div(positions, chunk_len, rounding_mode="floor")
        second = chunk >= cp_size
        owner = torch.where(second, 2 * cp_size - 1 - chunk, chunk)
        if bool((owner != self.rank).any()):
            bad = int(positions[owner != self.rank][0])
            raise ValueError(f"position {bad} is not on CP rank {self.rank}: this rotary table only holds that "
                             f"rank's rows")
        return second.to(positions.dtype) * chunk_len + positions - chunk * chunk_len

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.rotary(x, self.local_rows(positions))


def cp_rotary(rotary, local_len: int, cu_seqlens: Optional[torch.Tensor], cp_group):
    """A rotary to call at global (within-document) positions on this CP rank.

    rotary: a megatron_nsa.rope.Rotary. One built from a base, or from a table of every position,
    is returned as is; one built from Megatron's table sliced to this rank (2c rows) is wrapped.
    """
    cp_size, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    table = getattr(rotary, "table", None)
    if cp_size == 1 or table is None or table.shape[0] != local_len:
        return rotary
    if cu_seqlens is not None:
        raise ValueError(
            f"the rotary table has {table.shape[0]} rows, one per local token (sliced for CP rank {rank}), but the "
            f"input is packed (cu_seqlens): positions restart in every document; pass a table of every position"
        )
    return RankTableRotary(rotary, LoadBalancedLayout(local_len * cp_size, cp_size), rank)
