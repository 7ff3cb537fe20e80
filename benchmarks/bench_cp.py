"""NSA attention with context parallelism, every exchange mode side by side, forward + backward, on any number of GPUs.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node N -m benchmarks.bench_cp      # 128k, 256k, 512k tokens
    torchrun --nproc-per-node 2 -m benchmarks.bench_cp --tiny                  # CPU, gloo, torch backend
    python -m benchmarks.bench_cp --modes allgather,ring                      # one GPU, no torchrun needed

(from the repository root).

What runs: `nsa_attention_cp` (one layer's NSA core: 64 query heads, 4 KV heads shared by the
branches, head dim 128, bf16; l/d/l'/n/w = 32/16/64/16/512, mean compression) on each rank's
share of one sequence (batch 1) in the load-balanced layout, forward + backward with a random
output gradient, for each exchange mode of --modes (default: every mode of
megatron_nsa.context_parallel.exchange; a mode that cannot run at this size is reported with the
reason). The layer's projections are not included.

Reported per sequence length S (C = number of GPUs) and mode:
- step ms: median over iterations of the slowest rank's forward+backward (barrier before each);
  tokens/s = S / step.
- TFLOP/s per GPU: model FLOPs / step / C. FLOPs per query token t and query head (forward):
  2 (d_k + d_v) (N_cmp(t) + n l' + w) for the three branches, capped at t + 1 keys, plus 2 d_k N_cmp(t)
  for the scoring pass; backward 2.5x the branches' forward (no backward for scoring).
- peak GiB: torch.cuda.max_memory_allocated over the timed steps, the largest rank; beside it the
  gathered buffer of 'allgather' (S * h_g * (d_k + d_v) * 2 bytes, h_g = KV heads gathered at a
  time), the memory that 'ring' should save.
- bytes received per rank in one step, by kind, against each mode's formula (`mode_bytes`), with
  V = (C-1)/C * S * h * D * 2 (h KV heads, D = d_k + d_v, bf16):
  allgather: V forward, V backward re-gather, V backward reduce-scatter;
  ring / hierarchical: V forward, V backward, V of dK/dV travelling with the pieces;
  fetch: f V forward, f V backward re-fetch, f V of returned dK/dV (summed over ranks), where f, the
  fraction of remote selection blocks the rank's queries selected, is measured and reported;
  every mode: compressed (C-1)/C (S/d) h D 2, halos ~ 2 w h D 2.
- exposed communication: step ms minus the step ms with every collective replaced by local copies
  of the same shapes (LocalCommunicator: same kernels, no transfer). comm-only ms: the recorded
  collectives of one step replayed back to back without compute. hidden = 1 - exposed / comm-only.
- per-chunk compute (once per S, no communication, for benchmarks/cp_scale_model.py): the ms of
  each branch (forward + backward) on this rank's queries at this size: window, compressed +
  top-n, selected (against a whole-sequence K/V).
- with --memory-trace: the blocks live at one step's memory peak, by allocation site (rank 0's,
  printed and in the JSON).
- link bandwidth (C > 1): GB/s received per GPU by an all-gather and an all-to-all of 256 MiB.

Results: a table on stdout and benchmarks/results/bench_cp_<gpu>[_<variant>].{json,md} (gpu: h200 for one
GPU, 2xh200 for two; --tiny: cpu / 2xcpu, variant tiny); with C > 1 the table also shows the speed-up over
the one-GPU file of the same GPU and variant when one exists.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from benchmarks.memory_trace import format_report, trace_peak
from benchmarks.recording import RESULTS_DIR, gpu_tag, recorded, recorded_line, result_stem
from megatron_nsa import NSAConfig
from megatron_nsa.context_parallel import (
    Communicator, LoadBalancedLayout, LocalCommunicator, nsa_attention_cp, resolve_branches,
)
from megatron_nsa.context_parallel.exchange import EXCHANGE_MODES, build_exchange
from megatron_nsa.context_parallel.segments import build_plan
from megatron_nsa.reference import num_compressed_blocks, num_selection_blocks

ALL_MODES = EXCHANGE_MODES

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
    parser.add_argument("--modes", default=",".join(ALL_MODES),
                        help=f"comma-separated exchange modes to run side by side (default {','.join(ALL_MODES)})")
    parser.add_argument("--node-size", type=int, default=None,
                        help="CP ranks per node for 'hierarchical' (default: LOCAL_WORLD_SIZE, i.e. this node)")
    parser.add_argument("--memory-trace", action="store_true",
                        help="after timing each mode, record one step's allocator history and print what is live at "
                             "its peak, by allocation site (CUDA; benchmarks/memory_trace.py)")
    parser.add_argument("--variant", default=None,
                        help="what differs from the default run, the last part of the file names (--tiny: tiny)")
    parser.add_argument("--no-chunk-times", action="store_true", help="skip the per-branch compute timings")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 5, 2 with --tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2, 1 with --tiny)")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    args.variant = args.variant or ("tiny" if args.tiny else None)
    args.seq_lens = args.seq_lens or sizes["seq_lens"]
    args.backend = args.backend or ("torch" if args.tiny else "triton")
    args.iters = args.iters or (2 if args.tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.sizes = sizes
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.modes if m not in ALL_MODES]
    if unknown:
        parser.error(f"--modes: unknown mode(s) {unknown}; allowed: {list(ALL_MODES)}")
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
    """docs/design.md's forward volumes received per GPU (bytes)."""
    share = (cp_size - 1) / cp_size
    per_token = kv_heads * 2 * head_dim * item
    return {
        "compressed fwd": share * seq_len / config.compress_stride * per_token,
        "selection fwd": share * seq_len * per_token,
        "halo fwd": (2 * config.window_size * per_token) if cp_size > 1 else 0.0,
    }


