"""megatron-nsa: Native Sparse Attention for Megatron-Core."""
import importlib

from .compression import KVCompressor
from .config import NSAConfig
from .functional import nsa_attention
from .reference import NSAIntermediates, nsa_reference

# Megatron-Core integration, imported on first use (importing megatron-core takes seconds).
_MEGATRON_EXPORTS = {
    "NSATransformerConfig": ".transformer_config",
    "NSASelfAttention": ".attention",
    "NSACoreAttention": ".attention",
    "get_gpt_layer_nsa_spec": ".spec",
    "get_gpt_decoder_block_nsa_spec": ".spec",
}

__all__ = ["NSAConfig", "KVCompressor", "nsa_attention", "nsa_reference", "NSAIntermediates", *_MEGATRON_EXPORTS]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _MEGATRON_EXPORTS:
        return getattr(importlib.import_module(_MEGATRON_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
