"""Dense causal core attention on torch SDPA: the CPU-safe (and flash-capable) dense baseline.

Megatron's local DotProductAttention allocates on CUDA and materialises the [s, s] score
matrix; this one runs anywhere and uses the flash / memory-efficient SDPA kernels on GPU,
so the dense twin of an NSA recipe can run at 64k without Transformer Engine.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPACoreAttention(MegatronModule):
    """Core attention with Megatron's interface: q [sq, b, np, hn], k/v [sk, b, ng, hn] -> [sq, b, np*hn]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"context_parallel_size={config.context_parallel_size}: the dense SDPA baseline runs without "
                "context parallelism; use attention=nsa or context_parallel_size=1"
            )
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPACoreAttention is causal only, got attn_mask_type={attn_mask_type}")
        tp_size = pg_collection.tp.size() if pg_collection is not None else 1
        self.heads_per_rank = divide(config.num_attention_heads, tp_size)
        self.groups_per_rank = divide(config.num_query_groups, tp_size)
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention supports neither packed sequences nor an attention bias")
        seq_len, batch = query.shape[:2]
        group_size = query.shape[2] // key.shape[2]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if group_size > 1:
            k = k.repeat_interleave(group_size, dim=1)
            v = v.repeat_interleave(group_size, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale, dropout_p=self.dropout if self.training else 0.0
        )
        # [b, h, s, d] -> [s, b, h*d]
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, -1)
