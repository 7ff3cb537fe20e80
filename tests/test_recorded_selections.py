"""megatron_nsa.functional.recorded_selections: both backends record, per nsa_attention call, exactly the
blocks the reference selects, for batch rows and packed documents, without changing outputs or gradients;
nothing is recorded outside the block, and a nested block keeps its own list. The block scores (torch
backend) rank exactly the recorded selection."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import NSAConfig, nsa_attention
from megatron_nsa import reference as R
from megatron_nsa.functional import recorded_block_scores, recorded_selections

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=3, window_size=16)


def _reference_selection(q, ks, vs, gates, cu_seqlens=None):
    kv = (ks[0], vs[0])
    _, inter = R.nsa_reference(q, kv, kv, kv, gates, CONFIG, cu_seqlens, return_intermediates=True)
    return inter.selected_block_idx.long()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_call_records_the_reference_selection(nsa_inputs, backend):
    if backend == "triton":
        pytest.importorskip("nsa_kernels")
    seed = int(torch.randint(1 << 30, ()))
    calls = [nsa_inputs(2, 112, 4, 2, 16, 16, False, seed + i, dtype=torch.float32, requires_grad=True)
             for i in range(2)]
    outputs = []
    with recorded_selections() as records:
        for q, ks, vs, gates in calls:
            outputs.append(nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend=backend))
    assert len(records) == len(calls)  # one record per call (a model layer), in call order
    for record, out, (q, ks, vs, gates) in zip(records, outputs, calls):
        expected = _reference_selection(q, ks, vs, gates)
        assert record.shape == (2 * 112, 2, 3) and record.dtype == torch.int64 and record.device.type == "cpu"
        assert torch.equal(record, expected)
        assert (record >= 0).any() and (record == -1).any()  # real selections, padded early rows
        # outputs and gradients as without recording
        plain = nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend=backend)
        torch.testing.assert_close(out, plain, rtol=0, atol=0)
        grad = torch.randn_like(out)
        recorded_grads = torch.autograd.grad(out, (q, ks[0], gates), grad)
        plain_grads = torch.autograd.grad(plain, (q, ks[0], gates), grad)
        for a, b in zip(recorded_grads, plain_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_documents_record_per_document_block_ids(nsa_inputs, backend):
    if backend == "triton":
        pytest.importorskip("nsa_kernels")
    q, ks, vs, gates = nsa_inputs(1, 160, 4, 2, 16, 16, False, int(torch.randint(1 << 30, ())), dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 37, 120, 160], dtype=torch.int32)
    with recorded_selections() as records:
        nsa_attention(q, ks[0], vs[0], gates, CONFIG, cu_seqlens=cu_seqlens, backend=backend)
    (record,) = records
    assert torch.equal(record, _reference_selection(q, ks, vs, gates, cu_seqlens))
    assert record[37:120].max() == (120 - 37 - 1) // 16  # the second document counts blocks from its start


def test_nothing_is_recorded_outside_and_nested_blocks_keep_their_own(nsa_inputs):
    q, ks, vs, gates = nsa_inputs(1, 64, 2, 1, 8, 8, False, int(torch.randint(1 << 30, ())), dtype=torch.float32)
    with recorded_selections() as outer:
        nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
        with recorded_selections() as inner:
            nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
            nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
        nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
    nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
    assert len(outer) == 2 and len(inner) == 2
    assert torch.equal(outer[0], inner[0]) and torch.equal(outer[1], inner[1])


def test_block_scores_rank_the_recorded_selection(nsa_inputs):
    """recorded_block_scores (torch backend) records, per call, scores whose top n (ties to the lower id) are
    exactly the blocks recorded as selected; forced blocks score +inf, blocks after the query's -inf, and a
    packed document's rows are -inf past its own blocks. Outputs are unchanged."""
    q, ks, vs, gates = nsa_inputs(1, 160, 4, 2, 16, 16, False, int(torch.randint(1 << 30, ())), dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 37, 120, 160], dtype=torch.int32)
    with recorded_selections() as selections, recorded_block_scores() as scores:
        out = nsa_attention(q, ks[0], vs[0], gates, CONFIG, cu_seqlens=cu_seqlens, backend="torch")
    (selected,), (ranked,) = selections, scores
    assert ranked.shape == (160, 2, -(-(120 - 37) // 16)) and ranked.dtype == torch.float32
    assert torch.equal(R.top_blocks(ranked, _document_positions(cu_seqlens), CONFIG), selected)
    assert torch.isfinite(ranked).any() and (ranked == float("inf")).any()
    assert (ranked[:37, :, 3:] == float("-inf")).all()  # the first document has 3 blocks
    assert (ranked[37, :, 1:] == float("-inf")).all()  # a document's first query sees its first block alone
    torch.testing.assert_close(out, nsa_attention(q, ks[0], vs[0], gates, CONFIG, cu_seqlens=cu_seqlens,
                                                  backend="torch"), rtol=0, atol=0)


def _document_positions(cu_seqlens):
    bounds = cu_seqlens.tolist()
    return torch.cat([torch.arange(e - s) for s, e in zip(bounds[:-1], bounds[1:])])


def test_block_scores_refuse_the_triton_backend_before_any_work(nsa_inputs):
    q, ks, vs, gates = nsa_inputs(1, 64, 2, 1, 8, 8, False, int(torch.randint(1 << 30, ())), dtype=torch.float32)
    with recorded_block_scores() as scores, pytest.raises(RuntimeError, match="needs backend='torch'; this call has "
                                                                              "backend='triton'"):
        nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="triton")
    assert scores == []