# bytes kinds of the selection branch per mode (as counted by Communicator), each expected to be V
# (fetch: f V; its 'fetch bwd return' is f V summed over the ranks, not per rank)
SELECTION_KINDS = {
    "allgather": ("selection fwd", "selection bwd gather", "selection bwd reduce-scatter"),
    "ring": ("selection fwd", "selection bwd", "selection bwd grad"),
    "hierarchical": ("selection fwd", "selection bwd", "selection bwd grad"),
    "fetch": ("fetch fwd", "fetch bwd", "fetch bwd return"),
}


def mode_bytes(mode: str, seq_len: int, cp_size: int, config: NSAConfig, kv_heads: int, head_dim: int, item: int,
               fetch_fraction: float = 1.0) -> dict:
    """Per-mode formula of the bytes one GPU receives in one forward+backward step (see the module docstring)."""
    base = design_bytes(seq_len, cp_size, config, kv_heads, head_dim, item)
    volume = base["selection fwd"] * (fetch_fraction if mode == "fetch" else 1.0)
    out = {kind: volume for kind in SELECTION_KINDS[mode]}
    out.update({"compressed fwd": base["compressed fwd"], "compressed bwd": base["compressed fwd"],
                "halo fwd": base["halo fwd"], "halo bwd": base["halo fwd"]})
    return out


def fetch_fraction(bytes_received: dict, seq_len: int, cp_size: int, kv_heads: int, head_dim: int,
                   item: int) -> float:
    """Fraction of the remote selection K/V that 'fetch' moved forward (1.0: as much as an all-gather)."""
    remote = (cp_size - 1) / cp_size * seq_len * kv_heads * 2 * head_dim * item
    return bytes_received.get("fetch fwd", 0) / remote if remote else 0.0


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
        elif name == "all_to_all":
            (out_size, out_splits), (in_size, in_splits) = out_shape, in_shape
            buffers.append((name, (torch.empty(out_size, dtype=dtype, device=device), out_splits),
                            (torch.zeros(in_size, dtype=dtype, device=device), in_splits), kind))
        else:
            buffers.append((name, torch.empty(out_shape, dtype=dtype, device=device),
                            torch.zeros(in_shape, dtype=dtype, device=device), kind))

    def run():
        for name, a, b, kind in buffers:
            if name == "exchange":
                comm.exchange(a, b, kind)
            elif name == "all_gather":
                comm.all_gather(a, b, kind)
            elif name == "all_to_all":
                comm.all_to_all(a[0], b[0], a[1], b[1], kind)
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


