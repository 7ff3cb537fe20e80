"""The band kernels (window and compressed branches) skip the visibility mask on key / query tiles that
every row sees whole. Pieces long enough that most tiles take that path, with tiles that straddle the
causal edge, the window's far edge and segment ends, must still equal the reference: outputs, LSEs and
gradients, packed segments with query offsets (as context parallelism calls them), with the streamed
tiles read through tensor descriptors and through pointers."""
import contextlib

import pytest
import torch

from megatron_nsa import NSAConfig
from megatron_nsa import reference as R

pytest.importorskip("nsa_kernels")
from nsa_kernels import tma as tma_module  # noqa: E402
from nsa_kernels import tuning  # noqa: E402
from nsa_kernels import KernelParams, Layout  # noqa: E402
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


@pytest.mark.parametrize("use_tma", [True, False], ids=["descriptors", "pointers"])
@pytest.mark.parametrize("kind", ["window", "compressed"])
def test_band_kernel_matches_reference_over_whole_and_edge_tiles(kind, use_tma, monkeypatch):
    """use_tma: the streamed tiles read through tensor descriptors (TMA where the GPU has the copy engine; the
    interpreter always) or through pointers. A descriptor reads whole tiles, past a segment's end too: two
    trailing segments of NaN rows (queries without keys, keys without queries) must not reach any result."""
    described = []
    describe = tma_module.tma_descriptors

    def spy(tensors, block_rows, enabled):
        descriptors = describe(tensors, block_rows, enabled)
        described.append(descriptors is not None)
        return descriptors

    monkeypatch.setattr(tma_module, "tma_descriptors", spy)
    with contextlib.ExitStack() as stack:
        for kernel in ("band_fwd", "band_dq", "band_dkdv"):
            stack.enter_context(tuning.overrides(f"{kernel}/{kind}", TMA=use_tma))
        _check_band_kernel(kind)
    engine = tma_module._engine_present(torch.device(DEVICE))
    assert described == [use_tma and engine] * 3  # forward, dQ, dK/dV


def _check_band_kernel(kind):
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
    num_q_rows, num_k_rows = sum(len(x) for x in qs), sum(len(x) for x in ks)
    nan = float("nan")
    qs += [torch.full((5, hq, dk), nan, device=DEVICE), torch.zeros(0, hq, dk, device=DEVICE)]
    ks += [torch.zeros(0, hkv, dk, device=DEVICE), torch.full((7, hkv, dk), nan, device=DEVICE)]
    vs += [torch.zeros(0, hkv, dv, device=DEVICE), torch.full((7, hkv, dv), nan, device=DEVICE)]
    q_pos0 += [0, 0]
    k_first += [0, 0]
    q = torch.cat(qs).to(DTYPE).requires_grad_()
    k = torch.cat(ks).to(DTYPE).requires_grad_()
    v = torch.cat(vs).to(DTYPE).requires_grad_()
    cu_q = torch.tensor([0] + torch.tensor([len(x) for x in qs]).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + torch.tensor([len(x) for x in ks]).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    # segment i: queries at positions q_pos0[i].., keys (token or compressed) from key index k_first[i]
    layout = Layout(q_bounds=cu_q, k_bounds=cu_k, c_bounds=cu_k, q_start=as_int(q_pos0), k_start=as_int(k_first),
                    c_start=as_int(k_first))
    out, lse = band_attention(q, k, v, layout, kind, KernelParams.from_config(CONFIG, scale))
    assert torch.equal(out[num_q_rows:], torch.zeros_like(out[num_q_rows:]))  # queries without keys
    assert torch.equal(lse[num_q_rows:], torch.full_like(lse[num_q_rows:], float("-inf")))

    qf, kf, vf = (t.detach()[:n].double().requires_grad_() for t, n in ((q, num_q_rows), (k, num_k_rows),
                                                                         (v, num_k_rows)))
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
    assert _rel(out[:num_q_rows], ref_out) < TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse[:num_q_rows]), finite)
    assert torch.allclose(lse[:num_q_rows][finite].double(), ref_lse[finite], atol=20 * TOL)

    grad = torch.randn(out.shape, generator=gen, device=DEVICE).to(DTYPE)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref_out, (qf, kf, vf), grad[:num_q_rows].double())
    for name, g, w in zip("qkv", got, want):
        assert _rel(g[:len(w)], w) < 2 * TOL, f"d{name}"
        assert torch.equal(g[len(w):], torch.zeros_like(g[len(w):])), f"d{name} of the NaN rows"
