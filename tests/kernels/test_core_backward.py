"""The pieces nsa_core's one backward relies on: the combination's backward gives each branch's delta,
and the dQ kernels add their share to a dQ another kernel wrote (ADD_DQ).

The add's contract: the earlier dQ plus the branch's dQ, summed in float32 and rounded to the dtype once.
The branch's dQ alone (a separate call) is rounded once too, so the two results differ by at most the
two roundings: half a unit in the last place of the sum and of the branch's dQ."""
import pytest
import torch

from megatron_nsa import NSAConfig

pytest.importorskip("nsa_kernels")
from nsa_kernels import KernelParams, packed_documents  # noqa: E402
from nsa_kernels.band import band_backward, band_forward  # noqa: E402
from nsa_kernels.combine import combine_backward  # noqa: E402
from nsa_kernels.delta import row_dot_reference  # noqa: E402
from nsa_kernels.selected import selected_backward, selected_forward  # noqa: E402
from nsa_kernels.topk import select_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] if DEVICE == "cpu" else [torch.bfloat16, torch.float16]
CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4, window_size=20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_backward_gives_each_branch_delta(dtype):
    gen = torch.Generator().manual_seed(5)
    rows, heads, dv = 37, 3, 24
    gates = torch.rand(rows, heads, 3, generator=gen).to(DEVICE, dtype)
    cmp_out, slc_out, win_out, grad_out = (torch.randn(rows, heads, dv, generator=gen).to(DEVICE, dtype)
                                           for _ in range(4))
    d_gates, d_cmp, d_slc, d_win, delta = combine_backward(gates, cmp_out, slc_out, win_out, grad_out,
                                                           with_delta=True)
    assert delta.shape == (3, rows, heads) and delta.dtype == torch.float32
    for branch, (d_branch, out) in enumerate([(d_cmp, cmp_out), (d_slc, slc_out), (d_win, win_out)]):
        torch.testing.assert_close(d_branch, (gates[..., branch:branch + 1].float() * grad_out.float()).to(dtype))
        torch.testing.assert_close(delta[branch], row_dot_reference(d_branch, out), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_gates[..., branch], row_dot_reference(grad_out, out), rtol=1e-5, atol=1e-5)
    assert combine_backward(gates, cmp_out, slc_out, win_out, grad_out)[4] is None


def _inputs(dtype, num_tokens=70, num_q_heads=4, num_kv_heads=2, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    grad_out = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    delta = torch.randn(num_tokens, num_q_heads, generator=gen).to(DEVICE)
    earlier_dq = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(DEVICE, dtype)
    return q, k, v, grad_out, delta, earlier_dq


def assert_added_once_rounded(added, earlier_dq, alone):
    """added == round(earlier_dq + x) where alone == round(x), x the branch's float32 dQ: within
    eps/2 * |earlier_dq + x| + eps/2 * |x| of earlier_dq + alone (eps of the dtype; here bounded by
    eps * (|earlier_dq + alone| + |alone|), which holds the roundings of the bound itself too). The bound
    must reject a kernel that overwrote the earlier dQ or did not write at all."""
    eps = torch.finfo(added.dtype).eps
    expected = earlier_dq.float() + alone.float()
    bound = eps * (expected.abs() + alone.float().abs())
    excess = ((added.float() - expected).abs() - bound).max().item()
    assert excess <= 0, f"added dQ is {excess:.3g} past the one-rounding bound"
    for wrong in (alone, earlier_dq):  # overwritten, or left as it was
        assert ((wrong.float() - expected).abs() > bound).any(), "the bound cannot tell a missing add"


@pytest.mark.parametrize("dtype", DTYPES)
def test_band_dq_adds_to_an_earlier_dq(dtype):
    q, k, v, grad_out, delta, earlier_dq = _inputs(dtype)
    cu = torch.tensor([0, 45, q.shape[0]], device=DEVICE, dtype=torch.int32)
    params = KernelParams.from_config(CONFIG, CONFIG.scale_for(q.shape[-1]))
    layout = packed_documents(cu, q.shape[0], params)
    _, lse = band_forward(q, k, v, layout, "window", params)
    alone, dk, dv = band_backward(q, k, v, layout, "window", params, grad_out, lse, delta)
    target = earlier_dq.clone()
    added, dk_added, dv_added = band_backward(q, k, v, layout, "window", params, grad_out, lse, delta, dq=target)
    assert added is target
    assert_added_once_rounded(added, earlier_dq, alone)
    assert torch.equal(dk, dk_added) and torch.equal(dv, dv_added)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selected_dq_adds_to_an_earlier_dq(dtype):
    q, k, v, grad_out, delta, earlier_dq = _inputs(dtype)
    num_tokens = q.shape[0]
    cu = torch.tensor([0, num_tokens], device=DEVICE, dtype=torch.int32)
    params = KernelParams.from_config(CONFIG, CONFIG.scale_for(q.shape[-1]))
    layout = packed_documents(cu, num_tokens, params)
    num_compressed = int(layout.c_bounds[-1])
    compressed_k, compressed_v = k[:num_compressed].contiguous(), v[:num_compressed].contiguous()  # any keys will do
    _, cmp_lse = band_forward(q, compressed_k, compressed_v, layout, "compressed", params)
    idx = select_blocks(q, compressed_k, cmp_lse, layout, params)
    _, lse, _ = selected_forward(q, k, v, idx, layout, params)
    alone, dk, dv = selected_backward(q, k, v, idx, layout, params, grad_out, lse, delta)
    target = earlier_dq.clone()
    added, dk_added, dv_added = selected_backward(q, k, v, idx, layout, params, grad_out, lse, delta, dq=target)
    assert added is target
    assert_added_once_rounded(added, earlier_dq, alone)
    assert torch.equal(dk, dk_added) and torch.equal(dv, dv_added)
