"""NSA hyper-parameters (docs/semantics.md, table "Shapes and names")."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

COMPRESSION_KINDS = ("mean", "linear", "mlp")


@dataclasses.dataclass
class NSAConfig:
    """Hyper-parameters of Native Sparse Attention.

    compress_block_size   l   tokens per compressed block
    compress_stride       d   stride between compressed blocks (divides l and l')
    select_block_size     l'  tokens per selection block
    select_count          n   selected blocks per query, forced blocks included
    select_init_blocks        first blocks always selected
    select_local_blocks       most recent blocks always selected (the one holding t included)
    window_size           w   sliding-window length, the query itself included
    compression               phi: 'mean' (no parameters) | 'linear' | 'mlp'
    compress_mlp_hidden       hidden width of phi='mlp' (None: 2 * head dim)
    separate_kv               independent K/V per branch (the paper's choice)
    softmax_scale             None: 1/sqrt(d_k)
    """

    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    select_count: int = 16
    select_init_blocks: int = 1
    select_local_blocks: int = 2
    window_size: int = 512
    compression: str = "mean"
    compress_mlp_hidden: Optional[int] = None
    separate_kv: bool = False
    softmax_scale: Optional[float] = None

    def __post_init__(self):
        validate_nsa_fields(self)

    def scale_for(self, head_dim_qk: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim_qk)


NSA_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(NSAConfig))


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {minimum}")


def validate_nsa_fields(cfg) -> None:
    """Check the NSA fields of `cfg` (an NSAConfig or anything carrying the same attributes).

    Raises ValueError naming the field, its value and what is allowed.
    """
    for name in ("compress_block_size", "compress_stride", "select_block_size", "select_count", "window_size"):
        _require_int(name, getattr(cfg, name), 1)
    for name in ("select_init_blocks", "select_local_blocks"):
        _require_int(name, getattr(cfg, name), 0)
    l, d, lp = cfg.compress_block_size, cfg.compress_stride, cfg.select_block_size
    if l % d != 0:
        raise ValueError(
            f"compress_stride={d} must divide compress_block_size={l} (allowed: a divisor of {l})"
        )
    if lp % d != 0:
        raise ValueError(
            f"compress_stride={d} must divide select_block_size={lp} (allowed: a divisor of {lp})"
        )
    if l > lp:
        raise ValueError(
            f"compress_block_size={l} must be <= select_block_size={lp} (the spec requires l <= l')"
        )
    forced = cfg.select_init_blocks + cfg.select_local_blocks
    if cfg.select_count < forced:
        raise ValueError(
            f"select_count={cfg.select_count} is smaller than the forced blocks "
            f"select_init_blocks + select_local_blocks = {forced}; allowed: select_count >= {forced}"
        )
    if cfg.compression not in COMPRESSION_KINDS:
        raise ValueError(f"compression={cfg.compression!r} is not allowed; choose one of {COMPRESSION_KINDS}")
    if cfg.compress_mlp_hidden is not None:
        _require_int("compress_mlp_hidden", cfg.compress_mlp_hidden, 1)
    if not isinstance(cfg.separate_kv, bool):
        raise ValueError(f"separate_kv={cfg.separate_kv!r} is not allowed: it must be True or False")
    scale = cfg.softmax_scale
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(f"softmax_scale={scale!r} is not allowed: it must be None or a finite number > 0")


def nsa_config_from(obj) -> NSAConfig:
    """The NSAConfig held by any object that carries the NSA fields (e.g. NSATransformerConfig)."""
    return NSAConfig(**{name: getattr(obj, name) for name in NSA_FIELD_NAMES})
