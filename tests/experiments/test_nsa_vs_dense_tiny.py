"""experiments/nsa_vs_dense.py --tiny: the experiment driver end to end on CPU (calibration, NSA under a time
budget, dense on NSA's step count, evaluation of both checkpoints, report).

About a minute on 2 CPU cores (three training processes and the evaluation), beyond this directory's share
of the CI time: it runs when MEGATRON_NSA_EXPERIMENT_TESTS=1. Bad settings fail before any training (fast).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
experiment_run = pytest.mark.skipif(os.environ.get("MEGATRON_NSA_EXPERIMENT_TESTS") != "1",
                                    reason="1-2 min of training; set MEGATRON_NSA_EXPERIMENT_TESTS=1 to run it")


def run_tiny(tmp_path, *arguments: str) -> subprocess.CompletedProcess:
    """The driver's --tiny retrieval experiment, which must succeed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "experiments.nsa_vs_dense", "--experiment", "retrieval", "--tiny",
               "--out", str(tmp_path), *arguments]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@experiment_run
def test_tiny_retrieval_experiment(tmp_path):
    run_tiny(tmp_path, "--steps", "auto", "--time-budget-s", "3")
    summary = json.loads((tmp_path / "retrieval" / "summary.json").read_text())
    nsa, dense = summary["models"]["nsa"], summary["models"]["dense"]
    assert summary["calibration_step_s"] > 0 and summary["steps"] >= 10
    assert 1 <= nsa["steps"] <= summary["steps"] and dense["steps"] == nsa["steps"] and summary["equal_tokens"]
    assert nsa["tokens"] == nsa["steps"] * summary["global_batch_size"] * summary["seq_length"]
    for run in (nsa, dense):
        assert run["error"] is None and "final_error" not in run
        assert run["final"]["step"] == run["steps"] and run["final"]["loss"] > 0
        needle = run["final"]["needle"]
        assert needle["lengths"] == [128, 256] and set(needle["accuracy"]["256"]) == {"0", "50", "100"}
        assert run["validation_loss"] and run["validation_loss"][-1][0] <= run["steps"]
    assert set(nsa["gates"]) == {"gate_cmp", "gate_slc", "gate_win"} and not dense["gates"]
    report = (tmp_path / "retrieval" / "nsa_vs_dense_retrieval_cpu.md").read_text()
    assert "| NSA |" in report and "| dense |" in report and "Needle accuracy, NSA" in report
    assert f"Recorded at commit `{summary['recorded']['commit']}` on {summary['recorded']['date']}" in report
    assert not (tmp_path / "retrieval" / "nsa" / "checkpoints").exists()  # removed without --keep-checkpoints


def test_needle_lengths_past_the_key_range_fail_before_training(tmp_path):
    command = [sys.executable, "-m", "experiments.nsa_vs_dense", "--experiment", "retrieval", "--tiny",
               "--out", str(tmp_path), "--eval-lengths", "128", "1024"]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "retrieval.num_keys=256 is too small for the needle length (--lengths)=1024" in done.stderr
    assert not (tmp_path / "retrieval" / "calibration").exists()  # nothing was trained


@pytest.mark.slow
@experiment_run
def test_tiny_experiment_with_a_length_curriculum(tmp_path):
    done = run_tiny(tmp_path, "--steps", "5", "--stages", "32:3", "64:2,retrieval.mean_gap=2")
    out = tmp_path / "retrieval"
    summary = json.loads((out / "summary.json").read_text())
    for name in ("nsa", "dense"):
        run = summary["models"][name]
        assert run["steps"] == 3 + 2 + 5 and [s["steps"] for s in run["stages"]] == [3, 5]
        assert [point[0] for point in run["validation_loss"]][-1] == 10 and run["final"]["step"] == 10
        assert "resumed from" not in (out / name / "stage_1" / "train.log").read_text()
        assert "checkpoints/step_00000003 at step 3" in (out / name / "stage_2" / "train.log").read_text()
        assert "checkpoints/step_00000005 at step 5" in (out / name / "train.log").read_text()
        stage_2 = (out / name / "stage_2" / "metrics.jsonl").read_text()
        assert '"tokens_per_second"' in stage_2
    stage_2_log = (out / "nsa" / "stage_2" / "train.log").read_text()
    assert "data.seq_length=64" in done.stdout and "training.global_batch_size=8" in done.stdout
    assert "retrieval.mean_gap=2" in done.stdout and "steps 3..5" in stage_2_log
    report = (out / "nsa_vs_dense_retrieval_cpu.md").read_text()
    assert "32 tokens x 3 steps, 64 tokens x 2 steps (`retrieval.mean_gap=2`)" in report


