"""Training recipes: YAML sections -> typed dataclasses, `key=value` overrides, checks before training.

A recipe file names the sections it means (REQUIRED_SECTIONS; nsa when model.attention=nsa, retrieval with
data.source=retrieval); keys a section leaves out take their defaults, and the trainer says which did.
The nsa section is NSAConfig itself (megatron_nsa/config.py: defaults, allowed values, checks) plus the
head dims and the backend. `megatron-nsa-train --list-keys` lists every key with its default and meaning.
Overrides use the dotted name (`training.train_steps=20`) or, when it is unique, the bare field
name (`train_steps=20`); values are parsed as YAML (`true`, `3e-4`, `null`, `[a, b]`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from typing import Any, ClassVar, Dict, List, Literal, Optional, Tuple

import yaml

from megatron_nsa.config import NSAConfig, literal_choices, suggestion
from megatron_nsa.context_parallel.exchange import EXCHANGE_MODES, check_node_size
from megatron_nsa.context_parallel.layout import check_cp_sequence
from megatron_nsa.data.retrieval import GAP_AFTER
from megatron_nsa.functional import Backend


class BadInputError(Exception):
    """Input the run cannot start from (recipe, layout, data, checkpoint); the message says what to change."""


class RecipeError(BadInputError, ValueError):
    """A recipe, an override or the launch layout that cannot train."""


def _key(default: Any = None, help: str = "", factory=None) -> Any:  # noqa: A002 - the metadata key --list-keys reads
    """A recipe key: its default and its one-line meaning (listed by `megatron-nsa-train --list-keys`)."""
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class ModelSection:
    attention: Literal["nsa", "dense"] = _key("nsa", "nsa, or dense: the same GPT with dense causal attention (SDPA)")
    num_layers: int = _key(2, "transformer layers")
    hidden_size: int = _key(128, "model width")
    num_attention_heads: int = _key(4, "query heads")
    num_query_groups: Optional[int] = _key(None, "K/V heads (GQA); null: num_attention_heads")
    kv_channels: Optional[int] = _key(None, "head dim; null: hidden_size / num_attention_heads")
    ffn_hidden_size: Optional[int] = _key(None, "MLP width; null: 4 * hidden_size (8/3 * hidden_size with swiglu, "
                                                "rounded up to 64 * TP)")
    swiglu: bool = _key(True, "SwiGLU MLP (false: GeLU)")
    normalization: Literal["RMSNorm", "LayerNorm"] = _key("RMSNorm", "norm layers")
    position_embedding_type: Literal["learned_absolute", "rope"] = _key(
        "learned_absolute", "positions: learned absolute embeddings, or rope (the dense model's rope needs CUDA)")
    rotary_base: int = _key(10000, "RoPE base")
    rotary_percent: float = _key(1.0, "share of each head's q/k dims RoPE rotates (the rest carry no position)")
    qk_layernorm: bool = _key(False, "normalize each head's queries and keys (Megatron's qk_layernorm), both models")
    max_position_embeddings: Optional[int] = _key(None, "null: data.seq_length")
    untie_embeddings_and_output_weights: bool = _key(False, "separate input embedding and output layer weights")
    make_vocab_size_divisible_by: int = _key(128, "pad the vocabulary to a multiple of this times TP")
    init_method_std: float = _key(0.02, "std of the normal weight initialization")
    hidden_dropout: float = _key(0.0, "dropout after attention and MLP")
    attention_dropout: float = _key(0.0, "dropout on attention probabilities")
    recompute: Literal["none", "selective", "full"] = _key(
        "none", "activation recompute: none, selective (core attention) or full (whole layers; needs CUDA)")
    recompute_num_layers: int = _key(1, "layers per recompute block with recompute=full")


@dataclasses.dataclass(frozen=True)
class NSASection(NSAConfig):
    """NSA settings (used when model.attention = nsa): every field of NSAConfig, with its default, allowed
    values and checks, plus the head dims, the backend and the block score loss of the recipe's NSA layers."""

    qk_head_dim: Optional[int] = _key(None, "NSA query/key head dim; null: model.kv_channels")
    v_head_dim: Optional[int] = _key(None, "NSA value head dim; null: qk_head_dim")
    backend: Optional[Backend] = _key(None, "NSA core: torch or triton; null: triton on CUDA, torch on CPU")
    block_score_loss_coeff: float = _key(
        0.0, "weight of the auxiliary loss that trains the block scores toward the selected branch's full "
             "attention (not in the paper; docs/training.md); 0: off")
    block_score_loss_queries: int = _key(256, "query positions per sequence at which that loss is taken")


