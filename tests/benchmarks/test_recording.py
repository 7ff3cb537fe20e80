"""benchmarks/recording.py: result names <benchmark>_<gpu>[_<variant>] with a short GPU tag, and the commit and
date each result records."""
from __future__ import annotations

import datetime
import os
import subprocess

import pytest

from benchmarks.recording import REPO, gpu_model_tag, gpu_tag, recorded, recorded_line, result_stem


@pytest.mark.parametrize("name, tag", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA H100 PCIe", "h100"), ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA L40S", "l40s"), ("cpu", "cpu"),
])
def test_gpu_model_tag(name, tag):
    assert gpu_model_tag(name) == tag


def test_gpu_tag_counts_gpus_and_refuses_nonsense():
    assert gpu_tag(1, "NVIDIA H200") == "h200" and gpu_tag(2, "NVIDIA H200") == "2xh200"
    assert gpu_tag(8, "NVIDIA H100 80GB HBM3") == "8xh100" and gpu_tag(2, "cpu") == "2xcpu"
    with pytest.raises(ValueError, match="num_gpus=0 is not allowed"):
        gpu_tag(0, "NVIDIA H200")
    with pytest.raises(ValueError, match="holds no model number"):
        gpu_model_tag("NVIDIA Graphics Device")


def test_result_stem():
    assert result_stem("bench_cp", "2xh200", out_dir="out") == os.path.join("out", "bench_cp_2xh200")
    assert result_stem("tune_kernels", "h100", "64-4-192-128", "out") == os.path.join("out",
                                                                                      "tune_kernels_h100_64-4-192-128")
    assert result_stem("bench_layer", "h100").startswith(os.path.join(REPO, "benchmarks", "results", ""))


def test_recorded_names_this_commit_and_today():
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    info = recorded("NVIDIA H200")
    assert head.stdout.strip().startswith(info["commit"].removesuffix("-dirty"))
    assert len(info["commit"].removesuffix("-dirty")) >= 7
    assert info["date"] == datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    assert recorded_line(info) == f"Recorded at commit `{info['commit']}` on {info['date']} (NVIDIA H200)."
