"""Recipes: YAML + key=value overrides, unknown keys with suggestions, strict files (required sections,
defaults named), the nsa section as NSAConfig, and the launch-layout checks."""
from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

import dataclasses
import typing

from megatron_nsa import NSAConfig
from megatron_nsa.config import literal_choices
from megatron_nsa.training.config import (
    REQUIRED_SECTIONS, SECTIONS, NSASection, RecipeError, all_keys, check_layout, defaults_note, describe_keys,
    load_recipe, parse_override,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write_recipe(tmp_path, content: dict, complete: bool = True) -> str:
    """A recipe file of `content`; complete: the required sections it lacks are added, empty."""
    if complete:
        content = {**{name: {} for name in ("nsa", *REQUIRED_SECTIONS)}, **content}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_overrides_parse_yaml_values():
    rng = random.Random()
    steps, lr = rng.randint(1, 10_000), rng.uniform(1e-5, 1e-2)
    assert parse_override(f"training.train_steps={steps}") == ("training.train_steps", steps)
    assert parse_override(f"optimizer.lr={lr!r}") == ("optimizer.lr", lr)
    assert parse_override("checkpoint.dir=null") == ("checkpoint.dir", None)
    assert parse_override("data.paths=[0.3, a/b, 0.7, c]") == ("data.paths", [0.3, "a/b", 0.7, "c"])
    assert parse_override("data.split=90,10,0") == ("data.split", "90,10,0")
    with pytest.raises(RecipeError, match="key=value"):
        parse_override("training.train_steps")


def test_file_then_overrides(tmp_path):
    rng = random.Random()
    file_steps, override_steps = rng.sample(range(20, 500), 2)
    hidden = 32 * rng.randint(1, 8)
    path = write_recipe(tmp_path, {"training": {"train_steps": file_steps}, "model": {"hidden_size": hidden}})
    recipe = load_recipe(path, [f"training.train_steps={override_steps}", "attention=dense", "optimizer.lr=1"])
    assert recipe.training.train_steps == override_steps
    assert recipe.training.train_steps == override_steps
    assert recipe.model.hidden_size == hidden
    assert recipe.model.attention == "dense"  # a bare name that is unique is accepted
    assert recipe.optimizer.lr == 1.0 and isinstance(recipe.optimizer.lr, float)
    assert load_recipe(None, ["optimizer.lr=3e-4"]).optimizer.lr == 3e-4  # YAML 1.1 reads this as a string
    assert recipe.training.micro_batch_size == load_recipe(None).training.micro_batch_size  # untouched default


@pytest.mark.parametrize("key, suggestion", [
    ("training.train_step", "training.train_steps"),
    ("model.num_layer", "model.num_layers"),
    ("optimizer.warmup", "optimizer.warmup_steps"),
    ("nsa.window", "nsa.window_size"),
    ("hidden_sise", "model.hidden_size"),
])
def test_unknown_key_suggests_nearest(key, suggestion):
    with pytest.raises(RecipeError, match=f"unknown recipe key '{key}'.*did you mean '{suggestion}'"):
        load_recipe(None, [f"{key}=1"])


def test_unknown_key_in_file_and_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'model.hidden_size'"):
        load_recipe(write_recipe(tmp_path, {"model": {"hiden_size": 64}}))
    with pytest.raises(RecipeError, match="unknown recipe section 'optimiser'.*did you mean 'optimizer'"):
        load_recipe(write_recipe(tmp_path, {"optimiser": {"lr": 1e-3}}))


@pytest.mark.parametrize("text", ["", "\n\n", "# a recipe\n# model: nothing yet\n"])
def test_empty_or_comment_only_recipe_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=f"recipe '{path}' is empty \\(or only comments\\)"):
        load_recipe(str(path))


def test_a_directory_is_not_a_recipe(tmp_path):
    with pytest.raises(RecipeError, match=f"recipe '{tmp_path}' is a directory, expected a YAML file"):
        load_recipe(str(tmp_path))


def test_truncated_recipe_is_refused(tmp_path):
    """configs/tiny.yaml cut after its training section: optimizer, checkpoint and logging are gone."""
    lines = (CONFIGS / "tiny.yaml").read_text().splitlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith("optimizer:"))
    path = tmp_path / "cut.yaml"
    path.write_text("\n".join(lines[:cut]) + "\n")
    with pytest.raises(RecipeError, match=r"lacks the section\(s\) optimizer, checkpoint: a recipe must name "
                                          r"model, nsa, data, training, optimizer, checkpoint \(was the file cut short"):
        load_recipe(str(path))


