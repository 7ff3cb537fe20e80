"""CP = 1, 2, 4 give the single-process NSA's outputs and gradients (gloo, torch backend, float64)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cp_harness import assert_cp_matches_reference, make_case, rotate_half_rope, spawn

# Tiny geometry: l=8, d=4, l'=8, n=4, w=12. S=128 gives chunks of 64 / 32 / 16 tokens for C = 1 / 2 / 4.
GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=4,
                select_init_blocks=1, select_local_blocks=2, window_size=12)
SEQ_LEN = 128
# Unaligned starts, a document shorter than one compressed block, documents crossing chunk edges.
DOC_BOUNDS = [0, 13, 50, 51, 90, 128]


def _cases(rank, world):
    group = dist.group.WORLD
    # batch rows, shared K/V, mean compression
    assert_cp_matches_reference(make_case(1, SEQ_LEN, batch=2, **GEOMETRY), group)
    # packed documents, learned 'linear' compressor, RoPE on compressed keys
    cu_seqlens = torch.tensor(DOC_BOUNDS, dtype=torch.int32)
    assert_cp_matches_reference(make_case(2, SEQ_LEN, compression="linear", **GEOMETRY), group,
                                cu_seqlens=cu_seqlens, rope=rotate_half_rope)
    # separate K/V per branch, 'mlp' compressor, d_v != d_k, one KV head gathered at a time
    assert_cp_matches_reference(make_case(3, SEQ_LEN, head_dim_v=6, separate_kv=True, compression="mlp",
                                          **GEOMETRY), group, head_group_size=1)
    # l == d (no compressed halo) and a window of one token (no window halo), with documents
    geometry = dict(GEOMETRY, compress_block_size=4, compress_stride=4, window_size=1)
    assert_cp_matches_reference(make_case(4, SEQ_LEN, **geometry), group, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_cp_matches_single_process(cp_size, tmp_path):
    spawn(_cases, cp_size, tmp_path)
