"""Triton kernels for NSA (import name: nsa_kernels). Never imports Megatron or megatron_nsa.

Every kernel works on packed sequences [total_tokens, H, D] with document boundaries. The branch
functions below (one document piece, explicit query positions) serve context parallelism.
"""
from .branches import (compressed_attention, gated_combine, select_blocks, selected_attention,
                       selected_attention_backward, window_attention)
from .layout import Docs, make_docs
from .nsa import nsa_core

__all__ = ["Docs", "make_docs", "nsa_core", "compressed_attention", "select_blocks", "selected_attention",
           "selected_attention_backward", "window_attention", "gated_combine"]