def test_sections_required_by_the_recipe_itself(tmp_path):
    with pytest.raises(RecipeError, match=r"lacks the section\(s\) nsa"):
        load_recipe(write_recipe(tmp_path, {name: {} for name in REQUIRED_SECTIONS}, complete=False))
    dense = {**{name: {} for name in REQUIRED_SECTIONS}, "model": {"attention": "dense"}}
    assert load_recipe(write_recipe(tmp_path, dense, complete=False)).model.attention == "dense"
    with pytest.raises(RecipeError, match=r"lacks the section\(s\) retrieval"):
        load_recipe(write_recipe(tmp_path, {"data": {"source": "retrieval"}}))
    # an override names its section too
    assert load_recipe(write_recipe(tmp_path, dense, complete=False), ["parallel.sequence_parallel=false"])


def test_keys_left_to_defaults_are_named(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, {"model": {"num_layers": 3}, "training": {"train_steps": 70}}),
                         ["optimizer.lr=1e-3"])
    note = defaults_note(recipe)
    assert "model: attention, hidden_size," in note and " num_layers" not in note
    assert "training: micro_batch_size," in note and "train_steps" not in note
    assert "optimizer: min_lr," in note and "optimizer: lr" not in note and ", lr," not in note
    assert "retrieval" not in note  # not in use with data.source=stdlib
    full = load_recipe(None).to_dict()
    assert defaults_note(load_recipe(write_recipe(tmp_path, full, complete=False))) is None


def test_values_are_checked():
    with pytest.raises(RecipeError, match="training.train_steps='many' is not allowed: expected an integer"):
        load_recipe(None, ["training.train_steps=many"])
    with pytest.raises(RecipeError, match=r"model.attention='sparse' is not allowed; choose one of \['nsa', 'dense'\]"):
        load_recipe(None, ["model.attention=sparse"])
    with pytest.raises(RecipeError, match="training.micro_batch_size=0 is not allowed: it must be >= 1"):
        load_recipe(None, ["training.micro_batch_size=0"])
    with pytest.raises(RecipeError, match="nsa: compress_stride=5 must divide compress_block_size"):
        load_recipe(None, ["nsa.compress_stride=5"])
    with pytest.raises(RecipeError, match="optimizer.warmup_steps=50 must be smaller than the decay steps"):
        load_recipe(None, ["training.train_steps=50", "optimizer.warmup_steps=50"])


def test_bare_names_must_be_unique(monkeypatch):
    from megatron_nsa.training import config

    keys = all_keys()
    monkeypatch.setattr(config, "all_keys", lambda: keys + ["logging.seed"])
    with pytest.raises(RecipeError, match=r"'seed' is ambiguous: write one of \['training.seed', 'logging.seed'\]"):
        load_recipe(None, ["seed=3"])


def test_world_size_must_be_divisible_by_parallel_sizes():
    rng = random.Random()
    tp, pp = rng.choice([2, 4]), rng.choice([1, 2])
    recipe = load_recipe(None, [f"tensor_model_parallel_size={tp}", f"pipeline_model_parallel_size={pp}",
                                "model.num_attention_heads=8", "model.num_layers=4"])
    world = tp * pp * rng.randint(1, 3) + 1
    with pytest.raises(RecipeError, match=f"world size {world} is not divisible by .* = {tp * pp}"):
        check_layout(recipe, world, on_cuda=True)
    recipe.training.global_batch_size = recipe.training.micro_batch_size * 2
    check_layout(recipe, tp * pp * 2, on_cuda=True)


def test_batch_and_heads_must_fit_the_layout():
    recipe = load_recipe(None, ["training.micro_batch_size=2", "training.global_batch_size=6"])
    with pytest.raises(RecipeError, match="global_batch_size=6 must be a multiple of micro_batch_size"):
        check_layout(recipe, 2, on_cuda=False)
    recipe = load_recipe(None, ["model.num_attention_heads=6", "model.num_query_groups=3",
                                "tensor_model_parallel_size=4", "model.hidden_size=96", "global_batch_size=4"])
    with pytest.raises(RecipeError, match="num_attention_heads=6 is not divisible by tensor_model_parallel_size=4"):
        check_layout(recipe, 4, on_cuda=False)
    recipe.model.num_attention_heads = 12
    with pytest.raises(RecipeError, match="num_query_groups=3 is not divisible by tensor_model_parallel_size=4"):
        check_layout(recipe, 4, on_cuda=False)


