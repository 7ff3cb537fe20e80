"""exchange='fetch': CP = 2 and 4 and TP = 2 x CP = 2 give the single-process NSA's outputs and gradients
(gloo, torch backend, float64), and each rank receives exactly the remote blocks its queries selected."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cp_harness import assert_cp_matches_reference, make_case, rotate_half_rope, spawn
from megatron_nsa import nsa_reference
from megatron_nsa.context_parallel import Communicator, LoadBalancedLayout, nsa_attention_cp
from megatron_nsa.context_parallel.exchange import build_exchange

GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=4,
                select_init_blocks=1, select_local_blocks=2, window_size=12)
SEQ_LEN = 128
# Unaligned document starts (document blocks straddle chunk edges), a one-token document.
DOC_BOUNDS = [0, 13, 50, 51, 90, 128]


def _cases(rank, world):
    group = dist.group.WORLD
    cu_seqlens = torch.tensor(DOC_BOUNDS, dtype=torch.int32)
    assert_cp_matches_reference(make_case(12, SEQ_LEN, compression="linear", **GEOMETRY), group,
                                cu_seqlens=cu_seqlens, rope=rotate_half_rope, exchange="fetch")
    # no forced blocks: a query's own block is often not selected (the remapped position must still work)
    free = dict(GEOMETRY, select_init_blocks=0, select_local_blocks=0, select_count=2)
    assert_cp_matches_reference(make_case(14, SEQ_LEN, **free), group, cu_seqlens=cu_seqlens, exchange="fetch")
    _check_bytes(group, cu_seqlens)
    if world == 2:
        assert_cp_matches_reference(make_case(11, SEQ_LEN, batch=2, **GEOMETRY), group, exchange="fetch")
        # separate K/V, d_v != d_k, one KV head at a time
        assert_cp_matches_reference(make_case(13, SEQ_LEN, head_dim_v=6, separate_kv=True, **GEOMETRY), group,
                                    head_group_size=1, exchange="fetch")
    else:
        _tp_cp_case(rank, world)


def _expected_items(case, cu_seqlens, layout, rank):
    """Remote (KV head, aligned block) items this rank's queries need, from the reference's selection."""
    config = case["config"]
    lp = config.select_block_size
    _, inter = nsa_reference(case["q"], (case["ks"][0], case["vs"][0]), (case["ks"][0], case["vs"][0]),
                             (case["ks"][0], case["vs"][0]), case["gates"], config, cu_seqlens=cu_seqlens,
                             return_intermediates=True)
    bounds = cu_seqlens.tolist()
    doc_start = torch.tensor([max(s for s in bounds[:-1] if s <= t) for t in range(SEQ_LEN)])
    doc_end = torch.tensor([min(e for e in bounds[1:] if e > t) for t in range(SEQ_LEN)])
    items = set()
    for t in layout.positions(rank).tolist():
        for head in range(inter.selected_block_idx.shape[1]):
            for block in inter.selected_block_idx[t, head].tolist():
                if block < 0:
                    continue
                first = int(doc_start[t]) + block * lp
                last = min(int(doc_end[t]), first + lp) - 1
                items |= {(head, first // lp), (head, last // lp)}
    return {(head, g) for head, g in items if layout.owner(g * lp // layout.chunk_len)[0] != rank}


def _check_bytes(group, cu_seqlens):
    """Received bytes = the remote items the reference's selection needs, l' (d_k + d_v) values each, in forward,
    again in backward's re-fetch (and,
summed over the group, in the gradient return); with only the forced blocks (n = 3) fewer bytes
    than the all-gather."""
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    for count in (4, 3):
        case = make_case(15, SEQ_LEN, **dict(GEOMETRY, select_count=count))
        config, lp, item = case["config"], GEOMETRY["select_block_size"], 8
        layout = LoadBalancedLayout(SEQ_LEN, cp_size, config)
        per_mode = {}
        for mode in ("allgather", "fetch"):
            exchange = build_exchange(mode, Communicator(group))
            args = [layout.shard(t, rank).requires_grad_() for t in (case["q"], case["ks"][0], case["vs"][0],
                                                                    case["gates"])]
            out = nsa_attention_cp(*args, config, group, backend="torch", cu_seqlens=cu_seqlens, exchange=exchange)
            out.sum().backward()
            per_mode[mode] = exchange.comm.bytes_received
        dim = case["ks"][0].shape[-1] + case["vs"][0].shape[-1]
        expected = len(_expected_items(case, cu_seqlens, layout, rank)) * lp * dim * item
        got = per_mode["fetch"]
        assert got["fetch fwd"] == got["fetch bwd"] == expected, (dict(got), expected)
        # a rank gets back the gradients of the items it served: the same total over the group
        totals = torch.tensor([float(got["fetch fwd"]), float(got["fetch bwd return"])], dtype=torch.float64)
        dist.all_reduce(totals, group=group)
        assert totals[0] == totals[1], totals
        if count == 3 and cp_size > 1:
            assert 0 < got["fetch fwd"] < per_mode["allgather"]["selection fwd"], (dict(got), per_mode)


def _tp_cp_case(rank, world):
    """TP = 2 x CP = 2: each TP rank holds half the heads and runs CP over its own group of 2."""
    tp_size, cp_size = 2, world // 2
    tp_rank, cp_rank = rank // cp_size, rank % cp_size
    groups = [dist.new_group([tp * cp_size + c for c in range(cp_size)]) for tp in range(tp_size)]
    case = make_case(16, SEQ_LEN, num_q_heads=8, num_kv_heads=4, compression="linear", **GEOMETRY)
    q_heads, kv_heads = slice(4 * tp_rank, 4 * tp_rank + 4), slice(2 * tp_rank, 2 * tp_rank + 2)
    mine = dict(case, q=case["q"][:, :, q_heads], ks=[k[:, :, kv_heads] for k in case["ks"]],
                vs=[v[:, :, kv_heads] for v in case["vs"]], gates=case["gates"][:, :, q_heads],
                loss_weight=case["loss_weight"][:, :, q_heads])
    assert dist.get_rank(groups[tp_rank]) == cp_rank
    # the compressor's gradient is summed over the CP group only: it holds this TP rank's heads' share
    assert_cp_matches_reference(mine, groups[tp_rank], cu_seqlens=torch.tensor(DOC_BOUNDS, dtype=torch.int32),
                                exchange="fetch")


@pytest.mark.parametrize("cp_size", [2, 4])
def test_fetch_matches_single_process(cp_size, tmp_path):
    """CP = 2: batch rows, packed documents, separate K/V; 4 processes: CP = 4, then TP = 2 x CP = 2."""
    spawn(_cases, cp_size, tmp_path)


TRITON_GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=3,
                       select_init_blocks=1, select_local_blocks=1, window_size=8)


def _gathers_on_triton(rank, world):
    """The Triton selected kernels, forward and fused backward (packed documents): over the whole gathered
    documents ('allgather') and over compacted K/V with remapped query positions ('fetch')."""
    case = make_case(17, 64, num_q_heads=2, num_kv_heads=1, head_dim_k=8, head_dim_v=8, **TRITON_GEOMETRY)
    assert_cp_matches_reference(case, dist.group.WORLD, cu_seqlens=torch.tensor([0, 13, 40, 64], dtype=torch.int32),
                                atol=2e-4, exchanges=[dict(exchange="allgather"), dict(exchange="fetch")],
                                backend="triton", dtype=torch.float32)


@pytest.mark.slow
def test_allgather_and_fetch_with_triton_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spawn(_gathers_on_triton, 2, tmp_path)
