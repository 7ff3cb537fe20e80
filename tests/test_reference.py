"""megatron_nsa.reference and nsa_attention(backend='torch') against the per-token oracle (tests/oracle.py)."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import NSAConfig, nsa_attention, nsa_reference
from megatron_nsa import reference
from oracle import choose_blocks, oracle_batch, oracle_sequence, overlap_tokens

TOL = dict(rtol=1e-9, atol=1e-10)

# Small shapes are as fast on one thread, and one thread does not stall when the machine is busy.
pytestmark = pytest.mark.usefixtures("single_thread")


def paper_ratios(**overrides):
    """The paper's l : d : l' = 32 : 16 : 64 scaled down, n = 4, w = 8."""
    fields = dict(compress_block_size=4, compress_stride=2, select_block_size=8, select_count=4,
                  select_init_blocks=1, select_local_blocks=2, window_size=8)
    fields.update(overrides)
    return NSAConfig(**fields)


def identity_blocks(**overrides):
    """l = d = l': block scores are the compressed probabilities themselves."""
    fields = dict(compress_block_size=4, compress_stride=4, select_block_size=4, select_count=3,
                  select_init_blocks=1, select_local_blocks=1, window_size=5)
    fields.update(overrides)
    return NSAConfig(**fields)


# (id, config, B, T, H_q, H_kv, d_k, d_v)
CASES = [
    ("identity_G2", identity_blocks(), 1, 23, 4, 2, 5, 5),
    ("paper_G1", paper_ratios(), 1, 45, 2, 2, 4, 4),
    ("paper_G2_batch2", paper_ratios(), 2, 37, 4, 2, 4, 4),
    ("paper_G4_dk_ne_dv", paper_ratios(), 1, 41, 4, 1, 6, 3),
    ("no_forced_blocks", paper_ratios(select_count=2, select_init_blocks=0, select_local_blocks=0), 1, 43, 2, 1, 4, 4),
    ("many_forced_blocks", paper_ratios(select_count=5, select_init_blocks=2, select_local_blocks=3), 1, 53, 2, 1, 4, 4),
    ("l_eq_lp_gt_d", NSAConfig(compress_block_size=6, compress_stride=2, select_block_size=6, select_count=3,
                               window_size=4), 1, 35, 2, 1, 4, 4),
    ("stride1_odd_lp", NSAConfig(compress_block_size=3, compress_stride=1, select_block_size=6, select_count=3,
                                 window_size=3), 1, 29, 3, 1, 4, 2),
    ("window1", paper_ratios(window_size=1), 1, 45, 2, 1, 4, 4),
    ("window_covers_all", paper_ratios(window_size=64), 1, 45, 2, 1, 4, 4),
    ("n_exceeds_blocks", paper_ratios(select_count=16), 1, 33, 2, 1, 4, 4),
    ("shorter_than_a_block", paper_ratios(compress_block_size=8, compress_stride=4), 1, 6, 2, 1, 4, 4),
    ("explicit_scale", paper_ratios(softmax_scale=0.7), 1, 43, 2, 1, 4, 4),
    ("separate_kv", paper_ratios(separate_kv=True), 1, 39, 4, 2, 4, 3),
    ("linear_phi", paper_ratios(compression="linear"), 1, 35, 4, 2, 4, 3),
    ("mlp_phi_separate_kv", paper_ratios(compression="mlp", compress_mlp_hidden=5, separate_kv=True),
     2, 37, 2, 1, 4, 3),
]


def assert_matches_oracle(got, inter, expected):
    torch.testing.assert_close(got.reshape(expected["out"].shape), expected["out"], **TOL)
    assert torch.equal(inter.selected_block_idx, expected["selected"])
    for branch in ("cmp", "slc", "win"):
        torch.testing.assert_close(getattr(inter, f"{branch}_out"), expected[f"{branch}_out"], **TOL)
        torch.testing.assert_close(getattr(inter, f"{branch}_lse"), expected[f"{branch}_lse"], **TOL)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_and_functional_match_oracle(case, nsa_inputs, nsa_compressor):
    name, config, batch, seq_len, hq, hkv, dk, dv = case
    seed = sum(map(ord, name))
    q, ks, vs, gates = nsa_inputs(batch, seq_len, hq, hkv, dk, dv, config.separate_kv, seed)
    compressor = nsa_compressor(config, dk, dv, seed + 1)
    kv = list(zip(ks, vs))

    expected = oracle_batch(q, *kv, gates, config, compressor=compressor)
    ref_out, inter = nsa_reference(q, *kv, gates, config, compressor=compressor, return_intermediates=True)
    k_arg, v_arg = (ks, vs) if config.separate_kv else (ks[0], vs[0])
    out = nsa_attention(q, k_arg, v_arg, gates, config, compressor=compressor, backend="torch")

    assert out.shape == (batch, seq_len, hq, dv)
    assert_matches_oracle(ref_out, inter, expected)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    # Selection must really choose somewhere (not all blocks), unless the case says otherwise.
    if name not in ("n_exceeds_blocks", "shorter_than_a_block"):
        assert (seq_len - 1) // config.select_block_size + 1 > config.select_count


