"""The `--nsa-*` flags of Megatron-LM's pretrain_gpt, the checks of the Megatron-LM flags NSA layers
cannot honour, and the NSA model spec built from the flags. Needs megatron-core only.

Flags are generated from NSATransformerConfig's NSA fields (megatron_nsa/transformer_config.py: one
`nsa_<name>` per NSAConfig field plus the layer's own settings): field `nsa_select_count` is flag
`--nsa-select-count`, with the field's type, allowed values (`Literal` choices), default and help.
Megatron-LM's `core_transformer_config_from_args(args, NSATransformerConfig)` copies the parsed
values into the config by name. One field has no flag: the value head dim `nsa_v_head_dim` is
Megatron's own `--kv-channels` (NSA layers use kv_channels as the value head dim).

`--nsa-config FILE` reads the same settings from YAML (names with or without the `nsa_` prefix, at
the top level or under an `nsa:` section, so a recipe of configs/ works); flags given on the
command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import typing
from typing import Callable, Optional

from ..transformer_config import NSA_PREFIX, NSATransformerConfig, nsa_layer_field_names

VALUE_HEAD_DIM_FIELD = "nsa_v_head_dim"  # no flag: Megatron's --kv-channels is the value head dim
POSITION_EMBEDDINGS = ("rope", "none", "learned_absolute")
_NONE_WORDS = ("none", "None", "null")


class NSAArgumentError(ValueError):
    """A command line NSA cannot run; the message names the flag, its value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class NSAFlag:
    """One `--nsa-*` flag: the NSATransformerConfig field it sets and how to parse it."""

    field: str
    flag: str
    kind: type  # int | float | bool | str
    optional: bool  # None is allowed (written 'none' on the command line)
    choices: Optional[tuple]
    default: object
    help: str


def flag_name(attribute: str) -> str:
    """Megatron-LM's flag for an args attribute: `nsa_select_count` -> `--nsa-select-count`."""
    return "--" + attribute.replace("_", "-")


def nsa_flags() -> tuple:
    """Every `--nsa-*` flag, in NSATransformerConfig's field order."""
    fields = {f.name: f for f in dataclasses.fields(NSATransformerConfig)}
    hints = typing.get_type_hints(NSATransformerConfig)
    flags = []
    for name in nsa_layer_field_names():
        if name == VALUE_HEAD_DIM_FIELD:
            continue
        kind, optional, choices = _parse_type(hints[name], name)
        flags.append(NSAFlag(field=name, flag=flag_name(name), kind=kind, optional=optional, choices=choices,
                             default=fields[name].default, help=fields[name].metadata.get("help", "")))
    return tuple(flags)


