"""Runs of launch/train.sh on CPU for the training tests: tiny shapes, results read back from the
metrics file (one JSON line per step with log_interval=1)."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO_ROOT / "launch" / "train.sh"
TINY_RECIPE = REPO_ROOT / "configs" / "tiny.yaml"

# configs/tiny.yaml shrunk to seconds per run: 2 layers, 64 tokens, NSA blocks that all matter at 64 tokens.
FAST = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "data.seq_length=64", "nsa.compress_block_size=8", "nsa.compress_stride=4", "nsa.select_block_size=16",
    "nsa.select_count=3", "nsa.window_size=16", "training.micro_batch_size=2", "training.global_batch_size=4",
    "training.eval_interval=3", "training.eval_steps=1", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
    "logging.log_interval=1", "checkpoint.save_interval=0",
]


@dataclasses.dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    records: List[Dict]

    def losses(self) -> Dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    def validation_losses(self) -> Dict[int, float]:
        return {r["step"]: r["validation_loss"] for r in self.records if "validation_loss" in r}


def child_env(nproc: int, extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.update(NPROC=str(nproc), PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra or {})
    return env


def start_training(workdir: Path, overrides: List[str], nproc: int = 1, recipe: Path = TINY_RECIPE,
                   env: Optional[dict] = None) -> subprocess.Popen:
    """launch/train.sh RECIPE FAST... overrides, in workdir, writing workdir/metrics.jsonl."""
    args = [str(TRAIN_SH), str(recipe), *FAST, f"logging.metrics_file={workdir / 'metrics.jsonl'}", *overrides]
    return subprocess.Popen(args, cwd=workdir, env=child_env(nproc, env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_records(workdir: Path) -> List[Dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finish(process: subprocess.Popen, workdir: Path, timeout: int = 240) -> Run:
    stdout, stderr = process.communicate(timeout=timeout)
    return Run(process.returncode, stdout, stderr, read_records(workdir))


def run_training(workdir: Path, overrides: List[str], nproc: int = 1, timeout: int = 240, **kwargs) -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    return finish(start_training(workdir, overrides, nproc, **kwargs), workdir, timeout)


def run_cli(args: List[str], cwd: Path, env: Optional[dict] = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """One process of `python -m megatron_nsa.training.train ARGS` (no torchrun)."""
    full_env = child_env(1, env)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "megatron_nsa.training.train", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