@dataclasses.dataclass
class ParallelSection:
    tensor_model_parallel_size: int = _key(1, "TP: ranks that split each layer's weights")
    pipeline_model_parallel_size: int = _key(1, "PP: pipeline stages (needs CUDA)")
    context_parallel_size: int = _key(1, "CP: ranks that split each sequence (NSA only)")
    cp_exchange: Literal[EXCHANGE_MODES] = _key("allgather", "how NSA K/V cross context-parallel ranks")
    cp_node_size: Optional[int] = _key(None, "cp_exchange=hierarchical: consecutive CP ranks per node (divides CP)")
    sequence_parallel: bool = _key(False, "Megatron sequence parallelism (needs TP > 1)")
    use_distributed_optimizer: bool = _key(False, "shard optimizer state over data-parallel ranks (needs CUDA)")
    overlap_grad_reduce: bool = _key(True, "overlap the gradient all-reduce with backward (CUDA)")
    overlap_param_gather: bool = _key(False, "overlap the parameter all-gather with forward (distributed optimizer)")


@dataclasses.dataclass
class DataSection:
    source: Literal["stdlib", "indexed", "mock", "retrieval"] = _key(
        "stdlib", "stdlib (Python's own sources, built on first use), indexed (data.paths), mock, or retrieval")
    paths: List[Any] = _key(help="indexed: [prefix, ...] or [w1, prefix1, w2, prefix2, ...]", factory=list)
    split: str = _key("98,2,0", "train, validation, test weights over the documents")
    seq_length: int = _key(256, "tokens per sample")
    tokenizer: str = _key("bytes", "bytes, or the path of a local Hugging Face tokenizer directory")
    cache_dir: Optional[str] = _key(None, "null: $MEGATRON_NSA_CACHE or ~/.cache/megatron_nsa")
    num_workers: int = _key(2, "processes that build micro-batches ahead of the training step (0: in the "
                               "training process); the batches are the same for any value")


@dataclasses.dataclass
class RetrievalSection:
    """The synthetic key/value retrieval task of data.source=retrieval."""

    num_keys: int = _key(16384, "key token ids [258, 258 + num_keys): one fresh key per definition")
    num_values: int = _key(256, "value token ids right after the keys")
    query_fraction: float = _key(0.25, "share of records that query an earlier key (the loss is on their values)")
    mean_gap: int = _key(0, "filler tokens after each definition, uniform in [0, 2 * mean_gap]")
    gap_after: Literal[GAP_AFTER] = _key(
        "definitions", "the records that mean_gap's filler follows: definitions, or records (queries too: facts sit "
                       "sparsely in filler everywhere, as a needle does)")
    query_once: bool = _key(False, "each key queried at most once")
    queries_last: bool = _key(False, "all definitions first, then one block of queries, each key asked once")
    facts_per_sequence: int = _key(0, "> 0: only this many facts per sequence, each restated by many queries "
                                       "(0: a fresh key per definition)")
    single_facts: int = _key(0, "with facts_per_sequence: this many more facts per sequence, each stated once and "
                                "asked once at any later distance (one-shot recall, as in the needle test)")
    single_fact_at_start: float = _key(0.0, "share of sequences in which a single fact is stated at record 0, the "
                                            "first two tokens (where a needle at depth 0% sits)")


@dataclasses.dataclass
class TrainingSection:
    train_steps: int = _key(100, "optimizer steps of the whole run")
    micro_batch_size: int = _key(4, "samples per forward/backward on one data-parallel rank")
    global_batch_size: int = _key(8, "samples per optimizer step")
    seed: int = _key(1234, "random seed")
    device: Literal["auto", "cuda", "cpu"] = _key("auto", "auto: cuda when a GPU is visible")
    precision: Literal["auto", "bf16", "fp32"] = _key("auto", "auto: bf16 on CUDA, fp32 on CPU")
    eval_interval: int = _key(50, "steps between validations (0: none)")
    eval_steps: int = _key(2, "global batches per validation")