def test_sequence_length_must_fit_the_context_parallel_layout():
    pytest.importorskip("megatron_nsa.context_parallel")
    base = ["context_parallel_size=2", "nsa.select_block_size=64", "nsa.window_size=128"]
    recipe = load_recipe(None, base + ["data.seq_length=1000"])
    with pytest.raises(RecipeError, match="data.seq_length=1000: .*multiple of"):
        check_layout(recipe, 2, on_cuda=False)
    recipe = load_recipe(None, base + ["data.seq_length=256"])  # chunks of 64 tokens < window 128
    with pytest.raises(RecipeError, match="data.seq_length=256: .*shorter than window_size"):
        check_layout(recipe, 2, on_cuda=False)
    recipe = load_recipe(None, base + ["data.seq_length=512", "model.attention=dense"])
    with pytest.raises(RecipeError, match="context_parallel_size=2 needs model.attention=nsa"):
        check_layout(recipe, 2, on_cuda=False)
    check_layout(load_recipe(None, base + ["data.seq_length=512"]), 2, on_cuda=False)


def test_cuda_only_features_are_refused_on_cpu():
    for override, key in [("pipeline_model_parallel_size=2", "parallel.pipeline_model_parallel_size"),
                          ("training.precision=bf16", "training.precision"),
                          ("model.recompute=full", "model.recompute")]:
        recipe = load_recipe(None, [override, "model.num_layers=2"])
        with pytest.raises(RecipeError, match=f"{key}=.* needs CUDA"):
            check_layout(recipe, 2, on_cuda=False)


@pytest.mark.parametrize("name, world_size", [("tiny.yaml", 1), ("nsa_1b_64k.yaml", 1), ("dense_1b_64k.yaml", 1),
                                              ("nsa_1b_64k.yaml", 8), ("nsa_1m_multinode.yaml", 128)])
def test_shipped_recipes_are_valid(name, world_size):
    recipe = load_recipe(str(CONFIGS / name))
    check_layout(recipe, world_size, on_cuda=True)
    if name == "tiny.yaml":
        check_layout(recipe, world_size, on_cuda=False)


def test_1b_recipes_differ_only_in_attention():
    nsa = load_recipe(str(CONFIGS / "nsa_1b_64k.yaml")).to_dict()
    dense = load_recipe(str(CONFIGS / "dense_1b_64k.yaml")).to_dict()
    differences = {(s, k) for s in nsa for k in nsa[s] if nsa[s][k] != dense[s][k]}
    assert differences == {("model", "attention"), ("checkpoint", "dir")}


@pytest.mark.parametrize("attention", ["nsa", "dense"])
def test_qk_layernorm_gives_both_models_per_head_norms(attention):
    from megatron_nsa.training.model import build_config_and_spec

    head_dim = 16 * random.randint(1, 4)
    for enabled in (True, False):
        recipe = load_recipe(None, [f"model.attention={attention}", f"model.kv_channels={head_dim}",
                                    f"model.qk_layernorm={str(enabled).lower()}", "nsa.backend=torch"])
        config, spec = build_config_and_spec(recipe, on_cuda=False, bf16=False)
        assert config.qk_layernorm is enabled
        attention_spec = spec.submodules.self_attention.submodules
        if attention == "nsa":
            assert (attention_spec.q_layernorm is not None) is enabled
            assert (attention_spec.k_layernorm is not None) is enabled
        else:
            from megatron.core.transformer.identity_op import IdentityOp

            assert (attention_spec.q_layernorm is not IdentityOp) is enabled
            assert (attention_spec.k_layernorm is not IdentityOp) is enabled
    with pytest.raises(RecipeError, match="model.qk_layernorm"):
        load_recipe(None, ["model.qk_layernorm=maybe"])


