"""What holds GPU memory at the peak of one step: torch's allocator history replayed.

    report = trace_peak(lambda: step(), device)       # CUDA only: records one call of step()
    print(format_report(report))

`trace_peak` records the caching allocator's alloc/free history (with Python stacks) while the
step runs, then `peak_report` replays the events: the bytes allocated before the step are the
baseline, every allocation adds its size and every completed free takes it away again, and the
blocks that were live at the highest point are listed, largest first, each with the frames of
this repository's code that allocated it, and summed by allocation site. Blocks allocated
before the step (inputs, weights, saved state of earlier steps) are the baseline and are not
listed; a free of one of them lowers the running total all the same.
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, Sequence

import torch

# Path parts that mark this repository's frames in an allocation's stack.
REPO_PATH_PARTS = ("megatron_nsa/", "kernels/", "benchmarks/")


def allocation_site(frames: Sequence[dict], depth: int = 3) -> str:
    """The innermost `depth` frames of this repository ('file:line fn < caller ...'), or the
    innermost frame of any file when none is ours."""
    ours = [f for f in frames if any(part in f.get("filename", "") for part in REPO_PATH_PARTS)]
    chosen = ours[:depth] or list(frames[:1])
    if not chosen:
        return "(no Python frame)"
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}" for f in chosen)


def peak_report(events: Sequence[dict], baseline_bytes: int, top: int = 12) -> Dict[str, object]:
    """Replay allocator events (dicts with action, addr, size, frames) -> the peak and what was live then.

    Returns peak_bytes (baseline included), baseline_bytes, live_at_peak (the `top` largest blocks
    allocated during the step and live at the peak: size and site) and by_site (bytes live at the
    peak per allocation site, largest first)."""
    current, peak, peak_event = baseline_bytes, baseline_bytes, -1
    live: Dict[int, dict] = {}
    for index, event in enumerate(events):
        current = _apply(event, live, current)
        if current > peak:
            peak, peak_event = current, index
    live = {}
    for event in events[:peak_event + 1]:
        _apply(event, live, 0)
    blocks = sorted(live.values(), key=lambda block: -block["size"])
    by_site: Dict[str, int] = collections.defaultdict(int)
    for block in blocks:
        by_site[allocation_site(block["frames"])] += block["size"]
    return {
        "peak_bytes": peak,
        "baseline_bytes": baseline_bytes,
        "live_at_peak": [{"bytes": b["size"], "site": allocation_site(b["frames"])} for b in blocks[:top]],
        "by_site": sorted(({"bytes": n, "site": s} for s, n in by_site.items()), key=lambda row: -row["bytes"])[:top],
    }


def _apply(event: dict, live: Dict[int, dict], current: int) -> int:
    """One event on the live blocks; returns the new running total."""
    action = event["action"]
    if action == "alloc":
        live[event["addr"]] = event
        return current + event["size"]
    if action == "free_completed":
        block = live.pop(event["addr"], None)
        return current - (block["size"] if block is not None else event["size"])
    return current


def trace_peak(step: Callable[[], None], device: torch.device, top: int = 12) -> Dict[str, object]:
    """Run step() once with the allocator history recorded; peak_report of it (this device)."""
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=1_000_000)
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][device.index if device.index is not None else torch.cuda.current_device()]
    return peak_report(events, baseline, top)


def format_report(report: Dict[str, object], title: str = "") -> str:
    """The report as text lines: peak, baseline, then bytes per allocation site."""
    gib = 2.0 ** 30
    lines = [f"{title}peak {report['peak_bytes'] / gib:.2f} GiB (before the step {report['baseline_bytes'] / gib:.2f} GiB);"
             " live at the peak, by allocation site:"]
    lines += [f"  {row['bytes'] / gib:7.3f} GiB  {row['site']}" for row in report["by_site"]]
    return "\n".join(lines)

