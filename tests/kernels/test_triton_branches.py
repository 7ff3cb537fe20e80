"""nsa_kernels' per-branch functions (used by context parallelism) equal the reference's, for a piece of a
document: queries at positions p0.., all compressed / selection keys, window keys from k_start."""
import pytest
import torch

from megatron_nsa import NSAConfig
from megatron_nsa import reference as R

nsa_kernels = pytest.importorskip("nsa_kernels")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1.5e-2 if CUDA else 1e-4


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# (doc_len, p0, num_q, d_k, d_v); d_k 24 and 192 run as two column parts (16 + 16, 128 + 64)
@pytest.mark.parametrize("doc_len,p0,num_q,dim,dim_v", [(70, 29, 24, 24, 16), (48, 0, 48, 16, 16)] if not CUDA else
                         [(8192, 3000, 2048, 128, 128), (8192, 3000, 2048, 192, 128)])
def test_branch_functions_match_reference(doc_len, p0, num_q, dim, dim_v):
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4,
                       window_size=20) if not CUDA else NSAConfig()
    gen = torch.Generator(device=DEVICE).manual_seed(doc_len + p0)
    mk = lambda *s: torch.randn(*s, generator=gen, device=DEVICE).to(DTYPE).requires_grad_()  # noqa: E731
    hq, hkv = (4, 2) if not CUDA else (16, 2)
    q, k, v = mk(num_q, hq, dim), mk(doc_len, hkv, dim), mk(doc_len, hkv, dim_v)
    q_pos = torch.arange(p0, p0 + num_q, device=DEVICE)
    scale = config.scale_for(dim)
    ck, cv = R.compress_sequence(k, v, config, None)
    k_start = max(0, p0 - config.window_size + 1)
    up = lambda *ts: [t.detach().float().requires_grad_() for t in ts]  # noqa: E731
    qf, kf, vf = up(q, k, v)
    ckf, cvf = R.compress_sequence(kf, vf, config, None)

    out, lse, scores = nsa_kernels.compressed_attention(q, ck, cv, q_pos, config, scale)
    ref_out, ref_lse, ref_probs = R.compressed_attention(qf, ckf, cvf, q_pos, config, scale)
    assert _rel(out, ref_out) < TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.allclose(lse[finite], ref_lse[finite], atol=20 * TOL)

    num_slc = R.num_selection_blocks(doc_len, config)
    idx = nsa_kernels.select_blocks(scores, q_pos, num_slc, hkv, config)
    ref_idx = R.select_blocks(ref_probs.detach(), q_pos, num_slc, hkv, config)
    assert idx.dtype == torch.int64 and idx.shape == ref_idx.shape
    assert (idx != ref_idx).any(-1).float().mean() < (1e-4 if not CUDA else 2e-2)  # only near-ties may differ

    slc, slc_lse = nsa_kernels.selected_attention(q, k, v, idx, q_pos, config, scale)
    ref_slc, _ = R.selected_attention(qf, kf, vf, idx, q_pos, config, scale)
    assert _rel(slc, ref_slc) < TOL

    win, _ = nsa_kernels.window_attention(q, k[k_start:], v[k_start:], q_pos, k_start, config, scale)
    ref_win, _ = R.window_attention(qf, kf[k_start:], vf[k_start:], q_pos, k_start, config, scale)
    assert _rel(win, ref_win) < TOL

    grad = torch.randn_like(out)
    total = out + slc + win
    ref_total = ref_out + ref_slc + ref_win
    grads = torch.autograd.grad(total, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref_total, (qf, kf, vf), grad.float())
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 2 * TOL


