"""benchmarks/bench_layer.py: its dense baseline is exact causal GQA attention, and a toy-size run on
CPU (torch backend) measures every variant and writes its JSON and markdown."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from benchmarks import bench_layer as bench
from mcore_harness import REPO_ROOT, subprocess_env


def test_dense_baseline_is_causal_gqa_attention():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 19, 6, 8, dtype=torch.float64, generator=generator)
    k = torch.randn(2, 19, 2, 8, dtype=torch.float64, generator=generator)
    v = torch.randn(2, 19, 2, 5, dtype=torch.float64, generator=generator)
    out = bench.dense_causal_attention(q, k, v, 0.3, torch.nn.attention.SDPBackend.MATH)
    kv_head = torch.arange(6) // 3  # query head h reads KV head h // G
    scores = torch.einsum("bthd,bshd->bhts", q, k[:, :, kv_head]) * 0.3
    scores = scores.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v[:, :, kv_head])
    torch.testing.assert_close(out, expected)


def test_tiny_cpu_run_writes_results(tmp_path):
    command = [sys.executable, "-m", "benchmarks.bench_layer", "--tiny", "--device", "cpu", "--warmup", "0", "--iters", "1",
               "--out-dir", str(tmp_path)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    written = json.loads((tmp_path / "bench_layer_cpu_tiny.json").read_text())
    measured = {(r["variant"], r["seq_len"]) for r in written["results"] if r["step_ms"] > 0}
    assert measured == {(v, s) for v in ("nsa", "nsa_recompute", "dense") for s in (128, 256)}
    assert written["meta"]["backend"] == "torch"
    assert set(written["summary"]["256"]) >= {"nsa_speedup", "nsa_recompute_speedup"}
    report = (tmp_path / "bench_layer_cpu_tiny.md").read_text()
    assert "| 256 | dense |" in report
    assert f"Recorded at commit `{written['meta']['recorded']['commit']}`" in report