@pytest.mark.parametrize("separate_kv", [False, True])
def test_packed_documents_match_oracle(separate_kv, nsa_inputs):
    config = paper_ratios(separate_kv=separate_kv)
    # Odd document lengths, an empty document, and documents shorter than one compressed block.
    bounds = [0, 3, 20, 20, 21, 48, 61]
    q, ks, vs, gates = nsa_inputs(1, bounds[-1], 4, 2, 4, 3, separate_kv, seed=11 + separate_kv)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    kv = list(zip(ks, vs))

    expected = oracle_batch(q, *kv, gates, config, cu_seqlens=cu_seqlens)
    ref_out, inter = nsa_reference(q, *kv, gates, config, cu_seqlens=cu_seqlens, return_intermediates=True)
    k_arg, v_arg = (ks, vs) if separate_kv else (ks[0], vs[0])
    out = nsa_attention(q, k_arg, v_arg, gates, config, cu_seqlens=cu_seqlens, backend="torch")
    assert_matches_oracle(ref_out, inter, expected)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)


def test_documents_do_not_see_each_other(nsa_inputs):
    """Changing one document's tokens leaves the other documents' outputs bit-identical."""
    config = paper_ratios()
    bounds = [0, 19, 42, 55]
    cu_seqlens = torch.tensor(bounds)
    q, ks, vs, gates = nsa_inputs(1, bounds[-1], 2, 1, 4, 4, False, seed=5)
    out = nsa_attention(q, ks[0], vs[0], gates, config, cu_seqlens=cu_seqlens, backend="torch")
    k2, v2 = ks[0].clone(), vs[0].clone()
    k2[:, 19:42] += 1.0
    v2[:, 19:42] -= 1.0
    out2 = nsa_attention(q, k2, v2, gates, config, cu_seqlens=cu_seqlens, backend="torch")
    assert torch.equal(out[:, :19], out2[:, :19]) and torch.equal(out[:, 42:], out2[:, 42:])
    assert not torch.allclose(out[:, 19:42], out2[:, 19:42])


def test_first_tokens_have_no_compressed_output(nsa_inputs):
    """t < l - 1 sees no compressed block: branch output 0, lse -inf; from t = l - 1 on it is finite."""
    config = paper_ratios()
    q, ks, vs, gates = nsa_inputs(1, 20, 2, 1, 4, 4, False, seed=3)
    _, inter = nsa_reference(q, *zip(ks, vs), gates, config, return_intermediates=True)
    first = config.compress_block_size - 1
    assert torch.equal(inter.cmp_out[:first], torch.zeros_like(inter.cmp_out[:first]))
    assert torch.isneginf(inter.cmp_lse[:first]).all()
    assert torch.isfinite(inter.cmp_lse[first:]).all()
    assert (inter.cmp_out[first:].abs().sum(dim=-1) > 0).all()


def test_query_chunking_does_not_change_results(monkeypatch, nsa_inputs):
    """Tiny chunks (a few queries each) give the same outputs as one chunk."""
    config = paper_ratios(window_size=6)
    q, ks, vs, gates = nsa_inputs(1, 50, 4, 2, 4, 3, False, seed=9)
    kv = list(zip(ks, vs))
    whole, inter = nsa_reference(q, *kv, gates, config, return_intermediates=True)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 64)
    chunked, inter_chunked = nsa_reference(q, *kv, gates, config, return_intermediates=True)
    torch.testing.assert_close(chunked, whole, **TOL)
    assert torch.equal(inter.selected_block_idx, inter_chunked.selected_block_idx)
    torch.testing.assert_close(inter_chunked.win_lse, inter.win_lse, **TOL)


