"""The band kernels (window and compressed branches) skip the visibility mask on key / query tiles that
every row sees whole. Pieces long enough that most tiles take that path, with tiles that straddle the
causal edge, the window's far edge and segment ends, must still equal the reference: outputs, LSEs and
gradients, packed segments with query offsets (as context parallelism calls them)."""
import pytest
import torch

from megatron_nsa import NSAConfig
from megatron_nsa import reference as R

pytest.importorskip("nsa_kernels")
from nsa_kernels.band import band_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
TOL = 1.5e-2 if CUDA else 1e-4

# CPU: interpreter tiles are 16 x 16, so a 40-token window has whole tiles on both sides and the
# compressed keys of 190 tokens (stride 4) span several whole tiles
CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4,
                   window_size=40) if not CUDA else NSAConfig()
# (document length, first query position, number of queries) per packed segment
SEGMENTS = [(190, 0, 190), (97, 0, 97), (170, 61, 83)] if not CUDA else [(9000, 0, 9000), (3001, 0, 3001),
                                                                           (12000, 5000, 4100)]
HEADS = (4, 2) if not CUDA else (16, 2)  # G = 2 / 8; the compressed dK/dV splits the group over programs
DIMS = (16, 16) if not CUDA else (128, 128)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kind", ["window", "compressed"])
def test_band_kernel_matches_reference_over_whole_and_edge_tiles(kind):
    gen = torch.Generator(device=DEVICE).manual_seed(11 + len(kind))
    hq, hkv = HEADS
    dk, dv = DIMS
    scale = CONFIG.scale_for(dk)
    qs, ks, vs, q_pos0, k_first, refs = [], [], [], [], [], []
    for doc_len, p0, num_q in SEGMENTS:
        q = torch.randn(num_q, hq, dk, generator=gen, device=DEVICE)
        k = torch.randn(doc_len, hkv, dk, generator=gen, device=DEVICE)
        v = torch.randn(doc_len, hkv, dv, generator=gen, device=DEVICE)
        q_pos = torch.arange(p0, p0 + num_q, device=DEVICE)
        if kind == "window":
            first = max(0, p0 - CONFIG.window_size + 1)
            keys, values = k[first:p0 + num_q], v[first:p0 + num_q]
        else:
            first = 0
            keys, values = R.compress_sequence(k, v, CONFIG, None)
        qs.append(q)
        ks.append(keys)
        vs.append(values)
        q_pos0.append(p0)
        k_first.append(first)
        refs.append(q_pos)
    q = torch.cat(qs).to(DTYPE).requires_grad_()
    k = torch.cat(ks).to(DTYPE).requires_grad_()
    v = torch.cat(vs).to(DTYPE).requires_grad_()
    cu_q = torch.tensor([0] + torch.tensor([len(x) for x in qs]).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + torch.tensor([len(x) for x in ks]).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    out, lse = band_attention(q, k, v, cu_q, cu_k, kind, CONFIG, scale, as_int(q_pos0), as_int(k_first))

    qf, kf, vf = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = [], []
    for i, q_pos in enumerate(refs):
        qi, ki, vi = (t[c[i]:c[i + 1]] for t, c in ((qf, cu_q), (kf, cu_k), (vf, cu_k)))
        if kind == "window":
            o, l = R.window_attention(qi, ki, vi, q_pos, k_first[i], CONFIG, scale)
        else:
            o, l, _ = R.compressed_attention(qi, ki, vi, q_pos, CONFIG, scale)
        ref_out.append(o)
        ref_lse.append(l)
    ref_out, ref_lse = torch.cat(ref_out), torch.cat(ref_lse)
    assert _rel(out, ref_out) < TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=20 * TOL)

    grad = torch.randn(out.shape, generator=gen, device=DEVICE).to(DTYPE)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (qf, kf, vf), grad.double())
    for name, g, w in zip("qkv", got, want):
        assert _rel(g, w) < 2 * TOL, f"d{name}"
