"""The ring exchange's log-sum-exp algebra, in one process (float64, torch reference).

Selected attention over a document's keys cut into pieces at block edges (ids and query positions
shifted per piece, as exchange_ring.PieceWork does) and merged with merge_partial must give the
single call's output and lse; gradients fed per piece by partial_grads must sum to the single
call's dQ, dK, dV. Some rows select nothing in some pieces (lse -inf there).
"""
from __future__ import annotations

import torch

from megatron_nsa import NSAConfig, reference
from megatron_nsa.context_parallel.exchange_ring import PieceWork, merge_partial, partial_grads

LP, COUNT, TOKENS, KV_HEADS, GROUP = 4, 3, 30, 2, 2
CUTS = [0, 2, 3, 6, 8]  # pieces of blocks [0, 2), [2, 3), [3, 6), [6, 8): the last one partial (30 = 7.5 blocks)


def _inputs(gen):
    q = torch.randn(TOKENS, KV_HEADS * GROUP, 5, generator=gen, dtype=torch.float64)
    k = torch.randn(TOKENS, KV_HEADS, 5, generator=gen, dtype=torch.float64)
    v = torch.randn(TOKENS, KV_HEADS, 3, generator=gen, dtype=torch.float64)
    # per (query, KV head): up to COUNT distinct causal blocks, ascending, -1 padded
    idx = torch.full((TOKENS, KV_HEADS, COUNT), -1, dtype=torch.int64)
    for t in range(TOKENS):
        for h in range(KV_HEADS):
            allowed = t // LP + 1
            pick = torch.randperm(allowed, generator=gen)[:min(COUNT, allowed)].sort().values
            idx[t, h, :pick.numel()] = pick
    return q, k, v, idx


def test_pieces_merge_to_the_single_call():
    gen = torch.Generator().manual_seed(0)
    config = NSAConfig(compress_block_size=LP, compress_stride=LP, select_block_size=LP, select_count=COUNT,
                       select_init_blocks=0, select_local_blocks=0, window_size=1)
    scale = 0.4
    q, k, v, idx = _inputs(gen)
    positions = torch.arange(TOKENS)
    weight = torch.randn(TOKENS, KV_HEADS * GROUP, 3, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference.selected_attention(*leaves, idx, positions, config, scale)
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), leaves)

    out = torch.zeros_like(ref_out)
    lse = torch.full_like(ref_lse, float("-inf"))
    pieces = []
    for first, end in zip(CUTS[:-1], CUTS[1:]):
        key_lo, key_hi = first * LP, min(end * LP, TOKENS)
        work = PieceWork(row=0, rows=slice(key_lo, TOKENS), slot=0, keys=slice(key_lo, key_hi), first_block=first,
                         end_block=end, q_pos=positions[key_lo:] - key_lo)
        ids = work.block_ids(idx[work.rows])
        assert (ids == -1).all(dim=-1).any(), "a piece where some row selects nothing"
        out_c, lse_c = reference.selected_attention(q[work.rows], k[work.keys], v[work.keys], ids, work.q_pos,
                                                    config, scale)
        merge_partial(out[work.rows], lse[work.rows], out_c, lse_c)
        pieces.append((work, ids))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)

    grads = [torch.zeros_like(x) for x in (q, k, v)]
    for work, ids in pieces:
        parts = [q[work.rows].clone().requires_grad_(), k[work.keys].clone().requires_grad_(),
                 v[work.keys].clone().requires_grad_()]
        out_c, lse_c = reference.selected_attention(*parts, ids, work.q_pos, config, scale)
        feed = partial_grads(out_c, lse_c, out[work.rows], lse[work.rows], weight[work.rows])
        assert all(torch.isfinite(f).all() for f in feed)
        dq, dk, dv = torch.autograd.grad((out_c, lse_c), parts, feed)
        grads[0][work.rows] += dq
        grads[1][work.keys] += dk
        grads[2][work.keys] += dv
    for name, grad, ref in zip("qkv", grads, ref_grads):
        assert ref.abs().max() > 0
        torch.testing.assert_close(grad, ref, rtol=0, atol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")
