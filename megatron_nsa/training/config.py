"""Training recipes: YAML sections -> typed dataclasses, `key=value` overrides, checks before training.

A recipe has the sections below; every field has a default, so a recipe names only what it changes.
Overrides use the dotted name (`training.train_steps=20`) or, when it is unique, the bare field
name (`train_steps=20`); values are parsed as YAML (`true`, `3e-4`, `null`, `[a, b]`).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Dict, List, Optional, Tuple

import yaml


class BadInputError(Exception):
    """Input the run cannot start from (recipe, layout, data, checkpoint); the message says what to change."""


class RecipeError(BadInputError, ValueError):
    """A recipe, an override or the launch layout that cannot train."""


@dataclasses.dataclass
class ModelSection:
    attention: str = "nsa"  # nsa | dense (the same GPT with Megatron-style dense causal attention)
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: no GQA (= num_attention_heads)
    kv_channels: Optional[int] = None  # head dim; None: hidden_size / num_attention_heads
    ffn_hidden_size: Optional[int] = None  # None: 4 * hidden_size (8/3 * hidden_size with swiglu, rounded)
    swiglu: bool = True
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope (rope needs CUDA)
    rotary_base: int = 10000
    rotary_percent: float = 1.0  # share of each head's q/k dims that RoPE rotates (Megatron's rotary_percent);
    # the rest carry no position, so matching on them works the same at every distance
    qk_layernorm: bool = False  # normalize each head's queries and keys (Megatron's qk_layernorm), both models
    token_shift: bool = False  # add W e_(t-1) to each token's embedding e_t (W starts as the identity), both models
    max_position_embeddings: Optional[int] = None  # None: data.seq_length
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    recompute: str = "none"  # none | selective (core attention) | full (whole layers; needs CUDA)
    recompute_num_layers: int = 1  # layers per recompute block with recompute=full


@dataclasses.dataclass
class NSASection:
    """NSA hyper-parameters (see docs/semantics.md); used when model.attention = nsa."""

    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    select_count: int = 16
    select_init_blocks: int = 1
    select_local_blocks: int = 2
    window_size: int = 512
    compression: str = "mean"  # mean | linear | mlp
    compress_mlp_hidden: Optional[int] = None  # hidden width of compression=mlp (None: 2 * head dim)
    separate_kv: bool = False
    softmax_scale: Optional[float] = None
    qk_head_dim: Optional[int] = None  # None: model.kv_channels
    v_head_dim: Optional[int] = None  # None: qk_head_dim
    backend: Optional[str] = None  # torch | triton | None (triton on CUDA, torch on CPU)


@dataclasses.dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    cp_exchange: str = "allgather"  # allgather | ring | hierarchical | fetch: how NSA K/V cross CP ranks
    cp_node_size: Optional[int] = None  # hierarchical: consecutive CP ranks per node (a divisor of CP)
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False


@dataclasses.dataclass
class DataSection:
    source: str = "stdlib"  # stdlib (Python's own sources, built on first use) | indexed | mock | retrieval
    paths: List[Any] = dataclasses.field(default_factory=list)  # indexed: [prefix, ...] or [w1, prefix1, w2, ...]
    split: str = "98,2,0"  # train, validation, test weights over the documents
    seq_length: int = 256
    tokenizer: str = "bytes"  # bytes | path of a local Hugging Face tokenizer directory
    cache_dir: Optional[str] = None  # None: $MEGATRON_NSA_CACHE or ~/.cache/megatron_nsa


@dataclasses.dataclass
class RetrievalSection:
    """The synthetic key/value retrieval task of data.source=retrieval (megatron_nsa.eval.retrieval_task)."""

    num_keys: int = 16384  # key token ids [258, 258 + num_keys): one fresh key per definition
    num_values: int = 256  # value token ids right after the keys
    query_fraction: float = 0.25  # share of records that query an earlier key (the loss is on their values)
    mean_gap: int = 0  # filler tokens after each definition, uniform in [0, 2 * mean_gap]: fewer keys per sequence
    query_once: bool = False  # each key queried at most once, so that every answer is its definition's, however far
    queries_last: bool = False  # all definitions first, then one block of queries at the end, each key asked once
    filler: str = "random"  # filler after definitions: random bytes, or "repeat" (one sentence over and over)


@dataclasses.dataclass
class TrainingSection:
    train_steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seed: int = 1234
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    eval_interval: int = 50  # 0: no validation
    eval_steps: int = 2


@dataclasses.dataclass
class OptimizerSection:
    lr: float = 3.0e-4
    min_lr: float = 3.0e-5
    warmup_steps: int = 10
    decay_steps: Optional[int] = None  # None: training.train_steps
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1.0e-8
    clip_grad: float = 1.0


@dataclasses.dataclass
class CheckpointSection:
    dir: Optional[str] = None  # None: no checkpoints
    save_interval: int = 0  # 0: only at the end (and on SIGTERM)
    keep_last: int = 2
    resume: bool = True  # continue from the newest checkpoint in dir when there is one


@dataclasses.dataclass
class LoggingSection:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None  # None: <checkpoint.dir>/tensorboard, or none without checkpoints
    metrics_file: Optional[str] = None  # a JSON line per log interval and validation (full-precision values)


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

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)


CHOICES = {
    "model.attention": ("nsa", "dense"),
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.position_embedding_type": ("learned_absolute", "rope"),
    "model.recompute": ("none", "selective", "full"),
    "nsa.compression": ("mean", "linear", "mlp"),
    "nsa.backend": (None, "torch", "triton"),
    "parallel.cp_exchange": ("allgather", "ring", "hierarchical", "fetch"),
    "data.source": ("stdlib", "indexed", "mock", "retrieval"),
    "training.device": ("auto", "cuda", "cpu"),
    "training.precision": ("auto", "bf16", "fp32"),
    "optimizer.lr_decay_style": ("cosine", "linear", "constant"),
}

MINIMUMS = {
    "model.num_layers": 1, "model.hidden_size": 1, "model.num_attention_heads": 1, "model.num_query_groups": 1,
    "model.kv_channels": 1, "model.ffn_hidden_size": 1, "model.max_position_embeddings": 1,
    "model.make_vocab_size_divisible_by": 1, "model.recompute_num_layers": 1,
    "parallel.tensor_model_parallel_size": 1, "parallel.pipeline_model_parallel_size": 1,
    "parallel.context_parallel_size": 1, "data.seq_length": 2, "training.train_steps": 1,
    "training.micro_batch_size": 1, "training.global_batch_size": 1, "training.eval_interval": 0,
    "training.eval_steps": 1, "optimizer.warmup_steps": 0, "optimizer.decay_steps": 1,
    "checkpoint.save_interval": 0, "checkpoint.keep_last": 1, "logging.log_interval": 1,
    "nsa.qk_head_dim": 1, "nsa.v_head_dim": 1,
}


def _sections(recipe: Recipe):
    for field in dataclasses.fields(recipe):
        yield field.name, getattr(recipe, field.name)


def all_keys() -> List[str]:
    """Every dotted key a recipe may set."""
    recipe = Recipe()
    return [f"{name}.{f.name}" for name, section in _sections(recipe) for f in dataclasses.fields(section)]


def _suggest(key: str, candidates: List[str]) -> str:
    leaf_to_key = {c.split(".")[-1]: c for c in candidates}
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:
        leaf = difflib.get_close_matches(key.split(".")[-1], list(leaf_to_key), n=1, cutoff=0.5)
        close = [leaf_to_key[leaf[0]]] if leaf else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check `value` against the field's type; ints are accepted where floats are expected."""
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


