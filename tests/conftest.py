"""Shared pytest setup: the `slow` marker and a factory of fresh random NSA inputs."""
from __future__ import annotations

import os

import pytest
import torch

# On a CPU-only machine the Triton kernels run in Triton's interpreter. It must be chosen before
# nsa_kernels is first imported (its @triton.jit functions are built at import), so it is set here,
# before any test module of any directory is collected.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds, still part of the CI run")


def random_nsa_inputs(batch, seq_len, num_q_heads, num_kv_heads, head_dim_k, head_dim_v, separate_kv, seed,
                      dtype=torch.float64, requires_grad=False):
    """Fresh random q, k, v and gates in the layout of nsa_attention.

    Returns q [B, T, H_q, d_k], ks and vs as (cmp, slc, win) triples of [B, T, H_kv, d] (one tensor
    repeated when not separate_kv), gates [B, T, H_q, 3] uniform in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, uniform=False):
        x = torch.rand(*shape, generator=gen) if uniform else torch.randn(*shape, generator=gen)
        return x.to(dtype).requires_grad_(requires_grad)

    q = draw(batch, seq_len, num_q_heads, head_dim_k)
    branches = 3 if separate_kv else 1
    ks = [draw(batch, seq_len, num_kv_heads, head_dim_k) for _ in range(branches)]
    vs = [draw(batch, seq_len, num_kv_heads, head_dim_v) for _ in range(branches)]
    gates = draw(batch, seq_len, num_q_heads, 3, uniform=True)
    return q, tuple(ks * (3 // branches)), tuple(vs * (3 // branches)), gates


@pytest.fixture
def nsa_inputs():
    return random_nsa_inputs


def random_compressor(config, head_dim_k, head_dim_v, seed, dtype=torch.float64):
    """A KVCompressor for config.compression ('linear' / 'mlp'; None for 'mean') with random parameters.

    Parameters are redrawn at unit-ish scale so that every one of them (position embedding
    included) visibly changes the compressed keys.
    """
    from megatron_nsa import KVCompressor

    if config.compression == "mean":
        return None
    compressor = KVCompressor.from_config(config, head_dim_k, head_dim_v, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in compressor.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype) / param.shape[-1] ** 0.5)
    return compressor


@pytest.fixture
def nsa_compressor():
    return random_compressor


@pytest.fixture
def single_thread():
    """Tiny shapes run faster on one thread (and do not suffer from a busy machine's other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
