"""NSA attention with context parallelism (all-gather exchange), forward + backward, on any number of GPUs.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node N benchmarks/bench_cp.py      # 128k, 256k, 512k tokens
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --tiny                  # CPU, gloo, torch backend
    python benchmarks/bench_cp.py                                              # one GPU, no torchrun needed

What runs: `nsa_attention_cp` (one layer's NSA core: 64 query heads, 4 KV heads shared by the
branches, head dim 128, bf16; l/d/l'/n/w = 32/16/64/16/512, mean compression) on each rank's
share of one sequence (batch 1) in the load-balanced layout, forward + backward with a random
output gradient. The layer's projections are not included.

Reported per sequence length S (C = number of GPUs):
- step ms: median over iterations of the slowest rank's forward+backward (barrier before each);
  tokens/s = S / step.
- TFLOP/s per GPU: model FLOPs / step / C. FLOPs per query token t and query head (forward):
  2 (d_k + d_v) (N_cmp(t) + n l' + w) for the three branches, capped at t + 1 keys, plus 2 d_k N_cmp(t)
  for the scoring pass; backward 2.5x the branches' forward (no backward for scoring).
- peak GiB: torch.cuda.max_memory_allocated over the timed steps, the largest rank.
- bytes received per rank in one step, by exchange, against DESIGN.md (forward, bf16, h KV heads,
  D = d_k + d_v): compressed (C-1)/C (S/d) h D 2, selection (C-1)/C S h D 2, halos ~ 2 w h D 2.
  Backward moves the same again for the selection (re-gather) plus its reduce-scatter.
- exposed communication: step ms minus the step ms with every collective replaced by local copies
  of the same shapes (LocalCommunicator: same kernels, no transfer). comm-only ms: the recorded
  collectives of one step replayed back to back without compute. hidden = 1 - exposed / comm-only.

Results: a table on stdout and benchmarks/results/bench_cp_<gpu>_x<C>.{json,md}; with C > 1 the
table also shows the speed-up over the x1 file of the same GPU when one exists.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_nsa import NSAConfig  # noqa: E402
from megatron_nsa.context_parallel import (  # noqa: E402
    AllGatherExchange, Communicator, LoadBalancedLayout, LocalCommunicator, nsa_attention_cp,
)

FULL = dict(seq_lens=[131072, 262144, 524288], heads=64, kv_heads=4, head_dim=128, dtype="bfloat16",
            config=dict(compress_block_size=32, compress_stride=16, select_block_size=64, select_count=16,
                        window_size=512))
TINY = dict(seq_lens=[256, 512], heads=4, kv_heads=2, head_dim=16, dtype="float32",
            config=dict(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4,
                        window_size=32))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, gloo, torch backend, tiny shapes (logic check)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="tokens per sequence (default 128k 256k 512k)")
    parser.add_argument("--backend", choices=("torch", "triton"), help="default: triton, torch with --tiny")
    parser.add_argument("--head-group-size", type=int, default=None, help="KV heads gathered at a time (None: all)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 5, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2, 1 with --tiny)")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    args.seq_lens = args.seq_lens or sizes["seq_lens"]
    args.backend = args.backend or ("torch" if args.tiny else "triton")
    args.iters = args.iters or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.sizes = sizes
    return args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup(args):
    """Process group over every rank (torchrun) or a world of one; returns the device."""
    use_cuda = not args.tiny
    if use_cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny on a CPU machine")
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(minutes=20)
    if "RANK" in os.environ:
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Model arithmetic


def model_flops(seq_len: int, config: NSAConfig, heads: int, head_dim: int) -> float:
    """Forward + backward FLOPs of one NSA layer core on one sequence (see the module docstring)."""
    t = np.arange(seq_len, dtype=np.float64)
    l, d = config.compress_block_size, config.compress_stride
    visible_cmp = np.clip(np.floor((t - l + 1) / d) + 1, 0, None)
    keys = visible_cmp + np.minimum(config.select_count * config.select_block_size, t + 1)
    keys += np.minimum(config.window_size, t + 1)
    branches_fwd = 2 * (2 * head_dim) * keys.sum()
    scoring = 2 * head_dim * visible_cmp.sum()
    return heads * (3.5 * branches_fwd + scoring)


def design_bytes(seq_len: int, cp_size: int, config: NSAConfig, kv_heads: int, head_dim: int, item: int) -> dict:
    """DESIGN.md's forward volumes received per GPU (bytes)."""
    share = (cp_size - 1) / cp_size
    per_token = kv_heads * 2 * head_dim * item
    return {
        "compressed fwd": share * seq_len / config.compress_stride * per_token,
        "selection fwd": share * seq_len * per_token,
        "halo fwd": (2 * config.window_size * per_token) if cp_size > 1 else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_ms(fn, iters: int, device) -> list:
    """Per-iteration wall ms of fn, each the maximum over ranks (barrier before each iteration)."""
    times = []
    for _ in range(iters):
        dist.barrier()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def replay_ms(recorded, group, device, reps: int = 3) -> float:
    """The recorded collectives of one step, back to back, without compute (median of reps)."""
    comm = Communicator(group)
    buffers = []
    for name, out_shape, in_shape, dtype, kind in recorded:
        if name == "exchange":
            sends = [(torch.zeros(shape, dtype=dtype, device=device), peer) for shape, peer in in_shape]
            recvs = [(torch.empty(shape, dtype=dtype, device=device), peer) for shape, peer in out_shape]
            buffers.append((name, sends, recvs, kind))
        else:
            buffers.append((name, torch.empty(out_shape, dtype=dtype, device=device),
                            torch.zeros(in_shape, dtype=dtype, device=device), kind))

    def run():
        for name, a, b, kind in buffers:
            if name == "exchange":
                comm.exchange(a, b, kind)
            elif name == "all_gather":
                comm.all_gather(a, b, kind)
            else:
                comm.reduce_scatter(a, b, kind)

    run()
    return statistics.median(timed_ms(run, reps, device))


# ---------------------------------------------------------------------------------------------
# One sequence length


def local_inputs(args, local_len: int, device, rank: int):
    sizes = args.sizes
    dtype = getattr(torch, sizes["dtype"])
    gen = torch.Generator(device=device).manual_seed(1234 + rank)

    def draw(*shape, uniform=False):
        make = torch.rand if uniform else torch.randn
        return make(*shape, generator=gen, device=device, dtype=dtype).requires_grad_()

    q = draw(1, local_len, sizes["heads"], sizes["head_dim"])
    k = draw(1, local_len, sizes["kv_heads"], sizes["head_dim"])
    v = draw(1, local_len, sizes["kv_heads"], sizes["head_dim"])
    gates = draw(1, local_len, sizes["heads"], 3, uniform=True)
    grad_out = torch.randn(1, local_len, sizes["heads"], sizes["head_dim"], generator=gen, device=device,
                           dtype=dtype)
    return (q, k, v, gates), grad_out


def bench_one(args, seq_len: int, config: NSAConfig, device) -> dict:
    cp_size, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    layout = LoadBalancedLayout(seq_len, cp_size, config)  # raises for lengths that do not fit
    inputs, grad_out = local_inputs(args, 2 * layout.chunk_len, device, rank)

    def step(exchange):
        out = nsa_attention_cp(*inputs, config, group, backend=args.backend, head_group_size=args.head_group_size,
                               exchange=exchange)
        torch.autograd.grad(out, inputs, grad_out)

    real = AllGatherExchange(Communicator(group))
    no_comm = AllGatherExchange(LocalCommunicator(group))
    for _ in range(args.warmup):
        step(real)
        step(no_comm)

    counted = AllGatherExchange(Communicator(group, record=True))
    step(counted)
    comm_only = replay_ms(counted.comm.recorded, group, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms = statistics.median(timed_ms(lambda: step(real), args.iters, device))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")],
                        device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    no_comm_ms = statistics.median(timed_ms(lambda: step(no_comm), args.iters, device))

    sizes = args.sizes
    item = torch.empty(0, dtype=getattr(torch, sizes["dtype"])).element_size()
    exposed = max(0.0, step_ms - no_comm_ms)
    flops = model_flops(seq_len, config, sizes["heads"], sizes["head_dim"])
    return {
        "seq_len": seq_len, "gpus": cp_size, "backend": args.backend, "head_group_size": args.head_group_size,
        "step_ms": step_ms, "tokens_per_s": seq_len / (step_ms / 1e3),
        "model_flops": flops, "tflops_per_gpu": flops / (step_ms / 1e3) / cp_size / 1e12,
        "peak_gib": float(peak.item()),
        "bytes_received": dict(counted.comm.bytes_received),
        "design_bytes": design_bytes(seq_len, cp_size, config, sizes["kv_heads"], sizes["head_dim"], item),
        "comm_only_ms": comm_only, "no_comm_step_ms": no_comm_ms, "exposed_ms": exposed,
        "exposed_fraction": exposed / step_ms,
        "hidden_fraction": (1 - exposed / comm_only) if comm_only > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# Report


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.4g}"


def _gib(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: not measured (CPU)


def table(rows, speedups) -> str:
    lines = [
        "| S | GPUs | step ms | tokens/s | TFLOP/s/GPU | peak GiB/GPU | fwd recv MiB: selection / compressed / "
        "halo (DESIGN.md) | bwd recv MiB | comm-only ms | step without comm ms | exposed ms (% of step) | "
        "speed-up vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['seq_len']} | {row['gpus']} | {row['error']} |" + " |" * 9)
            continue
        got, want = row["bytes_received"], row["design_bytes"]
        fwd = " / ".join(f"{_mib(got.get(k, 0))} ({_mib(want[k])})" for k in ("selection fwd", "compressed fwd",
                                                                                "halo fwd"))
        bwd = sum(v for k, v in got.items() if "bwd" in k)
        speed = speedups.get(row["seq_len"])
        lines.append(
            f"| {row['seq_len']} | {row['gpus']} | {row['step_ms']:.1f} | {row['tokens_per_s']:.3g} | "
            f"{row['tflops_per_gpu']:.1f} | {_gib(row['peak_gib'])} | {fwd} | {_mib(bwd)} | "
            f"{row['comm_only_ms']:.1f} | {row['no_comm_step_ms']:.1f} | "
            f"{row['exposed_ms']:.1f} ({100 * row['exposed_fraction']:.1f}%) | {f'{speed:.2f}x' if speed else '-'} |"
        )
    return "\n".join(lines)


def device_slug(device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "tiny-cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main():
    args = parse_args()
    device = setup(args)
    config = NSAConfig(**args.sizes["config"])
    rows = []
    for seq_len in args.seq_lens:
        try:
            rows.append(bench_one(args, seq_len, config, device))
        except (ValueError, torch.cuda.OutOfMemoryError) as error:  # a length that does not fit, or OOM (all ranks)
            rows.append({"seq_len": seq_len, "gpus": dist.get_world_size(), "error": type(error).__name__ + ": "
                         + str(error).split("\n")[0][:200]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        slug = device_slug(device)
        base = os.path.join(args.out_dir, f"bench_cp_{slug}_x{dist.get_world_size()}")
        single = os.path.join(args.out_dir, f"bench_cp_{slug}_x1.json")
        speedups = {}
        if dist.get_world_size() > 1 and os.path.exists(single):
            one_gpu = {r["seq_len"]: r for r in json.load(open(single))["rows"] if "error" not in r}
            speedups = {r["seq_len"]: one_gpu[r["seq_len"]]["step_ms"] / r["step_ms"]
                        for r in rows if "error" not in r and r["seq_len"] in one_gpu}
        header = (f"NSA attention, context parallel (all-gather), {dist.get_world_size()} x "
                  f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (tiny)'}; "
                  f"H_q={args.sizes['heads']}, H_kv={args.sizes['kv_heads']}, head dim {args.sizes['head_dim']}, "
                  f"{args.sizes['dtype']}, backend {args.backend}, head_group_size {args.head_group_size}; "
                  f"torch {torch.__version__}")
        report = header + "\n\n" + table(rows, speedups)
        print(report, flush=True)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(base + ".json", "w") as handle:
            json.dump({"header": header, "rows": rows, "speedup_vs_1gpu": speedups}, handle, indent=1)
        with open(base + ".md", "w") as handle:
            handle.write(report + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
