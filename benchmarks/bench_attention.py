"""NSA (Triton) against dense attention (torch SDPA: cuDNN and FlashAttention-2 backends), one GPU, one run.

    python -m benchmarks.bench_attention                 # the default sweep, writes benchmarks/results/
    python -m benchmarks.bench_attention --seqlens 8192 --nsa-only-seqlens "" --shapes main

Causal dense attention with K/V expanded for GQA; batch 1, bf16. NSA: l/d/l'/n/w = 32/16/64/16/512,
mean compression, all stages included. Per NSA stage (forward): compression, compressed attention,
scoring + top-n, selected, window, combine; backward per branch. Ratios are dense time / NSA time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.recording import RESULTS_DIR, gpu_tag, recorded, recorded_line, result_stem
from megatron_nsa import NSAConfig, nsa_attention
from megatron_nsa.compression import compress_documents

SHAPES = {  # name: (H_q, H_kv, d_k, d_v)
    "main": (64, 4, 128, 128),
    "paper": (64, 4, 192, 128),
    "small-group": (16, 4, 128, 128),
}


def time_ms(fn, budget_ms=1500.0, max_reps=50):
    """Median of CUDA-event timings after warm-up; repetitions sized to the budget."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(max(3, min(max_reps, budget_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd_times(forward, inputs):
    """(forward ms, backward ms, forward+backward ms, peak GiB of forward+backward)."""
    def fwd():
        with torch.no_grad():
            forward()

    def both():
        out = forward()
        torch.autograd.grad(out, inputs, grad_out_holder[0])

    grad_out_holder = [None]
    with torch.no_grad():
        grad_out_holder[0] = torch.randn_like(forward())
    t_fwd = time_ms(fwd)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t_both = time_ms(both)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return t_fwd, t_both - t_fwd, t_both, peak


