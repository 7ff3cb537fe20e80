"""End-to-end runs of launch/train.sh on CPU (gloo): tensor parallelism, metrics, save/stop/resume.

Every run is configs/tiny.yaml shrunk to seconds (train_harness.FAST) on the standard-library corpus.
"""
from __future__ import annotations

import math
import signal
import time

import pytest
import torch

from train_harness import finish, read_records, run_training, start_training

STEPS = 6
# The same initial model under TP=1 and TP=2 (CPU initialization draws full weights, then shards them):
# the 258 byte ids pad to the same vocabulary (divisible by 1), and no SwiGLU (a TP shard of its fused
# fc1 weight holds gate and up rows of its own slice, so TP changes which rows are gates).
COMMON = [f"training.train_steps={STEPS}", f"optimizer.decay_steps={STEPS}", "model.make_vocab_size_divisible_by=1",
          "model.swiglu=false"]


def common(corpus_cache):
    return COMMON + [f"data.cache_dir={corpus_cache}"]


def assert_ok(run):
    assert run.returncode == 0, f"training failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def assert_close(a: dict, b: dict, rel: float):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=rel), (step, a[step], b[step])


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory, corpus_cache):
    workdir = tmp_path_factory.mktemp("tp1")
    run = run_training(workdir, common(corpus_cache) + [f"checkpoint.dir={workdir / 'ckpt'}"], nproc=1)
    assert_ok(run)
    return run, workdir


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, corpus_cache):
    workdir = tmp_path_factory.mktemp("tp2")
    run = run_training(workdir, common(corpus_cache) + ["parallel.tensor_model_parallel_size=2"], nproc=2)
    assert_ok(run)
    return run, workdir


def test_tiny_run_learns_and_reports(tp1_run):
    run, workdir = tp1_run
    losses = run.losses()
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 0.3, losses  # byte-level text: the first steps learn the byte statistics
    assert sorted(run.validation_losses()) == [3, 6]
    lines = [line for line in run.stdout.splitlines() if line.startswith("step") and "tok/s" in line]
    assert len(lines) == STEPS and all("left" in line and "gates cmp=" in line for line in lines)
    record = run.records[-2]
    assert record["tokens_per_second"] > 0 and record["tflops_per_gpu"] > 0 and record["peak_memory_gib"] > 0
    assert all(0 < record[f"gate_{b}"] < 1 for b in ("cmp", "slc", "win"))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "ckpt" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "val/loss", "perf/tokens_per_second", "perf/tflops_per_gpu",
            "perf/peak_memory_gib", "nsa/gate_cmp", "nsa/gate_slc", "nsa/gate_win"} <= tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([losses[s] for s in sorted(losses)])


def test_tensor_parallel_matches_one_process(tp1_run, tp2_run):
    """TP=2 (two gloo processes) trains the same model as one process: CPU initialization is TP-invariant."""
    assert_close(tp2_run[0].losses(), tp1_run[0].losses(), rel=2e-4)
    assert_close(tp2_run[0].validation_losses(), tp1_run[0].validation_losses(), rel=2e-4)


def test_context_parallel_matches_one_process(tmp_path, corpus_cache, tp1_run):
    """CP=2: each rank trains on its load-balanced share of every sequence (2 chunks of 16 of the 64 tokens)."""
    pytest.importorskip("megatron_nsa.context_parallel")
    run = run_training(tmp_path, common(corpus_cache) + ["parallel.context_parallel_size=2"], nproc=2)
    assert_ok(run)
    assert_close(run.losses(), tp1_run[0].losses(), rel=2e-4)
    assert_close(run.validation_losses(), tp1_run[0].validation_losses(), rel=2e-4)


def test_stop_and_resume_matches_uninterrupted(tmp_path, corpus_cache, tp2_run):
    """SIGTERM mid-run saves and stops; the same command resumes and continues with the same losses."""
    checkpoint = [f"checkpoint.dir={tmp_path / 'ckpt'}", "parallel.tensor_model_parallel_size=2"]
    # Far more steps than will run, so the signal always lands mid-run; decay_steps keeps the LR schedule.
    process = start_training(tmp_path, common(corpus_cache) + checkpoint + ["training.train_steps=1000"], nproc=2)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= 2 and "loss" in r for r in read_records(tmp_path)):
        assert process.poll() is None and time.time() < deadline, "first run ended before it could be stopped"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stopped = finish(process, tmp_path)
    assert_ok(stopped)
    assert "stopped by SIGTERM at step" in stopped.stderr
    stop_step = max(stopped.losses())
    assert 2 <= stop_step < STEPS, stop_step
    assert (tmp_path / "ckpt" / f"step_{stop_step:08d}").is_dir()

    (tmp_path / "metrics.jsonl").rename(tmp_path / "first_run.jsonl")
    resumed = run_training(tmp_path, common(corpus_cache) + checkpoint, nproc=2)
    assert_ok(resumed)
    assert f"resumed from {tmp_path / 'ckpt'}/step_{stop_step:08d} at step {stop_step}" in resumed.stdout
    assert sorted(resumed.losses()) == list(range(stop_step + 1, STEPS + 1))

    uninterrupted = tp2_run[0].losses()
    assert_close(stopped.losses(), {s: uninterrupted[s] for s in stopped.losses()}, rel=1e-6)
    assert_close(resumed.losses(), {s: uninterrupted[s] for s in resumed.losses()}, rel=1e-6)
    assert resumed.validation_losses()[STEPS] == pytest.approx(tp2_run[0].validation_losses()[STEPS], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (megatron DDP, optimizer, dist_checkpointing)")
def test_stop_and_resume_on_cuda(tmp_path, corpus_cache):
    """The CUDA path: megatron DDP, megatron's bf16 optimizer and schedules, dist_checkpointing."""
    gpu = ["training.device=cuda", "nsa.backend=torch"]
    reference = run_training(tmp_path / "reference", common(corpus_cache) + gpu, nproc=1)
    assert_ok(reference)
    first = run_training(tmp_path / "resume", common(corpus_cache) + gpu + [
        f"checkpoint.dir={tmp_path / 'resume' / 'ckpt'}", "training.train_steps=3"], nproc=1)
    assert_ok(first)
    assert (tmp_path / "resume" / "ckpt" / "step_00000003" / "meta.json").is_file()
    resumed = run_training(tmp_path / "resume", common(corpus_cache) + gpu + [
        f"checkpoint.dir={tmp_path / 'resume' / 'ckpt'}"], nproc=1)
    assert_ok(resumed)
    assert_close(resumed.losses(), reference.losses(), rel=1e-5)


def test_block_score_loss_is_trained_and_reported(tmp_path, corpus_cache):
    """nsa.block_score_loss_coeff > 0: every log line, the metrics file and TensorBoard carry the loss."""
    # 128 tokens of 16-token blocks: up to 5 blocks to rank after the forced ones
    run = run_training(tmp_path, ["training.train_steps=3", "optimizer.decay_steps=3", "data.seq_length=128",
                                  f"data.cache_dir={corpus_cache}", "nsa.block_score_loss_coeff=0.5",
                                  "nsa.block_score_loss_queries=32", f"checkpoint.dir={tmp_path / 'ckpt'}"])
    assert_ok(run)
    lines = [line for line in run.stdout.splitlines() if line.startswith("step") and "tok/s" in line]
    assert len(lines) == 3 and all("| block score loss " in line for line in lines)
    values = [record["block_score_loss"] for record in run.records if "block_score_loss" in record]
    assert len(values) == 3 and all(math.isfinite(v) and v > 0 for v in values)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "ckpt" / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("nsa/block_score_loss")] == pytest.approx(values)
