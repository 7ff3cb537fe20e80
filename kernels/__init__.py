"""Triton kernels for NSA (import name: nsa_kernels). Never imports Megatron or megatron_nsa.

Every kernel works on packed sequences [total_tokens, H, D] described by a Layout (which rows are which
document at which positions: packed_documents() for whole documents, document_piece() for queries of
one document at explicit positions) and reads the NSA settings from a KernelParams. nsa_core runs the
whole attention on packed documents; the branch functions (one document piece, explicit query
positions, the signatures of megatron_nsa.reference) serve context parallelism.
"""
from .branches import (compressed_attention, gated_combine, select_blocks, selected_attention,
                       selected_attention_backward, window_attention)
from .layout import Layout, document_piece, packed_documents
from .nsa import nsa_core
from .params import KernelParams

__all__ = ["Layout", "KernelParams", "packed_documents", "document_piece", "nsa_core", "compressed_attention",
           "select_blocks", "selected_attention", "selected_attention_backward", "window_attention",
           "gated_combine"]