def _set(recipe: Recipe, key: str, value: Any) -> None:
    keys = all_keys()
    if key not in keys:
        matches = [k for k in keys if k.split(".")[-1] == key]
        if len(matches) == 1:
            key = matches[0]
        elif len(matches) > 1:
            raise RecipeError(f"'{key}' is ambiguous: write one of {matches}")
        else:
            raise RecipeError(f"unknown recipe key '{key}'{_suggest(key, keys)}")
    section_name, field_name = key.split(".")
    section = getattr(recipe, section_name)
    hints = typing.get_type_hints(type(section))
    setattr(section, field_name, _coerce(key, value, hints[field_name]))


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
    """Read a YAML recipe (None: all defaults), apply `key=value` overrides, check field values."""
    content = {}
    if path is not None:
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file '{path}' does not exist")
        with open(path) as f:
            try:
                content = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise RecipeError(f"recipe '{path}' is not valid YAML: {err}") from None
    return recipe_from_mapping(content, overrides, source=path or "the defaults")


def recipe_from_mapping(content: Dict[str, Any], overrides: List[str] = (), source: str = "the recipe") -> Recipe:
    """Sections as a mapping (a parsed YAML file, or Recipe.to_dict() as checkpoints store it), then overrides."""
    recipe = Recipe()
    if not isinstance(content, dict):
        raise RecipeError(f"recipe '{source}' must be a mapping of sections (model:, nsa:, data:, ...)")
    section_names = [name for name, _ in _sections(recipe)]
    for section_name, entries in content.items():
        if section_name not in section_names:
            raise RecipeError(
                f"unknown recipe section '{section_name}' in {source}{_suggest(section_name, section_names)}"
            )
        if not isinstance(entries, dict):
            raise RecipeError(f"section '{section_name}' in {source} must be a mapping of key: value")
        for name, value in entries.items():
            _set(recipe, f"{section_name}.{name}", value)
    for text in overrides:
        _set(recipe, *parse_override(text))
    check_fields(recipe)
    return recipe


