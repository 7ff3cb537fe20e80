"""One Megatron-Core transformer layer, forward + backward: NSA against dense attention, one process.

    python -m benchmarks.bench_layer                         # H100 sweep: 16k, 32k, 64k, bf16, triton
    python -m benchmarks.bench_layer --tiny --device cpu     # the same logic at toy size (torch backend)

Layer: hidden 2560, 64 query heads in 4 KV groups, d_k 192, d_v 128, SwiGLU MLP of width 6912, RMSNorm,
RoPE, batch 1 ([s, 1, h]). Variants, each a fresh layer from the same spec function:
  nsa            NSASelfAttention with the NSA core (NSA defaults l/d/l'/n/w = 32/16/64/16/512)
  nsa_recompute  the same with selective recompute of the NSA core (Megatron's 'core_attn')
  dense          the same layer (same projections and RoPE) with a dense causal core: torch SDPA
                 (cuDNN backend when it runs, else the next that does), K/V expanded to all heads,
                 V zero-padded to d_k; the gate columns of the projection are computed and unused.
Times are medians of CUDA-event timings; peak memory is torch.cuda.max_memory_allocated during the
timed steps (weights, gradients and activations). Results: benchmarks/results/bench_layer_<gpu>[_<variant>].{json,md}
(--tiny: variant tiny).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.recording import RESULTS_DIR, gpu_tag, recorded, recorded_line, result_stem

PAPER_LAYER = dict(hidden_size=2560, num_attention_heads=64, num_query_groups=4, nsa_qk_head_dim=192,
                   nsa_v_head_dim=128, ffn_hidden_size=6912)
TINY_LAYER = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, nsa_qk_head_dim=24, nsa_v_head_dim=16,
                  ffn_hidden_size=96, nsa_compress_block_size=16, nsa_compress_stride=8, nsa_select_block_size=16,
                  nsa_select_count=4, nsa_window_size=32)
SDPA_ORDER = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
              SDPBackend.MATH)
VARIANTS = ("nsa", "nsa_recompute", "dense")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="default: 16384 32768 65536")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--backend", choices=("triton", "torch"), default=None,
                        help="NSA core backend (default: triton on cuda, torch on cpu)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16 on cuda")
    parser.add_argument("--compression", choices=("mean", "linear", "mlp"), default="mean")
    parser.add_argument("--separate-kv", action="store_true", help="separate K/V per branch (the paper's choice)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (seq 128, 256), for checking the script")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--variant", default=None,
                        help="what differs from the default sweep, the last part of the file names (--tiny: tiny)")
    args = parser.parse_args(argv)
    args.variant = args.variant or ("tiny" if args.tiny else None)
    if args.seq_lens is None:
        args.seq_lens = [128, 256] if args.tiny else [16384, 32768, 65536]
    if args.backend is None:
        args.backend = "triton" if args.device == "cuda" else "torch"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --tiny --device cpu to check the script")
    return args


def init_single_process(device: str) -> None:
    """A one-process world with Megatron's parallel state (TP = PP = CP = 1)."""
    from megatron.core import parallel_state

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo",
                                         init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)


class DenseSDPACore(torch.nn.Module):
    """Dense causal attention behind the NSA core's interface: q [b, t, H_q, d_k], k / v (cmp, slc, win)
    triples of [b, t, H_kv, d] (the selection branch's rotated keys are used), gates ignored."""

    sdpa_backend = None  # chosen once by pick_sdpa_backend

    def __init__(self, config, **builder_kwargs):
        super().__init__()

    def forward(self, q, k, v, gates, config, cu_seqlens=None, compressor=None, backend=None, compressed_rope=None):
        return dense_causal_attention(q, k[1], v[1], config.scale_for(q.shape[-1]), self.sdpa_backend)


