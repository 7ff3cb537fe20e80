"""The Triton backend computes the reference's function: outputs, LSEs, selected blocks and all gradients.

On CPU (CI) the kernels run in Triton's interpreter, in fp32/fp16 at tiny shapes. On a GPU the same
tests run in bf16 at real sizes (ragged documents, G = 1..32, the paper's shape). qk head dims that are
not a power of two run as two column parts (kernels/qk_parts.py): 48 = 32 + 16, 24 = 16 + 16 (8 used),
192 = 128 + 64, 96 = 64 + 32.
"""
import dataclasses
import zlib

import pytest
import torch

from megatron_nsa import KVCompressor, NSAConfig, nsa_attention
from megatron_nsa import reference as R

nsa_kernels = pytest.importorskip("nsa_kernels")
from nsa_kernels.band import band_attention  # noqa: E402
from nsa_kernels.topk import select_blocks  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@dataclasses.dataclass
class Case:
    doc_lens: list
    num_q_heads: int
    num_kv_heads: int
    head_dim_qk: int
    head_dim_v: int
    config: NSAConfig
    dtype: torch.dtype
    compression: str = "mean"

    def __str__(self):
        return (f"docs{self.doc_lens}-h{self.num_q_heads}/{self.num_kv_heads}-d{self.head_dim_qk}/{self.head_dim_v}-"
                f"{str(self.dtype)[6:]}-{self.config.compression}")


TINY = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4, window_size=20)
PAPER = NSAConfig()  # l/d/l'/n/w = 32/16/64/16/512

if CUDA:
    SPLIT_CASE = Case([3001, 95, 1000], 8, 8, 192, 128, PAPER, torch.bfloat16)  # d_k = 128 + 64, G = 1
    CASES = [
        Case([4096], 64, 4, 128, 128, PAPER, torch.bfloat16),
        Case([3001, 95, 1000], 16, 4, 128, 128, PAPER, torch.bfloat16),
        Case([2048], 64, 4, 192, 128, PAPER, torch.bfloat16),
        SPLIT_CASE,
        Case([1800, 300], 32, 2, 192, 128, PAPER, torch.bfloat16),
        Case([1500, 700], 8, 2, 96, 64, PAPER, torch.float16),
        Case([1500, 700], 8, 2, 64, 64, PAPER, torch.float16),
        Case([2500], 32, 4, 128, 64, dataclasses.replace(PAPER, compression="linear"), torch.bfloat16, "linear"),
        Case([2000, 600], 64, 4, 128, 128, dataclasses.replace(PAPER, compression="mlp"), torch.bfloat16, "mlp"),
    ] + [Case([1800, 300], 2 * g, 2, 128, 128, PAPER, torch.bfloat16) for g in (1, 2, 4, 8, 16, 32)]
else:  # the interpreter is slow: a few tokens past several blocks of each kind
    SPLIT_CASE = Case([33, 9], 2, 2, 24, 16, TINY, torch.float16)  # d_k = 16 + 16 (8 columns used), G = 1
    CASES = [
        Case([37, 5, 30], 4, 2, 16, 32, TINY, torch.float32),
        Case([50], 4, 4, 16, 16, TINY, torch.float32),
        Case([41, 20], 8, 1, 32, 16, dataclasses.replace(TINY, compression="linear"), torch.float32, "linear"),
        Case([45, 20], 4, 2, 16, 16, dataclasses.replace(TINY, compression="mlp"), torch.float32, "mlp"),
        Case([45], 4, 2, 16, 16, TINY, torch.float16),
        Case([40], 32, 1, 16, 16, TINY, torch.float32),  # G = 32: top-n walks the group in two head chunks
        Case([33, 9], 6, 2, 16, 16, TINY, torch.float32),  # G = 3, not a power of two
        Case([37, 5, 30], 2, 1, 48, 16, TINY, torch.float32),  # d_k = 32 + 16, G = 2
        SPLIT_CASE,
    ]
# whole-pipeline checks (bitwise reproducibility, every output written); on CPU only the two-part case,
# whose kernels store both column parts (part a is the whole of a power-of-two d_k)
CHECK_CASES = [CASES[1], SPLIT_CASE] if CUDA else [SPLIT_CASE]