def check_fields(recipe: Recipe) -> None:
    """Per-field checks that need no knowledge of the launch (choices, minimums, NSA rules)."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value not in allowed:
            raise RecipeError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    for key, minimum in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if value is not None and value < minimum:
            raise RecipeError(f"{key}={value} is not allowed: it must be >= {minimum}")
    if recipe.model.attention == "nsa":
        from megatron_nsa.config import validate_nsa_fields

        try:
            validate_nsa_fields(recipe.nsa)
        except ValueError as err:
            raise RecipeError(f"nsa: {err}") from None
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
        from megatron_nsa.eval.retrieval_task import RetrievalFormat, check_key_space, check_settings

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


def check_layout(recipe: Recipe, world_size: int, on_cuda: bool) -> None:
    """Checks that depend on the launch: parallel sizes vs world size, CP layout vs sequence length,
    batch sizes vs data-parallel size, features that need CUDA."""
    model, par, train, data, nsa = recipe.model, recipe.parallel, recipe.training, recipe.data, recipe.nsa
    tp, pp, cp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.context_parallel_size
    model_parallel = tp * pp * cp
    if world_size % model_parallel != 0:
        raise RecipeError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size * pipeline_model_parallel_size"
            f" * context_parallel_size = {tp}*{pp}*{cp} = {model_parallel}; launch a multiple of {model_parallel}"
            f" processes or change the parallel sizes"
        )
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
            raise RecipeError(f"{name}={value} is not divisible by tensor_model_parallel_size={tp}")
    if model.kv_channels is None and model.hidden_size % model.num_attention_heads != 0:
        raise RecipeError(
            f"model.hidden_size={model.hidden_size} is not divisible by num_attention_heads="
            f"{model.num_attention_heads}; set model.kv_channels (the head dim) explicitly"
        )
    if model.num_layers % pp != 0:
        raise RecipeError(f"model.num_layers={model.num_layers} is not divisible by pipeline_model_parallel_size={pp}")
    if par.sequence_parallel and tp == 1:
        raise RecipeError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    if model.token_shift and (cp > 1 or par.sequence_parallel):
        raise RecipeError(
            f"model.token_shift=true needs the whole sequence on each rank, but context_parallel_size={cp} and "
            f"sequence_parallel={str(par.sequence_parallel).lower()}: set context_parallel_size=1 and "
            "sequence_parallel=false"
        )
    max_positions = model.max_position_embeddings or data.seq_length
    if model.position_embedding_type == "learned_absolute" and max_positions < data.seq_length:
        raise RecipeError(
            f"model.max_position_embeddings={max_positions} is smaller than data.seq_length={data.seq_length}"
        )
    if cp > 1:
        check_context_parallel_layout(recipe)
    if not on_cuda:
        cuda_only = {
            "parallel.pipeline_model_parallel_size": (pp > 1, "megatron-core's pipeline p2p communication allocates on CUDA"),
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
        for key, (bad, why) in cuda_only.items():
            if bad:
                section, name = key.split(".")
                raise RecipeError(f"{key}={getattr(getattr(recipe, section), name)!r} needs CUDA ({why})")
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
        from megatron_nsa.context_parallel.layout import check_cp_sequence
    except ImportError:
        raise RecipeError(
            f"parallel.context_parallel_size={cp} needs megatron_nsa.context_parallel, which this install "
            "lacks; set context_parallel_size=1"
        ) from None
    try:
        check_cp_sequence(recipe.data.seq_length, cp, recipe.nsa)
    except ValueError as err:
        raise RecipeError(f"data.seq_length={recipe.data.seq_length}: {err}") from None
    if recipe.parallel.cp_exchange == "hierarchical":
        from megatron_nsa.context_parallel.exchange_hierarchical import check_node_size

        try:
            check_node_size(recipe.parallel.cp_node_size, cp, "parallel.cp_node_size")
        except ValueError as err:
            raise RecipeError(str(err)) from None


def dataset_exists(prefix: str) -> bool:
    """An indexed dataset is the pair PREFIX.bin (tokens) + PREFIX.idx (document index)."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def parse_blend(paths: List) -> Tuple[List[str], Optional[List[float]]]:
    """[prefix, ...] or [weight, prefix, weight, prefix, ...] -> (prefixes, weights or None)."""
    if all(isinstance(p, str) for p in paths):
        return [os.path.expanduser(p) for p in paths], None
    pairs = list(zip(paths[0::2], paths[1::2]))
    if len(paths) % 2 or not all(isinstance(w, (int, float)) and isinstance(p, str) for w, p in pairs):
        raise RecipeError(
            f"data.paths={paths!r} must be a list of dataset prefixes or of weight, prefix pairs "
            "(e.g. [0.7, data/web, 0.3, data/code])"
        )
    if any(w <= 0 for w, _ in pairs):
        raise RecipeError(f"data.paths={paths!r}: blend weights must be > 0")
    return [os.path.expanduser(p) for _, p in pairs], [float(w) for w, _ in pairs]


def check_data_paths(recipe: Recipe) -> None:
    """Missing .bin/.idx files stop the run before any model is built."""
    if recipe.data.source != "indexed":
        return
    prefixes, _ = parse_blend(recipe.data.paths)
    for prefix in prefixes:
        if not dataset_exists(prefix):
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            raise RecipeError(
                f"data.paths: dataset '{prefix}' is missing {', '.join(missing)}; build it with "
                f"`python -m megatron_nsa.training.build_dataset --output {prefix} YOUR_TEXT_FILES` "
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
