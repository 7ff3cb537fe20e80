"""A GPTModel of NSA layers: CP = 2 and TP = 2 x CP = 2 against TP = CP = 1 (torchrun, gloo, CPU);
TP x CP with the 'allgather' and the 'ring' exchange (nsa_cp_exchange)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("megatron_cp_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("tp,cp,modes", [(1, 2, "allgather"), (2, 2, "allgather,ring")])
def test_gpt_model_with_cp_matches_without(tp, cp, modes, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * cp}",
               f"--master-port={_free_port()}", str(WORKER), str(out), str(tp), str(cp), modes]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = json.loads(out.read_text())
    assert set(results) == {f"{kind}/{mode}" for kind in ("unpacked", "packed") for mode in modes.split(",")}
    for kind, result in results.items():
        assert result["loss_abs_max"] > 1.0, kind  # a real loss, not zeros
        # float64 model; Megatron's vocab-parallel cross-entropy (TP > 1) works in float32
        assert result["loss_max_abs_diff"] < 1e-6 * result["loss_abs_max"], (kind, result["loss_max_abs_diff"])
        worst = max(result["grad_max_rel_diff"].items(), key=lambda item: item[1])
        assert worst[1] < 1e-6, (kind, worst)
        assert any(".compressor." in name for name in result["grad_max_rel_diff"]), "no compressor parameters"
