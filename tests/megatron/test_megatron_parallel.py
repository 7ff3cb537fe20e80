"""Tensor, sequence and pipeline parallelism of the NSA GPT model: 2 processes under torchrun, one
launch for all scenarios (megatron_parallel_worker.py); the tests read its measurements.

CPU (default): gloo, torch backend, float32. With MEGATRON_NSA_TEST_GPUS=1 on a machine with 2 GPUs:
NCCL, triton backend, GPU-sized heads and blocks, float32 (Triton's dots run in TF32, hence looser
tolerances there).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mcore_harness import run_torchrun

WORKER = Path(__file__).with_name("megatron_parallel_worker.py")
ON_GPUS = os.environ.get("MEGATRON_NSA_TEST_GPUS") == "1"
LOSS_RTOL, GRAD_RTOL = (1e-4, 5e-3) if ON_GPUS else (1e-5, 1e-4)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    device_args = ["--device", "cuda", "--backend", "triton"] if ON_GPUS else []
    result = run_torchrun(WORKER, nproc=2, args=[out, "--scenarios", "tp,pp", *device_args])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", ["tp2", "tp2_sp"])
def test_tensor_parallel_matches_tp1(measured, layout):
    """Same master weights at TP=1 and TP=2 (with / without sequence parallelism): same loss and the
    same full gradients, the shared compression parameters and per-head q/k norms included (summed over
    the TP group)."""
    reference, run = measured["tp"]["tp1"], measured["tp"][layout]
    assert run["weight_max_abs_diff"] == 0.0, "the TP=2 model does not hold the TP=1 weights"
    assert abs(run["loss"] - reference["loss"]) <= LOSS_RTOL * abs(reference["loss"])
    assert reference["compressor_grad_abs_max"] > 0
    for shared in (".compressor.", ".q_layernorm.", ".k_layernorm."):
        assert any(shared in name for name in run["grad_max_rel_diff"]), shared
    worst = {name: diff for name, diff in run["grad_max_rel_diff"].items() if diff > GRAD_RTOL}
    assert not worst, f"gradients differ from TP=1: {worst}"


def test_pipeline_parallel_trains_like_pp1(measured):
    """PP=2 (one layer per stage, Megatron's 1F1B schedule, 2 micro-batches) from the PP=1 weights:
    the same loss at every one of 3 optimizer steps."""
    run = measured["pp"]
    assert run["pp2_layers_per_stage"] == [1, 1]
    assert len(run["pp1_losses"]) == len(run["pp2_losses"]) == 3
    for step, (pp1, pp2) in enumerate(zip(run["pp1_losses"], run["pp2_losses"])):
        assert abs(pp1 - pp2) <= LOSS_RTOL * abs(pp1), f"step {step}: PP=1 loss {pp1}, PP=2 loss {pp2}"