@dataclasses.dataclass
class OptimizerSection:
    lr: float = _key(3.0e-4, "peak learning rate")
    min_lr: float = _key(3.0e-5, "learning rate at the end of the decay")
    warmup_steps: int = _key(10, "linear warm-up steps")
    decay_steps: Optional[int] = _key(None, "null: training.train_steps")
    lr_decay_style: Literal["cosine", "linear", "constant"] = _key("cosine", "decay after warm-up")
    weight_decay: float = _key(0.1, "AdamW weight decay")
    adam_beta1: float = _key(0.9, "AdamW beta1")
    adam_beta2: float = _key(0.95, "AdamW beta2")
    adam_eps: float = _key(1.0e-8, "AdamW epsilon")
    clip_grad: float = _key(1.0, "gradient norm clip")


@dataclasses.dataclass
class CheckpointSection:
    dir: Optional[str] = _key(None, "where checkpoints go (null: no checkpoints)")
    save_interval: int = _key(0, "steps between checkpoints (0: only at the end and on SIGTERM)")
    keep_last: int = _key(2, "this run's newest checkpoints kept (older ones of this run are deleted)")
    resume: bool = _key(True, "continue the run whose checkpoints are in dir; false: start afresh (dir must hold "
                              "no checkpoints)")
    new_run_subdir: bool = _key(False, "start afresh in a new subdirectory dir/run_<time>, leaving the "
                                       "checkpoints in dir untouched")


@dataclasses.dataclass
class LoggingSection:
    log_interval: int = _key(10, "steps per console line (its loss is the mean over those steps)")
    tensorboard_dir: Optional[str] = _key(None, "null: <checkpoint.dir>/tensorboard, or none without checkpoints")
    metrics_file: Optional[str] = _key(None, "a JSON line per log interval and validation (full-precision values)")


@dataclasses.dataclass
class Recipe:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    nsa: NSASection = dataclasses.field(default_factory=NSASection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    retrieval: RetrievalSection = dataclasses.field(default_factory=RetrievalSection)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    optimizer: OptimizerSection = dataclasses.field(default_factory=OptimizerSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)

    # Keys the recipe file and the overrides left at their defaults (set by recipe_from_mapping).
    defaulted: ClassVar[Tuple[str, ...]] = ()

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


# Sections every recipe file must have; nsa too when model.attention = nsa, retrieval with data.source = retrieval.
REQUIRED_SECTIONS = ("model", "data", "training", "optimizer", "checkpoint")

# Keys that no longer exist: a stored value equal to the one given here (what every run had) is ignored, so
# that recipes stored in older checkpoints still load.
REMOVED_KEYS = {"model.token_shift": False, "retrieval.filler": "random"}

MINIMUMS = {
    "model.num_layers": 1, "model.hidden_size": 1, "model.num_attention_heads": 1, "model.num_query_groups": 1,
    "model.kv_channels": 1, "model.ffn_hidden_size": 1, "model.max_position_embeddings": 1,
    "model.make_vocab_size_divisible_by": 1, "model.recompute_num_layers": 1,
    "parallel.tensor_model_parallel_size": 1, "parallel.pipeline_model_parallel_size": 1,
    "parallel.context_parallel_size": 1, "data.seq_length": 2, "data.num_workers": 0, "training.train_steps": 1,
    "training.micro_batch_size": 1, "training.global_batch_size": 1, "training.eval_interval": 0,
    "training.eval_steps": 1, "optimizer.warmup_steps": 0, "optimizer.decay_steps": 1,
    "checkpoint.save_interval": 0, "checkpoint.keep_last": 1, "logging.log_interval": 1,
    "nsa.qk_head_dim": 1, "nsa.v_head_dim": 1,
}


SECTIONS: Dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}


