"""The ring exchange's log-sum-exp algebra, in one process.

Selected attention over a document's keys cut into pieces at block edges (ids and query positions
shifted per piece, as exchange.ring.PieceWork does) and merged with merge_partial must give the
single call's output and lse; each piece's share of the gradients from selected_attention_backward
(given the merged lse and delta = rowsum(dO * O)) must sum to the single call's dQ, dK, dV. Some
rows select nothing in some pieces (lse -inf there). The torch branches in float64; the Triton
kernels' fused backward in float32 under the CPU interpreter.
"""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import NSAConfig, reference
from megatron_nsa.context_parallel.branches import torch_branches, triton_branches
from megatron_nsa.context_parallel.exchange.ring import PieceWork, merge_partial

LP, COUNT, TOKENS, KV_HEADS, GROUP = 4, 3, 30, 2, 2
CUTS = [0, 2, 3, 6, 8]  # pieces of blocks [0, 2), [2, 3), [3, 6), [6, 8): the last one partial (30 = 7.5 blocks)


def _inputs(gen, dtype):
    q = torch.randn(TOKENS, KV_HEADS * GROUP, 5, generator=gen, dtype=dtype)
    k = torch.randn(TOKENS, KV_HEADS, 5, generator=gen, dtype=dtype)
    v = torch.randn(TOKENS, KV_HEADS, 3, generator=gen, dtype=dtype)
    # per (query, KV head): up to COUNT distinct causal blocks, ascending, -1 padded
    idx = torch.full((TOKENS, KV_HEADS, COUNT), -1, dtype=torch.int64)
    for t in range(TOKENS):
        for h in range(KV_HEADS):
            allowed = t // LP + 1
            pick = torch.randperm(allowed, generator=gen)[:min(COUNT, allowed)].sort().values
            idx[t, h, :pick.numel()] = pick
    return q, k, v, idx


def _pieces(positions, idx):
    pieces = []
    for first, end in zip(CUTS[:-1], CUTS[1:]):
        key_lo, key_hi = first * LP, min(end * LP, TOKENS)
        work = PieceWork(row=0, rows=slice(key_lo, TOKENS), slot=0, keys=slice(key_lo, key_hi), first_block=first,
                         end_block=end, q_pos=positions[key_lo:] - key_lo)
        ids = work.block_ids(idx[work.rows])
        assert (ids == -1).all(dim=-1).any(), "a piece where some row selects nothing"
        pieces.append((work, ids))
    return pieces


def _branches(name):
    if name == "torch":
        return torch_branches, torch.float64, 1e-12
    pytest.importorskip("triton")
    return triton_branches(), torch.float32, 2e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_pieces_merge_to_the_single_call(backend):
    branches, dtype, atol = _branches(backend)
    gen = torch.Generator().manual_seed(0)
    config = NSAConfig(compress_block_size=LP, compress_stride=LP, select_block_size=LP, select_count=COUNT,
                       select_init_blocks=0, select_local_blocks=0, window_size=1)
    scale = 0.4
    q, k, v, idx = _inputs(gen, dtype)
    positions = torch.arange(TOKENS)
    grad_out = torch.randn(TOKENS, KV_HEADS * GROUP, 3, generator=gen, dtype=dtype)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.selected_attention(*leaves, idx, positions, config, scale)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())

    out = torch.zeros(TOKENS, KV_HEADS * GROUP, 3, dtype=dtype)
    lse = torch.full((TOKENS, KV_HEADS * GROUP), float("-inf"), dtype=torch.float32 if backend == "triton" else dtype)
    pieces = _pieces(positions, idx)
    for work, ids in pieces:
        out_c, lse_c = branches.selected_attention(q[work.rows], k[work.keys], v[work.keys], ids, work.q_pos,
                                                   config, scale)
        merge_partial(out[work.rows], lse[work.rows], out_c, lse_c)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=0, atol=atol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), rtol=0, atol=atol)

    delta = (grad_out * out).sum(-1).to(lse.dtype)
    grads = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    for grad in grads:
        grad.zero_()
    for work, ids in pieces:
        dq, dk, dv = branches.selected_attention_backward(
            q[work.rows], k[work.keys], v[work.keys], ids, work.q_pos, config, scale, grad_out[work.rows],
            lse[work.rows], delta[work.rows])
        assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
        grads[0][work.rows] += dq
        grads[1][work.keys] += dk
        grads[2][work.keys] += dv
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(grad.double(), ref, rtol=0, atol=atol, msg=lambda m, name=name: f"d{name}: {m}")


def test_merge_keeps_a_half_precision_output_to_its_rounding():
    """O kept in bfloat16 between merges (L in float32): the merged output is the float64 one rounded."""
    gen = torch.Generator().manual_seed(1)
    rows, heads, dim = 7, 3, 4
    parts = [(torch.randn(rows, heads, dim, generator=gen, dtype=torch.float64),
              torch.randn(rows, heads, generator=gen, dtype=torch.float64) * 3) for _ in range(3)]
    exact_lse = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    exact = sum(out * torch.exp(lse - exact_lse)[..., None] for out, lse in parts)
    out = torch.zeros(rows, heads, dim, dtype=torch.bfloat16)
    lse = torch.full((rows, heads), float("-inf"), dtype=torch.float32)
    for out_c, lse_c in parts:
        merge_partial(out, lse, out_c.to(torch.bfloat16), lse_c.float())
    torch.testing.assert_close(lse.double(), exact_lse, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=3 * 2 ** -8 * exact.abs().max().item())
