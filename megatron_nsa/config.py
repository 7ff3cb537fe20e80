"""NSAConfig: the one declaration of every NSA setting (name, type, default, allowed values, meaning, checks).

Every front end derives from it: the training recipe's `nsa:` section, NSATransformerConfig's NSA fields,
Megatron-LM's `--nsa-*` flags. Read `dataclasses.fields(NSAConfig)` for names and defaults,
`field.metadata["help"]` for the one-line meaning and `setting_choices(name)` for the allowed values of a
choice field; build from a mapping with `NSAConfig.from_mapping`. megatron_nsa/reference.py computes
exactly what each setting means.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from typing import Any, Iterable, Literal, Mapping, Optional, Tuple

Compression = Literal["mean", "linear", "mlp"]


def _setting(default: Any, help: str) -> Any:  # noqa: A002 - `help` is the metadata key front ends read
    return dataclasses.field(default=default, metadata={"help": help})


def suggestion(key: str, candidates: Iterable[str]) -> str:
    """"; did you mean 'X'?" for the candidate closest to `key`, or "" when none is close."""
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _refuse_unknown_keywords(cls):
    """Make `cls(windw_size=...)` raise a TypeError that names the key and the closest field."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        names = [f.name for f in dataclasses.fields(cls)]
        for key in kwargs:
            if key not in names:
                raise TypeError(f"unknown NSA setting '{key}'{suggestion(key, names)}")
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_refuse_unknown_keywords
@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters of Native Sparse Attention (frozen: `dataclasses.replace` makes a new, checked one).

    compress_block_size   l   tokens per compressed block
    compress_stride       d   stride between compressed blocks (divides l and l')
    select_block_size     l'  tokens per selection block
    select_count          n   selected blocks per query, forced blocks included
    select_init_blocks        first blocks always selected
    select_local_blocks       most recent blocks always selected (the one holding t included)
    window_size           w   sliding-window length, the query itself included
    compression               phi: one of setting_choices("compression")
    compress_mlp_hidden       hidden width of phi='mlp' (None: 2 * head dim)
    separate_kv               independent K/V per branch (the paper's choice)
    softmax_scale             None: 1/sqrt(d_k)

    Construction checks every field (ValueError naming the field, its value and what is allowed); an
    unknown keyword is a TypeError that suggests the closest setting.
    """

    compress_block_size: int = _setting(32, "l: tokens per compressed block")
    compress_stride: int = _setting(16, "d: stride between compressed blocks (divides l and l')")
    select_block_size: int = _setting(64, "l': tokens per selection block")
    select_count: int = _setting(16, "n: selected blocks per query, the forced init and local blocks included")
    select_init_blocks: int = _setting(1, "first selection blocks every query selects")
    select_local_blocks: int = _setting(2, "most recent selection blocks every query selects (its own included)")
    window_size: int = _setting(512, "w: sliding-window length in tokens, the query itself included")
    compression: Compression = _setting("mean", "phi, the block compression: mean (no parameters), linear or mlp")
    compress_mlp_hidden: Optional[int] = _setting(None, "hidden width of compression=mlp (unset: 2 * head dim)")
    separate_kv: bool = _setting(False, "independent K/V projections per branch (the paper's choice)")
    softmax_scale: Optional[float] = _setting(None, "attention logit scale (unset: 1/sqrt(qk head dim))")

    def __post_init__(self):
        validate_nsa_fields(self)

    def scale_for(self, head_dim_qk: int) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(head_dim_qk)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], key_prefix: str = "") -> "NSAConfig":
        """An NSAConfig from `{key_prefix + field name: value}`; absent fields keep their defaults.

        Every key must name a field: an unknown one raises ValueError with the closest key, e.g.
        `NSAConfig.from_mapping({"nsa.windw_size": 64}, key_prefix="nsa.")` ->
        "unknown NSA setting 'nsa.windw_size'; did you mean 'nsa.window_size'?". Values are not converted;
        the usual field checks apply (ValueError naming field, value and what is allowed).
        """
        known = {key_prefix + name: name for name in NSA_FIELD_NAMES}
        for key in mapping:
            if key not in known:
                raise ValueError(f"unknown NSA setting '{key}'{suggestion(key, known)}")
        return cls(**{known[key]: value for key, value in mapping.items()})


NSA_FIELD_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(NSAConfig))


def literal_choices(annotation) -> Optional[tuple]:
    """The allowed values of a `Literal[...]` annotation (also inside Optional[...]: None joins them),
    or None for any other annotation."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        if len(literals) == 1 and len(args) == 2 and type(None) in args:
            return (None, *typing.get_args(literals[0]))
    return None


def setting_choices(name: str) -> Optional[tuple]:
    """The allowed values of NSAConfig field `name`, read from its Literal type; None for a free field."""
    return literal_choices(typing.get_type_hints(NSAConfig)[name])


COMPRESSION_KINDS: Tuple[str, ...] = setting_choices("compression")


def _require_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an integer >= {minimum}")


def validate_nsa_fields(cfg, key_prefix: str = "") -> None:
    """Check the NSA fields of `cfg` (an NSAConfig, or anything carrying the same values as attributes
    named `key_prefix + field name`).

    Raises ValueError naming the field, its value and what is allowed.
    """
    values = {name: getattr(cfg, key_prefix + name) for name in NSA_FIELD_NAMES}
    n = {name: key_prefix + name for name in NSA_FIELD_NAMES}  # the names the messages use
    for name in ("compress_block_size", "compress_stride", "select_block_size", "select_count", "window_size"):
        _require_int(n[name], values[name], 1)
    for name in ("select_init_blocks", "select_local_blocks"):
        _require_int(n[name], values[name], 0)
    l, d, lp = values["compress_block_size"], values["compress_stride"], values["select_block_size"]
    if l % d != 0:
        raise ValueError(
            f"{n['compress_stride']}={d} must divide {n['compress_block_size']}={l} (allowed: a divisor of {l})"
        )
    if lp % d != 0:
        raise ValueError(
            f"{n['compress_stride']}={d} must divide {n['select_block_size']}={lp} (allowed: a divisor of {lp})"
        )
    if l > lp:
        raise ValueError(
            f"{n['compress_block_size']}={l} must be <= {n['select_block_size']}={lp} (the spec requires l <= l')"
        )
    forced = values["select_init_blocks"] + values["select_local_blocks"]
    if values["select_count"] < forced:
        raise ValueError(
            f"{n['select_count']}={values['select_count']} is smaller than the forced blocks "
            f"{n['select_init_blocks']} + {n['select_local_blocks']} = {forced}; "
            f"allowed: {n['select_count']} >= {forced}"
        )
    for name in NSA_FIELD_NAMES:
        allowed = setting_choices(name)
        if allowed is not None and values[name] not in allowed:
            raise ValueError(f"{n[name]}={values[name]!r} is not allowed; choose one of {allowed}")
    if values["compress_mlp_hidden"] is not None:
        _require_int(n["compress_mlp_hidden"], values["compress_mlp_hidden"], 1)
    if not isinstance(values["separate_kv"], bool):
        raise ValueError(f"{n['separate_kv']}={values['separate_kv']!r} is not allowed: it must be True or False")
    scale = values["softmax_scale"]
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
    ):
        raise ValueError(
            f"{n['softmax_scale']}={scale!r} is not allowed: it must be None or a finite number > 0"
        )


def nsa_config_from(obj, key_prefix: str = "") -> NSAConfig:
    """The NSAConfig held by any object that carries the NSA fields as attributes named
    `key_prefix + field name` (e.g. NSATransformerConfig, an argparse namespace of `--nsa-*` flags)."""
    return NSAConfig(**{name: getattr(obj, key_prefix + name) for name in NSA_FIELD_NAMES})
