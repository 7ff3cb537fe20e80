"""How benchmark results are named and what they record about their run.

Files are `<benchmark>_<gpu>[_<variant>].{json,md,png}` in RESULTS_DIR: `gpu` is a short lower-case
tag of the GPU model (`h100`, `h200`), prefixed by the count when a run uses several (`2xh200`), and
`cpu` without one. Each JSON holds `recorded` (commit, date, GPU) and each markdown report a line
saying the same, so that a result can be traced to the code that produced it.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from typing import Dict, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
_VENDOR_WORDS = {"nvidia", "tesla", "geforce", "quadro", "amd", "radeon", "instinct"}


def gpu_model_tag(device_name: str) -> str:
    """The model in a device name, lower case: 'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200',
    'NVIDIA A100-SXM4-80GB' -> 'a100', 'cpu' -> 'cpu'. The first word after the vendor's that holds a
    digit; ValueError for a name without one."""
    if device_name.strip().lower() == "cpu":
        return "cpu"
    words = [w for w in re.split(r"[\s\-_/]+", device_name.lower()) if w and w not in _VENDOR_WORDS]
    for word in words:
        if any(c.isdigit() for c in word) and not word.endswith("gb"):
            return re.sub(r"[^a-z0-9]", "", word)
    raise ValueError(f"device name {device_name!r} holds no model number to name results by")


def gpu_tag(num_gpus: int = 1, device_name: Optional[str] = None) -> str:
    """The `<gpu>` part of a result name: 'h100' for one GPU, '2xh200' for two; 'cpu' ('2xcpu') for a run on
    CPUs. device_name: 'cpu', or a GPU's name; default torch.cuda's name of the current device, 'cpu'
    without CUDA."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus={num_gpus} is not allowed: at least 1")
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    model = gpu_model_tag(device_name)
    return model if num_gpus == 1 else f"{num_gpus}x{model}"


def result_stem(benchmark: str, gpu: str, variant: Optional[str] = None, out_dir: str = RESULTS_DIR) -> str:
    """out_dir/<benchmark>_<gpu>[_<variant>]: add .json, .md or .png."""
    name = f"{benchmark}_{gpu}" + (f"_{variant}" if variant else "")
    return os.path.join(out_dir, name)


def current_commit() -> str:
    """The repository's commit (short hash), with '-dirty' when tracked files differ from it; 'unknown'
    outside a git checkout."""
    try:
        described = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=7"],
                                   capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() if described.returncode == 0 and described.stdout.strip() else "unknown"


def recorded(device_name: Optional[str] = None) -> Dict[str, str]:
    """What a result file records about its run: commit, date (UTC) and, when known, the GPU's name."""
    info = {"commit": current_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
    if device_name:
        info["gpu"] = device_name
    return info


def recorded_line(info: Dict[str, str]) -> str:
    """The markdown report's line for recorded(): 'Recorded at commit `abc1234` on 2026-12-06 (NVIDIA H200).'"""
    where = f" ({info['gpu']})" if info.get("gpu") else ""
    return f"Recorded at commit `{info['commit']}` on {info['date']}{where}."
