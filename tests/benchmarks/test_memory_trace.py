"""benchmarks/memory_trace.py: the allocator-history replay that names what is live at the peak."""
from __future__ import annotations

import random

from benchmarks.memory_trace import allocation_site, format_report, peak_report


def frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


RING = [frame("/usr/lib/torch/functional.py", 10, "zeros_like"),
        frame("/repo/megatron_nsa/context_parallel/exchange/ring.py", 412, "backward"),
        frame("/repo/benchmarks/bench_cp.py", 300, "step")]
KERNEL = [frame("/repo/kernels/selected.py", 77, "selected_backward")]


def alloc(addr, size, frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def free(addr, size, completed=True):
    return {"action": "free_completed" if completed else "free_requested", "addr": addr, "size": size, "frames": []}


def test_site_names_repository_frames_innermost_first():
    assert allocation_site(RING) == "ring.py:412 backward < bench_cp.py:300 step"
    assert allocation_site(RING, depth=1) == "ring.py:412 backward"
    assert allocation_site([frame("/usr/lib/x.py", 3, "f")]) == "x.py:3 f"
    assert allocation_site([]) == "(no Python frame)"


def test_peak_and_live_blocks_match_a_brute_force_replay():
    rng = random.Random(7)
    for trial in range(20):
        baseline = rng.randrange(1, 1000)
        events, live, next_addr = [], {}, 1
        for _ in range(60):
            if live and rng.random() < 0.45:
                addr = rng.choice(sorted(live))
                events.append(free(addr, live.pop(addr)))
                events.append(free(addr, 0, completed=False))  # a free_requested changes nothing by itself
            else:
                size = rng.randrange(1, 500)
                events.append(alloc(next_addr, size, rng.choice([RING, KERNEL])))
                live[next_addr] = size
                next_addr += 1
        # brute force: total and live set after every prefix
        best, best_live, running = baseline, {}, {}
        for event in events:
            if event["action"] == "alloc":
                running[event["addr"]] = event["size"]
            elif event["action"] == "free_completed":
                running.pop(event["addr"])
            total = baseline + sum(running.values())
            if total > best:
                best, best_live = total, dict(running)
        report = peak_report(events, baseline, top=100)
        assert report["peak_bytes"] == best
        assert sorted(row["bytes"] for row in report["live_at_peak"]) == sorted(best_live.values())
        assert sum(row["bytes"] for row in report["by_site"]) == sum(best_live.values())


def test_free_of_a_block_from_before_the_step_lowers_the_total():
    events = [free(999, 400), alloc(1, 300, RING), alloc(2, 50, KERNEL), free(1, 300)]
    report = peak_report(events, baseline_bytes=1000)
    assert report["peak_bytes"] == 1000  # 1000 - 400 + 300 + 50 = 950 never exceeds the start
    assert report["live_at_peak"] == []
    events = [alloc(1, 300, RING), free(999, 400), alloc(2, 50, KERNEL)]
    report = peak_report(events, baseline_bytes=1000)
    assert report["peak_bytes"] == 1300
    assert report["by_site"] == [{"bytes": 300, "site": allocation_site(RING)}]
    assert "ring.py:412 backward" in format_report(report)