def _parse_type(hint, name: str):
    """(kind, optional, choices) of a field's type: int, float, bool, str or Literal[...], maybe Optional."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) is typing.Union and type(None) in args
    if optional:
        (hint,) = [arg for arg in args if arg is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), optional, choices
    if hint in (int, float, bool, str):
        return hint, optional, None
    raise TypeError(f"NSATransformerConfig.{name} has type {hint!r}, which no command-line flag can take")


def _value_parser(flag: NSAFlag) -> Callable[[str], object]:
    def parse(text: str):
        if flag.optional and text in _NONE_WORDS:
            return None
        return flag.kind(text)

    parse.__name__ = flag.kind.__name__  # argparse names the type in its error message
    return parse


def add_nsa_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's `extra_args_provider`: adds the `--nsa-*` flags and `--nsa-config` to its parser.

    The flags leave no attribute when not given (so that `--nsa-config` can fill them);
    `resolve_nsa_arguments` sets every one afterwards."""
    group = parser.add_argument_group(
        title="NSA (Native Sparse Attention)",
        description="Settings of the NSA attention layers (megatron_nsa; see docs/megatron.md). The value head "
                    "dim is --kv-channels; q/k norms: --qk-layernorm; selective recompute of the NSA core: "
                    "--recompute-granularity selective --recompute-modules core_attn.")
    group.add_argument("--nsa-config", dest="nsa_config_file", metavar="FILE", default=None,
                       help="YAML file with NSA settings (the names below without --nsa-, e.g. select_count: 16; "
                            "at the top level or under 'nsa:'). Flags on the command line win over it.")
    for flag in nsa_flags():
        shown = "none" if flag.default is None else flag.default
        text = f"{flag.help} (default: {shown})"
        if flag.kind is bool:
            group.add_argument(flag.flag, dest=flag.field, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
            continue
        metavar = None if flag.choices else flag.kind.__name__.upper()
        choices = None
        if flag.choices:
            choices = flag.choices + ((None,) if flag.optional else ())
        group.add_argument(flag.flag, dest=flag.field, type=_value_parser(flag), choices=choices, metavar=metavar,
                           default=argparse.SUPPRESS, help=text)
    return parser


# ---------------------------------------------------------------------------------------------------
def load_nsa_file(path: str) -> dict:
    """{nsa_<name>: value} from a YAML file of NSA settings; unknown names raise with a suggestion."""
    import yaml

    try:
        with open(path) as stream:
            content = yaml.safe_load(stream)
    except OSError as error:
        raise NSAArgumentError(f"--nsa-config {path}: cannot read it ({error.strerror})") from None
    if isinstance(content, dict) and isinstance(content.get("nsa"), dict):
        content = content["nsa"]
    if not isinstance(content, dict):
        raise NSAArgumentError(f"--nsa-config {path}: expected a mapping of NSA settings (or an 'nsa:' section)")
    known = nsa_layer_field_names()
    settings = {}
    for key, value in content.items():
        field = key if str(key).startswith(NSA_PREFIX) else NSA_PREFIX + str(key)
        if field not in known:
            allowed = [name[len(NSA_PREFIX):] for name in known]
            close = difflib.get_close_matches(str(key).removeprefix(NSA_PREFIX), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NSAArgumentError(f"--nsa-config {path}: {key!r} is not an NSA setting; {hint}allowed: {allowed}")
        settings[field] = value
    return settings


def resolve_nsa_arguments(args: argparse.Namespace, have_transformer_engine: bool,
                          have_fused_adam: bool = True) -> argparse.Namespace:
    """After Megatron-LM parsed and validated `args`: every NSA field set (flag, else --nsa-config, else the
    field's default), the position embedding decided, and every Megatron-LM setting NSA layers cannot
    honour refused. Raises NSAArgumentError before any work starts."""
    check_megatron_arguments(args, have_transformer_engine, have_fused_adam)
    from_file = load_nsa_file(args.nsa_config_file) if getattr(args, "nsa_config_file", None) else {}
    defaults = {f.name: f.default for f in dataclasses.fields(NSATransformerConfig)}
    for field in nsa_layer_field_names():
        if not hasattr(args, field):
            setattr(args, field, from_file.get(field, defaults[field]))
    _resolve_value_head_dim(args, from_file)
    _resolve_position_embedding(args)
    # NSA layers rotate q and k themselves (megatron_nsa.rope); Megatron's fused RoPE kernel, which needs
    # Transformer Engine, is never called, so its switch is turned off rather than demanded of the user.
    args.apply_rope_fusion = False
    # NSA layers are causal by construction and never read an attention mask, while the [1, S, S] mask
    # Megatron-LM's datasets build by default grows with the square of the length (4 GiB a 64k sample,
    # built on the host each step): it is not built.
    args.create_attention_mask_in_dataloader = False
    return args


def _resolve_value_head_dim(args, from_file: dict) -> None:
    value_dim = from_file.get(VALUE_HEAD_DIM_FIELD)
    if value_dim is not None and value_dim != args.kv_channels:
        raise NSAArgumentError(
            f"--nsa-config {args.nsa_config_file}: v_head_dim: {value_dim} but --kv-channels is {args.kv_channels}; "
            f"the value head dim of NSA layers is --kv-channels: pass --kv-channels {value_dim}"
        )
    args.nsa_v_head_dim = None  # NSATransformerConfig takes it from kv_channels


def _resolve_position_embedding(args) -> None:
    kind = args.position_embedding_type
    if kind not in POSITION_EMBEDDINGS:
        raise NSAArgumentError(f"--position-embedding-type {kind} is not supported by NSA layers; allowed: "
                               f"{POSITION_EMBEDDINGS} (rope: GPTModel's table; none: NSA's own RoPE)")
    if kind == "rope" and args.nsa_rotary_base is not None:
        raise NSAArgumentError(
            f"--nsa-rotary-base {args.nsa_rotary_base} with --position-embedding-type rope would rotate q/k twice; "
            f"allowed: --position-embedding-type none with --nsa-rotary-base (NSA's own RoPE), or rope alone"
        )
    if kind == "none" and args.nsa_rotary_base is None:
        # 'none' means NSA's own RoPE (never no position information): Megatron's --rotary-base and
        # --rotary-percent then apply to it, over the q/k head dim.
        args.nsa_rotary_base = float(args.rotary_base)
        if args.nsa_rotary_dim is None and args.rotary_percent < 1.0:
            qk_dim = args.nsa_qk_head_dim or args.kv_channels
            args.nsa_rotary_dim = max(2, int(qk_dim * args.rotary_percent) // 2 * 2)


def check_megatron_arguments(args: argparse.Namespace, have_transformer_engine: bool,
                             have_fused_adam: bool = True) -> None:
    """Megatron-LM settings this entry point cannot honour with NSA layers, refused by flag.
    have_fused_adam: Megatron-Core's optimizer found apex's or Transformer Engine's Adam."""
    if args.spec is not None:
        raise NSAArgumentError(f"--spec {' '.join(args.spec)}: this entry point builds the NSA layer spec itself "
                               f"from the --nsa-* flags; allowed: no --spec")
    if getattr(args, "yaml_cfg", None) is not None:
        raise NSAArgumentError(f"--yaml-cfg {args.yaml_cfg}: the model config comes from the command line here; "
                               f"allowed: no --yaml-cfg (NSA settings from a file: --nsa-config)")
    if getattr(args.attention_backend, "name", args.attention_backend) == "local":
        raise NSAArgumentError(
            "--attention-backend local makes Megatron-LM replace the attention core with its dense "
            "DotProductAttention; NSA layers have their own core (--nsa-backend torch|triton); "
            "allowed: the default --attention-backend auto")
    if args.num_experts:
        raise NSAArgumentError(f"--num-experts {args.num_experts}: the NSA layer spec has a dense MLP; "
                               f"allowed: no --num-experts")
    for name in ("experimental_attention_variant", "heterogeneous_layers_config_path", "mtp_num_layers"):
        if getattr(args, name, None) is not None:
            raise NSAArgumentError(f"{flag_name(name)} {getattr(args, name)} is not supported with NSA layers; "
                                   f"allowed: unset")
    for name in ("multi_latent_attention", "rotary_interleaved", "hybrid_context_parallel"):
        if getattr(args, name, False):
            raise NSAArgumentError(f"{flag_name(name)} is not supported with NSA layers; allowed: off")
    if args.transformer_impl not in ("local", "transformer_engine"):
        raise NSAArgumentError(f"--transformer-impl {args.transformer_impl} is not supported with NSA layers; "
                               f"allowed: local, transformer_engine")
    if args.transformer_impl == "transformer_engine" and not have_transformer_engine:
        raise NSAArgumentError(
            "--transformer-impl transformer_engine (Megatron-LM's default) but transformer-engine is not "
            "installed; allowed: --transformer-impl local (PyTorch linears and norms)")
    if getattr(args, "attention_dropout", 0.0):
        raise NSAArgumentError(
            f"--attention-dropout {args.attention_dropout} (Megatron-LM's default is 0.1): NSA layers have no "
            f"dropout on attention probabilities; allowed: --attention-dropout 0")
    if getattr(args, "reset_attention_mask", False):
        raise NSAArgumentError(
            "--reset-attention-mask puts document boundaries into a dense attention mask, which NSA layers do not "
            "read (they are causal over the whole sequence); allowed: off. For document boundaries use packed "
            "batches (--dataloader-inter-document-masking), which reach NSA as THD cu_seqlens")
    load = getattr(args, "load", None)
    if (getattr(args, "use_distributed_optimizer", False) and not have_fused_adam and load
            and os.path.isfile(os.path.join(load, "latest_checkpointed_iteration.txt"))):
        raise NSAArgumentError(
            f"--use-distributed-optimizer with --load {load} (it holds a checkpoint): without apex or Transformer "
            f"Engine, Megatron-LM's distributed optimizer cannot load one (DistributedOptimizer.state_dict asserts "
            f"a single Adam step count while the optimizer has no state yet); allowed: install apex or "
            f"transformer-engine, or train and resume without --use-distributed-optimizer")
    if args.context_parallel_size > 1 and getattr(args, "sft", False):
        raise NSAArgumentError(
            f"--sft with --context-parallel-size {args.context_parallel_size}: Megatron-LM then splits each "
            f"document over the ranks separately, a layout NSA's context parallelism does not read; allowed: "
            f"--context-parallel-size 1 with --sft, or pretraining batches")


# ---------------------------------------------------------------------------------------------------
def nsa_transformer_config(args: argparse.Namespace, config_from_args: Callable) -> NSATransformerConfig:
    """The NSATransformerConfig of `args`, built by Megatron-LM's `core_transformer_config_from_args`
    (passed as `config_from_args`); a bad value raises NSAArgumentError naming its flag."""
    try:
        config = config_from_args(args, NSATransformerConfig)
    except ValueError as error:
        raise NSAArgumentError(flags_in_message(str(error), args)) from None
    if config.context_parallel_size > 1:
        from ..context_parallel import check_cp_sequence

        try:
            check_cp_sequence(args.seq_length, config.context_parallel_size, config.nsa_config())
        except ValueError as error:
            raise NSAArgumentError(f"--seq-length {args.seq_length}: {flags_in_message(str(error), args)}") from None
    return config


def flags_in_message(message: str, args: argparse.Namespace) -> str:
    """A config error's field names written as the flags that set them: every `nsa_*` name, and any other
    args attribute given a value (`num_query_groups=2` -> `--num-query-groups=2`)."""
    def as_flag(match):
        name = match.group(1)
        return flag_name(name) if hasattr(args, name) else name

    return re.sub(r"(?<![\w-])(nsa_[a-z0-9_]+|[a-z][a-z0-9_]*(?==(?!=)))", as_flag, message)


def nsa_block_spec_builder(args: argparse.Namespace) -> Callable:
    """The `transformer_layer_spec` of Megatron-LM's GPTModelConfig: called with the model config and the
    virtual pipeline stage, it gives that stage's NSA decoder block (its final norm sequence-parallel capable)."""
    from ..spec import get_gpt_decoder_block_nsa_spec

    use_transformer_engine = args.transformer_impl == "transformer_engine"

    def nsa_decoder_block_spec(model_config, vp_stage: Optional[int] = None):
        transformer_config = getattr(model_config, "transformer", model_config)
        return get_gpt_decoder_block_nsa_spec(
            transformer_config, vp_stage=vp_stage, use_transformer_engine=use_transformer_engine,
            normalization=args.normalization, qk_layernorm=args.qk_layernorm)

    return nsa_decoder_block_spec


def describe(config: NSATransformerConfig) -> str:
    """One line with every NSA setting of `config`."""
    return " ".join(f"{name}={getattr(config, name)}" for name in nsa_layer_field_names())
