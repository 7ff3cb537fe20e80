"""benchmarks/bench_cp.py --tiny: the benchmark's logic on CPU (gloo, torch backend)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH = REPO_ROOT / "benchmarks" / "bench_cp.py"


def _run(args, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if nproc is None:
        command = [sys.executable, str(BENCH), *args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                   f"--master-port={port}", str(BENCH), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


@pytest.mark.slow
def test_tiny_benchmark_on_one_and_two_processes(tmp_path):
    _run(["--tiny", "--seq-lens", "256", "--out-dir", str(tmp_path)])
    stdout = _run(["--tiny", "--seq-lens", "256", "100", "--out-dir", str(tmp_path)], nproc=2)
    assert "| 256 | 2 |" in stdout
    one = json.loads((tmp_path / "bench_cp_tiny-cpu_x1.json").read_text())["rows"]
    two = json.loads((tmp_path / "bench_cp_tiny-cpu_x2.json").read_text())
    assert two["rows"][1]["error"].startswith("ValueError: sequence length 100")
    row = two["rows"][0]
    for result in (one[0], row):
        assert result["step_ms"] > 0 and result["no_comm_step_ms"] > 0 and result["comm_only_ms"] >= 0
        assert 0 <= result["exposed_ms"] <= result["step_ms"]
    assert set(two["speedup_vs_1gpu"]) == {"256"}
    assert one[0]["bytes_received"].get("selection fwd", 0) == 0  # one GPU: nothing crosses
    got, design = row["bytes_received"], row["design_bytes"]
    assert got["selection fwd"] == design["selection fwd"]
    assert got["selection bwd gather"] == got["selection bwd reduce-scatter"] == got["selection fwd"]
    assert design["compressed fwd"] <= got["compressed fwd"] <= 1.2 * design["compressed fwd"]
    assert 0 < got["halo fwd"] <= design["halo fwd"]
