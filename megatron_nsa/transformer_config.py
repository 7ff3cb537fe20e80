"""`NSATransformerConfig`: Megatron-Core's TransformerConfig plus the NSA fields, validated.

Every NSA field carries the prefix `nsa_`, as Megatron's own `dsa_indexer_*` fields do, so that
none shadows a TransformerConfig field (Megatron has its own `window_size` and `softmax_scale`):

- one `nsa_<name>` per NSAConfig field, generated from `dataclasses.fields(NSAConfig)` (default,
  type and help text are NSAConfig's: every NSA hyper-parameter is declared once, in config.py);
- the layer's own settings, declared here: head dims, backend, NSA's own RoPE, the
  context-parallel exchange.

Megatron-LM's `core_transformer_config_from_args(args, NSATransformerConfig)` copies every args
attribute named like a field, so the `--nsa-*` flags (megatron_nsa.megatron_lm.arguments,
generated from these fields) reach the config without a mapping table.

NSA layers also run from a plain TransformerConfig (`--spec megatron_nsa.spec nsa_layer_spec`):
then the NSA hyper-parameters come from the layer spec (`get_gpt_layer_nsa_spec(nsa_config=...)`)
and both head dims are `kv_channels`. `nsa_layer_settings` resolves either case into one
`NSALayerSettings`.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from .config import NSA_FIELD_NAMES, NSAConfig, nsa_config_from, validate_nsa_fields
from .context_parallel.exchange import EXCHANGE_MODES, check_node_size
from .functional import BACKENDS, Backend

NSA_PREFIX = "nsa_"
NSA_BACKENDS = (None, *BACKENDS)
CPExchange = Literal[EXCHANGE_MODES]


def _nsa_config_fields_with_prefix() -> list:
    """(nsa_<name>, type, field) for make_dataclass: NSAConfig's default, type and metadata (help)."""
    hints = typing.get_type_hints(NSAConfig)
    return [(NSA_PREFIX + f.name, hints[f.name], dataclasses.field(default=f.default, metadata=f.metadata))
            for f in dataclasses.fields(NSAConfig)]


_TransformerConfigWithNSAConfig = dataclasses.make_dataclass(
    "_TransformerConfigWithNSAConfig", _nsa_config_fields_with_prefix(), bases=(TransformerConfig,))


def _layer_field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class NSATransformerConfig(_TransformerConfigWithNSAConfig):
    """TransformerConfig for models whose attention is Native Sparse Attention.

    Fields `nsa_<name>` for every NSAConfig field (megatron_nsa/config.py, same meaning, default
    and allowed values), plus the layer's settings below. Megatron's own `window_size` (dense
    sliding-window attention) and `softmax_scale` must stay None: NSA's are `nsa_window_size`
    and `nsa_softmax_scale`.

    Selective recompute of the NSA core uses Megatron's own switch:
    recompute_granularity='selective' with 'core_attn' in recompute_modules (the default list).
    q/k norms use Megatron's `qk_layernorm` (with a spec built with qk_layernorm=True).
    """

    nsa_qk_head_dim: Optional[int] = _layer_field(None, "Head dim of queries and keys (None: kv_channels).")
    nsa_v_head_dim: Optional[int] = _layer_field(
        None, "Head dim of values (None: kv_channels); kv_channels is set to it when left unset.")
    nsa_backend: Optional[Backend] = _layer_field(
        None, "NSA core: 'torch' (pure-PyTorch reference) or 'triton' (kernels); None: triton on CUDA when "
              "available, else torch, decided once when the layer is built.")
    nsa_rotary_base: Optional[float] = _layer_field(
        None, "When set, NSA layers apply their own RoPE with this base (the GPTModel then needs "
              "position_embedding_type 'none'). None: the rotary table GPTModel passes with "
              "position_embedding_type 'rope', or no RoPE.")
    nsa_rotary_dim: Optional[int] = _layer_field(
        None, "Leading dims of each q/k head that NSA's own RoPE rotates (None: all of the q/k head dim).")
    nsa_cp_exchange: CPExchange = _layer_field(
        "allgather", "How NSA's keys and values cross context-parallel ranks (same result, different memory "
                     "and traffic; see docs/context_parallel.md).")
    nsa_cp_node_size: Optional[int] = _layer_field(
        None, "Consecutive context-parallel ranks per node, for nsa_cp_exchange 'hierarchical' "
              "(a divisor of context_parallel_size).")
    nsa_block_score_loss_coeff: float = _layer_field(
        0.0, "Weight of the auxiliary loss that trains the block scores toward the selected branch's full "
             "attention per block (megatron_nsa/block_score_loss.py; not in the NSA paper); 0: off. Needs "
             "context_parallel_size 1.")
    nsa_block_score_loss_queries: int = _layer_field(
        256, "Query positions per sequence (evenly spaced) at which that loss compares the two.")

    def __post_init__(self):
        if self.kv_channels is None and self.nsa_v_head_dim is not None:
            self.kv_channels = self.nsa_v_head_dim
        _reject_shadowed_megatron_fields(self)
        super().__post_init__()
        if self.nsa_v_head_dim is None:
            self.nsa_v_head_dim = self.kv_channels
        if self.nsa_qk_head_dim is None:
            self.nsa_qk_head_dim = self.kv_channels
        validate_nsa_fields(self, key_prefix=NSA_PREFIX)
        _validate_head_dims(self)
        _validate_choice(self.nsa_backend, NSA_BACKENDS, "nsa_backend")
        _validate_rotary(self)
        _validate_cp_exchange(self)
        check_block_score_loss(self.nsa_block_score_loss_coeff, self.nsa_block_score_loss_queries,
                               self.context_parallel_size, "nsa_")
        check_megatron_fields(self, self.tensor_model_parallel_size)

    def nsa_config(self) -> NSAConfig:
        """The NSAConfig these fields hold."""
        return nsa_config_from(self, key_prefix=NSA_PREFIX)