def _inputs(case: Case, seed: int):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    total = sum(case.doc_lens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(case.dtype).requires_grad_()

    q = randn(1, total, case.num_q_heads, case.head_dim_qk)
    k = randn(1, total, case.num_kv_heads, case.head_dim_qk)
    v = randn(1, total, case.num_kv_heads, case.head_dim_v)
    gates = torch.rand(1, total, case.num_q_heads, 3, generator=gen, device=DEVICE).to(case.dtype).requires_grad_()
    cu = torch.tensor([0] + torch.tensor(case.doc_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    compressor = None
    if case.compression != "mean":
        torch.manual_seed(seed)
        compressor = KVCompressor(case.compression, case.config.compress_block_size, case.head_dim_qk,
                                  case.head_dim_v, device=DEVICE, dtype=torch.float32)
    return q, k, v, gates, cu, compressor


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _tolerance(dtype):
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1.5e-2}[dtype]


def _reference_block_ranking(q, k, v, cu, config, compressor):
    """Per (token, KV head, block): the reference's ranking value (forced +inf, invalid -inf), float64."""
    rows = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[0, start:end].double() for t in (q, k, v))
        ck, cv = R.compress_sequence(kd, vd, config, compressor.double() if compressor else None)
        pos = torch.arange(end - start, device=q.device)
        _, _, probs = R.compressed_attention(qd, ck, cv, pos, config, config.scale_for(q.shape[-1]))
        num_slc = R.num_selection_blocks(end - start, config)
        scores = R.block_scores(probs, num_slc, k.shape[2], config)
        block = torch.arange(num_slc, device=q.device)[None, :]
        current = (pos // config.select_block_size)[:, None]
        valid = block <= current
        forced = valid & ((block < config.select_init_blocks) | (block > current - config.select_local_blocks))
        rows.append(torch.where(forced[:, None], float("inf"), torch.where(valid[:, None], scores, float("-inf"))))
    return rows


def _reference_selected(q, k, v, selected_block_idx, cu, config):
    outs = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        pos = torch.arange(end - start, device=q.device)
        out, _ = R.selected_attention(q[0, start:end], k[0, start:end], v[0, start:end],
                                      selected_block_idx[start:end].long(), pos, config, config.scale_for(q.shape[-1]))
        outs.append(out)
    return torch.cat(outs)


def _check_selection(kernel_idx, q, k, v, cu, config, compressor):
    """Kernel picks a top-n set: identical to the reference's except where block scores tie (to rounding)."""
    for doc, ranking in zip(range(len(cu) - 1), _reference_block_ranking(q, k, v, cu, config, compressor)):
        idx = kernel_idx[cu[doc]:cu[doc + 1]].long()  # [T, H_kv, n]
        picked = torch.where(idx >= 0, ranking.gather(-1, idx.clamp(min=0)), float("-inf"))
        best = ranking.sort(dim=-1, descending=True).values[..., : idx.shape[-1]]
        if best.shape[-1] < idx.shape[-1]:
            best = torch.nn.functional.pad(best, (0, idx.shape[-1] - best.shape[-1]), value=float("-inf"))
        picked = picked.sort(dim=-1, descending=True).values
        finite = torch.isfinite(best)
        assert torch.equal(torch.isinf(picked), torch.isinf(best)), "forced / valid block counts differ"
        assert torch.allclose(picked[finite], best[finite], atol=1e-3, rtol=1e-3), "kernel skipped a better block"
        assert (idx >= 0).sum() == torch.isfinite(best).logical_or(best == float("inf")).sum()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    config = dataclasses.replace(case.config)
    q, k, v, gates, cu, compressor = _inputs(case, seed=zlib.crc32(str(case).encode()) % 1000)  # str hash() changes per process
    params = [q, k, v, gates] + (list(compressor.parameters()) if compressor else [])

    out, inter = _triton_with_intermediates(q, k, v, gates, cu, config, compressor)
    assert torch.isfinite(out).all()
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, grad_out)

    up = [t.detach().float().requires_grad_() for t in (q, k, v, gates)]
    compressed_keys = []  # phi's key outputs, one per document: their gradient sizes a rounding allowance below
    hook = compressor.k_map.register_forward_hook(lambda _m, _i, o: compressed_keys.append(o)) if compressor else None
    ref_out, ref_inter = R.nsa_reference(up[0], (up[1], up[2]), (up[1], up[2]), (up[1], up[2]), up[3], config,
                                         cu, compressor, return_intermediates=True)
    if hook is not None:
        hook.remove()
    ref_params = up + (list(compressor.parameters()) if compressor else [])
    ref_grads = torch.autograd.grad(ref_out[0], ref_params + compressed_keys, grad_out.float(),
                                    retain_graph=bool(compressed_keys))
    ref_grads, compressed_key_grads = ref_grads[:len(ref_params)], ref_grads[len(ref_params):]
    walk = {}
    if compressor:
        walk = _random_walk_grads(dict(compressor.named_parameters()), compressed_keys, compressed_key_grads)

    tol = _tolerance(case.dtype)
    assert _rel(out, ref_out[0]) < tol
    for name in ("cmp_out", "win_out"):
        assert _rel(inter[name], getattr(ref_inter, name)) < tol, name
    # the selected branch on the kernel's own blocks (near-tied scores may pick other blocks; see _check_selection)
    slc_ref = _reference_selected(up[0], up[1], up[2], inter["selected_block_idx"], cu, config)
    assert _rel(inter["slc_out"], slc_ref) < tol
    for name in ("cmp_lse", "win_lse", "slc_lse"):
        got, want = inter[name], getattr(ref_inter, name)
        assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        finite = torch.isfinite(want)
        assert torch.allclose(got[finite], want[finite], atol=20 * tol, rtol=tol), name
    names = ["q", "k", "v", "gates"] + [n for n, _ in compressor.named_parameters()] if compressor else ["q", "k", "v", "gates"]
    for name, got, want in zip(names, grads, ref_grads):
        # the linear key map's position embedding and the mlp key map's output bias shift every compressed key
        # alike, which no softmax sees: their true gradient is a sum that cancels, and the kernel's is the sum of
        # its compressed-key gradients' rounding errors, which at a relative size tol with random signs is tol * walk
        shifts_all_keys = name == "k_map.proj.2.bias" or (name == "k_map.pos_emb" and case.compression == "linear")
        scale = want.norm().item() + (0.5 * walk[name] if shifts_all_keys else 0.0)
        assert ((got.double() - want.double()).norm() / max(scale, 1e-30)).item() < 2 * tol, name
    _check_selection(inter["selected_block_idx"], q, k, v, cu, config, compressor)


def _random_walk_grads(params: dict, outputs, output_grads):
    """{name: norm of the gradient that errors on `outputs` of the size of output_grads, with independent random
    signs, give that parameter}: how the map from the parameters to the outputs sums rounding errors of the
    outputs' gradients (where it adds outputs up, as a bias does, a random walk of their norm)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    errors = [(torch.randint(0, 2, g.shape, generator=gen, device=g.device) * 2 - 1).to(g.dtype) * g.abs()
              for g in output_grads]
    grads = torch.autograd.grad(outputs, list(params.values()), errors, allow_unused=True, materialize_grads=True)
    return {name: grad.norm().item() for name, grad in zip(params, grads)}


def _triton_with_intermediates(q, k, v, gates, cu, config, compressor):
    params = nsa_kernels.KernelParams.from_config(config, config.scale_for(q.shape[-1]))
    layout = nsa_kernels.packed_documents(cu, q.shape[1], params)
    compressed = R.compress_packed(k[0], v[0], cu, config, compressor)
    return nsa_kernels.nsa_core(q[0], (k[0], v[0]), (k[0], v[0]), compressed, gates[0], layout, params,
                                return_intermediates=True)


# (H_q, H_kv, d_k, n): G = 1 and G > 1, d_k of one part and of two; n of the config, or n above 16 (the
# running top-n is then wider than the kernel's default tile of 16 blocks)
TOP_N_SHAPES = [(2, 2, 24, None), (4, 1, 48, None), (4, 2, 16, None), (2, 1, 16, 20)] if not CUDA else \
    [(64, 4, 192, None), (16, 16, 192, None), (16, 4, 96, None), (64, 4, 128, 24)]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim_qk,select_count", TOP_N_SHAPES)
def test_top_n_matches_reference(num_q_heads, num_kv_heads, head_dim_qk, select_count):
    """Scoring + top-n alone, on documents with many more blocks than n, so that the ranking decides
    (the whole-pipeline cases on CPU are too short for that)."""
    config = TINY if not CUDA else PAPER
    if select_count is not None:
        config = dataclasses.replace(config, select_count=select_count)
    doc_lens = [150, 90] if not CUDA else [6000, 2100]  # CPU: up to 10 blocks of 16 tokens, n = 4
    if select_count is not None and not CUDA:
        doc_lens = [520, 180]  # 33 blocks of 16 tokens, n = 20
    case = Case(doc_lens, num_q_heads, num_kv_heads, head_dim_qk, 16, config,
                torch.float32 if not CUDA else torch.bfloat16)
    q, k, v, _, cu, _ = _inputs(case, seed=head_dim_qk)
    config = case.config
    params = nsa_kernels.KernelParams.from_config(config, config.scale_for(head_dim_qk))
    layout = nsa_kernels.packed_documents(cu, q.shape[1], params)
    with torch.no_grad():
        compressed_k, compressed_v = R.compress_packed(k[0], v[0], cu, config)
        _, cmp_lse = band_attention(q[0], compressed_k, compressed_v, layout, "compressed", params)
        # NaN rows past the last document's compressed keys, which a descriptor's whole tiles reach
        nan_rows = torch.full((3,) + compressed_k.shape[1:], float("nan"), device=q.device, dtype=q.dtype)
        selected_block_idx = select_blocks(q[0], torch.cat([compressed_k, nan_rows]), cmp_lse, layout, params)
    _check_selection(selected_block_idx, q.detach(), k.detach(), v.detach(), cu, config, None)


def test_functional_triton_backend_matches_torch_backend_batched():
    """nsa_attention(backend='triton') on a [B, T] batch with separate K/V per branch."""
    config = dataclasses.replace(TINY if not CUDA else PAPER, separate_kv=True)
    seq_len = 36 if not CUDA else 1500
    dtype = torch.float32 if not CUDA else torch.bfloat16
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=gen, device=DEVICE).to(dtype).requires_grad_()  # noqa: E731
    q = mk(2, seq_len, 4, 16 if not CUDA else 64)
    ks = tuple(mk(2, seq_len, 2, q.shape[-1]) for _ in range(3))
    vs = tuple(mk(2, seq_len, 2, 16 if not CUDA else 64) for _ in range(3))
    gates = torch.rand(2, seq_len, 4, 3, generator=gen, device=DEVICE).to(dtype).requires_grad_()
    out = nsa_attention(q, ks, vs, gates, config, backend="triton")
    ref = nsa_attention(q, ks, vs, gates, config, backend="torch")
    grad_out = torch.randn_like(out)
    params = [q, *ks, *vs, gates]
    grads = torch.autograd.grad(out, params, grad_out)
    ref_grads = torch.autograd.grad(ref, params, grad_out)
    tol = _tolerance(dtype)
    assert _rel(out, ref) < tol
    for got, want in zip(grads, ref_grads):
        assert _rel(got, want) < 2 * tol


@pytest.mark.parametrize("case", CHECK_CASES, ids=str)
def test_backward_is_bitwise_reproducible(case):
    q, k, v, gates, cu, compressor = _inputs(case, seed=3)
    grad_out = None
    results = []
    for _ in range(2):
        out, _ = _triton_with_intermediates(q, k, v, gates, cu, case.config, compressor)
        grad_out = torch.randn_like(out, generator=None) if grad_out is None else grad_out
        results.append(torch.autograd.grad(out, (q, k, v, gates), grad_out))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("case", CHECK_CASES, ids=str)
def test_outputs_are_fully_written(monkeypatch, case):
    """Every buffer the kernels allocate starts poisoned (NaN / -7777): all outputs and gradients must be written."""
    q, k, v, gates, cu, compressor = _inputs(case, seed=11)
    out, _ = _triton_with_intermediates(q, k, v, gates, cu, case.config, compressor)
    grad_out = torch.randn_like(out)
    clean = (out.detach(),) + torch.autograd.grad(out, (q, k, v, gates), grad_out)

    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7777)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(real_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(real_empty_like(*a, **kw)))
    out, inter = _triton_with_intermediates(q, k, v, gates, cu, case.config, compressor)
    poisoned = (out.detach(),) + torch.autograd.grad(out, (q, k, v, gates), grad_out)
    for name in ("slc_out", "win_out", "cmp_out", "slc_lse", "win_lse"):
        assert torch.isfinite(inter[name]).all(), name
    assert (inter["selected_block_idx"] >= -1).all()
    for a, b in zip(clean, poisoned):
        assert torch.equal(a, b)
