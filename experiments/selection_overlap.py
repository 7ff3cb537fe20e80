"""How much do neighbouring query tokens share their selected blocks in a trained NSA model, and what
does that mean for the selected-attention kernels' tiling?

    python -m experiments.selection_overlap --checkpoint CKPT_DIR [--batches 2] [--batch-size 4]
        [--tiles 1 2 4 8 16] [--shape 64,4,128,128] [--tile-tokens 1 2 4] [--save-selections FILE.pt] [--out DIR]
    python -m experiments.selection_overlap --selections FILE.pt ...   # recorded before: no model needed

Runs validation batches of the checkpoint's own recipe through the model (Triton backend, one GPU) and
records every layer's selected_block_idx. Per layer it prints the mean number of distinct blocks that a
tile of m consecutive tokens selects for one KV head (m = --tiles), against m * n when no block is
shared, for tokens whose position is at least n * l' (before that a token may pick every block it has).
The same counts for random inputs of the same shape (what benchmarks/bench_attention.py times) are the
baseline.

It then times the selected-attention kernels (forward, and forward + backward) at --shape
(H_q,H_kv,d_k,d_v, bf16, random Q/K/V) with each layer's recorded selections (KV head h uses the
recorded head h mod H_kv of the model) and with random-input selections, with programs of m tokens
(m = --tile-tokens, ROWS = m G; the forward and dQ kernels stream the union of the m tokens' blocks
once for all of them): which tiling pays on trained selections. --save-selections keeps the first two
samples' selections (and the recipe's block sizes), so that kernels can be timed on them later without the model.
Writes selection_overlap_<gpu>[_<variant>].{json,md} to --out (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List

import torch

from benchmarks import recording
from benchmarks.bench_attention import nsa_inputs, time_ms
from megatron_nsa.functional import recorded_selections

SAVED_SAMPLES = 2  # samples per layer that --save-selections keeps


def distinct_blocks_per_tile(selected_block_idx: torch.Tensor, tokens: int, first_row: int) -> float:
    """Mean over (tile of `tokens` consecutive rows from `first_row` on, KV head) of the number of distinct
    valid (>= 0) block ids the tile's rows selected. selected_block_idx [T, H_kv, n]."""
    idx = selected_block_idx[first_row:].to(torch.int64)
    rows = idx.shape[0] - idx.shape[0] % tokens
    if rows == 0:
        raise ValueError(f"no whole tile of {tokens} tokens after row {first_row} of {selected_block_idx.shape[0]} "
                         "rows")
    per_tile = idx[:rows].view(rows // tokens, tokens, idx.shape[1], -1).transpose(1, 2).flatten(2)
    per_tile = per_tile.sort(-1).values  # [tiles, H_kv, tokens * n]
    new = torch.ones_like(per_tile, dtype=torch.bool)
    new[..., 1:] = per_tile[..., 1:] != per_tile[..., :-1]
    return ((new & (per_tile >= 0)).sum(-1).double().mean()).item()


def model_selections(checkpoint: str, batches: int, batch_size: int) -> tuple:
    """(recipe, checkpoint step, [layer] -> [batches * batch_size * T, H_kv, n] selections of the validation
    batches; each sample is one document, its block ids count from its start)."""
    from megatron_nsa.eval.model_loader import load_model
    from megatron_nsa.data.datasets import build_datasets, micro_batches

    loaded = load_model(checkpoint, overrides=["nsa.backend=triton"], device="cuda")
    if loaded.attention != "nsa":
        sys.exit(f"--checkpoint {checkpoint!r} is a {loaded.attention!r} model; selections need an NSA model")
    _, valid = build_datasets(loaded.recipe, loaded.tokenizer, 1, batches * batch_size)
    iterator = micro_batches(valid, 0, batch_size, 0, 1, loaded.device)
    with torch.no_grad(), recorded_selections() as records:
        for _ in range(batches):
            loaded.logits(next(iterator)["tokens"])
    num_layers = loaded.recipe.model.num_layers  # records: batch 0's layers in order, then batch 1's, ...
    layers = [torch.cat(records[layer::num_layers]) for layer in range(num_layers)]
    return loaded.recipe, loaded.step, layers


def block_config(recipe):
    """The recipe's NSA block sizes as an NSAConfig."""
    from megatron_nsa import NSAConfig

    nsa = recipe.nsa
    return NSAConfig(compress_block_size=nsa.compress_block_size, compress_stride=nsa.compress_stride,
                     select_block_size=nsa.select_block_size, select_count=nsa.select_count,
                     select_init_blocks=nsa.select_init_blocks, select_local_blocks=nsa.select_local_blocks,
                     window_size=nsa.window_size)


def one_document(config, shape, num_tokens: int):
    """Random bf16 q [T, H_q, d_k], k [T, H_kv, d_k], v [T, H_kv, d_v] on the GPU (bench_attention's
    inputs) as one document: (q, k, v, cu_seqlens, its layout, the kernels' parameters)."""
    from nsa_kernels import KernelParams, packed_documents

    q, k, v = (t[0] for t in nsa_inputs(num_tokens, shape)[:3])
    cu = torch.tensor([0, num_tokens], device="cuda", dtype=torch.int32)
    params = KernelParams.from_config(config, config.scale_for(shape[2]))
    return q, k, v, cu, packed_documents(cu, num_tokens, params), params


def random_selections(config, shape, num_tokens: int) -> torch.Tensor:
    """What top-n picks for random inputs at `shape` (one document): [T, H_kv, n] on the GPU."""
    from nsa_kernels.band import band_attention
    from nsa_kernels.topk import select_blocks

    from megatron_nsa.compression import compress_documents

    q, k, v, cu, layout, params = one_document(config, shape, num_tokens)
    with torch.no_grad():
        ck, cv = compress_documents(k, v, cu, config)
        _, cmp_lse = band_attention(q, ck, cv, layout, "compressed", params)
        return select_blocks(q, ck, cmp_lse, layout, params)


def time_tilings(config, shape, selected_block_idx: torch.Tensor, tile_tokens) -> Dict[str, float]:
    """Selected attention at `shape` with these selections ([T, H_kv, n], one document): forward and
    forward+backward ms with programs of m tokens, for each m in tile_tokens."""
    from nsa_kernels import tuning
    from nsa_kernels.selected import selected_attention

    num_tokens = selected_block_idx.shape[0]
    q, k, v, _, layout, params = one_document(config, shape, num_tokens)
    grad = torch.randn(num_tokens, shape[0], shape[3], device="cuda", dtype=torch.bfloat16)
    idx = selected_block_idx.to(device="cuda", dtype=torch.int32).contiguous()
    group = shape[0] // shape[1]

    def forward():
        with torch.no_grad():
            selected_attention(q, k, v, idx, layout, params)

    def forward_backward():
        torch.autograd.grad(selected_attention(q, k, v, idx, layout, params)[0], (q, k, v), grad)

    result = {}
    for tokens in tile_tokens:
        # a warp per 16 rows (one token of G = 16: the H100 defaults of kernels/tuning.py)
        params = dict(ROWS=tokens * group, KEYS=32, num_warps=max(1, tokens * group // 16), num_stages=2)
        with tuning.overrides("selected_fwd", **params), tuning.overrides("selected_dq", **params):
            result[f"fwd_ms_{tokens}"] = time_ms(forward)
            result[f"fwd_bwd_ms_{tokens}"] = time_ms(forward_backward)
    return result


def as_kv_heads(selected_block_idx: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, h, n] -> [T, num_kv_heads, n]: KV head i takes recorded head i mod h."""
    heads = torch.arange(num_kv_heads) % selected_block_idx.shape[1]
    return selected_block_idx[:, heads]


def report(result: dict) -> str:
    tiles, tile_tokens, n = result["tiles"], result["tile_tokens"], result["select_count"]
    per_tiling = " / ".join(f"{m}-token" for m in tile_tokens)
    lines = [f"### Selected blocks shared by neighbouring tokens: {result['source']}, {result['gpu']}",
             "",
             f"Mean distinct blocks per tile of m consecutive tokens and one KV head (of m x {n} picks), tokens at "
             f"positions >= {result['first_position']}; timings: selected attention at H_q/H_kv/d_k/d_v = "
             f"{result['shape']}, bf16, {result['tokens']} tokens, with these selections (ms), programs of "
             f"{per_tiling} tiles.",
             "",
             *([recording.recorded_line(result["recorded"]), ""] if "recorded" in result else []),
             "| selections | " + " | ".join(f"m={m}" for m in tiles) + f" | fwd {per_tiling} | fwd+bwd {per_tiling} |",
             "|---|" + "---|" * (len(tiles) + 2)]
    for row in result["rows"]:
        t = row["timing"]
        lines.append(f"| {row['name']} | " + " | ".join(f"{row['distinct'][str(m)]:.1f}" for m in tiles)
                     + " | " + " / ".join(f"{t[f'fwd_ms_{m}']:.2f}" for m in tile_tokens)
                     + " | " + " / ".join(f"{t[f'fwd_bwd_ms_{m}']:.2f}" for m in tile_tokens) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained NSA run's checkpoint.dir or step directory")
    source.add_argument("--selections", help="a file written by --save-selections")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tiles", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--shape", default="64,4,128,128", help="H_q,H_kv,d_k,d_v of the kernel timings")
    parser.add_argument("--tile-tokens", type=int, nargs="+", default=[1, 2, 4],
                        help="tokens per program of the timed tilings")
    parser.add_argument("--save-selections", help="write the recorded selections here (torch.save)")
    parser.add_argument("--out", default=recording.RESULTS_DIR)
    parser.add_argument("--variant", default=None, help="what differs from the default run (file name suffix)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("experiments.selection_overlap runs the Triton kernels: it needs a CUDA GPU")
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 4 or shape[0] % shape[1]:
        sys.exit(f"--shape {args.shape!r}: give H_q,H_kv,d_k,d_v with H_q a multiple of H_kv")

    if args.checkpoint:
        recipe, step, layers = model_selections(args.checkpoint, args.batches, args.batch_size)
        recorded = dict(source=f"{args.checkpoint} (step {step})", config=vars(block_config(recipe)),
                        seq_length=recipe.data.seq_length, layers=layers)
        if args.save_selections:  # the first SAVED_SAMPLES samples, int16: a few MB
            kept = [idx[:SAVED_SAMPLES * recipe.data.seq_length].to(torch.int16) for idx in layers]
            torch.save(dict(recorded, layers=kept), args.save_selections)
    elif not os.path.isfile(args.selections):
        sys.exit(f"--selections {args.selections!r} does not exist; write one with --save-selections")
    else:
        recorded = torch.load(args.selections)
        recorded["layers"] = [idx.to(torch.int32) for idx in recorded["layers"]]
    from megatron_nsa import NSAConfig

    config = NSAConfig(**recorded["config"])
    seq_length = recorded["seq_length"]
    first_position = config.select_count * config.select_block_size

    def row(name, samples, timed_idx):
        """samples: selections of one document each; timed_idx: the selections the kernels are timed on."""
        distinct = {str(m): statistics.mean(distinct_blocks_per_tile(sample, m, first_position) for sample in samples)
                    for m in args.tiles}
        return dict(name=name, distinct=distinct, timing=time_tilings(config, shape, timed_idx, args.tile_tokens))

    rows = []
    for layer, idx in enumerate(recorded["layers"]):
        samples = idx.split(seq_length)  # one document each
        rows.append(row(f"layer {layer}", samples, as_kv_heads(samples[0], shape[1])))
    random_idx = random_selections(config, shape, seq_length).cpu()
    rows.append(row("random inputs", [random_idx], random_idx))
    gpu = torch.cuda.get_device_name()
    result = dict(source=recorded["source"], gpu=gpu, tiles=args.tiles, tile_tokens=args.tile_tokens,
                  select_count=config.select_count, first_position=first_position,
                  shape="/".join(map(str, shape)), tokens=seq_length, rows=rows, recorded=recording.recorded(gpu))
    os.makedirs(args.out, exist_ok=True)
    stem = recording.result_stem("selection_overlap", recording.gpu_tag(), args.variant, args.out)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    text = report(result)
    with open(stem + ".md", "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
