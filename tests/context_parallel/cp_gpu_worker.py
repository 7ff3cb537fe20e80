"""CP against one GPU at scale (NCCL, either backend), for the GPU machine:

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 tests/context_parallel/cp_gpu_worker.py OUT.json \
        [--seq-len 65536] [--backend triton] [--dtype bfloat16] [--device cuda|cpu] [--tiny] \
        [--exchange allgather|ring|fetch|hierarchical] [--node-size M]

Every rank builds the same global inputs, runs nsa_attention on the whole sequence (its own copy
of the single-GPU result) and nsa_attention_cp on its share, and compares outputs and the
gradients of q, k, v, gates and the compressor parameters (summed over ranks), for one unpacked
sequence and for packed documents. In half precision the top-n selection may differ between the
two at near-ties, so the comparison is a relative L2 error per tensor plus the share of tokens
off by more than a tolerance; rank 0 writes them as JSON (test_cp_gpu.py asserts on them).
"""
from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.distributed as dist

from megatron_nsa import KVCompressor, NSAConfig, nsa_attention
from megatron_nsa.context_parallel import LoadBalancedLayout, nsa_attention_cp

TINY_GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4, window_size=32)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--backend", choices=("torch", "triton"), default="triton")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="small NSA blocks (l/d/l'/n/w = 8/4/16/4/32)")
    parser.add_argument("--exchange", default="allgather", help="CP exchange mode of nsa_attention_cp")
    parser.add_argument("--node-size", type=int, default=None, help="CP ranks per node for 'hierarchical'")
    return parser.parse_args()


def compare(name, got, want, results):
    got, want = got.float(), want.float()
    scale = want.abs().max().clamp(min=1e-30)
    token_err = (got - want).abs().flatten(2).amax(-1) / scale  # [B, T]
    results[name] = {
        "rel_l2": float((got - want).norm() / want.norm().clamp(min=1e-30)),
        "max_abs_over_max": float(token_err.max()),
        "tokens_off_fraction": float((token_err > 0.05).float().mean()),
    }


def run_case(args, device, cu_seqlens, seed):
    cp_size, rank = dist.get_world_size(), dist.get_rank()
    dtype = getattr(torch, args.dtype)
    config = NSAConfig(compression="linear", **(TINY_GEOMETRY if args.tiny else {}))
    gen = torch.Generator(device=device).manual_seed(seed)
    shape_q = (1, args.seq_len, args.heads, args.head_dim)
    shape_kv = (1, args.seq_len, args.kv_heads, args.head_dim)
    full = [torch.randn(s, generator=gen, device=device, dtype=dtype) for s in (shape_q, shape_kv, shape_kv)]
    full.append(torch.rand(1, args.seq_len, args.heads, 3, generator=gen, device=device, dtype=dtype))
    weight = torch.randn(shape_q, generator=gen, device=device, dtype=dtype)
    torch.manual_seed(seed)  # the compressor's initialisation: the same on every rank
    compressor = KVCompressor.from_config(config, args.head_dim, args.head_dim, device=device, dtype=torch.float32)

    leaves = [t.clone().requires_grad_() for t in full]
    ref_compressor = copy.deepcopy(compressor)
    out = nsa_attention(*leaves, config, cu_seqlens=cu_seqlens, compressor=ref_compressor, backend=args.backend)
    ref = torch.autograd.grad((out.float() * weight.float()).sum(), leaves + list(ref_compressor.parameters()))
    ref_out = out.detach()

    layout = LoadBalancedLayout(args.seq_len, cp_size, config)
    mine = [layout.shard(t, rank).clone().requires_grad_() for t in full]
    out = nsa_attention_cp(*mine, config, dist.group.WORLD, compressor=compressor, backend=args.backend,
                           cu_seqlens=cu_seqlens, exchange=args.exchange, node_size=args.node_size)
    got = torch.autograd.grad((out.float() * layout.shard(weight, rank).float()).sum(),
                              mine + list(compressor.parameters()))
    results = {}
    compare("out", out.detach(), layout.shard(ref_out, rank), results)
    for name, g, r in zip(("q", "k", "v", "gates"), got[:4], ref[:4]):
        compare(f"grad {name}", g, layout.shard(r, rank), results)
    # The keys' position-embedding gradient is zero up to rounding without RoPE (a shift shared by all
    # compressed keys leaves every softmax unchanged): compare every compressor gradient on the scale
    # of the largest one.
    param_scale = max(float(r.float().norm()) for r in ref[4:])
    for (name, _), g, r in zip(compressor.named_parameters(), got[4:], ref[4:]):
        g = g.clone()
        dist.all_reduce(g)
        results[f"grad compressor {name}"] = {"rel_l2": float((g - r).float().norm()) / param_scale}
    return results


def main():
    args = parse_args()
    device = torch.device(args.device)
    if args.device == "cuda":
        dist.init_process_group("nccl")
        device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        dist.init_process_group("gloo")
    docs = torch.tensor([0, args.seq_len // 5, args.seq_len // 5 + 3, args.seq_len // 2 + 1, args.seq_len],
                        dtype=torch.int32, device=device)
    results = {"unpacked": run_case(args, device, None, seed=1), "packed": run_case(args, device, docs, seed=2)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "per_rank": gathered}, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
