"""compress_documents (batched over packed documents) against the reference's one-document-at-a-time
compress_packed: values, the rope positions and gradients, for every phi and ragged layouts."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import KVCompressor, NSAConfig
from megatron_nsa.compression import compress_documents
from megatron_nsa.reference import compress_packed

pytestmark = pytest.mark.usefixtures("single_thread")

# document lengths: shorter than a block, empty, starts at every offset modulo the stride
LAYOUTS = {
    "batch": [48, 48, 48],
    "ragged": [37, 5, 0, 64, 19, 33, 8, 41],
    "one": [70],
    "all_short": [3, 7, 1],
}


def rope_by_position(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A position-dependent map, so that a wrong position changes the result."""
    return x * torch.cos(positions.to(x.dtype) * 0.37)[:, None, None] + 0.01 * positions.to(x.dtype)[:, None, None]


@pytest.mark.parametrize("kind", ["mean", "linear", "mlp"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("with_rope", [False, True])
def test_matches_documents_one_by_one(kind, layout, with_rope):
    torch.manual_seed(sorted(LAYOUTS).index(layout) * 10 + len(kind) + with_rope)
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=8, compression=kind)
    lengths = LAYOUTS[layout]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    total, num_kv_heads, dk, dv = int(cu_seqlens[-1]), 2, 6, 5
    compressor = None if kind == "mean" else KVCompressor.from_config(config, dk, dv, dtype=torch.float64)
    k = torch.randn(total, num_kv_heads, dk, dtype=torch.float64, requires_grad=True)
    v = torch.randn(total, num_kv_heads, dv, dtype=torch.float64, requires_grad=True)
    rope = rope_by_position if with_rope else None

    got_k, got_v = compress_documents(k, v, cu_seqlens, config, compressor, rope)
    want_k, want_v = compress_packed(k, v, cu_seqlens, config, compressor, rope)
    assert got_k.shape == want_k.shape and got_v.shape == want_v.shape
    torch.testing.assert_close(got_k, want_k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_v, want_v, rtol=1e-12, atol=1e-12)
    if got_k.shape[0] == 0:
        return
    grad_k, grad_v = torch.randn_like(got_k), torch.randn_like(got_v)
    params = [k, v] + ([] if compressor is None else list(compressor.parameters()))
    got_grads = torch.autograd.grad((got_k * grad_k).sum() + (got_v * grad_v).sum(), params)
    want_grads = torch.autograd.grad((want_k * grad_k).sum() + (want_v * grad_v).sum(), params)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_number_of_phi_calls_does_not_grow_with_documents():
    """256 equal documents compress in one call of phi per K and V (the slowness this function removes)."""
    config = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=8, compression="linear")
    compressor = KVCompressor.from_config(config, 4, 4)
    calls = []
    compressor.k_map.register_forward_hook(lambda *args: calls.append("k"))
    compressor.v_map.register_forward_hook(lambda *args: calls.append("v"))
    cu_seqlens = torch.arange(257, dtype=torch.int32) * 32
    k, v = torch.randn(2, 256 * 32, 1, 4).unbind(0)
    compressed_k, _ = compress_documents(k, v, cu_seqlens, config, compressor)
    assert calls == ["k", "v"]
    assert compressed_k.shape == (256 * 7, 1, 4)
