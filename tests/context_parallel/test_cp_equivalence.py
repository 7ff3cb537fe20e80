"""CP = 1, 2, 4 give the single-process NSA's outputs and gradients (gloo, torch backend, float64).

One spawn per CP size runs every case (process start-up dominates on the CI machine): the
comparisons, the bytes each exchange moves against docs/design.md's volumes, the input errors, and
branches silenced by functional.silenced_branches.
Every case runs with 'allgather'; the 'ring' and 'hierarchical' exchanges join the cases with
packed documents (blocks straddling chunk edges), separate K/V, one KV head at a time and batch
rows, attending a few query rows at a time.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cp_harness import assert_cp_matches_reference, make_case, rotate_half_rope, spawn
from megatron_nsa import NSAConfig
from megatron_nsa.context_parallel import Branches, Communicator, LoadBalancedLayout, nsa_attention_cp, torch_branches
from megatron_nsa.context_parallel.exchange import AllGatherExchange, build_exchange
from megatron_nsa.context_parallel.exchange import ring as ring_exchange
from megatron_nsa.context_parallel.rope import RankTableRotary, cp_rotary
from megatron_nsa.functional import silenced_branches
from megatron_nsa.rope import Rotary, rotary_angles

# Tiny geometry: l=8, d=4, l'=8, n=4, w=12. S=128 gives chunks of 64 / 32 / 16 tokens for C = 1 / 2 / 4.
GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=4,
                select_init_blocks=1, select_local_blocks=2, window_size=12)
SEQ_LEN = 128
# Unaligned starts, a document shorter than one compressed block, documents crossing chunk edges.
DOC_BOUNDS = [0, 13, 50, 51, 90, 128]


def ring_modes(cp_size):
    """The ring exchanges at this CP size (hierarchical: nodes of 2 ranks, so that C = 4 has 2 nodes)."""
    return [dict(exchange="ring"), dict(exchange="hierarchical", node_size=min(2, cp_size))]


def _cases(rank, world):
    group = dist.group.WORLD
    ring_exchange.ROW_PART_ELEMENTS = 100  # the ring modes attend and merge a few query rows at a time
    every_mode = [{}] + ring_modes(world)
    # batch rows, shared K/V, mean compression
    assert_cp_matches_reference(make_case(1, SEQ_LEN, batch=2, **GEOMETRY), group, exchanges=every_mode)
    # packed documents, learned 'linear' compressor, RoPE on compressed keys
    cu_seqlens = torch.tensor(DOC_BOUNDS, dtype=torch.int32)
    assert_cp_matches_reference(make_case(2, SEQ_LEN, compression="linear", **GEOMETRY), group,
                                cu_seqlens=cu_seqlens, rope=rotate_half_rope, exchanges=every_mode)
    # separate K/V per branch, 'mlp' compressor, d_v != d_k, one KV head gathered at a time
    assert_cp_matches_reference(make_case(3, SEQ_LEN, head_dim_v=6, separate_kv=True, compression="mlp",
                                          **GEOMETRY), group, head_group_size=1, exchanges=every_mode)
    # l == d (no compressed halo) and a window of one token (no window halo), with documents
    geometry = dict(GEOMETRY, compress_block_size=4, compress_stride=4, window_size=1)
    assert_cp_matches_reference(make_case(4, SEQ_LEN, **geometry), group, cu_seqlens=cu_seqlens)
    _check_bytes(group)
    _check_errors(group)
    _check_rotary(group)
    _check_pluggable_branches(group)
    _check_silenced_branches(group)


def _check_silenced_branches(group):
    """Inside functional.silenced_branches nsa_attention_cp silences the same branches as nsa_attention."""
    case = make_case(6, SEQ_LEN, **GEOMETRY)
    with silenced_branches("cmp", "win"):
        assert_cp_matches_reference(case, group)
    layout = LoadBalancedLayout(SEQ_LEN, dist.get_world_size(group), case["config"])
    args = [layout.shard(t, dist.get_rank(group)) for t in (case["q"], case["ks"][0], case["vs"][0], case["gates"])]
    with silenced_branches("cmp", "win"):
        silenced = nsa_attention_cp(*args, case["config"], group, backend="torch")
    assert (nsa_attention_cp(*args, case["config"], group, backend="torch") - silenced).abs().max() > 1e-3


def _check_bytes(group):
    """Bytes received per exchange against docs/design.md: selection (C-1)/C * S * h * D * bytes, compressed the same
    over S/d tokens (padded to whole chunks here), halos 2 per rank but one on the first and last rank."""
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, heads, dim_k, dim_v, item = 2, 2, 8, 6, 8
    case = make_case(5, SEQ_LEN, batch=batch, num_kv_heads=heads, head_dim_k=dim_k, head_dim_v=dim_v, **GEOMETRY)
    layout = LoadBalancedLayout(SEQ_LEN, cp_size, case["config"])
    args = [layout.shard(t, rank).requires_grad_() for t in (case["q"], case["ks"][0], case["vs"][0], case["gates"])]
    selection = (cp_size - 1) / cp_size * SEQ_LEN * batch * heads * (dim_k + dim_v) * item
    exchange = AllGatherExchange(Communicator(group))
    nsa_attention_cp(*args, case["config"], group, backend="torch", exchange=exchange).sum().backward()
    got = exchange.comm.bytes_received
    for kind in ("selection fwd", "selection bwd gather", "selection bwd reduce-scatter"):
        assert got[kind] == int(selection / 2) * 2, (kind, got[kind], selection)
    # the ring modes move the same volume (pieces, gradients in the K/V dtype), compressed tokens included
    for mode in ring_modes(cp_size):
        ring = build_exchange(mode["exchange"], Communicator(group), mode.get("node_size"))
        nsa_attention_cp(*args, case["config"], group, backend="torch", exchange=ring).sum().backward()
        for kind in ("selection fwd", "selection bwd", "selection bwd grad"):
            assert ring.comm.bytes_received[kind] == int(selection / 2) * 2, (mode, kind, ring.comm.bytes_received)
        for kind in ("compressed fwd", "compressed bwd"):
            assert ring.comm.bytes_received[kind] == got[kind], (mode, kind, ring.comm.bytes_received, got)
    l, d = GEOMETRY["compress_block_size"], GEOMETRY["compress_stride"]
    compressed = (cp_size - 1) / cp_size * (SEQ_LEN / d) * batch * heads * (dim_k + dim_v) * item
    assert compressed <= got["compressed fwd"] <= compressed * (1 + l / layout.chunk_len) + 1
    assert got["compressed bwd"] == got["compressed fwd"]
    halo = max(GEOMETRY["window_size"] - 1, l - d) * batch * heads * (dim_k + dim_v) * item
    total_halo = torch.tensor([float(got["halo fwd"]), float(got["halo bwd"])], dtype=torch.float64)
    dist.all_reduce(total_halo, group=group)
    assert total_halo.tolist() == [(2 * cp_size - 2) * halo] * 2


def _check_errors(group):
    cp_size = dist.get_world_size(group)
    config = NSAConfig(**GEOMETRY)
    case = make_case(6, SEQ_LEN, **GEOMETRY)
    layout = LoadBalancedLayout(SEQ_LEN, cp_size, config)
    q, k, v, gates = (layout.shard(t, 0) for t in (case["q"], case["ks"][0], case["vs"][0], case["gates"]))
    short = 2 * 8  # 2 local chunks of one selection block: shorter than the window for every C
    with pytest.raises(ValueError, match=f"chunks of {short * cp_size} / {2 * cp_size} = 8 tokens, shorter than "
                                         f"window_size w=12"):
        nsa_attention_cp(q[:, :short], k[:, :short], v[:, :short], gates[:, :short], config, group)
    with pytest.raises(ValueError, match=f"sequence length {(short + 2) * cp_size} .* multiple of 2 \\* {cp_size} "
                                         f"\\* select_block_size l'=8"):
        nsa_attention_cp(q[:, :short + 2], k[:, :short + 2], v[:, :short + 2], gates[:, :short + 2], config, group)
    with pytest.raises(ValueError, match="head_group_size=0"):
        nsa_attention_cp(q, k, v, gates, config, group, head_group_size=0)
    with pytest.raises(ValueError, match="exchange='rings' is not allowed; choose one of .*'ring'"):
        nsa_attention_cp(q, k, v, gates, config, group, exchange="rings")
    with pytest.raises(ValueError, match=f"node_size={cp_size + 1} is not allowed for exchange='hierarchical' "
                                         f"with context_parallel_size={cp_size}: .* divisor of {cp_size}"):
        nsa_attention_cp(q, k, v, gates, config, group, exchange="hierarchical", node_size=cp_size + 1)
    with pytest.raises(ValueError, match="node_size=None is not allowed"):
        nsa_attention_cp(q, k, v, gates, config, group, exchange="hierarchical")
    with pytest.raises(ValueError, match=f"cu_seqlens must start at 0 and end at T={SEQ_LEN}"):
        nsa_attention_cp(q, k, v, gates, config, group, cu_seqlens=torch.tensor([0, layout.chunk_len]))


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_matches_single_process(cp_size, tmp_path):
    spawn(_cases, cp_size, tmp_path)


def _check_rotary(group):
    """cp_rotary wraps only a table with one row per local token (Megatron's per-rank slice)."""
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    layout = LoadBalancedLayout(SEQ_LEN, cp_size)
    full = Rotary.from_table(rotary_angles(torch.arange(SEQ_LEN), 4, 100.0))
    sliced = Rotary.from_table(layout.shard(full.table, rank, dim=0))
    local_len = 2 * layout.chunk_len
    assert cp_rotary(full, local_len, None, group) is full
    from_base = Rotary.from_base(100.0, 4)
    assert cp_rotary(from_base, local_len, None, group) is from_base
    wrapped = cp_rotary(sliced, local_len, None, group)
    if cp_size == 1:
        assert wrapped is sliced
        return
    assert isinstance(wrapped, RankTableRotary)
    x = torch.randn(local_len, 2, 4, dtype=torch.float64)
    torch.testing.assert_close(wrapped(x, layout.positions(rank)), full(x, layout.positions(rank)))
    with pytest.raises(ValueError, match="sliced for CP rank .* packed"):
        cp_rotary(sliced, local_len, torch.tensor([0, SEQ_LEN]), group)


def _check_pluggable_branches(group):
    """A Branches object passed as backend is the one that computes every branch."""
    calls = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    names = ("compressed_attention", "select_blocks", "selected_attention", "window_attention", "gated_combine")
    spy = Branches("spy", *(counted(n, getattr(torch_branches, n)) for n in names[:4]), upcast_half=True,
                   gated_combine=counted(names[4], torch_branches.gated_combine))
    case = make_case(7, SEQ_LEN, **GEOMETRY)
    rank = dist.get_rank(group)
    layout = LoadBalancedLayout(SEQ_LEN, dist.get_world_size(group), case["config"])
    args = [layout.shard(t, rank) for t in (case["q"], case["ks"][0], case["vs"][0], case["gates"])]
    expected = nsa_attention_cp(*args, case["config"], group, backend="torch")
    got = nsa_attention_cp(*args, case["config"], group, backend=spy)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(calls) == set(names), calls
