"""experiments/retrieval_curriculum_8k.sh: its refusals, and a two-stage curriculum of a tiny NSA model on
CPU: the second stage resumes the first one's checkpoint, the recipe CURRICULUM_RECIPE names and the overrides
reach every stage, a stage's own overrides reach that stage alone, each stage's recall breakdown is written
and tabulated, and the needle test runs at the last stage's length and at 2x and 4x it (and with
NEEDLE_SILENCE once more with branches off, with NEEDLE_RANKS once more ranking the needle's block)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "experiments/retrieval_curriculum_8k.sh"
TINY = ["model.num_layers=1", "model.hidden_size=64", "model.num_attention_heads=2", "model.num_query_groups=1",
        "model.kv_channels=32", "nsa.compress_block_size=8", "nsa.compress_stride=4", "nsa.select_block_size=16",
        "nsa.select_count=4", "nsa.window_size=32", "optimizer.decay_steps=4", "optimizer.warmup_steps=1",
        "training.eval_interval=2"]


def run_script(args, **env):
    return subprocess.run(["bash", SCRIPT, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.mark.parametrize("args, env, message", [
    (["foo"], {}, "the first argument must be nsa or dense, got 'foo'"),
    (["nsa", "ten"], {}, "SECONDS must be a whole number of seconds (0: no limit), got 'ten'"),
    (["nsa", "10", "lr=3e-3"], {}, "override 'lr=3e-3' must look like section.key=value"),
    (["nsa"], {"CURRICULUM_STAGES": "256:4:8"}, "stage '256:4:8' must be length:sequences:facts:last_step"),
    (["nsa"], {"CURRICULUM_STAGES": "256:4:8:5 512:2:8:5"}, "stage '512:2:8:5' ends at step 5, not after"),
    (["nsa"], {"CURRICULUM_STAGES": "256:4:8:5,retrieval.mean_gap=2 512:2:8:9,gap=3"},
     "stage '512:2:8:9,gap=3': override 'gap=3' must look like section.key=value"),
    (["nsa"], {"NEEDLE_SAMPLES": "0"}, "NEEDLE_SAMPLES must be a whole number >= 1, got '0'"),
    (["nsa"], {"RECALL_SAMPLES": "some"}, "RECALL_SAMPLES must be a whole number >= 0, got 'some'"),
    (["nsa"], {"NEEDLE_SILENCE": "cmp window"}, "NEEDLE_SILENCE: 'window' is not a branch"),
    (["nsa"], {"NEEDLE_RANKS": "yes"}, "NEEDLE_RANKS must be 0 or 1, got 'yes'"),
    (["nsa"], {"CURRICULUM_RECIPE": "no_such_recipe.yaml"}, "CURRICULUM_RECIPE: no recipe file 'no_such_recipe.yaml'"),
])
def test_bad_arguments_stop_before_training(args, env, message):
    result = run_script(args, **env)
    assert result.returncode == 2 and message in result.stderr and "stage:" not in result.stdout


def test_a_two_stage_curriculum_resumes_and_ends_with_the_needle_test(tmp_path):
    checkpoint_dir = tmp_path / "curriculum"
    args = ["nsa", "0", f"checkpoint.dir={checkpoint_dir}", "retrieval.single_facts=2",
            "model.position_embedding_type=rope", *TINY]
    env = dict(CURRICULUM_STAGES="64:2:4:2 128:2:4:4,retrieval.mean_gap=3,retrieval.gap_after=records",
               NEEDLE_SAMPLES="1", RECALL_SAMPLES="2", NEEDLE_SILENCE="cmp win", NEEDLE_RANKS="1",
               CURRICULUM_RECIPE="configs/retrieval_emergence_cpu.yaml")
    result = run_script(args, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "steps 0..2" in result.stdout and "steps 2..4" in result.stdout  # the second stage resumed
    recipe = json.loads((checkpoint_dir / "step_00000004" / "meta.json").read_text())["recipe"]
    assert recipe["retrieval"]["single_facts"] == 2 and recipe["data"]["seq_length"] == 128  # the overrides won
    assert recipe["model"]["hidden_size"] == 64
    assert recipe["retrieval"]["num_keys"] == 64  # CURRICULUM_RECIPE's (the default recipe has 1,024 keys)
    assert recipe["retrieval"]["mean_gap"] == 3 and recipe["retrieval"]["gap_after"] == "records"  # the stage's own
    first_stage, second_stage = [line for line in result.stdout.splitlines() if line.startswith("stage:")]
    assert "mean_gap" not in first_stage and second_stage.endswith("retrieval.mean_gap=3 retrieval.gap_after=records")
    needle = json.loads((checkpoint_dir / "needle.json").read_text())
    assert needle["lengths"] == [128, 256, 512] and needle["step"] == 4 and "needle_block_selected" in needle
    silenced = json.loads((checkpoint_dir / "needle_silenced.json").read_text())  # the selected branch alone
    assert silenced["lengths"] == [128] and silenced["silenced_branches"] == ["cmp", "win"]
    ranks = json.loads((checkpoint_dir / "needle_ranks.json").read_text())  # the needle block's rank, 128 tokens
    assert ranks["lengths"] == [128] and set(ranks["needle_block_rank"]["128"]) == {f"{d}" for d in range(0, 101, 10)}
    metrics = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in metrics) == 4
    for step, length in ((2, 64), (4, 128)):  # each stage's recall breakdown, at its own length
        recall = json.loads((checkpoint_dir / f"recall_step_{step}.json").read_text())
        assert recall["step"] == step and recall["seq_length"] == length and recall["samples"] == 2
    curve_rows = (checkpoint_dir / "recall_curve.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in curve_rows] == [["| 2", "64"], ["| 4", "128"]]
    weights = checkpoint_dir / "weights" / "step_00000004"  # the last checkpoint's weights, bf16
    assert json.loads((weights / "meta.json").read_text())["format"] == "weights"
    exported_at = (weights / "model.pt").stat().st_mtime_ns

    # the same command again: both stages are trained, so no trainer starts; a missing recall breakdown of a
    # stage whose checkpoint is kept is made, and the needle test runs again
    (checkpoint_dir / "recall_step_4.json").unlink()
    (checkpoint_dir / "needle.json").unlink()
    again = run_script(args, **env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("trained already") == 2 and "training nsa GPT" not in again.stdout + again.stderr
    assert json.loads((checkpoint_dir / "recall_step_4.json").read_text())["step"] == 4
    assert json.loads((checkpoint_dir / "needle.json").read_text())["step"] == 4
    assert (weights / "model.pt").stat().st_mtime_ns == exported_at  # exported once
