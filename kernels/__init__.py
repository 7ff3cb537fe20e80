"""Triton kernels for NSA (import name: nsa_kernels). Never imports Megatron."""