def all_keys() -> List[str]:
    """Every dotted key a recipe may set."""
    return [f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def describe_keys() -> str:
    """Every recipe key with its default, allowed values and meaning, one per line (read from the sections)."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:")
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            default = field.default_factory() if field.default is dataclasses.MISSING else field.default
            choices = literal_choices(hints[field.name])
            allowed = f" [{' | '.join('null' if c is None else str(c) for c in choices)}]" if choices else ""
            text = field.metadata.get("help", "")
            lines.append(f"  {field.name}: {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
                         f"{allowed}  # {text}")
    return "\n".join(lines)


def _suggest(key: str, candidates: List[str]) -> str:
    leaf_to_key = {c.split(".")[-1]: c for c in candidates}
    found = suggestion(key, candidates)
    if not found:
        leaf = difflib.get_close_matches(key.split(".")[-1], list(leaf_to_key), n=1, cutoff=0.5)
        found = f"; did you mean '{leaf_to_key[leaf[0]]}'?" if leaf else ""
    return found


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
    choices = literal_choices(annotation)
    if choices is not None:
        if value in choices and (value is None or isinstance(value, str)):
            return value
        raise RecipeError(f"{key}={value!r} is not allowed; choose one of {list(choices)}")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}={value!r} is not allowed: expected true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"{key}={value!r} is not allowed: expected an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{key}={value!r} is not allowed: expected a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}={value!r} is not allowed: expected a string")
    if origin in (list, List):
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
        raise RecipeError(f"{key}={value!r} is not allowed: expected a list")
    return value


def _resolve(key: str) -> str:
    """The dotted key a recipe key or a bare, unique field name stands for."""
    keys = all_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.split(".")[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise RecipeError(f"'{key}' is ambiguous: write one of {matches}")
    raise RecipeError(f"unknown recipe key '{key}'{_suggest(key, keys)}")


def parse_override(text: str):
    """'section.key=value' -> (key, value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like key=value, e.g. training.train_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override '{text}' has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(f"override '{text}': the value is not valid YAML ({err})") from None
    return key, value


def load_recipe(path: Optional[str], overrides: List[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, check field values.

    The file must hold the sections of REQUIRED_SECTIONS (an empty or comment-only file is refused);
    `Recipe.defaulted` lists the keys left at their defaults. path=None starts from every default (for
    programs that set what they need through `overrides`).
    """
    content = {}
    if path is not None:
        if os.path.isdir(path):
            raise RecipeError(f"recipe '{path}' is a directory, expected a YAML file (e.g. configs/tiny.yaml)")
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file '{path}' does not exist")
        with open(path) as f:
            try:
                content = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise RecipeError(f"recipe '{path}' is not valid YAML: {err}") from None
        if content is None:
            raise RecipeError(f"recipe '{path}' is empty (or only comments): it must name its sections "
                              f"({', '.join(REQUIRED_SECTIONS)}, ...); see configs/tiny.yaml")
    recipe = recipe_from_mapping(content, overrides, source=path or "the defaults")
    if path is not None:
        check_required_sections(recipe, content, overrides, path)
    return recipe


def recipe_from_mapping(content: Dict[str, Any], overrides: List[str] = (), source: str = "the recipe") -> Recipe:
    """Sections as a mapping (a parsed YAML file, or Recipe.to_dict() as checkpoints store it), then overrides.

    Each section is built once from all its given keys, so that checks across keys (NSA's l, d, l') see
    the final values."""
    if not isinstance(content, dict):
        raise RecipeError(f"recipe '{source}' must be a mapping of sections (model:, nsa:, data:, ...)")
    given: Dict[str, Dict[str, Any]] = {name: {} for name in SECTIONS}
    for section_name, entries in content.items():
        if section_name not in SECTIONS:
            raise RecipeError(
                f"unknown recipe section '{section_name}' in {source}{_suggest(section_name, list(SECTIONS))}"
            )
        if not isinstance(entries, dict):
            raise RecipeError(f"section '{section_name}' in {source} must be a mapping of key: value")
        for name, value in entries.items():
            key = f"{section_name}.{name}"
            if key in REMOVED_KEYS and value == REMOVED_KEYS[key]:
                continue
            key = _resolve(key)
            given[section_name][name] = value
    for text in overrides:
        key, value = parse_override(text)
        section_name, name = _resolve(key).split(".")
        given[section_name][name] = value
    sections = {}
    for section_name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {name: _coerce(f"{section_name}.{name}", value, hints[name])
                  for name, value in given[section_name].items()}
        try:
            sections[section_name] = cls(**values)
        except ValueError as err:
            raise RecipeError(f"{section_name}: {err}") from None
    recipe = Recipe(**sections)
    recipe.defaulted = tuple(f"{section_name}.{f.name}" for section_name, cls in SECTIONS.items()
                             for f in dataclasses.fields(cls) if f.name not in given[section_name])
    check_fields(recipe)
    return recipe


def check_required_sections(recipe: Recipe, content: Dict[str, Any], overrides: List[str], path: str) -> None:
    """A recipe file names what it means: every required section is there (in the file or an override)."""
    named = set(content) | {_resolve(parse_override(text)[0]).split(".")[0] for text in overrides}
    required = list(REQUIRED_SECTIONS)
    if recipe.model.attention == "nsa":
        required.insert(1, "nsa")
    if recipe.data.source == "retrieval":
        required.append("retrieval")
    missing = [name for name in required if name not in named]
    if missing:
        raise RecipeError(
            f"recipe '{path}' lacks the section(s) {', '.join(missing)}: a recipe must name "
            f"{', '.join(required)} (was the file cut short?); `megatron-nsa-train --list-keys` lists every key "
            "with its default"
        )


def defaults_note(recipe: Recipe) -> Optional[str]:
    """Which keys of the sections in use fell back to their defaults (None when none did)."""
    unused = {"retrieval"} if recipe.data.source != "retrieval" else set()
    if recipe.model.attention != "nsa":
        unused.add("nsa")
    by_section: Dict[str, List[str]] = {}
    for key in recipe.defaulted:
        section, name = key.split(".")
        if section not in unused:
            by_section.setdefault(section, []).append(name)
    if not by_section:
        return None
    parts = []
    for section, names in by_section.items():
        if len(names) == len(dataclasses.fields(SECTIONS[section])):
            parts.append(f"{section}: all")
        else:
            parts.append(f"{section}: {', '.join(names)}")
    return "defaults used (keys the recipe does not set): " + "; ".join(parts)


def check_fields(recipe: Recipe) -> None:
    """Per-field checks that need no knowledge of the launch (minimums, cross-field rules); choices and
    NSA's rules were checked when the sections were built."""
    for key, minimum in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None and value < minimum:
            raise RecipeError(f"{key}={value} is not allowed: it must be >= {minimum}")
    if recipe.model.position_embedding_type == "rope":
        head_dim = rotated_head_dim(recipe)
        if head_dim is not None:
            rotary_dims(recipe.model.rotary_percent, *head_dim)
    opt = recipe.optimizer
    decay_steps = opt.decay_steps or recipe.training.train_steps
    if opt.warmup_steps >= decay_steps:
        raise RecipeError(
            f"optimizer.warmup_steps={opt.warmup_steps} must be smaller than the decay steps ({decay_steps}: "
            f"optimizer.decay_steps, or training.train_steps when unset); lower warmup_steps"
        )
    if opt.min_lr > opt.lr:
        raise RecipeError(f"optimizer.min_lr={opt.min_lr} must be <= optimizer.lr={opt.lr}")
    if recipe.data.source == "retrieval":
        from megatron_nsa.data.retrieval import RetrievalFormat, check_key_space, check_settings

        if recipe.data.tokenizer != "bytes":
            raise RecipeError(f"data.source=retrieval needs data.tokenizer=bytes, got {recipe.data.tokenizer!r}")
        try:
            check_settings(recipe.retrieval)
            check_key_space(RetrievalFormat.of(recipe.retrieval), recipe.data.seq_length + 1,
                            "data.seq_length (+1 for the labels)")
        except ValueError as err:
            raise RecipeError(str(err)) from None
    if recipe.data.source == "indexed" and not recipe.data.paths:
        raise RecipeError("data.source=indexed needs data.paths: a list of dataset prefixes (path/name for name.bin/.idx)")


def rotated_head_dim(recipe: Recipe) -> Optional[Tuple[str, int]]:
    """(where it comes from, its value) of the q/k head dim RoPE rotates: NSA's own qk_head_dim when it
    sets one, else the model's head dim; None when the recipe gives no head dim (check_layout says so)."""
    model = recipe.model
    if model.attention == "nsa" and recipe.nsa.qk_head_dim is not None:
        return "nsa.qk_head_dim", recipe.nsa.qk_head_dim
    if model.kv_channels is not None:
        return "model.kv_channels", model.kv_channels
    if model.hidden_size % model.num_attention_heads == 0:
        return "model.hidden_size / model.num_attention_heads", model.hidden_size // model.num_attention_heads
    return None


def rotary_dims(rotary_percent: float, head_dim_key: str, head_dim: int) -> int:
    """How many of a head's `head_dim` dims RoPE rotates; RecipeError unless that is an even integer >= 2."""
    if not 0 < rotary_percent <= 1:
        raise RecipeError(f"model.rotary_percent={rotary_percent!r} is not allowed: it must be a number in (0, 1]")
    dims = head_dim * rotary_percent
    if dims != int(dims) or int(dims) < 2 or int(dims) % 2:
        raise RecipeError(
            f"model.rotary_percent={rotary_percent!r} rotates {dims:g} of the {head_dim} dims of a head "
            f"({head_dim_key}); it must give an even whole number of dims >= 2 (e.g. 0.5 or 0.25 of {head_dim})"
        )
    return int(dims)


def cuda_only_problems(recipe: Recipe) -> List[str]:
    """What the recipe asks for that needs CUDA (checked on CPU launches)."""
    model, par, train = recipe.model, recipe.parallel, recipe.training
    cuda_only = {
        "parallel.pipeline_model_parallel_size": (par.pipeline_model_parallel_size > 1,
                                                  "megatron-core's pipeline p2p communication allocates on CUDA"),
        "model.position_embedding_type": (model.position_embedding_type == "rope" and model.attention == "dense",
                                          "the dense model uses megatron-core's RotaryEmbedding, which moves its "
                                          "frequencies to CUDA; use learned_absolute (NSA layers do RoPE on CPU)"),
        "model.recompute": (model.recompute == "full" or (model.recompute == "selective" and model.attention == "dense"),
                            "megatron-core's activation checkpointing saves the CUDA RNG state; on CPU only "
                            "NSA's selective recompute works"),
        "training.precision": (train.precision == "bf16", "the CPU path trains in fp32; use precision=auto or fp32"),
        "parallel.use_distributed_optimizer": (par.use_distributed_optimizer,
                                               "megatron-core's distributed optimizer keeps its buffers on CUDA"),
    }
    problems = []
    for key, (bad, why) in cuda_only.items():
        if bad:
            section, name = key.split(".")
            problems.append(f"{key}={getattr(getattr(recipe, section), name)!r} needs CUDA ({why})")
    return problems


def check_layout(recipe: Recipe, world_size: int, on_cuda: bool) -> None:
    """Checks that depend on the launch: parallel sizes vs world size, CP layout vs sequence length,
    batch sizes vs data-parallel size, features that need CUDA."""
    model, par, train, data, nsa = recipe.model, recipe.parallel, recipe.training, recipe.data, recipe.nsa
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    model_parallel = tp * pp * cp
    problems = [] if on_cuda else cuda_only_problems(recipe)
    if world_size % model_parallel != 0:
        problems.insert(0,
            f"world size {world_size} is not divisible by tensor_model_parallel_size * pipeline_model_parallel_size"
            f" * context_parallel_size = {tp}*{pp}*{cp} = {model_parallel}; launch a multiple of {model_parallel}"
            f" processes or change the parallel sizes"
        )
    if len(problems) == 1:
        raise RecipeError(problems[0])
    if problems:
        raise RecipeError(f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    dp = world_size // model_parallel
    if train.global_batch_size % (train.micro_batch_size * dp) != 0:
        raise RecipeError(
            f"training.global_batch_size={train.global_batch_size} must be a multiple of micro_batch_size * "
            f"data-parallel size = {train.micro_batch_size}*{dp} = {train.micro_batch_size * dp}"
        )
    groups = model.num_query_groups or model.num_attention_heads
    if model.num_attention_heads % groups != 0:
        raise RecipeError(
            f"model.num_query_groups={groups} must divide model.num_attention_heads={model.num_attention_heads}"
        )
    for name, value in (("model.num_attention_heads", model.num_attention_heads), ("model.num_query_groups", groups)):
        if value % tp != 0:
            both = math.gcd(model.num_attention_heads, groups)
            allowed = [size for size in range(1, both + 1) if both % size == 0]
            raise RecipeError(f"{name}={value} is not divisible by tensor_model_parallel_size={tp}; allowed "
                              f"tensor_model_parallel_size: {allowed} (the divisors of both num_attention_heads="
                              f"{model.num_attention_heads} and num_query_groups={groups})")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads != 0:
        raise RecipeError(
            f"model.hidden_size={model.hidden_size} is not divisible by num_attention_heads="
            f"{model.num_attention_heads}; set model.kv_channels (the head dim) explicitly"
        )
    if model.num_layers % pp != 0:
        raise RecipeError(f"model.num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
    if par.sequence_parallel and tp == 1:
        raise RecipeError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    max_positions = model.max_position_embeddings or data.seq_length
    if model.position_embedding_type == "learned_absolute" and max_positions < data.seq_length:
        raise RecipeError(
            f"model.max_position_embeddings={max_positions} is smaller than data.seq_length={data.seq_length}"
        )
    if cp > 1:
        check_context_parallel_layout(recipe)
    if nsa.backend == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RecipeError("nsa.backend=triton needs CUDA (or TRITON_INTERPRET=1); use nsa.backend=torch on CPU")


def check_context_parallel_layout(recipe: Recipe) -> None:
    """Megatron's load-balanced layout (2*CP chunks per sequence), with NSA's rules from
    megatron_nsa.context_parallel: whole selection blocks per chunk, chunks at least one window long."""
    cp = recipe.parallel.context_parallel_size
    if recipe.model.attention != "nsa":
        raise RecipeError(
            f"parallel.context_parallel_size={cp} needs model.attention=nsa: the dense SDPA baseline has no "
            "context parallelism; set context_parallel_size=1"
        )
    try:
        check_cp_sequence(recipe.data.seq_length, cp, recipe.nsa)
    except ValueError as err:
        raise RecipeError(f"data.seq_length={recipe.data.seq_length}: {err}") from None
    if recipe.parallel.cp_exchange == "hierarchical":
        try:
            check_node_size(recipe.parallel.cp_node_size, cp, "parallel.cp_node_size")
        except ValueError as err:
            raise RecipeError(str(err)) from None


def check_data_paths(recipe: Recipe) -> None:
    """Missing .bin/.idx files stop the run before any model is built."""
    if recipe.data.source != "indexed":
        return
    from megatron_nsa.data.build_dataset import dataset_exists, parse_blend

    try:
        prefixes, _ = parse_blend(recipe.data.paths)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    for prefix in prefixes:
        if not dataset_exists(prefix):
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            raise RecipeError(
                f"data.paths: dataset '{prefix}' is missing {', '.join(missing)}; build it with "
                f"`python -m megatron_nsa.data.build_dataset --output {prefix} YOUR_TEXT_FILES` "
                "or fix the path"
            )


def wants_cuda(recipe: Recipe) -> bool:
    """training.device=cuda, or auto with a visible GPU."""
    import torch

    if recipe.training.device == "cuda" and not torch.cuda.is_available():
        raise RecipeError("training.device=cuda but no CUDA device is visible; use training.device=auto or cpu")
    return recipe.training.device == "cuda" or (recipe.training.device == "auto" and torch.cuda.is_available())


def check_before_launch(recipe: Recipe) -> None:
    """Everything checkable from the recipe and torchrun's environment alone, in a second, before any
    model is built: the parallel layout against WORLD_SIZE, CUDA-only features, data files."""
    check_layout(recipe, int(os.environ.get("WORLD_SIZE", "1")), wants_cuda(recipe))
    check_data_paths(recipe)