def dense_causal_attention(q, k, v, scale, sdpa_backend):
    """q [b, t, H_q, d_k], k [b, t, H_kv, d_k], v [b, t, H_kv, d_v] -> [b, t, H_q, d_v]."""
    group = q.shape[2] // k.shape[2]
    value_dim = v.shape[-1]
    heads_first = lambda t: t.transpose(1, 2)  # noqa: E731  [b, t, H, d] -> [b, H, t, d]
    k = heads_first(k.repeat_interleave(group, dim=2))
    v = F.pad(heads_first(v.repeat_interleave(group, dim=2)), (0, q.shape[-1] - value_dim))
    with sdpa_kernel([sdpa_backend]):
        out = F.scaled_dot_product_attention(heads_first(q), k, v, is_causal=True, scale=scale)
    return heads_first(out)[..., :value_dim]


def pick_sdpa_backend(device, dtype, head_dim) -> SDPBackend:
    """The first SDPA backend in SDPA_ORDER that runs forward + backward at this head dim."""
    q = torch.randn(1, 4, 256, head_dim, device=device, dtype=dtype, requires_grad=True)
    for candidate in SDPA_ORDER:
        try:
            with sdpa_kernel([candidate]):
                F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
            return candidate
        except RuntimeError:
            continue
    raise RuntimeError("no SDPA backend runs causal attention here")


def build_layer(args, variant: str):
    """A fresh TransformerLayer (NSA spec; the dense variant swaps the core) on the benchmark device."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_nsa import NSATransformerConfig
    from megatron_nsa.spec import get_gpt_layer_nsa_spec

    sizes = TINY_LAYER if args.tiny else PAPER_LAYER
    recompute = dict(recompute_granularity="selective", recompute_modules=["core_attn"]) \
        if variant == "nsa_recompute" else {}
    config = NSATransformerConfig(
        num_layers=1, **sizes, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        nsa_compression=args.compression, nsa_separate_kv=args.separate_kv, nsa_backend=args.backend,
        nsa_rotary_base=10000.0, **recompute,
    )
    core = DenseSDPACore if variant == "dense" else None
    spec = get_gpt_layer_nsa_spec(use_transformer_engine=False, **({"core_attention": core} if core else {}))
    torch.manual_seed(0)
    layer = build_module(spec, config=config, layer_number=1)
    return layer.to(device=args.device, dtype=getattr(torch, args.dtype)), config


class Clock:
    """Wall time of GPU work (CUDA events) or of CPU work."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, end) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return (end - start) * 1e3