def dense(seq_len, shape, backend):
    hq, hkv, dk, dv = shape
    dim = max(dk, dv)  # FlashAttention / cuDNN need equal q/k and v head dims: pad V
    q = torch.randn(1, hq, seq_len, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, seq_len, dk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, seq_len, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def forward():
        with sdpa_kernel(backend):
            kk = k.repeat_interleave(hq // hkv, dim=1)
            vv = v.repeat_interleave(hq // hkv, dim=1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    return fwd_bwd_times(forward, (q, k, v))


def nsa_inputs(seq_len, shape):
    hq, hkv, dk, dv = shape
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(1, seq_len, hq, dk), mk(1, seq_len, hkv, dk), mk(1, seq_len, hkv, dv)
    gates = torch.rand(1, seq_len, hq, 3, device="cuda", dtype=torch.bfloat16).requires_grad_()
    return q, k, v, gates


def nsa(seq_len, shape, config):
    q, k, v, gates = nsa_inputs(seq_len, shape)
    return fwd_bwd_times(lambda: nsa_attention(q, k, v, gates, config, backend="triton"), (q, k, v, gates))


def nsa_stages(seq_len, shape, config):
    """Forward time of each stage and backward time of each branch (ms), and the selected kernel's TFLOP/s."""
    from nsa_kernels import KernelParams, packed_documents
    from nsa_kernels.band import band_attention
    from nsa_kernels.combine import gated_combine
    from nsa_kernels.selected import selected_attention
    from nsa_kernels.topk import select_blocks

    q, k, v, gates = nsa_inputs(seq_len, shape)
    q, k, v, gates = q[0], k[0], v[0], gates[0]
    params = KernelParams.from_config(config, config.scale_for(q.shape[-1]))
    cu = torch.tensor([0, seq_len], device="cuda", dtype=torch.int32)
    bounds = [0, seq_len]  # on the host, as nsa_attention has them: layouts built there, as in a real call
    layout = packed_documents(cu, seq_len, params, bounds)
    ck, cv = compress_documents(k, v, cu, config, bounds=bounds)
    cmp_out, cmp_lse = band_attention(q, ck, cv, layout, "compressed", params)
    idx = select_blocks(q, ck, cmp_lse, layout, params)
    slc_out, _ = selected_attention(q, k, v, idx, layout, params)
    win_out, _ = band_attention(q, k, v, layout, "window", params)
    grad = torch.randn_like(cmp_out)
    with torch.no_grad():
        stages = {
            "compression": time_ms(lambda: compress_documents(k, v, cu, config, bounds=bounds)),
            "compressed_attn": time_ms(lambda: band_attention(q, ck, cv, layout, "compressed", params)),
            "scoring_topn": time_ms(lambda: select_blocks(q, ck, cmp_lse, layout, params)),
            "selected_attn": time_ms(lambda: selected_attention(q, k, v, idx, layout, params)),
            "window_attn": time_ms(lambda: band_attention(q, k, v, layout, "window", params)),
            "combine": time_ms(lambda: gated_combine(gates, cmp_out, slc_out, win_out)),
        }
    ck, cv = ck.detach().requires_grad_(), cv.detach().requires_grad_()
    bwd = {
        "compressed_bwd": time_ms(lambda: torch.autograd.grad(
            band_attention(q, ck, cv, layout, "compressed", params)[0], (q, ck, cv), grad)),
        "selected_bwd": time_ms(lambda: torch.autograd.grad(
            selected_attention(q, k, v, idx, layout, params)[0], (q, k, v), grad)),
        "window_bwd": time_ms(lambda: torch.autograd.grad(
            band_attention(q, k, v, layout, "window", params)[0], (q, k, v), grad)),
    }
    bwd["compressed_bwd"] -= stages["compressed_attn"]
    bwd["selected_bwd"] -= stages["selected_attn"]
    bwd["window_bwd"] -= stages["window_attn"]
    hq, _, dk, dv = shape
    selected_flop = 2.0 * seq_len * hq * config.select_count * config.select_block_size * (dk + dv)
    tflops = selected_flop / (stages["selected_attn"] * 1e-3) / 1e12
    return {**stages, **bwd, "selected_tflops": tflops}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--nsa-only-seqlens", default="262144,524288")
    parser.add_argument("--shapes", default="main,paper,small-group")
    parser.add_argument("--shape-seqlens", default="8192,65536", help="sequence lengths for the non-main shapes")
    parser.add_argument("--bf16-peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--variant", default=None, help="what differs from the default sweep (file name suffix)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.bench_attention needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    config = NSAConfig()
    rows = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        seqlens = args.seqlens if shape_name == "main" else args.shape_seqlens
        nsa_only = args.nsa_only_seqlens if shape_name == "main" else ""
        plan = [(int(s), True) for s in seqlens.split(",") if s] + [(int(s), False) for s in nsa_only.split(",") if s]
        for seq_len, with_dense in plan:
            row = {"shape": shape_name, "H_q/H_kv/d_k/d_v": "/".join(map(str, shape)), "seq_len": seq_len}
            try:
                row["nsa"] = nsa(seq_len, shape, config)
                if with_dense:
                    row["cudnn"] = dense(seq_len, shape, SDPBackend.CUDNN_ATTENTION)
                    row["flash2"] = dense(seq_len, shape, SDPBackend.FLASH_ATTENTION)
                if shape_name == "main":
                    row["stages"] = nsa_stages(seq_len, shape, config)
            except torch.OutOfMemoryError:
                row["oom"] = True
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
            write_results(rows, gpu, args, quiet=True)
    write_results(rows, gpu, args)


def write_results(rows, gpu, args, quiet=False):
    stem = result_stem("bench_attention", gpu_tag(), args.variant, args.out_dir)
    info = recorded(gpu)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "rows": rows, "recorded": info}, f, indent=1)
    lines = [f"### NSA (Triton) vs dense SDPA on {gpu}, bf16, batch 1, causal, l/d/l'/n/w = 32/16/64/16/512", "",
             recorded_line(info), "",
             "| shape H_q/H_kv/d_k/d_v | T | NSA fwd / bwd / total ms | cuDNN fwd / bwd ms | FA2 fwd / bwd ms "
             "| speed-up vs cuDNN fwd / bwd / total | vs FA2 total | NSA peak GiB | cuDNN peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "nsa" not in r:
            lines.append(f"| {r['H_q/H_kv/d_k/d_v']} | {r['seq_len']} | out of memory | | | | | | |")
            continue
        n = r["nsa"]
        c, fa = r.get("cudnn"), r.get("flash2")
        cells = [r["H_q/H_kv/d_k/d_v"], str(r["seq_len"]), f"{n[0]:.2f} / {n[1]:.2f} / {n[2]:.2f}"]
        if c:
            cells += [f"{c[0]:.2f} / {c[1]:.2f}", f"{fa[0]:.2f} / {fa[1]:.2f}",
                      f"{c[0] / n[0]:.1f}x / {c[1] / n[1]:.1f}x / {c[2] / n[2]:.1f}x", f"{fa[2] / n[2]:.1f}x",
                      f"{n[3]:.2f}", f"{c[3]:.2f}"]
        else:
            cells += ["-", "-", "-", "-", f"{n[3]:.2f}", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"#### NSA stage times (ms), shape main, {gpu}", "",
              "| T | compression | compressed | scoring+top-n | selected | window | combine "
              "| cmp bwd | slc bwd | win bwd | selected TFLOP/s (% of bf16 peak) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.get("stages")
        if not s:
            continue
        lines.append("| " + " | ".join([str(r["seq_len"])] + [f"{s[k]:.2f}" for k in (
            "compression", "compressed_attn", "scoring_topn", "selected_attn", "window_attn", "combine",
            "compressed_bwd", "selected_bwd", "window_bwd")] + [
            f"{s['selected_tflops']:.0f} ({100 * s['selected_tflops'] / args.bf16_peak_tflops:.0f}%)"]) + " |")
    table = "\n".join(lines) + "\n"
    with open(stem + ".md", "w") as f:
        f.write(table)
    if not quiet:
        print(table)


if __name__ == "__main__":
    main()