def test_rotary_percent_sets_the_dims_rope_rotates():
    from megatron_nsa.training.model import build_config_and_spec

    rng = random.Random()
    head_dim = 16 * rng.randint(1, 4)
    recipe = load_recipe(None, ["model.position_embedding_type=rope", f"model.kv_channels={head_dim}",
                                "model.rotary_percent=0.5", "nsa.backend=torch"])
    config, _ = build_config_and_spec(recipe, on_cuda=False, bf16=False)
    assert config.nsa_rotary_dim == head_dim // 2
    full = load_recipe(None, ["model.position_embedding_type=rope", f"model.kv_channels={head_dim}",
                              "nsa.backend=torch"])
    assert build_config_and_spec(full, on_cuda=False, bf16=False)[0].nsa_rotary_dim == head_dim
    nsa_dims = load_recipe(None, ["model.position_embedding_type=rope", "model.kv_channels=64", "nsa.qk_head_dim=96",
                                  "model.rotary_percent=0.25", "nsa.backend=torch"])
    assert build_config_and_spec(nsa_dims, on_cuda=False, bf16=False)[0].nsa_rotary_dim == 24
    for percent, allowed in ((0.3, "even whole number of dims"), (0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]")):
        with pytest.raises(RecipeError, match=rf"model.rotary_percent={percent!r} .*{allowed}"):
            load_recipe(None, ["model.position_embedding_type=rope", "model.kv_channels=64",
                               f"model.rotary_percent={percent}"])
    with pytest.raises(RecipeError, match=r"rotates 3 of the 96 dims of a head \(nsa.qk_head_dim\)"):
        load_recipe(None, ["model.position_embedding_type=rope", "model.kv_channels=64", "nsa.qk_head_dim=96",
                           "model.rotary_percent=0.03125"])


def test_nsa_section_is_nsa_config():
    """Defaults, allowed values and checks of the nsa section come from NSAConfig alone."""
    section = load_recipe(None).nsa
    assert isinstance(section, NSAConfig)
    for field in dataclasses.fields(NSAConfig):
        assert getattr(section, field.name) == field.default, field.name
    allowed = typing.get_args(typing.get_type_hints(NSAConfig)["compression"])
    with pytest.raises(RecipeError, match=re.escape(f"nsa.compression='max' is not allowed; choose one of "
                                                    f"{list(allowed)!r}")):
        load_recipe(None, ["nsa.compression=max"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        section.window_size = 3
    with pytest.raises(RecipeError, match="unknown recipe key 'nsa.windw_size'; did you mean 'nsa.window_size'"):
        load_recipe(None, ["nsa.windw_size=64"])


def test_nsa_checks_see_the_final_values_in_any_order():
    """l <= l' holds only once both are set: the section is built from all its keys at once."""
    keys = ["nsa.select_block_size=8", "nsa.compress_block_size=8", "nsa.compress_stride=4", "nsa.select_count=3"]
    for order in (keys, keys[::-1]):
        nsa = load_recipe(None, order).nsa
        assert (nsa.select_block_size, nsa.compress_block_size, nsa.compress_stride) == (8, 8, 4)


def test_choices_of_every_section_come_from_literal_types():
    for section_name, cls in SECTIONS.items():
        for name, annotation in typing.get_type_hints(cls).items():
            choices = literal_choices(annotation)
            if choices is None:
                continue
            with pytest.raises(RecipeError, match=f"{section_name}.{name}='nonsense' is not allowed; choose one of"):
                load_recipe(None, [f"{section_name}.{name}=nonsense"])
    assert literal_choices(typing.get_type_hints(SECTIONS["training"])["device"]) == ("auto", "cuda", "cpu")


def test_list_keys_shows_every_key_with_default_and_meaning():
    text = describe_keys()
    for key in all_keys():
        section, name = key.split(".")
        assert f"\n  {name}: " in text or text.startswith(f"{section}:\n  {name}: "), key
    assert "  window_size: 512  # w: sliding-window length" in text
    assert "  attention: nsa [nsa | dense]  #" in text
    assert "  backend: null [null | torch | triton]  #" in text
    help_texts = [f.metadata.get("help") for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert all(help_texts)


def test_token_shift_is_gone_but_old_stored_recipes_load():
    with pytest.raises(RecipeError, match="unknown recipe key 'model.token_shift'"):
        load_recipe(None, ["model.token_shift=true"])
    from megatron_nsa.training.config import recipe_from_mapping

    stored = load_recipe(None).to_dict()
    stored["model"]["token_shift"] = False  # what checkpoints written before its removal hold
    assert recipe_from_mapping(stored) == load_recipe(None)
    stored["model"]["token_shift"] = True
    with pytest.raises(RecipeError, match="unknown recipe key 'model.token_shift'"):
        recipe_from_mapping(stored)
