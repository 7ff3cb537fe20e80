"""What a run tells its user: console and TensorBoard losses labelled and equal where they should be, the
end-of-run summary, the optional loss curve."""
from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from megatron_nsa.training.config import load_recipe
from megatron_nsa.training.loop import RunSummary
from megatron_nsa.training.metrics import Metrics


def test_console_loss_is_tensorboards_loss_mean(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = random.Random()
    losses = [rng.uniform(2.0, 6.0) for _ in range(6)]
    metrics = Metrics(6, 1024, 1e6, 1, torch.device("cpu"), str(tmp_path / "tb"), None, is_logger=True)
    for step, loss in enumerate(losses, start=1):
        metrics.step(step, loss, 1e-3, 1.0, 0.01)
        if step % 3 == 0:
            metrics.log(step, 1e-3, 1.0, {})
    metrics.close()
    console = [float(line.split("| loss ")[1].split(" ")[0]) for line in capsys.readouterr().out.splitlines()]
    means = [sum(losses[:3]) / 3, sum(losses[3:]) / 3]
    assert console == pytest.approx(means, abs=5e-5)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss_mean")] == [3, 6]
    assert [e.value for e in events.Scalars("train/loss_mean")] == pytest.approx(means, rel=1e-6)
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is not None, reason="matplotlib is installed here")
def test_without_matplotlib_no_curve_and_no_error(tmp_path):
    metrics = Metrics(2, 1024, 1e6, 1, torch.device("cpu"), None, None, is_logger=True)
    metrics.step(1, 3.0, 1e-3, 1.0, 0.01)
    assert metrics.write_loss_curve(str(tmp_path / "loss.png")) is None
    assert not (tmp_path / "loss.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (optional) is not installed")
def test_loss_curve_png(tmp_path):
    metrics = Metrics(2, 1024, 1e6, 1, torch.device("cpu"), None, None, is_logger=True)
    metrics.step(1, 3.0, 1e-3, 1.0, 0.01)
    metrics.step(2, 2.5, 1e-3, 1.0, 0.01)
    path = metrics.write_loss_curve(str(tmp_path / "loss.png"))
    assert path and (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_lines_and_resume_hints(tmp_path):
    recipe = load_recipe(None, ["training.train_steps=20"])
    summary = RunSummary(20, False, 2.5, 2.75, str(tmp_path / "step_00000020"), str(tmp_path),
                         str(tmp_path / "tensorboard"), None)
    lines = summary.lines(recipe)
    assert lines[0] == "done: step 20/20, loss 2.5000 (the last step's), validation loss 2.7500"
    assert f"  final checkpoint: {tmp_path / 'step_00000020'}" in lines
    assert any(line.startswith(f"  tensorboard --logdir {tmp_path / 'tensorboard'}") for line in lines)
    assert any(line.startswith(f"  next: python -m megatron_nsa.eval.loss --checkpoint {tmp_path}") for line in lines)
    assert summary.resume_hint(False) == "run the same command to resume"
    assert summary.resume_hint(True) == (f"to resume, run the same command with checkpoint.dir={tmp_path} "
                                         "checkpoint.new_run_subdir=false")
    assert RunSummary(20, False, None, None, None, None, None, None).lines(recipe) == ["done: step 20/20"]
