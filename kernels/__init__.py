"""Triton kernels for NSA (import name: nsa_kernels). Never imports Megatron or megatron_nsa.

Every kernel works on packed sequences [total_tokens, H, D] with document boundaries.
"""
from .layout import Docs, make_docs
from .nsa import nsa_core

__all__ = ["Docs", "make_docs", "nsa_core"]
