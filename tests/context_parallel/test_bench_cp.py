"""benchmarks/bench_cp.py --tiny (run as `python -m benchmarks.bench_cp`): the benchmark's logic on CPU (gloo,
torch backend)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _run(args, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if nproc is None:
        command = [sys.executable, "-m", "benchmarks.bench_cp", *args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={port}", "-m", "benchmarks.bench_cp", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@pytest.mark.slow
def test_tiny_benchmark_on_one_and_two_processes(tmp_path):
    _run(["--tiny", "--seq-lens", "256", "--out-dir", str(tmp_path)])
    stdout = _run(["--tiny", "--seq-lens", "256", "100", "--out-dir", str(tmp_path)], nproc=2)
    assert "| 256 | 2 | allgather |" in stdout and "| 256 | 2 | fetch |" in stdout
    one = json.loads((tmp_path / "bench_cp_cpu_tiny.json").read_text())
    two = json.loads((tmp_path / "bench_cp_2xcpu_tiny.json").read_text())
    for result in (one, two):
        assert result["recorded"]["commit"] and result["recorded"]["date"] and result["recorded"]["gpu"] == "cpu"
    assert f"Recorded at commit `{two['recorded']['commit']}`" in (tmp_path / "bench_cp_2xcpu_tiny.md").read_text()
    assert two["rows"][-1]["error"].startswith("ValueError: sequence length 100")
    by_mode = {row["mode"]: row for row in two["rows"] if row["seq_len"] == 256}
    assert set(by_mode) == {"allgather", "ring", "fetch", "hierarchical"}
    for result in [r for r in one["rows"] if "step_ms" in r] + list(by_mode.values()):
        assert result["step_ms"] > 0 and result["no_comm_step_ms"] > 0 and result["comm_only_ms"] >= 0
        assert 0 <= result["exposed_ms"] <= result["step_ms"]
    assert set(two["speedup_vs_1gpu"]) == {f"{mode} 256" for mode in by_mode}
    single = one["rows"][0]
    assert single["bytes_received"].get("selection fwd", 0) == 0  # one GPU: nothing crosses
    for mode, row in by_mode.items():
        got, formula, design = row["bytes_received"], row["mode_bytes"], row["design_bytes"]
        assert design["compressed fwd"] <= got["compressed fwd"] <= 1.2 * design["compressed fwd"], mode
        assert 0 < got["halo fwd"] <= design["halo fwd"], mode
        if mode == "fetch":
            assert 0 < row["fetch_fraction"] <= 1
            assert got["fetch fwd"] == got["fetch bwd"] <= formula["fetch fwd"] <= design["selection fwd"]
        else:  # all-gather, ring and hierarchical move the whole remote selection K/V three times
            kinds = [k for k in formula if k.startswith("selection")]
            assert len(kinds) == 3 and all(got[k] == formula[k] == design["selection fwd"] for k in kinds), (mode, got)
    # per-chunk compute and link bandwidth for the scale model
    for result in (one, two):
        times = result["chunk_times"][0]
        assert times["seq_len"] == 256 and times["local_tokens"] == 256 // result["rows"][0]["gpus"]
        assert times["window_ms"] > 0 and times["compressed_topk_ms"] > 0 and times["selected_ms"] > 0
    assert one["link_bandwidth"] == {}
    assert two["link_bandwidth"]["all_gather_gb_per_s"] > 0 and two["link_bandwidth"]["all_to_all_gb_per_s"] > 0


def test_unknown_mode_is_rejected(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_cp", "--tiny", "--modes", "allgather,spiral", "--out-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode != 0 and "unknown mode(s) ['spiral']" in done.stderr
