"""`NSATransformerConfig`: Megatron-Core's TransformerConfig plus the NSA fields, validated.

NSA layers also run from a plain TransformerConfig (Megatron-LM's `--spec` path): then the NSA
hyper-parameters come from the layer spec (`get_gpt_layer_nsa_spec(nsa_config=...)`) and both head
dims are `kv_channels`. `nsa_layer_settings` resolves either case into one `NSALayerSettings`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from .config import NSAConfig, nsa_config_from, validate_nsa_fields

NSA_BACKENDS = (None, "torch", "triton")

_NSA_DEFAULTS = NSAConfig()


@dataclasses.dataclass
class NSATransformerConfig(TransformerConfig):
    """TransformerConfig for models whose attention is Native Sparse Attention.

    The NSA fields mean what they mean in NSAConfig (megatron_nsa/config.py). Two names are shared
    with TransformerConfig: `softmax_scale` (same meaning: None gives 1/sqrt(qk_head_dim)) and
    `window_size`, which here is NSA's sliding window in tokens (an int), not Megatron's
    (left, right) tuple for dense sliding-window attention.

    Selective recompute of the NSA core uses Megatron's own switch:
    recompute_granularity='selective' with 'core_attn' in recompute_modules (the default list).
    """

    compress_block_size: int = _NSA_DEFAULTS.compress_block_size
    """l: tokens per compressed block."""

    compress_stride: int = _NSA_DEFAULTS.compress_stride
    """d: stride between compressed blocks (divides l and l')."""

    select_block_size: int = _NSA_DEFAULTS.select_block_size
    """l': tokens per selection block."""

    select_count: int = _NSA_DEFAULTS.select_count
    """n: selected blocks per query, forced ones included."""

    select_init_blocks: int = _NSA_DEFAULTS.select_init_blocks
    """First selection blocks always selected."""

    select_local_blocks: int = _NSA_DEFAULTS.select_local_blocks
    """Most recent selection blocks always selected (the one holding the query included)."""

    window_size: int = _NSA_DEFAULTS.window_size
    """w: NSA sliding-window length in tokens, the query included (replaces Megatron's tuple)."""

    compression: str = _NSA_DEFAULTS.compression
    """phi: 'mean' | 'linear' | 'mlp'; its parameters are shared across heads."""

    compress_mlp_hidden: Optional[int] = _NSA_DEFAULTS.compress_mlp_hidden
    """Hidden width of phi='mlp' (None: 2 * head dim)."""

    separate_kv: bool = _NSA_DEFAULTS.separate_kv
    """Independent K/V projections per branch (the paper's choice) instead of one shared K/V."""

    qk_head_dim: Optional[int] = None
    """Head dim of queries and keys (None: kv_channels)."""

    v_head_dim: Optional[int] = None
    """Head dim of values (None: kv_channels). kv_channels is set to it when left unset."""

    nsa_backend: Optional[str] = None
    """NSA core: 'torch' (reference), 'triton' (kernels), None (triton on CUDA when available)."""

    nsa_rotary_base: Optional[float] = None
    """When set, NSA layers apply their own RoPE with this base (use the GPTModel with
    position_embedding_type 'none' or 'learned_absolute'). When None, they use the rotary table
    that GPTModel passes with position_embedding_type='rope', or no RoPE at all."""

    nsa_rotary_dim: Optional[int] = None
    """Leading dims of each q/k head that NSA's own RoPE rotates (None: all of qk_head_dim)."""

    nsa_cp_exchange: str = "allgather"
    """How NSA K/V cross context-parallel ranks: 'allgather' | 'ring' | 'hierarchical' | 'fetch'
    (megatron_nsa.context_parallel.exchange; same result, different memory and traffic)."""

    nsa_cp_node_size: Optional[int] = None
    """Consecutive CP ranks per node, for nsa_cp_exchange='hierarchical' (a divisor of context_parallel_size)."""

    def __post_init__(self):
        if self.kv_channels is None and self.v_head_dim is not None:
            self.kv_channels = self.v_head_dim
        super().__post_init__()
        if self.v_head_dim is None:
            self.v_head_dim = self.kv_channels
        if self.qk_head_dim is None:
            self.qk_head_dim = self.kv_channels
        validate_nsa_fields(self)
        _validate_head_dims(self)
        _validate_backend(self.nsa_backend, "nsa_backend")
        _validate_rotary(self)
        _validate_cp_exchange(self)
        check_megatron_fields(self, self.tensor_model_parallel_size)

    def nsa_config(self) -> NSAConfig:
        return nsa_config_from(self)


@dataclasses.dataclass(frozen=True)
class NSALayerSettings:
    """What one NSA attention layer needs besides Megatron's TransformerConfig."""

    nsa: NSAConfig
    qk_head_dim: int
    v_head_dim: int
    backend: Optional[str] = None
    rotary_base: Optional[float] = None  # NSA's own RoPE; None: Megatron's table (if passed) or none
    rotary_dim: Optional[int] = None


def nsa_layer_settings(config: TransformerConfig, nsa_config: Optional[NSAConfig] = None,
                       nsa_backend: Optional[str] = None) -> NSALayerSettings:
    """The NSA settings of a layer: from an NSATransformerConfig, or from the spec's params
    (`nsa_config`, `nsa_backend`) with a plain TransformerConfig (head dims = kv_channels)."""
    if isinstance(config, NSATransformerConfig):
        if nsa_config is not None or nsa_backend is not None:
            raise ValueError(
                "NSA settings were given twice: the config is an NSATransformerConfig, so set them on it "
                "and build the spec without nsa_config / nsa_backend"
            )
        return NSALayerSettings(
            nsa=config.nsa_config(), qk_head_dim=config.qk_head_dim, v_head_dim=config.v_head_dim,
            backend=config.nsa_backend, rotary_base=config.nsa_rotary_base,
            rotary_dim=config.nsa_rotary_dim or config.qk_head_dim,
        )
    if nsa_config is None:
        nsa_config = NSAConfig(softmax_scale=config.softmax_scale)
    if not isinstance(nsa_config, NSAConfig):
        raise TypeError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
    _validate_backend(nsa_backend, "nsa_backend")
    return NSALayerSettings(nsa=nsa_config, qk_head_dim=config.kv_channels, v_head_dim=config.kv_channels,
                            backend=nsa_backend)


def check_megatron_fields(config: TransformerConfig, tensor_parallel_size: int) -> None:
    """Megatron settings that NSA layers cannot honour; errors name the field."""
    if config.num_query_groups % tensor_parallel_size != 0:
        raise ValueError(
            f"num_query_groups={config.num_query_groups} is not divisible by the tensor-parallel size "
            f"{tensor_parallel_size}: NSA keeps whole KV groups on one rank (no KV replication); "
            f"allowed: a tensor_model_parallel_size that divides {config.num_query_groups}"
        )
    for name in ("multi_latent_attention", "rotary_interleaved"):
        if getattr(config, name, False):
            raise ValueError(f"{name}=True is not supported by NSA layers; allowed: False")


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")


def _validate_head_dims(cfg: NSATransformerConfig) -> None:
    _require_positive_int("qk_head_dim", cfg.qk_head_dim)
    _require_positive_int("v_head_dim", cfg.v_head_dim)
    if cfg.kv_channels != cfg.v_head_dim:
        raise ValueError(
            f"kv_channels={cfg.kv_channels} must equal v_head_dim={cfg.v_head_dim}: NSA layers use kv_channels "
            f"as the value head dim (the output projection's input is num_attention_heads * v_head_dim); "
            f"leave kv_channels unset"
        )


def _validate_backend(backend, name: str) -> None:
    if backend not in NSA_BACKENDS:
        raise ValueError(f"{name}={backend!r} is not allowed; choose one of {NSA_BACKENDS}")


def _validate_cp_exchange(cfg: NSATransformerConfig) -> None:
    from .context_parallel.exchange import EXCHANGE_MODES
    from .context_parallel.exchange_hierarchical import check_node_size

    if cfg.nsa_cp_exchange not in EXCHANGE_MODES:
        raise ValueError(f"nsa_cp_exchange={cfg.nsa_cp_exchange!r} is not allowed; choose one of {EXCHANGE_MODES}")
    if cfg.nsa_cp_exchange == "hierarchical":
        check_node_size(cfg.nsa_cp_node_size, cfg.context_parallel_size, "nsa_cp_node_size")


def _validate_rotary(cfg: NSATransformerConfig) -> None:
    base, dim = cfg.nsa_rotary_base, cfg.nsa_rotary_dim
    if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float))
                             or not math.isfinite(base) or base <= 0):
        raise ValueError(f"nsa_rotary_base={base!r} is not allowed: it must be None or a finite number > 0")
    if dim is None:
        if base is not None and cfg.qk_head_dim % 2:
            raise ValueError(
                f"qk_head_dim={cfg.qk_head_dim} is odd, so RoPE cannot rotate all of it; "
                f"set nsa_rotary_dim to an even number <= {cfg.qk_head_dim}"
            )
        return
    if base is None:
        raise ValueError(f"nsa_rotary_dim={dim} needs nsa_rotary_base (NSA's own RoPE); set both or neither")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2 or dim > cfg.qk_head_dim:
        raise ValueError(
            f"nsa_rotary_dim={dim!r} is not allowed: it must be an even integer in [2, qk_head_dim={cfg.qk_head_dim}]"
        )

