"""Selected attention with several query tokens per program (kernels/selected.py): a program streams the
union of its tokens' blocks once, and each row sees only the blocks its own token picked.

Selections are drawn so that neighbouring tokens share some blocks and not others, some rows use only
part of their slots or none, and token tiles straddle document boundaries; outputs, LSEs and gradients
are compared with the reference for each tile height (launch parameter ROWS) and group size.
"""
import dataclasses

import pytest
import torch

from megatron_nsa import NSAConfig
from megatron_nsa import reference as R

pytest.importorskip("nsa_kernels")
from nsa_kernels import KernelParams, packed_documents  # noqa: E402
from nsa_kernels.selected import selected_attention, tile_block_union, tokens_per_tile  # noqa: E402
from nsa_kernels.tuning import overrides  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1.5e-2 if CUDA else 1e-4
CONFIG = NSAConfig() if CUDA else NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16,
                                            select_count=4, window_size=20)
DOC_LENS = [1500, 37, 900] if CUDA else [37, 5, 30]  # 5-token tiles and a 37-token document cross boundaries
HEAD_DIM = 128 if CUDA else 16


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _cu(doc_lens):
    return torch.tensor([0] + torch.tensor(doc_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


def _selection(doc_lens, num_kv_heads, config, gen):
    """[T, H_kv, n] block ids within each document, used slots first: each token draws from its own
    causal blocks, half the time copying its left neighbour's pick, and uses 0..n of its slots."""
    n, block = config.select_count, config.select_block_size
    rows = []
    for doc_len in doc_lens:
        previous = None
        for t in range(doc_len):
            row = torch.full((num_kv_heads, n), -1, dtype=torch.int64)
            for h in range(num_kv_heads):
                candidates = torch.randperm(t // block + 1, generator=gen)
                used = int(torch.randint(0, n + 1, (1,), generator=gen)) if t % 7 else n
                picks = candidates[:used].tolist()
                if previous is not None and torch.rand(1, generator=gen) < 0.5:
                    picks = list(dict.fromkeys([b for b in previous[h].tolist() if b >= 0] + picks))[:used]
                row[h, :len(picks)] = torch.tensor(picks, dtype=torch.int64)
            rows.append(row)
            previous = row
    return torch.stack(rows).to(DEVICE)


def _reference(q, k, v, idx, doc_lens, config, scale):
    outs, lses = [], []
    for start, end in zip(_cu(doc_lens)[:-1].tolist(), _cu(doc_lens)[1:].tolist()):
        pos = torch.arange(end - start, device=q.device)
        out, lse = R.selected_attention(q[start:end], k[start:end], v[start:end], idx[start:end], pos, config, scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def test_tile_block_union_is_each_tiles_distinct_blocks():
    gen = torch.Generator().manual_seed(0)
    idx = _selection(DOC_LENS, 2, CONFIG, gen)
    layout = packed_documents(_cu(DOC_LENS), sum(DOC_LENS), KernelParams.from_config(CONFIG, 1.0))
    global_ids = torch.where(idx >= 0, idx + layout.row_slc_start.long()[:, None, None], -1)
    for tokens in (1, 3, 4, 16):
        union = tile_block_union(idx, layout.row_slc_start, tokens)
        assert union.dtype == torch.int32 and union.shape == (-(-idx.shape[0] // tokens), 2, tokens * idx.shape[2])
        for tile in range(union.shape[0]):
            for head in range(2):
                got = union[tile, head].tolist()
                used = [b for b in got if b >= 0]
                assert got == used + [-1] * (len(got) - len(used)), "used entries first"
                rows = global_ids[tile * tokens:(tile + 1) * tokens, head]
                want = sorted({b for b in rows.flatten().tolist() if b >= 0})
                if tokens == 1:
                    assert got == idx[tile, head].tolist(), "one token: its own selection as it is"
                else:
                    assert used == want


# blocks of two or more steps of KEYS keys (the interpreter's blocks are 16 keys, a dot's smallest width)
SPLIT_CONFIG = CONFIG if CUDA else dataclasses.replace(CONFIG, select_block_size=32)


@pytest.mark.parametrize("num_q_heads,num_kv_heads,rows,keys", [
    (2, 2, 16, None), (4, 2, 16, None), (6, 2, 16, None), (8, 2, 16, None), (32, 2, 16, None), (32, 2, 64, None),
    (8, 2, 64, None), (16, 1, 32, None),
    (32, 2, 16, 16), (32, 2, 16, 32), (8, 2, 64, 16), (6, 2, 16, 16)])
def test_tiled_selected_attention_matches_reference(num_q_heads, num_kv_heads, rows, keys):
    """rows: ROWS (tokens per program); keys: KEYS (keys per step of a block's walk, None: the whole block).
    K and V end in NaN rows past the last document, which must not reach any result."""
    config = CONFIG if keys is None else SPLIT_CONFIG
    launch = dict(ROWS=rows) if keys is None else dict(ROWS=rows, KEYS=keys)
    group = num_q_heads // num_kv_heads
    gen = torch.Generator().manual_seed(num_q_heads * 100 + rows + (keys or 0))
    total = sum(DOC_LENS)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, DTYPE).requires_grad_()  # noqa: E731
    q = mk(total, num_q_heads, HEAD_DIM)
    nan_rows = torch.full((3, num_kv_heads, HEAD_DIM), float("nan"), device=DEVICE, dtype=DTYPE)
    k, v = (torch.cat([mk(total, num_kv_heads, HEAD_DIM), nan_rows]).detach().requires_grad_() for _ in range(2))
    idx = _selection(DOC_LENS, num_kv_heads, config, gen)
    scale = config.scale_for(HEAD_DIM)
    params = KernelParams.from_config(config, scale)
    layout = packed_documents(_cu(DOC_LENS), sum(DOC_LENS), params)
    assert tokens_per_tile(group, rows) == max(1, rows // (1 << (group - 1).bit_length()))
    with overrides("selected_fwd", **launch), overrides("selected_dq", **launch):
        out, lse = selected_attention(q, k, v, idx.to(torch.int32), layout, params)
        grad_out = torch.randn(out.shape, generator=gen).to(DEVICE, DTYPE)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert all(torch.equal(g[total:], torch.zeros_like(g[total:])) for g in grads[1:]), "dK/dV of the NaN rows"
    grads = [g[:total] for g in grads]
    up = [t.detach()[:total].double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = _reference(*up, idx, DOC_LENS, config, scale)
    ref_grads = torch.autograd.grad(ref_out, up, grad_out.double())
    assert _rel(out, ref_out) < TOL
    finite = torch.isfinite(ref_lse)
    assert (~finite).any(), "some rows see no key (no used slot)"
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=20 * TOL)
    assert (out[~finite] == 0).all()
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 2 * TOL


def test_tiled_outputs_are_fully_written(monkeypatch):
    """Buffers start poisoned (NaN / -7777): the tiled forward and dQ still write every row."""
    gen = torch.Generator().manual_seed(5)
    total = sum(DOC_LENS)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, DTYPE).requires_grad_()  # noqa: E731
    q, k, v = mk(total, 4, HEAD_DIM), mk(total, 2, HEAD_DIM), mk(total, 2, HEAD_DIM)
    idx = _selection(DOC_LENS, 2, CONFIG, gen).to(torch.int32)
    params = KernelParams.from_config(CONFIG, CONFIG.scale_for(HEAD_DIM))
    layout = packed_documents(_cu(DOC_LENS), sum(DOC_LENS), params)
    grad_out = torch.randn(total, 4, HEAD_DIM, generator=gen).to(DEVICE, DTYPE)

    def run():
        out, lse = selected_attention(q, k, v, idx, layout, params)
        return (out.detach(), lse) + torch.autograd.grad(out, (q, k, v), grad_out)

    clean = run()
    real_empty, real_empty_like = torch.empty, torch.empty_like
    poison = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7777)  # noqa: E731
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    for a, b in zip(clean, run()):
        assert torch.equal(a, b)