@pytest.mark.parametrize("stage,message", [
    ("100:5", "length 100 is not allowed: it must be smaller than --seq-length 128 and divide it"),
    ("128:5", "length 128 is not allowed"),
    ("32", "is not allowed: write LENGTH:STEPS"),
    ("32:0", "steps 0 is not allowed"),
    ("32:5,data.seq_length=16", "override 'data.seq_length=16' is not allowed"),
    ("32:5,retrieval.mean_gap", "override 'retrieval.mean_gap' is not allowed"),
    ("32:5,retrieval.mean_gap=-1", "retrieval.mean_gap=-1 is not allowed"),
])
def test_bad_stages_fail_before_training(tmp_path, stage, message):
    command = [sys.executable, "-m", "experiments.nsa_vs_dense", "--experiment", "retrieval", "--tiny",
               "--out", str(tmp_path), "--stages", stage]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in done.stderr
    assert not (tmp_path / "retrieval" / "calibration").exists()  # nothing was trained


@pytest.mark.slow
@experiment_run
def test_tiny_experiment_split_over_two_jobs(tmp_path):
    nsa_job, dense_job = tmp_path / "nsa_job", tmp_path / "dense_job"
    nsa_job.mkdir(), dense_job.mkdir()
    run_tiny(nsa_job, "--steps", "6", "--only", "nsa")
    nsa_summary = json.loads((nsa_job / "retrieval" / "summary.json").read_text())
    assert set(nsa_summary["models"]) == {"nsa"} and nsa_summary["models"]["nsa"]["final"]["step"] == 6
    assert not list((nsa_job / "retrieval").glob("*.md"))  # no report before the dense twin
    pair = str(nsa_job / "retrieval" / "summary.json")
    run_tiny(dense_job, "--steps", "6", "--only", "dense", "--pair", pair)
    summary = json.loads((dense_job / "retrieval" / "summary.json").read_text())
    nsa, dense = summary["models"]["nsa"], summary["models"]["dense"]
    assert nsa == nsa_summary["models"]["nsa"] and dense["steps"] == nsa["steps"] == 6 and summary["equal_tokens"]
    assert dense["final"]["step"] == 6 and dense["validation_loss"] and not dense["gates"]
    report = (dense_job / "retrieval" / "nsa_vs_dense_retrieval_cpu.md").read_text()
    assert "| NSA |" in report and "| dense |" in report and "trained in separate jobs" in report
    assert not (dense_job / "retrieval" / "nsa").exists()  # NSA was not trained again


@pytest.mark.parametrize("arguments,message", [
    (["--only", "dense"], "--only dense and --pair SUMMARY go together"),
    (["--pair", "summary.json"], "--only dense and --pair SUMMARY go together"),
    (["--only", "dense", "--pair", "missing.json"], "--pair missing.json: no such file"),
])
def test_bad_pairing_fails_before_training(tmp_path, arguments, message):
    command = [sys.executable, "-m", "experiments.nsa_vs_dense", "--experiment", "retrieval", "--tiny",
               "--out", str(tmp_path), *arguments]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert message in done.stderr
    assert not (tmp_path / "retrieval" / "calibration").exists() and not (tmp_path / "retrieval" / "dense").exists()


def test_pairing_with_another_run_names_what_differs(tmp_path):
    nsa_summary = {"experiment": "retrieval", "overrides": ["retrieval.mean_gap=3"], "stages": [], "seq_length": 128,
                   "global_batch_size": 4, "tiny": True, "environment": {"device": "cpu"},
                   "models": {"nsa": {"final": {"loss": 1.0}}}}
    pair = tmp_path / "summary.json"
    pair.write_text(json.dumps(nsa_summary))
    command = [sys.executable, "-m", "experiments.nsa_vs_dense", "--experiment", "retrieval", "--tiny",
               "--out", str(tmp_path / "out"), "--only", "dense", "--pair", str(pair)]
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "its overrides is" in done.stderr and "must repeat the NSA run's arguments" in done.stderr
    assert not (tmp_path / "out" / "retrieval" / "dense").exists()


@pytest.mark.slow
@experiment_run
def test_deadline_stops_a_warm_up_stage_and_keeps_the_results(tmp_path):
    run_tiny(tmp_path, "--steps", "5", "--deadline-s", "1", "--stages", "32:100000")
    summary = json.loads((tmp_path / "retrieval" / "summary.json").read_text())
    nsa, dense = summary["models"]["nsa"], summary["models"]["dense"]
    assert nsa["stopped_in_stage"] == 1 and nsa["stopped_by_budget"] and 0 < nsa["steps"] < 100000
    assert 0 < dense["steps"] <= nsa["steps"]
    for run in (nsa, dense):
        assert run["final"]["step"] == run["steps"] and run["stages"] == []
    report = (tmp_path / "retrieval" / "nsa_vs_dense_retrieval_cpu.md").read_text()
    assert "The deadline stopped NSA in warm-up stage 1" in report