def node_size_for(args, cp_size: int) -> int:
    return args.node_size or int(os.environ.get("LOCAL_WORLD_SIZE", cp_size))


def gathered_buffer_bytes(seq_len: int, args, item: int) -> int:
    """The selection K/V 'allgather' holds at once: S * h_g * (d_k + d_v) * item bytes."""
    sizes = args.sizes
    heads = min(args.head_group_size or sizes["kv_heads"], sizes["kv_heads"])
    return seq_len * heads * 2 * sizes["head_dim"] * item


def bench_mode(args, mode: str, seq_len: int, config: NSAConfig, device, inputs, grad_out) -> dict:
    """One mode at one length: timings, memory, bytes; raises ValueError when the mode cannot run here."""
    cp_size = dist.get_world_size()
    group = dist.group.WORLD
    node_size = node_size_for(args, cp_size)

    def step(exchange):
        out = nsa_attention_cp(*inputs, config, group, backend=args.backend, head_group_size=args.head_group_size,
                               exchange=exchange)
        torch.autograd.grad(out, inputs, grad_out)

    def make(comm):
        return build_exchange(mode, comm, node_size)

    real = make(Communicator(group))
    no_comm = make(LocalCommunicator(group))
    for _ in range(args.warmup):
        step(real)
        step(no_comm)

    counted = make(Communicator(group, record=True))
    step(counted)
    comm_only = replay_ms(counted.comm.recorded, group, device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_ms = statistics.median(timed_ms(lambda: step(real), args.iters, device))
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")],
                        device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    no_comm_ms = statistics.median(timed_ms(lambda: step(no_comm), args.iters, device))

    memory_trace = None
    if args.memory_trace and device.type == "cuda":
        memory_trace = trace_peak(lambda: step(real), device)
        if dist.get_rank() == 0:
            print(format_report(memory_trace, f"memory trace {mode} S={seq_len} rank 0: "), flush=True)

    sizes = args.sizes
    item = torch.empty(0, dtype=getattr(torch, sizes["dtype"])).element_size()
    exposed = max(0.0, step_ms - no_comm_ms)
    flops = model_flops(seq_len, config, sizes["heads"], sizes["head_dim"])
    got = dict(counted.comm.bytes_received)
    fraction = None
    if mode == "fetch":  # the slowest-moving rank's fraction (ranks differ: rank 0's early chunk needs little)
        local = fetch_fraction(got, seq_len, cp_size, sizes["kv_heads"], sizes["head_dim"], item)
        most = torch.tensor([local], dtype=torch.float64, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        fraction = float(most.item())
    return {
        "seq_len": seq_len, "gpus": cp_size, "mode": mode, "backend": args.backend,
        "head_group_size": args.head_group_size, "node_size": node_size if mode == "hierarchical" else None,
        "step_ms": step_ms, "tokens_per_s": seq_len / (step_ms / 1e3),
        "model_flops": flops, "tflops_per_gpu": flops / (step_ms / 1e3) / cp_size / 1e12,
        "peak_gib": float(peak.item()),
        "gathered_buffer_gib": gathered_buffer_bytes(seq_len, args, item) / 2**30,
        "bytes_received": got,
        "design_bytes": design_bytes(seq_len, cp_size, config, sizes["kv_heads"], sizes["head_dim"], item),
        "mode_bytes": mode_bytes(mode, seq_len, cp_size, config, sizes["kv_heads"], sizes["head_dim"], item,
                                 fraction if fraction is not None else 1.0),
        "fetch_fraction": fraction,
        "comm_only_ms": comm_only, "no_comm_step_ms": no_comm_ms, "exposed_ms": exposed,
        "exposed_fraction": exposed / step_ms,
        "hidden_fraction": (1 - exposed / comm_only) if comm_only > 0 else None,
        "memory_trace": memory_trace,
    }


def _fwd_bwd_ms(fn, tensors, reps: int, device) -> float:
    """Median ms of fn(*tensors) forward + backward (a random output gradient), this rank only."""
    def once():
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*leaves)
        torch.autograd.grad(out, leaves, torch.randn_like(out), allow_unused=True)

    once()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        once()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def chunk_times(args, seq_len: int, config: NSAConfig, device) -> dict:
    """Per-branch compute of this rank's queries at this size, no communication (ms, forward + backward).

    Queries: this rank's two chunks of one document of S tokens. Keys: random, of the sizes the
    branches see under CP (window: the chunk and its halo; compressed: all N_cmp(S) blocks;
    selected: all S tokens). The slowest rank's times are kept.
    """
    cp_size, rank = dist.get_world_size(), dist.get_rank()
    sizes = args.sizes
    dtype = getattr(torch, sizes["dtype"])
    branches = resolve_branches(args.backend, device)
    compute = branches.compute_dtype(dtype)
    layout = LoadBalancedLayout(seq_len, cp_size, config)
    plan = build_plan(layout, rank, 1, None, config)
    scale = config.scale_for(sizes["head_dim"])
    gen = torch.Generator(device=device).manual_seed(99 + rank)
    draw = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=compute)  # noqa: E731
    heads, kv_heads, dim = sizes["heads"], sizes["kv_heads"], sizes["head_dim"]
    num_cmp = num_compressed_blocks(seq_len, config)
    compressed_k, compressed_v = draw(num_cmp, kv_heads, dim), draw(num_cmp, kv_heads, dim)
    keys, values = draw(seq_len, kv_heads, dim), draw(seq_len, kv_heads, dim)
    reps = max(1, args.iters // 2)
    totals = {"window_ms": 0.0, "compressed_topk_ms": 0.0, "selected_ms": 0.0}
    for seg in plan.segments:
        length = seg.q_end - seg.q_start
        q = draw(length, heads, dim)
        q_pos = seg.query_positions(device)
        lo = max(seg.doc_start, seg.q_start - plan.win_halo)
        window_keys = keys[lo:seg.q_end]
        totals["window_ms"] += _fwd_bwd_ms(
            lambda q_, k_, v_: branches.window_attention(q_, k_, v_, q_pos, lo - seg.doc_start, config, scale)[0],
            (q, window_keys, values[lo:seg.q_end]), reps, device)
        selected = []

        def compressed(q_, k_, v_):
            out, _, scores = branches.compressed_attention(q_, k_, v_, q_pos, config, scale)
            selected.append(branches.select_blocks(scores, q_pos, num_selection_blocks(seq_len, config), kv_heads,
                                                   config))
            return out

        totals["compressed_topk_ms"] += _fwd_bwd_ms(compressed, (q, compressed_k, compressed_v), reps, device)
        idx = selected[-1]
        totals["selected_ms"] += _fwd_bwd_ms(
            lambda q_, k_, v_: branches.selected_attention(q_, k_, v_, idx, q_pos, config, scale)[0],
            (q, keys, values), reps, device)
    slowest = torch.tensor(list(totals.values()), dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return {"seq_len": seq_len, "gpus": cp_size, "local_tokens": 2 * layout.chunk_len,
            **dict(zip(totals, slowest.tolist()))}


def link_bandwidth(args, device) -> dict:
    """GB/s received per GPU by an all-gather and an all-to-all (C > 1), median of a few repetitions."""
    cp_size = dist.get_world_size()
    if cp_size == 1:
        return {}
    comm = Communicator(dist.group.WORLD)
    nbytes = (1 << 20) if args.tiny else (256 << 20)
    dtype = getattr(torch, args.sizes["dtype"])
    rows = nbytes // torch.empty(0, dtype=dtype).element_size() // cp_size
    inp = torch.randn(rows, dtype=torch.float32, device=device).to(dtype)
    gathered = inp.new_empty(cp_size * rows)
    exchanged = inp.new_empty(rows)
    splits = [rows // cp_size] * cp_size
    splits[-1] += rows - sum(splits)
    received = {"all_gather": (cp_size - 1) * rows * inp.element_size(),
                "all_to_all": (rows - splits[dist.get_rank()]) * inp.element_size()}
    ops = {"all_gather": lambda: comm.all_gather(gathered, inp, "probe"),
           "all_to_all": lambda: comm.all_to_all(exchanged, inp, splits, splits, "probe")}
    result = {}
    for name, op in ops.items():
        op()
        ms = statistics.median(timed_ms(op, 3 if args.tiny else 10, device))
        result[f"{name}_gb_per_s"] = received[name] / (ms / 1e3) / 1e9
    return result


def bench_length(args, seq_len: int, config: NSAConfig, device):
    """Every requested mode at one length; returns (rows, chunk times or None)."""
    cp_size, rank = dist.get_world_size(), dist.get_rank()
    layout = LoadBalancedLayout(seq_len, cp_size, config)  # raises for lengths that do not fit
    inputs, grad_out = local_inputs(args, 2 * layout.chunk_len, device, rank)
    rows = []
    for mode in args.modes:
        try:
            rows.append(bench_mode(args, mode, seq_len, config, device, inputs, grad_out))
        except (ValueError, torch.cuda.OutOfMemoryError) as error:  # e.g. a node size that does not divide C, OOM
            rows.append({"seq_len": seq_len, "gpus": cp_size, "mode": mode,
                         "error": type(error).__name__ + ": " + str(error).split("\n")[0][:200]})
            if rank == 0:
                print(f"{mode} at S={seq_len} failed: {rows[-1]['error']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    times = None
    if not args.no_chunk_times and any("step_ms" in row for row in rows):
        try:
            times = chunk_times(args, seq_len, config, device)
        except torch.cuda.OutOfMemoryError as error:
            times = {"seq_len": seq_len, "gpus": cp_size, "error": "OutOfMemoryError: " + str(error)[:120]}
            torch.cuda.empty_cache()
    return rows, times


# ---------------------------------------------------------------------------------------------
# Report


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.4g}"


def _gib(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: not measured (CPU)


def table(rows, speedups) -> str:
    lines = [
        "| S | GPUs | mode | step ms | tokens/s | TFLOP/s/GPU | peak GiB/GPU (gathered buffer) | selection recv MiB: "
        "fwd / bwd / bwd grads (formula) | other recv MiB: compressed / halo fwd (docs/design.md) | comm-only ms | "
        "step without comm ms | exposed ms (% of step) | speed-up vs 1 GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['seq_len']} | {row['gpus']} | {row.get('mode', 'allgather')} |"
        if "error" in row:
            lines.append(head + f" {row['error']} |" + " |" * 9)
            continue
        got, want = row["bytes_received"], row["mode_bytes"]
        kinds = SELECTION_KINDS[row["mode"]]
        selection = " / ".join(_mib(got.get(k, 0)) for k in kinds) + f" ({_mib(want[kinds[0]])} each"
        if row["fetch_fraction"] is not None:
            selection += f"; f = {row['fetch_fraction']:.3f}"
        selection += ")"
        other = " / ".join(f"{_mib(got.get(k, 0))} ({_mib(row['design_bytes'][k])})" for k in ("compressed fwd",
                                                                                              "halo fwd"))
        speed = speedups.get(f"{row['mode']} {row['seq_len']}")
        lines.append(
            f"{head} {row['step_ms']:.1f} | {row['tokens_per_s']:.3g} | {row['tflops_per_gpu']:.1f} | "
            f"{_gib(row['peak_gib'])} ({row['gathered_buffer_gib']:.2f}) | {selection} | {other} | "
            f"{row['comm_only_ms']:.1f} | {row['no_comm_step_ms']:.1f} | "
            f"{row['exposed_ms']:.1f} ({100 * row['exposed_fraction']:.1f}%) | {f'{speed:.2f}x' if speed else '-'} |"
        )
    return "\n".join(lines)


def chunk_table(times, bandwidth) -> str:
    lines = ["Per-chunk compute (ms per rank, forward + backward, no communication; for cp_scale_model.py):", "",
             "| S | GPUs | local tokens | window | compressed + top-n | selected |", "|---|---|---|---|---|---|"]
    for row in times:
        if "error" in row:
            lines.append(f"| {row['seq_len']} | {row['gpus']} | {row['error']} | | | |")
            continue
        lines.append(f"| {row['seq_len']} | {row['gpus']} | {row['local_tokens']} | {row['window_ms']:.1f} | "
                     f"{row['compressed_topk_ms']:.1f} | {row['selected_ms']:.1f} |")
    if bandwidth:
        lines += ["", "Link bandwidth received per GPU: " + ", ".join(f"{k.replace('_gb_per_s', '')} {v:.1f} GB/s"
                                                                     for k, v in bandwidth.items())]
    return "\n".join(lines)


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def speedups_over_one_gpu(rows, single_path: str) -> dict:
    """'mode S' -> step ms on one GPU / step ms here (rows of an older file without modes count as allgather)."""
    if not os.path.exists(single_path):
        return {}
    one_gpu = {f"{r.get('mode', 'allgather')} {r['seq_len']}": r for r in json.load(open(single_path))["rows"]
               if "step_ms" in r}
    out = {}
    for row in rows:
        key = f"{row['mode']} {row['seq_len']}"
        if "step_ms" in row and key in one_gpu:
            out[key] = one_gpu[key]["step_ms"] / row["step_ms"]
    return out


def main():
    args = parse_args()
    device = setup(args)
    config = NSAConfig(**args.sizes["config"])
    bandwidth = link_bandwidth(args, device)
    rows, times = [], []
    for seq_len in args.seq_lens:
        try:
            length_rows, length_times = bench_length(args, seq_len, config, device)
            rows += length_rows
            if length_times is not None:
                times.append(length_times)
        except ValueError as error:  # a length that does not fit (all ranks)
            rows.append({"seq_len": seq_len, "gpus": dist.get_world_size(), "mode": "-",
                         "error": type(error).__name__ + ": " + str(error).split("\n")[0][:200]})
    if dist.get_rank() == 0:
        name = device_name(device)
        cp_size = dist.get_world_size()
        base = result_stem("bench_cp", gpu_tag(cp_size, name), args.variant, args.out_dir)
        single = result_stem("bench_cp", gpu_tag(1, name), args.variant, args.out_dir) + ".json"
        speedups = speedups_over_one_gpu(rows, single) if cp_size > 1 else {}
        info = recorded(name)
        header = (f"NSA attention, context parallel (modes {', '.join(args.modes)}), {cp_size} x "
                  f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (tiny)'}; "
                  f"H_q={args.sizes['heads']}, H_kv={args.sizes['kv_heads']}, head dim {args.sizes['head_dim']}, "
                  f"{args.sizes['dtype']}, backend {args.backend}, head_group_size {args.head_group_size}, "
                  f"hierarchical node size {node_size_for(args, cp_size)}; torch {torch.__version__}")
        report = (header + "\n\n" + recorded_line(info) + "\n\n" + table(rows, speedups) + "\n\n"
                  + chunk_table(times, bandwidth))
        print(report, flush=True)
        os.makedirs(args.out_dir, exist_ok=True)
        with open(base + ".json", "w") as handle:
            json.dump({"header": header, "config": args.sizes, "rows": rows, "chunk_times": times,
                       "link_bandwidth": bandwidth, "speedup_vs_1gpu": speedups, "recorded": info}, handle,
                      indent=1)
        with open(base + ".md", "w") as handle:
            handle.write(report + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
