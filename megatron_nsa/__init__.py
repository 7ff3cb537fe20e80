"""megatron-nsa: Native Sparse Attention for Megatron-Core."""
from .compression import KVCompressor
from .config import NSAConfig
from .functional import nsa_attention
from .reference import NSAIntermediates, nsa_reference

__all__ = ["NSAConfig", "KVCompressor", "nsa_attention", "nsa_reference", "NSAIntermediates"]
__version__ = "0.1.0"
