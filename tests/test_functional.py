"""nsa_attention: gradients (gradcheck, oracle), the backend switch and every input check."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from megatron_nsa import KVCompressor, NSAConfig, nsa_attention, nsa_reference
from oracle import oracle_batch

TINY = dict(compress_block_size=2, compress_stride=1, select_block_size=2, select_count=3,
            select_init_blocks=1, select_local_blocks=1, window_size=3)


def call(q, ks, vs, gates, config, **kwargs):
    k_arg, v_arg = (ks, vs) if config.separate_kv else (ks[0], vs[0])
    return nsa_attention(q, k_arg, v_arg, gates, config, backend="torch", **kwargs)


# ---------------------------------------------------------------------------------------------
# Gradients

pytestmark = pytest.mark.usefixtures("single_thread")

@pytest.mark.parametrize("separate_kv", [False, True])
def test_gradcheck_q_k_v_gates(separate_kv, nsa_inputs):
    """T=11 with l'=2 and n=3: the top-n really chooses (6 blocks at the end); d_k != d_v; G = 2."""
    config = NSAConfig(**TINY, separate_kv=separate_kv)
    q, ks, vs, gates = nsa_inputs(1, 11, 2, 1, 3, 2, separate_kv, seed=1 + separate_kv, requires_grad=True)
    branches = 3 if separate_kv else 1
    inputs = (q, *ks[:branches], *vs[:branches], gates)

    def fn(q, *rest):
        ks, vs = rest[:branches] * (3 // branches), rest[branches:2 * branches] * (3 // branches)
        return call(q, ks, vs, rest[-1], config)

    # Full Jacobian for shared K/V; the separate case (twice the inputs) checks random projections of it.
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=separate_kv)


def test_gradcheck_packed_documents(nsa_inputs):
    config = NSAConfig(**TINY)
    q, ks, vs, gates = nsa_inputs(1, 12, 2, 2, 2, 2, False, seed=7, requires_grad=True)
    cu_seqlens = torch.tensor([0, 1, 8, 12])
    assert torch.autograd.gradcheck(
        lambda q, k, v, g: nsa_attention(q, k, v, g, config, cu_seqlens=cu_seqlens, backend="torch"),
        (q, ks[0], vs[0], gates),
        fast_mode=True,
    )


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradcheck_compression_parameters(kind, nsa_inputs, nsa_compressor):
    config = NSAConfig(**TINY, compression=kind, compress_mlp_hidden=3)
    q, ks, vs, gates = nsa_inputs(1, 9, 2, 1, 2, 2, False, seed=3, requires_grad=True)
    compressor = nsa_compressor(config, 2, 2, seed=4)
    names = [name for name, _ in compressor.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in compressor.parameters())
    assert len(params) == (2 if kind == "linear" else 5) * 2  # pos_emb + weights (+ biases), for k and v

    def fn(k, v, *param_values):
        replaced = ParametersReplaced(compressor, dict(zip(names, param_values)))
        return nsa_attention(q, k, v, gates, config, compressor=replaced, backend="torch")

    assert torch.autograd.gradcheck(fn, (ks[0], vs[0], *params))


class ParametersReplaced:
    """A compressor whose parameters are the given tensors (named as in named_parameters()), so that
    gradcheck can perturb them."""

    def __init__(self, compressor, params):
        self.compressor, self.params, self.kind = compressor, params, compressor.kind

    def compress_k(self, windows):
        return functional_call(self.compressor.k_map, self._params_of("k_map."), (windows,))

    def compress_v(self, windows):
        return functional_call(self.compressor.v_map, self._params_of("v_map."), (windows,))

    def _params_of(self, prefix):
        return {name[len(prefix):]: value for name, value in self.params.items() if name.startswith(prefix)}


