"""Bad input stops `python -m megatron_nsa.training.train` before training, with exit code 2 and a message
that says what to change (layout checks in detail: test_recipe.py)."""
from __future__ import annotations

import json

import pytest

from megatron_nsa.training.checkpoint import layout_of
from megatron_nsa.training.config import load_recipe

from train_harness import FAST, TINY_RECIPE, run_cli


def assert_refused(result, *fragments):
    assert result.returncode == 2, f"expected exit code 2:\n{result.stdout}\n{result.stderr}"
    assert "error: " in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "step " not in result.stdout  # no training step ran


def test_unknown_key(tmp_path):
    result = run_cli([str(TINY_RECIPE), "training.num_step=3"], tmp_path)
    assert_refused(result, "unknown recipe key 'training.num_step'", "did you mean 'training.train_steps'")


def test_missing_data_path(tmp_path):
    missing = tmp_path / "nowhere" / "corpus"
    result = run_cli([str(TINY_RECIPE), "data.source=indexed", f"data.paths=[{missing}]", "checkpoint.dir=null"],
                     tmp_path)
    assert_refused(result, f"dataset '{missing}' is missing", "python -m megatron_nsa.data.build_dataset")


def test_world_size_not_divisible(tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_cli([str(TINY_RECIPE), "parallel.tensor_model_parallel_size=2"], tmp_path, env=env)
    assert_refused(result, "world size 3 is not divisible by tensor_model_parallel_size", "= 2")


def test_sequence_length_the_context_parallel_layout_cannot_take(tmp_path):
    pytest.importorskip("megatron_nsa.context_parallel")
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_cli([str(TINY_RECIPE), "parallel.context_parallel_size=2", "data.seq_length=200"], tmp_path, env=env)
    assert_refused(result, "data.seq_length=200", "context_parallel_size=2")


@pytest.mark.parametrize("damage", ["meta", "shard"])
def test_corrupt_checkpoint(tmp_path, corpus_cache, damage):
    """A checkpoint whose meta.json or rank file is unreadable is refused, naming the way out."""
    overrides = FAST + [f"checkpoint.dir={tmp_path / 'ckpt'}", f"data.cache_dir={corpus_cache}"]
    recipe = load_recipe(str(TINY_RECIPE), overrides)
    for step in (2, 4):
        directory = tmp_path / "ckpt" / f"step_{step:08d}"
        directory.mkdir(parents=True)
        meta = {"step": step, "consumed_samples": 8 * step, "format": "host", "layout": layout_of(recipe, 1),
                "scheduler": {}}
        (directory / "meta.json").write_text(json.dumps(meta) if damage == "shard" or step == 2 else '{"step": 4,')
        (directory / "rank_00000.pt").write_bytes(b"\x80\x02not a torch file")
    result = run_cli([str(TINY_RECIPE), *overrides], tmp_path)
    newest = tmp_path / "ckpt" / "step_00000004"
    reason = "is corrupt: cannot read meta.json" if damage == "meta" else "cannot be loaded"
    assert_refused(result, f"checkpoint {newest} {reason}", "move it away to resume from step_00000002",
                   "checkpoint.new_run_subdir=true")


def test_pipeline_parallel_on_one_cpu_process_names_both_problems(tmp_path):
    result = run_cli([str(TINY_RECIPE), "parallel.pipeline_model_parallel_size=2"], tmp_path)
    assert_refused(result, "2 problems:", "world size 1 is not divisible", "launch a multiple of 2 processes",
                   "parallel.pipeline_model_parallel_size=2 needs CUDA")


def test_query_groups_that_tensor_parallelism_cannot_split_list_the_allowed_sizes(tmp_path):
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    result = run_cli([str(TINY_RECIPE), "parallel.tensor_model_parallel_size=4"], tmp_path, env=env)
    assert_refused(result, "model.num_query_groups=2 is not divisible by tensor_model_parallel_size=4",
                   "allowed tensor_model_parallel_size: [1, 2]")


def test_a_directory_or_an_empty_file_is_not_a_recipe(tmp_path):
    assert_refused(run_cli([str(tmp_path)], tmp_path), f"recipe '{tmp_path}' is a directory, expected a YAML file")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n")
    assert_refused(run_cli([str(empty)], tmp_path), f"recipe '{empty}' is empty (or only comments)")


def test_list_keys(tmp_path):
    result = run_cli(["--list-keys"], tmp_path)
    assert result.returncode == 0
    assert "  window_size: 512  # w: sliding-window length" in result.stdout
    assert "  new_run_subdir: false  #" in result.stdout
