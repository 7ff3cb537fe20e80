"""'ring' at CP = 2 with the Triton branches under the CPU interpreter (float32) against the float64
torch reference: partial selected attention per visiting chunk, rows with nothing selected in a
chunk (the kernel's zero rows), blocks straddling chunk edges in packed documents."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cp_harness import assert_cp_matches_reference, make_case, spawn

GEOMETRY = dict(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=3,
                select_init_blocks=1, select_local_blocks=1, window_size=8)
SEQ_LEN = 64  # 4 chunks of 16 tokens at CP = 2
DOC_BOUNDS = [0, 13, 40, 64]


def _ring_on_triton(rank, world):
    case = make_case(11, SEQ_LEN, num_q_heads=2, num_kv_heads=1, head_dim_k=8, head_dim_v=8, **GEOMETRY)
    assert_cp_matches_reference(case, dist.group.WORLD, cu_seqlens=torch.tensor(DOC_BOUNDS, dtype=torch.int32),
                                atol=2e-4, exchanges=[dict(exchange="ring")], backend="triton", dtype=torch.float32)


@pytest.mark.slow
def test_ring_with_triton_interpreter(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spawn(_ring_on_triton, 2, tmp_path)
