"""'allgather' and 'fetch' backward: with a Branches object that has a selected_attention_backward of its
own (the Triton one's role), backward calls it once per segment and head group and never recomputes
the selected-attention forward; the gradients equal those of the torch branches (CP = 2, gloo, float64)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from cp_harness import make_case, spawn
from megatron_nsa import reference
from megatron_nsa.context_parallel import Branches, LoadBalancedLayout, nsa_attention_cp, torch_branches
from megatron_nsa.context_parallel.branches import recomputed_selected_backward
from megatron_nsa.context_parallel.segments import build_plan

GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=4,
                select_init_blocks=1, select_local_blocks=2, window_size=12)
SEQ_LEN = 128
DOC_BOUNDS = [0, 13, 50, 51, 90, 128]


def _counting_branches(calls):
    """torch_branches whose selected_attention and (separate) selected backward count their calls in `calls`."""

    def selected_attention(*args):
        calls["selected_attention"] += 1
        return torch_branches.selected_attention(*args)

    fused = recomputed_selected_backward(reference.selected_attention)  # not the counted forward

    def selected_attention_backward(*args):
        calls["selected_attention_backward"] += 1
        return fused(*args)

    return Branches("counting", torch_branches.compressed_attention, torch_branches.select_blocks,
                    selected_attention, torch_branches.window_attention, upcast_half=True,
                    fused_selected_backward=selected_attention_backward)


def _backward_calls_no_forward(rank, world):
    group = dist.group.WORLD
    case = make_case(21, SEQ_LEN, **GEOMETRY)
    config, cu_seqlens = case["config"], torch.tensor(DOC_BOUNDS, dtype=torch.int32)
    layout = LoadBalancedLayout(SEQ_LEN, world, config)
    num_segments = len(build_plan(layout, rank, 1, DOC_BOUNDS, config).segments)
    num_kv_heads = case["ks"][0].shape[2]
    loss_weight = layout.shard(case["loss_weight"], rank)
    for mode in ("allgather", "fetch"):
        grads = {}
        for name in ("torch", "counting"):
            calls = {"selected_attention": 0, "selected_attention_backward": 0}
            backend = torch_branches if name == "torch" else _counting_branches(calls)
            leaves = [layout.shard(t, rank).requires_grad_() for t in (case["q"], case["ks"][0], case["vs"][0],
                                                                     case["gates"])]
            out = nsa_attention_cp(*leaves, config, group, backend=backend, cu_seqlens=cu_seqlens, exchange=mode,
                                   head_group_size=1)
            forward_calls = dict(calls)
            grads[name] = torch.autograd.grad((out * loss_weight).sum(), leaves)
        assert forward_calls == {"selected_attention": num_segments * num_kv_heads,
                                 "selected_attention_backward": 0}, (mode, forward_calls)
        assert calls == {"selected_attention": num_segments * num_kv_heads,
                         "selected_attention_backward": num_segments * num_kv_heads}, (mode, calls)
        for name, got, expected in zip(("q", "k", "v", "gates"), grads["counting"], grads["torch"]):
            torch.testing.assert_close(got, expected, atol=1e-12, rtol=0, msg=lambda m, n=name: f"{mode} d{n}: {m}")


def test_backward_runs_the_selected_backward_only(tmp_path):
    spawn(_backward_calls_no_forward, 2, tmp_path)