def test_gradients_match_oracle_autograd(nsa_inputs):
    """Backward of the reference equals autograd through the per-token oracle (float64)."""
    config = NSAConfig(compress_block_size=4, compress_stride=2, select_block_size=8, select_count=3, window_size=6,
                       separate_kv=True)
    q, ks, vs, gates = nsa_inputs(1, 30, 4, 2, 4, 3, True, seed=12, requires_grad=True)
    leaves = (q, *ks, *vs, gates)
    weight = torch.randn(1, 30, 4, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    got = torch.autograd.grad((call(q, ks, vs, gates, config) * weight).sum(), leaves)
    expected_out = oracle_batch(q, *zip(ks, vs), gates, config)["out"].view(1, 30, 4, 3)
    expected = torch.autograd.grad((expected_out * weight).sum(), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


def test_selection_passes_no_gradient(nsa_inputs, nsa_compressor):
    """With the compressed gate at 0, compressed K/V and phi get exactly zero gradient: indices carry none."""
    config = NSAConfig(**TINY, compression="linear", separate_kv=True)
    q, ks, vs, gates = nsa_inputs(1, 14, 2, 1, 3, 3, True, seed=5, requires_grad=True)
    compressor = nsa_compressor(config, 3, 3, seed=6)
    gates = gates.detach() * torch.tensor([0.0, 1.0, 1.0], dtype=gates.dtype)
    call(q, ks, vs, gates, config, compressor=compressor).sum().backward()
    assert torch.equal(ks[0].grad, torch.zeros_like(ks[0])) and torch.equal(vs[0].grad, torch.zeros_like(vs[0]))
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in compressor.parameters())
    assert ks[1].grad.abs().sum() > 0 and ks[2].grad.abs().sum() > 0 and q.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Backend switch


def test_default_backend_on_cpu_is_torch(nsa_inputs):
    config = NSAConfig(**TINY)
    q, ks, vs, gates = nsa_inputs(1, 10, 2, 1, 3, 3, False, seed=2)
    default = nsa_attention(q, ks[0], vs[0], gates, config)
    assert torch.equal(default, nsa_attention(q, ks[0], vs[0], gates, config, backend="torch"))
    assert torch.equal(default, nsa_reference(q, (ks[0], vs[0]), (ks[0], vs[0]), (ks[0], vs[0]), gates, config))


def test_triton_backend_on_cpu_without_interpreter_raises(monkeypatch, nsa_inputs):
    """Without CUDA and without TRITON_INTERPRET=1 the Triton backend cannot run: a clear RuntimeError."""
    pytest.importorskip("nsa_kernels")  # built now, under the interpreter: later tests of any order still run
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = NSAConfig(**TINY)
    q, ks, vs, gates = nsa_inputs(1, 10, 2, 1, 3, 3, False, seed=2)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        nsa_attention(q, ks[0], vs[0], gates, config, backend="triton")


# ---------------------------------------------------------------------------------------------
# Input checks: every error names the offending argument


def valid_args(separate_kv=False, dtype=torch.float32):
    """Keyword arguments of a valid nsa_attention call, B=1, T=10, H_q=4, H_kv=2, d_k=3, d_v=5."""
    config = NSAConfig(**TINY, separate_kv=separate_kv)
    gen = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    k = tuple(draw(1, 10, 2, 3) for _ in range(3)) if separate_kv else draw(1, 10, 2, 3)
    v = tuple(draw(1, 10, 2, 5) for _ in range(3)) if separate_kv else draw(1, 10, 2, 5)
    return dict(q=draw(1, 10, 4, 3), k=k, v=v, gates=torch.rand(1, 10, 4, 3, generator=gen).to(dtype), config=config)


def replace_branch(triple, index, tensor):
    return tuple(tensor if i == index else t for i, t in enumerate(triple))


SHARED = valid_args()
SEPARATE = valid_args(separate_kv=True)
BAD_CALLS = [
    ("config_type", dict(config=dict(TINY)), TypeError, "config must be an NSAConfig, got dict"),
    ("backend", dict(backend="cuda"), ValueError, r"backend='cuda' is not allowed; choose one of \('torch', 'triton'\)"),
    ("missing_compressor", dict(config=NSAConfig(**TINY, compression="linear")), ValueError,
     "compression='linear' needs a compressor"),
    ("compressor_kind", dict(config=NSAConfig(**TINY, compression="linear"),
                             compressor=KVCompressor("mlp", 2, 3, 5)), ValueError,
     "compressor.kind='mlp' does not match config.compression='linear'"),
    ("mean_with_other_compressor", dict(compressor=KVCompressor("linear", 2, 3, 5)), ValueError,
     "compressor.kind='linear' does not match config.compression='mean'"),
    ("triple_when_shared", dict(k=SEPARATE["k"]), ValueError, "k must be one tensor shared by the branches"),
    ("tensor_when_separate", dict(config=SEPARATE["config"], k=SHARED["k"], v=SEPARATE["v"]), ValueError,
     r"k must be a \(cmp, slc, win\) triple"),
    ("pair_when_separate", dict(config=SEPARATE["config"], k=SEPARATE["k"], v=SEPARATE["v"][:2]), ValueError,
     r"v must be a \(cmp, slc, win\) triple"),
    ("q_3d", dict(q=SHARED["q"][0]), ValueError, r"q must be a 4-D tensor \[B, T, H_q, d_k\]"),
    ("q_not_tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor, got list"),
    ("q_numpy", dict(q=SHARED["q"].numpy()), TypeError, "q must be a torch.Tensor, got numpy.ndarray"),
    ("k_numpy", dict(k=SHARED["k"].numpy()), TypeError, "k must be a torch.Tensor, got numpy.ndarray"),
    ("gates_numpy", dict(gates=SHARED["gates"].numpy()), TypeError, "gates must be a torch.Tensor, got numpy.ndarray"),
    ("no_tokens", dict(q=SHARED["q"][:, :0], k=SHARED["k"][:, :0], v=SHARED["v"][:, :0], gates=SHARED["gates"][:, :0]),
     ValueError, r"q has T=0 \(shape \(1, 0, 4, 3\)\); allowed: T >= 1"),
    ("no_batch", dict(q=SHARED["q"][:0], k=SHARED["k"][:0], v=SHARED["v"][:0], gates=SHARED["gates"][:0]),
     ValueError, "q has B=0"),
    ("gates_above_one", dict(gates=SHARED["gates"] + 1), ValueError, r"gates must lie in \[0, 1\]"),
    ("gates_negative", dict(gates=SHARED["gates"] - 0.5), ValueError, r"gates must lie in \[0, 1\].*got values in \[-"),
    ("q_integer", dict(q=SHARED["q"].long()), TypeError, "q has dtype torch.int64"),
    ("k_3d", dict(k=SHARED["k"][0]), ValueError, r"k must be 4-D \[B, T, H, D\], got shape \(10, 2, 3\)"),
    ("gates_3d", dict(gates=SHARED["gates"][0]), ValueError, "gates must be 4-D"),
    ("v_seq_len", dict(v=SHARED["v"][:, :9]), ValueError, r"v has \[B, T\] = \(1, 9\) but q has \(1, 10\)"),
    ("gates_batch", dict(gates=SHARED["gates"].expand(2, -1, -1, -1)), ValueError, r"gates has \[B, T\] = \(2, 10\)"),
    ("k_dtype", dict(k=SHARED["k"].double()), TypeError, "k has dtype torch.float64 but q has torch.float32"),
    ("gates_dtype", dict(gates=SHARED["gates"].half()), TypeError, "gates has dtype torch.float16"),
    ("v_device", dict(v=SHARED["v"].to("meta")), ValueError, "v is on meta but q is on cpu"),
    ("k_branch_not_tensor", dict(config=SEPARATE["config"], k=replace_branch(SEPARATE["k"], 1, None),
                                 v=SEPARATE["v"]), TypeError, r"k\[slc\] must be a torch.Tensor, got NoneType"),
    ("v_branch_shape", dict(config=SEPARATE["config"], k=SEPARATE["k"],
                            v=replace_branch(SEPARATE["v"], 2, SEPARATE["v"][2][..., :4])), ValueError,
     r"v\[win\] has shape \(1, 10, 2, 4\), expected \(1, 10, 2, 5\)"),
    ("v_heads", dict(v=SHARED["v"][:, :, :1]), ValueError, "v has 1 heads but k has 2"),
    ("k_head_dim", dict(k=SHARED["k"][..., :2]), ValueError, "k has head dim 2 but q has 3"),
    ("group_not_integer", dict(q=SHARED["q"][:, :, :3]), ValueError,
     "q has H_q=3 heads and k has H_kv=2: H_q must be a positive multiple of H_kv"),
    ("no_kv_heads", dict(k=SHARED["k"][:, :, :0], v=SHARED["v"][:, :, :0]), ValueError, "H_kv=0"),
    ("gates_branches", dict(gates=SHARED["gates"][..., :2]), ValueError, r"gates must be \[B, T, H_q, 3\]"),
    ("gates_heads", dict(gates=SHARED["gates"][:, :, :2]), ValueError, r"gates must be \[B, T, H_q, 3\]"),
    ("cu_seqlens_2d", dict(cu_seqlens=torch.tensor([[0, 10]])), ValueError, "cu_seqlens must be a 1-D tensor"),
    ("cu_seqlens_one_entry", dict(cu_seqlens=torch.tensor([10])), ValueError, "at least 2 entries"),
    ("cu_seqlens_list", dict(cu_seqlens=[0, 10]), ValueError, "cu_seqlens must be a 1-D tensor"),
    ("cu_seqlens_float", dict(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens has dtype torch.float32"),
    ("cu_seqlens_device", dict(cu_seqlens=torch.tensor([0, 10], device="meta")), ValueError,
     "cu_seqlens is on meta but q is on cpu"),
    ("cu_seqlens_batch", dict(q=SHARED["q"].expand(2, -1, -1, -1), k=SHARED["k"].expand(2, -1, -1, -1),
                              v=SHARED["v"].expand(2, -1, -1, -1), gates=SHARED["gates"].expand(2, -1, -1, -1),
                              cu_seqlens=torch.tensor([0, 10])), ValueError, "need batch size 1, got B=2"),
    ("cu_seqlens_start", dict(cu_seqlens=torch.tensor([1, 10])), ValueError, "must start at 0 and end at T=10"),
    ("cu_seqlens_end", dict(cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "must start at 0 and end at T=10"),
    ("cu_seqlens_decreasing", dict(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens must be non-decreasing, got \[0, 6, 4, 10\]"),
]


@pytest.mark.parametrize("overrides,error,message", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_rejected_with_a_named_error(overrides, error, message):
    args = dict(SHARED, **overrides)
    with pytest.raises(error, match=message):
        nsa_attention(**args)


def test_valid_calls_pass_the_checks():
    """The bases of BAD_CALLS are valid: only the override makes each call fail."""
    assert nsa_attention(**SHARED).shape == (1, 10, 4, 5)
    assert nsa_attention(**SEPARATE).shape == (1, 10, 4, 5)
    assert nsa_attention(**SHARED, cu_seqlens=torch.tensor([0, 3, 3, 10], dtype=torch.int32)).shape == (1, 10, 4, 5)