def rotate_half_rope(x, positions):
    """A rotary embedding: x [N, H, D] rotated at integer positions [N]."""
    half = x.shape[-1] // 2
    freq = 1.0 / (10.0 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = positions.to(x.dtype)[:, None] * freq[None, :]  # [N, D/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def test_compressed_rope_at_last_token_of_each_block(nsa_inputs):
    """compressed_rope rotates compressed block i at position i*d + l - 1 of its own document."""
    config = paper_ratios()
    bounds = [0, 17, 40]
    cu_seqlens = torch.tensor(bounds)
    q, ks, vs, gates = nsa_inputs(1, bounds[-1], 2, 1, 4, 4, False, seed=21)
    kv = list(zip(ks, vs))
    expected = oracle_batch(q, *kv, gates, config, cu_seqlens=cu_seqlens, rope=rotate_half_rope)
    out = nsa_attention(q, ks[0], vs[0], gates, config, cu_seqlens=cu_seqlens, backend="torch",
                        compressed_rope=rotate_half_rope)
    _, inter = nsa_reference(q, *kv, gates, config, cu_seqlens=cu_seqlens, rope=rotate_half_rope,
                             return_intermediates=True)
    torch.testing.assert_close(out.reshape(expected["out"].shape), expected["out"], **TOL)
    torch.testing.assert_close(inter.cmp_lse, expected["cmp_lse"], **TOL)
    unrotated = nsa_attention(q, ks[0], vs[0], gates, config, cu_seqlens=cu_seqlens, backend="torch")
    assert not torch.allclose(out, unrotated)


def test_half_precision_computes_in_float32(nsa_inputs):
    """bfloat16 inputs give the float32 result of the same inputs, rounded to bfloat16."""
    config = paper_ratios()
    q, ks, vs, gates = nsa_inputs(1, 33, 4, 2, 8, 8, False, seed=4, dtype=torch.bfloat16)
    out = nsa_attention(q, ks[0], vs[0], gates, config, backend="torch")
    up = [t.float() for t in (q, ks[0], vs[0], gates)]
    expected = nsa_attention(*up, config, backend="torch")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Block scores and top-n selection, checked directly


@pytest.mark.parametrize("l,d,lp", [(32, 16, 64), (4, 2, 8), (4, 4, 4), (6, 2, 6), (3, 1, 6), (8, 8, 16)])
def test_overlap_weights_count_shared_tokens(l, d, lp):
    config = NSAConfig(compress_block_size=l, compress_stride=d, select_block_size=lp, select_count=3)
    num_cmp, num_slc = 3 * lp // d + 2, 4
    weights = reference.selection_overlap_weights(num_cmp, num_slc, config, dtype=torch.float64)
    expected = torch.tensor([[overlap_tokens(i, j, config) / d for j in range(num_slc)] for i in range(num_cmp)],
                            dtype=torch.float64)
    assert torch.equal(weights, expected)
    assert (weights.sum(dim=1)[: (num_slc * lp - l) // d + 1] == l // d).all()  # each full block fully counted


def test_overlap_weights_paper_example():
    """docs/semantics.md: for l=32, d=16, l'=64, selection block j is scored by blocks 4j-1 .. 4j+3 with 1,2,2,2,1."""
    config = NSAConfig()
    weights = reference.selection_overlap_weights(20, 4, config)
    j = 2
    nonzero = weights[:, j].nonzero().flatten().tolist()
    assert nonzero == list(range(4 * j - 1, 4 * j + 4))
    assert weights[nonzero, j].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]


def select(probs_by_head, t, config, num_kv_heads=1):
    """select_blocks for one query at position t; probs_by_head [H_q, N_cmp] with l = d = l' = 1."""
    probs = torch.tensor(probs_by_head, dtype=torch.float64)[None]
    idx = reference.select_blocks(probs, torch.tensor([t]), t // config.select_block_size + 1, num_kv_heads, config)
    rows = idx[0].tolist()  # [H_kv][n]
    return rows[0] if num_kv_heads == 1 else rows


def unit_blocks(n, init, local):
    return NSAConfig(compress_block_size=1, compress_stride=1, select_block_size=1, select_count=n,
                     select_init_blocks=init, select_local_blocks=local, window_size=1)


def test_forced_initial_and_local_blocks_win_over_scores():
    config = unit_blocks(n=4, init=1, local=2)
    probs = [0.0, 0.3, 0.25, 0.2, 0.15, 0.1, 0.0, 0.0, 0.0, 0.0]  # t = 9: blocks 0 and 8, 9 have score 0
    assert select([probs], 9, config) == [0, 1, 8, 9]
    config = unit_blocks(n=5, init=2, local=1)
    assert select([probs], 9, config) == [0, 1, 2, 3, 9]


def test_top_n_without_forced_blocks_ranks_by_score():
    config = unit_blocks(n=3, init=0, local=0)
    probs = [0.05, 0.3, 0.05, 0.25, 0.05, 0.2, 0.1]
    assert select([probs], 6, config) == [1, 3, 5]


def test_ties_break_toward_lower_block_index():
    config = unit_blocks(n=3, init=1, local=1)
    probs = [0.0, 0.1, 0.2, 0.1, 0.2, 0.2, 0.1, 0.1]  # blocks 2, 4, 5 tie for the single free slot
    assert select([probs], 7, config) == [0, 2, 7]
    uniform = [1 / 8] * 8
    assert select([uniform], 7, unit_blocks(n=4, init=0, local=0)) == [0, 1, 2, 3]
    assert choose_blocks(uniform, 7, unit_blocks(n=4, init=0, local=0)) == [0, 1, 2, 3]


def test_blocks_after_the_query_are_never_selected():
    config = unit_blocks(n=3, init=0, local=0)
    probs = [0.1, 0.2, 0.1, 0.0, 0.9, 0.9]  # mass on blocks 4, 5, after t = 3
    assert select([probs], 3, config) == [0, 1, 2]


def test_fewer_valid_blocks_than_n_selects_all_and_pads():
    config = unit_blocks(n=6, init=1, local=2)
    assert select([[0.5, 0.2, 0.3]], 2, config) == [0, 1, 2, -1, -1, -1]
    assert select([[1.0]], 0, config) == [0, -1, -1, -1, -1, -1]


def test_gqa_sums_probabilities_of_the_group():
    """Group score is the sum over query heads: 0.5 + 0.5 beats 0.9 + 0.05 (max would pick the other)."""
    config = unit_blocks(n=2, init=1, local=0)
    head_a = [0.0, 0.5, 0.05, 0.45]
    head_b = [0.0, 0.5, 0.9, 0.0]
    assert select([head_a, head_b], 3, config) == [0, 1]
    # Two KV groups of one head each choose independently.
    assert select([head_a, head_b], 3, config, num_kv_heads=2) == [[0, 1], [0, 2]]


def test_selection_with_block_sizes_above_one():
    """l=4, d=2, l'=8: compressed block 3 covers tokens 6..9 and so scores selection blocks 0 and 1."""
    config = paper_ratios(select_count=2, select_init_blocks=0, select_local_blocks=0)
    t = 23  # selection blocks 0..2; compressed blocks 0..10 visible
    probs = torch.zeros(1, 1, 11, dtype=torch.float64)
    probs[0, 0, 3] = 0.4  # tokens 6..9, one stride in each of blocks 0 and 1: 0.4 each
    probs[0, 0, 1] = 0.1  # tokens 2..5, two strides in block 0: 0.2 more, so block 0 (0.6) beats block 1 (0.4)
    probs[0, 0, 10] = 0.5  # tokens 20..23, two strides in block 2: 1.0
    idx = reference.select_blocks(probs, torch.tensor([t]), 3, 1, config)
    assert idx[0, 0].tolist() == [0, 2]


# ---------------------------------------------------------------------------------------------
# Practical size


@pytest.mark.slow
def test_4k_tokens_paper_defaults_forward():
    """A 4k-token sequence with the paper's block sizes runs forward in seconds; spot-checked by the oracle."""
    config = NSAConfig()
    seq_len, hq, hkv, dim = 4096, 16, 4, 64
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, seq_len, hq, dim, generator=gen)
    k, v = torch.randn(2, 1, seq_len, hkv, dim, generator=gen)
    gates = torch.rand(1, seq_len, hq, 3, generator=gen)
    with torch.no_grad():
        out = nsa_attention(q, k, v, gates, config, backend="torch")
    assert out.shape == (1, seq_len, hq, dim) and torch.isfinite(out).all()
    positions = [0, 30, 31, 700, 2048 + 17, seq_len - 1]
    up = lambda x: x[0].double()  # noqa: E731
    expected = oracle_sequence(up(q), (up(k), up(v)), (up(k), up(v)), (up(k), up(v)), up(gates), config,
                               positions=positions)
    torch.testing.assert_close(out[0, positions].double(), expected["out"], rtol=1e-4, atol=1e-5)