def nsa_transformer_fields(nsa: NSAConfig) -> dict:
    """The NSATransformerConfig keywords that hold `nsa`: {nsa_<name>: value}."""
    return {NSA_PREFIX + name: getattr(nsa, name) for name in NSA_FIELD_NAMES}


def nsa_layer_field_names() -> tuple:
    """Every NSA field of NSATransformerConfig (NSAConfig's with the prefix, then the layer's own)."""
    megatron = {f.name for f in dataclasses.fields(TransformerConfig)}
    return tuple(f.name for f in dataclasses.fields(NSATransformerConfig) if f.name not in megatron)


def _reject_shadowed_megatron_fields(cfg: NSATransformerConfig) -> None:
    for name in ("window_size", "softmax_scale"):
        if getattr(cfg, name) is not None:
            raise ValueError(
                f"{name}={getattr(cfg, name)!r} is Megatron's dense-attention setting, which NSA layers do not use; "
                f"allowed: None. NSA's own is {NSA_PREFIX}{name}"
            )


@dataclasses.dataclass(frozen=True)
class NSALayerSettings:
    """What one NSA attention layer needs besides Megatron's TransformerConfig."""

    nsa: NSAConfig
    qk_head_dim: int
    v_head_dim: int
    backend: Optional[str] = None
    rotary_base: Optional[float] = None  # NSA's own RoPE; None: Megatron's table (if passed) or none
    rotary_dim: Optional[int] = None
    block_score_loss_coeff: float = 0.0  # megatron_nsa/block_score_loss.py; 0: off
    block_score_loss_queries: int = 256


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
            nsa=config.nsa_config(), qk_head_dim=config.nsa_qk_head_dim, v_head_dim=config.nsa_v_head_dim,
            backend=config.nsa_backend, rotary_base=config.nsa_rotary_base,
            rotary_dim=config.nsa_rotary_dim or config.nsa_qk_head_dim,
            block_score_loss_coeff=config.nsa_block_score_loss_coeff,
            block_score_loss_queries=config.nsa_block_score_loss_queries,
        )
    if nsa_config is None:
        nsa_config = NSAConfig(softmax_scale=config.softmax_scale)
    if not isinstance(nsa_config, NSAConfig):
        raise TypeError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
    _validate_choice(nsa_backend, NSA_BACKENDS, "nsa_backend")
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


def check_block_score_loss(coeff, queries, context_parallel_size: int, prefix: str) -> None:
    """The block score loss's settings (named `prefix + block_score_loss_coeff` / `_queries` in errors)."""
    name = f"{prefix}block_score_loss_coeff"
    if isinstance(coeff, bool) or not isinstance(coeff, (int, float)) or not math.isfinite(coeff) or coeff < 0:
        raise ValueError(f"{name}={coeff!r} is not allowed: it must be a finite number >= 0 (0: off)")
    _require_positive_int(f"{prefix}block_score_loss_queries", queries)
    if coeff > 0 and context_parallel_size > 1:
        raise ValueError(f"{name}={coeff} needs context_parallel_size 1 (got {context_parallel_size}): the loss "
                         f"compares each query with every key before it; allowed with context parallelism: {name}=0")


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= 1")


def _validate_head_dims(cfg: NSATransformerConfig) -> None:
    _require_positive_int("nsa_qk_head_dim", cfg.nsa_qk_head_dim)
    _require_positive_int("nsa_v_head_dim", cfg.nsa_v_head_dim)
    if cfg.kv_channels != cfg.nsa_v_head_dim:
        raise ValueError(
            f"kv_channels={cfg.kv_channels} must equal nsa_v_head_dim={cfg.nsa_v_head_dim}: NSA layers use "
            f"kv_channels as the value head dim (the output projection's input is num_attention_heads * "
            f"nsa_v_head_dim); leave kv_channels unset"
        )


def _validate_choice(value, allowed: tuple, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {allowed}")


def _validate_cp_exchange(cfg: NSATransformerConfig) -> None:
    _validate_choice(cfg.nsa_cp_exchange, EXCHANGE_MODES, "nsa_cp_exchange")
    if cfg.nsa_cp_exchange == "hierarchical":
        check_node_size(cfg.nsa_cp_node_size, cfg.context_parallel_size, "nsa_cp_node_size")


def _validate_rotary(cfg: NSATransformerConfig) -> None:
    base, dim = cfg.nsa_rotary_base, cfg.nsa_rotary_dim
    if base is not None and (isinstance(base, bool) or not isinstance(base, (int, float))
                             or not math.isfinite(base) or base <= 0):
        raise ValueError(f"nsa_rotary_base={base!r} is not allowed: it must be None or a finite number > 0")
    if dim is None:
        if base is not None and cfg.nsa_qk_head_dim % 2:
            raise ValueError(
                f"nsa_qk_head_dim={cfg.nsa_qk_head_dim} is odd, so RoPE cannot rotate all of it; "
                f"set nsa_rotary_dim to an even number <= {cfg.nsa_qk_head_dim}"
            )
        return
    if base is None:
        raise ValueError(f"nsa_rotary_dim={dim} needs nsa_rotary_base (NSA's own RoPE); set both or neither")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2 or dim > cfg.nsa_qk_head_dim:
        raise ValueError(f"nsa_rotary_dim={dim!r} is not allowed: it must be an even integer in "
                         f"[2, nsa_qk_head_dim={cfg.nsa_qk_head_dim}]")

