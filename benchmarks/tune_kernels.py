"""Sweep the launch parameters of every NSA kernel on one GPU and report the fastest of each.

For one shape and sequence length (default: 64 query heads, 4 KV heads, head dim 128, 64k tokens,
bf16, l/d/l'/n/w = 32/16/64/16/512), each kernel is timed with each candidate from CANDIDATES via
nsa_kernels.tuning.overrides; the current defaults are timed too. Backward kernels are timed as the
whole branch backward with one kernel's parameters changed. Writes JSON and a markdown table to
benchmarks/results/tune_kernels_<gpu>[_<variant>].{json,md} (another --shape: variant <shape>, e.g.
64-4-192-128, unless --variant names it); copy
the winners into kernels/tuning.py (_DEFAULTS for d <= 128; _WIDE for the paper's d_k 192).

    python -m benchmarks.tune_kernels [--seq-len 65536] [--kernels band_fwd/compressed,topk,...]
    python -m benchmarks.tune_kernels --shape 64,4,192,128     # the paper's shape
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from benchmarks.recording import RESULTS_DIR, gpu_tag, recorded, recorded_line, result_stem
from megatron_nsa import NSAConfig
from megatron_nsa.compression import compress_documents

# TMA: streamed tiles through tensor descriptors (kernels/tma.py) or pointers
_band = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, TMA=tma) for tma in (True, False)
         for m, n, w, s in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                            (128, 64, 8, 4), (64, 128, 4, 2), (128, 32, 8, 3)]]
_band_dkdv = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s, TMA=tma) for tma in (True, False)
              for m, n, w, s in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2),
                                 (32, 128, 8, 2), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 8, 3),
                                 (32, 128, 8, 4), (64, 128, 8, 4), (64, 64, 4, 4), (32, 64, 4, 4), (16, 128, 8, 3),
                                 (32, 128, 4, 3)]]
# ROWS: query rows per forward / dQ program (tokens x G heads; one token when G >= ROWS); KEYS: keys per step
_selected = [dict(ROWS=r, KEYS=n, num_warps=w, num_stages=s)
             for r in (16, 32, 64) for n in (64, 32) for w in (1, 2, 4) for s in (2, 3)]
CANDIDATES = {
    "band_fwd/compressed": _band, "band_fwd/window": _band,
    "band_dq/compressed": _band, "band_dq/window": _band,
    "band_dkdv/compressed": _band_dkdv, "band_dkdv/window": _band_dkdv,
    "selected_fwd": _selected, "selected_dq": _selected,
    "selected_dkdv": [dict(ROWS=r, num_warps=w, num_stages=s) for r in (32, 64, 128) for w in (4, 8) for s in (2, 3)],
    "topk": [dict(ROWS=r, num_warps=w, num_stages=s) for r in (128, 256) for w in (4, 8) for s in (1, 2, 3)],
}
DEFAULT_SHAPE = "64,4,128,128"  # H_q, H_kv, d_k, d_v


def time_ms(fn, warmup=2, reps=5):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def stage_functions(seq_len, hq, hkv, dk, dv, config):
    """kernel name -> a function running the stage that kernel belongs to."""
    from nsa_kernels import KernelParams, packed_documents
    from nsa_kernels.band import band_attention
    from nsa_kernels.selected import selected_attention
    from nsa_kernels.topk import select_blocks

    mk = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(seq_len, hq, dk), mk(seq_len, hkv, dk), mk(seq_len, hkv, dv)
    params = KernelParams.from_config(config, config.scale_for(dk))
    cu = torch.tensor([0, seq_len], device="cuda", dtype=torch.int32)
    layout = packed_documents(cu, seq_len, params)
    with torch.no_grad():
        ck, cv = compress_documents(k, v, cu, config)
    ck, cv = ck.requires_grad_(), cv.requires_grad_()
    with torch.no_grad():
        _, cmp_lse = band_attention(q, ck, cv, layout, "compressed", params)
        idx = select_blocks(q, ck, cmp_lse, layout, params)
    grad = torch.randn(seq_len, hq, dv, device="cuda", dtype=torch.bfloat16)

    compressed = lambda: band_attention(q, ck, cv, layout, "compressed", params)[0]  # noqa: E731
    window = lambda: band_attention(q, k, v, layout, "window", params)[0]  # noqa: E731
    selected = lambda: selected_attention(q, k, v, idx, layout, params)[0]  # noqa: E731

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def fwd_bwd(fn, inputs):
        return lambda: torch.autograd.grad(fn(), inputs, grad)

    return {
        "band_fwd/compressed": no_grad(compressed), "band_fwd/window": no_grad(window),
        "band_dq/compressed": fwd_bwd(compressed, (q, ck, cv)), "band_dkdv/compressed": fwd_bwd(compressed, (q, ck, cv)),
        "band_dq/window": fwd_bwd(window, (q, k, v)), "band_dkdv/window": fwd_bwd(window, (q, k, v)),
        "selected_fwd": no_grad(selected), "selected_dq": fwd_bwd(selected, (q, k, v)),
        "selected_dkdv": fwd_bwd(selected, (q, k, v)),
        "topk": no_grad(lambda: select_blocks(q, ck, cmp_lse, layout, params)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--shape", default=DEFAULT_SHAPE, help="H_q,H_kv,d_k,d_v")
    parser.add_argument("--kernels", default=",".join(CANDIDATES))
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--variant", default=None,
                        help="what differs from the default sweep, the last part of the file names")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.tune_kernels needs a CUDA GPU")
    from nsa_kernels import tuning
    from nsa_kernels.qk_parts import tile_width

    hq, hkv, dk, dv = (int(x) for x in args.shape.split(","))
    config = NSAConfig()
    functions = stage_functions(args.seq_len, hq, hkv, dk, dv, config)
    gpu = torch.cuda.get_device_name()
    results = {}
    for kernel in args.kernels.split(","):
        if kernel not in CANDIDATES:
            sys.exit(f"--kernels: {kernel!r} is not one of {sorted(CANDIDATES)}")
        default = tuning.launch_params(kernel, tile_width(dk, dv))
        rows = [{"params": default, "ms": time_ms(functions[kernel]), "default": True}]
        for params in CANDIDATES[kernel]:
            if params == default:
                continue
            try:
                with tuning.overrides(kernel, **params):
                    rows.append({"params": params, "ms": time_ms(functions[kernel]), "default": False})
            except Exception as error:  # a candidate that does not compile (e.g. out of shared memory)
                rows.append({"params": params, "ms": None, "default": False, "error": str(error)[:200]})
        timed = [r for r in rows if r["ms"] is not None]
        best = min(timed, key=lambda r: r["ms"])
        results[kernel] = {"rows": rows, "best": best["params"], "best_ms": best["ms"], "default_ms": rows[0]["ms"]}
        print(f"{kernel:22s} default {rows[0]['ms']:8.2f} ms   best {best['ms']:8.2f} ms  {best['params']}", flush=True)
        write_results(args, gpu, results)  # after every kernel, so a run cut short keeps what it measured


def write_results(args, gpu, results):
    variant = args.variant or (None if args.shape == DEFAULT_SHAPE else args.shape.replace(",", "-"))
    stem = result_stem("tune_kernels", gpu_tag(1, gpu), variant, args.out_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    info = recorded(gpu)
    meta = {"gpu": gpu, "seq_len": args.seq_len, "shape": args.shape, "torch": torch.__version__}
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "results": results, "recorded": info}, f, indent=1)
    lines = [f"# Kernel launch sweep on {gpu}", "", recorded_line(info), "",
             f"{args.seq_len} tokens, H_q/H_kv/d_k/d_v = {args.shape}, bf16. Times are the stage the kernel belongs "
             "to (backward kernels: the branch's forward + backward).", "",
             "| kernel | default (ms) | best (ms) | best parameters |", "|---|---|---|---|"]
    for kernel, r in results.items():
        lines.append(f"| {kernel} | {r['default_ms']:.2f} | {r['best_ms']:.2f} | {r['best']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