def test_lse_is_differentiable():
    """A gradient on the returned lse (context parallelism's log-sum-exp merge of partial results) reaches
    q, k and v as the reference's does, for the selected and window branches."""
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4,
                       window_size=20) if not CUDA else NSAConfig()
    doc_len, p0, num_q = (64, 16, 40) if not CUDA else (4096, 1000, 1024)
    hq, hkv, dim = (4, 2, 16) if not CUDA else (16, 2, 128)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=gen, device=DEVICE).to(DTYPE).requires_grad_()  # noqa: E731
    q, k, v = mk(num_q, hq, dim), mk(doc_len, hkv, dim), mk(doc_len, hkv, dim)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    q_pos = torch.arange(p0, p0 + num_q, device=DEVICE)
    scale = config.scale_for(dim)
    num_slc = R.num_selection_blocks(doc_len, config)
    idx = torch.stack([torch.randperm(num_slc, generator=torch.Generator().manual_seed(i))[:config.select_count]
                       for i in range(num_q * hkv)]).view(num_q, hkv, -1).sort(-1).values.to(DEVICE)
    idx = torch.where(idx * config.select_block_size <= q_pos[:, None, None], idx, -1)
    k_start = max(0, p0 - config.window_size + 1)
    got = [nsa_kernels.selected_attention(q, k, v, idx, q_pos, config, scale),
           nsa_kernels.window_attention(q, k[k_start:], v[k_start:], q_pos, k_start, config, scale)]
    want = [R.selected_attention(qf, kf, vf, idx, q_pos, config, scale),
            R.window_attention(qf, kf[k_start:], vf[k_start:], q_pos, k_start, config, scale)]
    for (out, lse), (ref_out, ref_lse) in zip(got, want):
        grad_out, grad_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
        finite = torch.isfinite(ref_lse)
        grad_lse = torch.where(finite, grad_lse, 0.0)
        grads = torch.autograd.grad((out.float() * grad_out).sum() + (lse.float() * grad_lse).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse.where(finite, 0.0) * grad_lse).sum(),
                                        (qf, kf, vf))
        for g, w in zip(grads, ref_grads):
            assert _rel(g, w) < 2 * TOL


def test_selected_backward_reads_head_slices_in_place():
    """selected_attention_backward on q and dO that are head slices of wider tensors (what context
    parallelism passes per KV-head group; read through their strides, not copied) gives the reference's
    gradients."""
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=3,
                       window_size=20) if not CUDA else NSAConfig()
    doc_len, p0, num_q, dim = (64, 20, 40, 16) if not CUDA else (4096, 1000, 2048, 128)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    hkv, group = 2, 2 if not CUDA else 16
    q_all = torch.randn(num_q, 2 * hkv * group, dim, generator=gen, device=DEVICE).to(DTYPE)
    grad_all = torch.randn(num_q, 2 * hkv * group, dim, generator=gen, device=DEVICE).to(DTYPE)
    heads = slice(hkv * group, 2 * hkv * group)  # the second half of the heads: strided views
    q, grad_out = q_all[:, heads], grad_all[:, heads]
    assert not q.is_contiguous() and not grad_out.is_contiguous()
    k = torch.randn(doc_len, hkv, dim, generator=gen, device=DEVICE).to(DTYPE)
    v = torch.randn(doc_len, hkv, dim, generator=gen, device=DEVICE).to(DTYPE)
    q_pos = torch.arange(p0, p0 + num_q, device=DEVICE)
    scale = config.scale_for(dim)
    num_blocks = R.num_selection_blocks(doc_len, config)
    idx = torch.stack([torch.randperm(num_blocks, generator=torch.Generator().manual_seed(i))[:config.select_count]
                       for i in range(num_q * hkv)]).view(num_q, hkv, -1).sort(-1).values.to(DEVICE)
    idx = torch.minimum(idx, (q_pos // config.select_block_size)[:, None, None])  # only visible blocks
    idx = torch.where(idx == idx.roll(1, -1), -1, idx)  # blocks clamped onto one are used once

    out, lse = nsa_kernels.selected_attention(q, k, v, idx, q_pos, config, scale)
    delta = (grad_out.float() * out.float()).sum(-1)
    grads = nsa_kernels.selected_attention_backward(q, k, v, idx, q_pos, config, scale, grad_out, lse, delta)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, _ = R.selected_attention(*leaves, idx, q_pos, config, scale)
    ref_grads = torch.autograd.grad(ref_out, leaves, grad_out.double())
    for name, got, want in zip("qkv", grads, ref_grads):
        assert want.abs().max() > 0
        assert _rel(got, want) < 2 * TOL, name
