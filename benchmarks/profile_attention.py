"""Where one NSA forward+backward (Triton) spends its time on one GPU: the host's time to queue the step,
the GPU's kernel time, the wall time, kernels per step, and the kernels that take the most GPU time.

    python -m benchmarks.profile_attention                          # 64/4/128/128 and 16/4/128/128 at 8k
    python -m benchmarks.profile_attention --shapes main --seqlens 4096,65536 --top 20

When the host time is close to the wall time and above the kernel time, the step is bound by the host
(Python, launches, bookkeeping), not by the GPU. Shapes and NSA settings as in bench_attention.py.
Writes benchmarks/results/profile_attention_<gpu>[_<variant>].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from benchmarks.bench_attention import SHAPES, nsa_inputs
from benchmarks.recording import RESULTS_DIR, gpu_tag, recorded, recorded_line, result_stem
from megatron_nsa import NSAConfig, nsa_attention


def nsa_step(seq_len, shape, config):
    """A closure running one NSA forward+backward on fresh random inputs."""
    q, k, v, gates = nsa_inputs(seq_len, shape)
    grad_out = torch.randn(*q.shape[:3], shape[3], device="cuda", dtype=torch.bfloat16)

    def step():
        out = nsa_attention(q, k, v, gates, config, backend="triton")
        torch.autograd.grad(out, (q, k, v, gates), grad_out)
    return step


def host_and_wall_ms(step, reps):
    """Medians over reps steps of (ms for the host to queue one step, ms until the GPU is done). Each
    step starts on an idle GPU, so the host never waits on a full launch queue."""
    host, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return statistics.median(host) * 1e3, statistics.median(wall) * 1e3


def kernel_rows(events, steps):
    """Per GPU kernel name: ms and launches per step, most time first. `events`: torch.profiler's
    key_averages() (entries with key, count, self_device_time_total in us and device_type)."""
    rows = [dict(kernel=e.key, ms=e.self_device_time_total / steps / 1e3, launches=e.count / steps)
            for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])


def profile(seq_len, shape, config, reps, steps):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step = nsa_step(seq_len, shape, config)
    for _ in range(3):  # compile and fill the layout caches
        step()
    host_ms, wall_ms = host_and_wall_ms(step, reps)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = kernel_rows(prof.key_averages(), steps)
    return dict(host_ms=host_ms, wall_ms=wall_ms, gpu_ms=sum(r["ms"] for r in kernels),
                launches=sum(r["launches"] for r in kernels), kernels=kernels)


def markdown(rows, gpu, top, info=None):
    """The report; `info` (recording.recorded()) adds the commit and date line."""
    lines = [f"### One NSA forward+backward (Triton) on {gpu}: host against GPU time, bf16, batch 1", "",
             *([recorded_line(info), ""] if info else []),
             "| H_q/H_kv/d_k/d_v | T | kernels per step | host ms to queue | GPU kernel ms | wall ms | bound by |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bound = "host" if r["host_ms"] > r["gpu_ms"] else "GPU"
        lines.append(f"| {r['shape']} | {r['seq_len']} | {r['launches']:.0f} | {r['host_ms']:.2f} | "
                     f"{r['gpu_ms']:.2f} | {r['wall_ms']:.2f} | {bound} |")
    for r in rows:
        lines += ["", f"#### Kernels by GPU time, {r['shape']}, T = {r['seq_len']}", "",
                  "| ms per step | launches per step | kernel |", "|---|---|---|"]
        lines += [f"| {k['ms']:.3f} | {k['launches']:g} | `{k['kernel'][:100]}` |" for k in r["kernels"][:top]]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="main,small-group")
    parser.add_argument("--seqlens", default="8192")
    parser.add_argument("--reps", type=int, default=10, help="steps timed for host and wall time")
    parser.add_argument("--steps", type=int, default=5, help="steps under the profiler")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per case")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--variant", default=None, help="what differs from the default run (file name suffix)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.profile_attention needs a CUDA GPU")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        sys.exit(f"--shapes: unknown {unknown}; allowed: {sorted(SHAPES)}")
    gpu, config, rows = torch.cuda.get_device_name(), NSAConfig(), []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        for seq_len in (int(s) for s in args.seqlens.split(",")):
            row = dict(shape="/".join(map(str, shape)), seq_len=seq_len,
                       **profile(seq_len, shape, config, args.reps, args.steps))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), flush=True)
    stem = result_stem("profile_attention", gpu_tag(), args.variant, args.out_dir)
    info = recorded(gpu)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows, "recorded": info}, f, indent=1)
    table = markdown(rows, gpu, args.top, info)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