def measure(args, variant: str, seq_len: int) -> dict:
    """Median forward / backward / step times and the peak memory of fwd+bwd steps of one layer."""
    device, dtype = args.device, getattr(torch, args.dtype)
    layer, config = build_layer(args, variant)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(seq_len, 1, config.hidden_size, device=device, dtype=dtype, generator=generator,
                    requires_grad=True)
    grad_out = torch.randn(seq_len, 1, config.hidden_size, device=device, dtype=dtype, generator=generator)
    clock = Clock(device)

    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        start = clock.now()
        output = layer(x, attention_mask=None)
        output = output[0] if isinstance(output, tuple) else output
        middle = clock.now()
        output.backward(grad_out)
        end = clock.now()
        return clock.ms(start, middle), clock.ms(middle, end)

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timings = [step() for _ in range(args.iters)]
    forward_ms = statistics.median(t[0] for t in timings)
    backward_ms = statistics.median(t[1] for t in timings)
    result = dict(variant=variant, seq_len=seq_len, forward_ms=forward_ms, backward_ms=backward_ms,
                  step_ms=statistics.median(t[0] + t[1] for t in timings),
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
    del layer, x, grad_out
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_one(args, variant, seq_len) -> dict:
    try:
        return measure(args, variant, seq_len)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(variant=variant, seq_len=seq_len, error="out of memory")


def ratios(results):
    """Per sequence length: dense time / NSA time and NSA peak memory / dense peak memory."""
    rows = {}
    for seq_len in sorted({r["seq_len"] for r in results}):
        by_variant = {r["variant"]: r for r in results if r["seq_len"] == seq_len and "error" not in r}
        dense = by_variant.get("dense")
        row = {}
        for variant in ("nsa", "nsa_recompute"):
            nsa = by_variant.get(variant)
            if dense is None or nsa is None:
                continue
            row[f"{variant}_speedup"] = dense["step_ms"] / nsa["step_ms"]
            row[f"{variant}_forward_speedup"] = dense["forward_ms"] / nsa["forward_ms"]
            row[f"{variant}_backward_speedup"] = dense["backward_ms"] / nsa["backward_ms"]
            if dense["peak_gib"] is not None:
                row[f"{variant}_memory_ratio"] = nsa["peak_gib"] / dense["peak_gib"]
        rows[seq_len] = row
    return rows


def markdown(meta, results, summary) -> str:
    lines = [f"# One transformer layer, forward + backward: NSA vs dense ({meta['device_name']})", "",
             f"{meta['layer']}; dtype {meta['dtype']}; NSA backend {meta['backend']}, compression "
             f"{meta['compression']}, separate K/V {meta['separate_kv']}; dense core: torch SDPA "
             f"{meta['sdpa_backend']}; megatron-core {meta['megatron_core']}, torch {meta['torch']}.", "",
             *([recorded_line(meta["recorded"]), ""] if "recorded" in meta else []),
             "| seq len | variant | forward ms | backward ms | step ms | peak GiB |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['variant']} | {r['error']} | | | |")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {r['seq_len']} | {r['variant']} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | "
                     f"{r['step_ms']:.2f} | {peak} |")
    lines += ["", "| seq len | step speedup (dense / NSA) | fwd | bwd | NSA peak / dense peak | "
              "with recompute: speedup | peak ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda row, key: f"{row[key]:.2f}" if key in row else "-"  # noqa: E731
    for seq_len, row in summary.items():
        lines.append(f"| {seq_len} | {fmt(row, 'nsa_speedup')} | {fmt(row, 'nsa_forward_speedup')} | "
                     f"{fmt(row, 'nsa_backward_speedup')} | {fmt(row, 'nsa_memory_ratio')} | "
                     f"{fmt(row, 'nsa_recompute_speedup')} | {fmt(row, 'nsa_recompute_memory_ratio')} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    from megatron.core import package_info

    init_single_process(args.device)
    dtype = getattr(torch, args.dtype)
    head_dim = (TINY_LAYER if args.tiny else PAPER_LAYER)["nsa_qk_head_dim"]
    DenseSDPACore.sdpa_backend = SDPBackend.MATH if args.device == "cpu" else pick_sdpa_backend("cuda", dtype,
                                                                                                 head_dim)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    meta = dict(device_name=device_name, dtype=args.dtype, backend=args.backend, compression=args.compression,
                separate_kv=args.separate_kv, sdpa_backend=DenseSDPACore.sdpa_backend.name,
                megatron_core=package_info.__version__, torch=torch.__version__, tiny=args.tiny,
                layer=", ".join(f"{k} {v}" for k, v in (TINY_LAYER if args.tiny else PAPER_LAYER).items())
                + ", SwiGLU, RMSNorm, RoPE, batch 1", recorded=recorded(device_name))
    results = []
    for seq_len in args.seq_lens:
        for variant in args.variants:
            result = run_one(args, variant, seq_len)
            results.append(result)
            print(json.dumps(result), flush=True)
    summary = ratios(results)
    report = markdown(meta, results, summary)
    print(report)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = result_stem("bench_layer", gpu_tag(1, device_name), args.variant, args.out_dir)
    with open(stem + ".json", "w") as handle:
        json.dump(dict(meta=meta, results=results, summary={str(k): v for k, v in summary.items()}), handle, indent=1)
    with open(stem + ".md", "w") as handle:
        handle.write(report)
    print(f"wrote {stem}.json and {stem}.md")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
