"""The NSA settings the kernels read, as one small frozen object."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class KernelParams:
    """Block sizes, counts, window and softmax scale of one NSA attention (the paper's l, d, l', n, w)."""

    compress_block: int  # l: tokens per compressed block
    compress_stride: int  # d: stride between compressed blocks
    select_block: int  # l': tokens per selection block
    select_count: int  # n: selected blocks per query, the forced ones included
    init_blocks: int  # first selection blocks every query selects
    local_blocks: int  # most recent selection blocks every query selects (its own included)
    window: int  # w: sliding-window length in tokens, the query itself included
    scale: float  # softmax scale of the attention logits

    @classmethod
    def from_config(cls, config, scale: float) -> "KernelParams":
        """The parameters of an object with megatron_nsa.NSAConfig's field names, and a softmax scale."""
        return cls(compress_block=config.compress_block_size, compress_stride=config.compress_stride,
                   select_block=config.select_block_size, select_count=config.select_count,
                   init_blocks=config.select_init_blocks, local_blocks=config.select_local_blocks,
                   window=config.window_size, scale=float(scale))
