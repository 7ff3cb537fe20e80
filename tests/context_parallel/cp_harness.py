"""Helpers for the multi-process CP tests: launching gloo workers and comparing CP with the reference."""
from __future__ import annotations

import copy
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_nsa import KVCompressor, NSAConfig, nsa_attention
from megatron_nsa.context_parallel import LoadBalancedLayout, nsa_attention_cp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world, port, fn, args, error_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()  # no rank tears gloo down while another still finishes its last exchange
    except BaseException:
        with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # A passing worker leaves at once: C++ static destructors at interpreter exit can meet gloo threads that
    # are still winding down and abort the process ("terminate called without an active exception")
    # after every check has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world: int, tmp_path, *args) -> None:
    """Run fn(rank, world, *args) in `world` gloo processes; re-raise the first failure with its traceback."""
    try:
        mp.start_processes(_entry, args=(world, free_port(), fn, args, str(tmp_path)), nprocs=world,
                           start_method="spawn")
    except Exception as exc:
        reports = sorted(p for p in os.listdir(tmp_path) if p.startswith("rank"))
        details = "\n".join(open(os.path.join(tmp_path, p)).read() for p in reports)
        raise AssertionError(f"a CP worker failed:\n{details or exc}") from None


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A plain RoPE for the tests: x [N, H, D] rotated at positions [N]."""
    half = x.shape[-1] // 2
    freqs = 1.0 / (100.0 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = positions.to(x.dtype)[:, None] * freqs[None, :]  # [N, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def make_case(seed, seq_len, batch=1, num_q_heads=4, num_kv_heads=2, head_dim_k=8, head_dim_v=8, **config_kw):
    """Fresh random global inputs (float64) and a config for one CP comparison."""
    config = NSAConfig(**config_kw)
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    branches = 3 if config.separate_kv else 1
    q = draw(batch, seq_len, num_q_heads, head_dim_k)
    ks = [draw(batch, seq_len, num_kv_heads, head_dim_k) for _ in range(branches)]
    vs = [draw(batch, seq_len, num_kv_heads, head_dim_v) for _ in range(branches)]
    gates = torch.rand(batch, seq_len, num_q_heads, 3, generator=gen, dtype=torch.float64)
    loss_weight = draw(batch, seq_len, num_q_heads, head_dim_v)
    compressor = None
    if config.compression != "mean":
        compressor = KVCompressor.from_config(config, head_dim_k, head_dim_v, dtype=torch.float64)
        with torch.no_grad():
            for param in compressor.parameters():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) / param.shape[-1] ** 0.5)
    return dict(config=config, q=q, ks=ks, vs=vs, gates=gates, loss_weight=loss_weight, compressor=compressor)


def _as_kv(tensors, config):
    return tuple(tensors) if config.separate_kv else tensors[0]


def reference_result(case, cu_seqlens=None, rope=None):
    """Output and gradients of the single-process NSA on the whole sequence."""
    config = case["config"]
    leaves = [t.clone().requires_grad_() for t in [case["q"], *case["ks"], *case["vs"], case["gates"]]]
    q, rest = leaves[0], leaves[1:]
    n = len(case["ks"])
    ks, vs, gates = rest[:n], rest[n:2 * n], rest[-1]
    compressor = copy.deepcopy(case["compressor"])
    out = nsa_attention(q, _as_kv(ks, config), _as_kv(vs, config), gates, config, cu_seqlens=cu_seqlens,
                        compressor=compressor, backend="torch", compressed_rope=rope)
    params = list(compressor.parameters()) if compressor is not None else []
    grads = torch.autograd.grad((out * case["loss_weight"]).sum(), leaves + params)
    return out.detach(), grads[:len(leaves)], grads[len(leaves):]


def cp_result(case, group, cu_seqlens=None, rope=None, backend="torch", dtype=torch.float64, **cp_kw):
    """This rank's output and gradients under CP (inputs cast to dtype); compressor gradients summed over
    the CP group."""
    config = case["config"]
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = LoadBalancedLayout(case["q"].shape[1], cp_size, config)
    full = [case["q"], *case["ks"], *case["vs"], case["gates"]]
    leaves = [layout.shard(t, rank).to(dtype).requires_grad_() for t in full]
    q, rest = leaves[0], leaves[1:]
    n = len(case["ks"])
    ks, vs, gates = rest[:n], rest[n:2 * n], rest[-1]
    compressor = copy.deepcopy(case["compressor"])
    if compressor is not None:
        compressor.to(dtype)
    out = nsa_attention_cp(q, _as_kv(ks, config), _as_kv(vs, config), gates, config, group, compressor=compressor,
                           backend=backend, compressed_rope=rope, cu_seqlens=cu_seqlens, **cp_kw)
    params = list(compressor.parameters()) if compressor is not None else []
    loss_weight = layout.shard(case["loss_weight"], rank).to(dtype)
    grads = torch.autograd.grad((out * loss_weight).sum(), leaves + params)
    param_grads = [g.clone() for g in grads[len(leaves):]]
    for g in param_grads:
        dist.all_reduce(g, group=group)
    return out.detach(), grads[:len(leaves)], param_grads, layout


def assert_cp_matches_reference(case, group, cu_seqlens=None, rope=None, atol=1e-10, exchanges=({},), **cp_kw):
    """CP output and gradients equal the single-process reference's, for each of `exchanges` (extra
    nsa_attention_cp keywords, e.g. {'exchange': 'ring'}; the reference is computed once)."""
    ref_out, ref_grads, ref_param_grads = reference_result(case, cu_seqlens, rope)
    rank = dist.get_rank(group)
    names = ["q"] + [f"k{i}" for i in range(len(case["ks"]))] + [f"v{i}" for i in range(len(case["vs"]))] + ["gates"]
    for extra in exchanges:
        out, grads, param_grads, layout = cp_result(case, group, cu_seqlens, rope, **cp_kw, **extra)
        where = f" ({extra})" if extra else ""
        torch.testing.assert_close(out, layout.shard(ref_out, rank).to(out.dtype), atol=atol, rtol=0,
                                   msg=lambda m: f"output{where}: {m}")
        for name, grad, ref in zip(names, grads, ref_grads):
            torch.testing.assert_close(grad, layout.shard(ref, rank).to(grad.dtype), atol=atol, rtol=0,
                                       msg=lambda m, name=name: f"grad of {name}{where}: {m}")
        assert len(param_grads) == len(ref_param_grads)
        for i, (grad, ref) in enumerate(zip(param_grads, ref_param_grads)):
            assert ref.abs().max() > 0, "a compressor parameter got no gradient in the reference"
            torch.testing.assert_close(grad, ref.to(grad.dtype), atol=atol, rtol=0,
                                       msg=lambda m, i=i: f"compressor param {i}{where}: {m}")
