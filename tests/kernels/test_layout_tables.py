"""The kernels' tables are sized from host-known bounds (nothing waits for the GPU), so they carry padding
entries: row tiles and dK/dV pieces past the real ones must be empty, and the real ones exactly the
ones a per-segment loop would make."""
import dataclasses

import pytest
import torch

pytest.importorskip("nsa_kernels")
from nsa_kernels import KernelParams, document_piece, packed_documents  # noqa: E402
from nsa_kernels import selected as S  # noqa: E402
from nsa_kernels.layout import max_pieces, tiles  # noqa: E402

LAYOUTS = [[37, 0, 5, 30], [64, 64], [1], [0, 3, 0], [200], [0]]


def _params(compress_block=8, compress_stride=4, select_block=16):
    return KernelParams(compress_block=compress_block, compress_stride=compress_stride, select_block=select_block,
                        select_count=4, init_blocks=1, local_blocks=2, window=20, scale=0.25)


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("lens,block", [([37, 0, 5, 30], 16), ([64, 64], 16), ([1], 8), ([0, 0], 4), ([100], 7)])
def test_tiles_cover_each_segment_once_then_pad(lens, block):
    cu = _cu(lens)
    num_rows = sum(lens)
    start, end, segment = tiles(cu, block, num_rows)
    assert start.numel() == max_pieces(num_rows, len(lens), block) >= sum(-(-n // block) for n in lens)
    want = [(s, min(s + block, cu[i + 1].item()), i) for i in range(len(lens))
            for s in range(cu[i].item(), cu[i + 1].item(), block)]
    got = list(zip(start.tolist(), end.tolist(), segment.tolist()))
    assert got[:len(want)] == want
    assert all(s == e == num_rows for s, e, _ in got[len(want):])


def test_packed_documents_rows_and_blocks():
    lens = [37, 0, 5, 30]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    layout = packed_documents(cu, sum(lens), _params())
    doc_of_row = [i for i, n in enumerate(lens) for _ in range(n)]
    assert torch.equal(layout.q_bounds, cu) and torch.equal(layout.k_bounds, cu)
    assert layout.q_start.tolist() == layout.k_start.tolist() == layout.c_start.tolist() == [0] * len(lens)
    assert layout.row_key_start.tolist() == [cu[i].item() for i in doc_of_row]
    assert layout.row_pos.tolist() == [r - cu[i].item() for r, i in enumerate(doc_of_row)]
    cu_slc = [0, 3, 3, 4, 6]  # ceil(T / 16) selection blocks per document
    assert layout.row_slc_start.tolist() == [cu_slc[i] for i in doc_of_row]
    assert layout.c_bounds.tolist() == [0, 8, 8, 8, 14]  # floor((T - 8) / 4) + 1 blocks when T >= 8
    real = [(cu[i].item(), b, cu[i + 1].item()) for i, n in enumerate(lens) for b in range(-(-n // 16))]
    block_docs = list(zip(*layout.block_docs.tolist()))
    assert block_docs[:len(real)] == real
    assert all(entry == (0, 0, 0) for entry in block_docs[len(real):])  # padding blocks hold no key


def test_inverted_selection_lists_each_blocks_queries_in_pieces(monkeypatch):
    monkeypatch.setattr(S, "PIECE", 4)
    gen = torch.Generator().manual_seed(0)
    tokens, num_kv_heads, n, num_blocks = 29, 2, 3, 5
    idx = torch.stack([torch.randperm(num_blocks, generator=gen)[:n] for _ in range(tokens * num_kv_heads)])
    idx = idx.view(tokens, num_kv_heads, n)  # distinct blocks per row, as top-n picks them
    idx[torch.rand(idx.shape, generator=gen) < 0.3] = -1
    row_slc_start = torch.zeros(tokens, dtype=torch.int32)
    query_list, piece_key, piece_start, piece_end, pieces_of_key = S._invert_selection(idx, row_slc_start, num_blocks)
    assert piece_key.numel() == max_pieces(idx.numel(), num_kv_heads * num_blocks, 4)
    for key in range(num_kv_heads * num_blocks):
        head, block = divmod(key, num_blocks)
        want = sorted({t for t in range(tokens) if block in idx[t, head].tolist()})
        pieces = range(pieces_of_key[key].item(), pieces_of_key[key + 1].item())
        got = []
        for p in pieces:
            assert piece_key[p] == key and 0 < piece_end[p] - piece_start[p] <= 4
            got += query_list[piece_start[p]:piece_end[p]].tolist()
        assert got == want
    padding = range(pieces_of_key[-1].item(), piece_key.numel())
    assert all(piece_end[p] <= piece_start[p] for p in padding)


@pytest.mark.parametrize("lens", LAYOUTS)
@pytest.mark.parametrize("block", [4, 7, 16])
def test_host_built_tiles_equal_the_device_ones(lens, block):
    cu = _cu(lens)
    host = packed_documents(cu, sum(lens), _params(), bounds=cu.tolist()).tiles("queries", block, sum(lens))
    for got, want in zip(host, tiles(cu, block, sum(lens))):
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("lens", LAYOUTS)
def test_host_built_layout_equals_the_device_one(lens):
    cu = _cu(lens)
    device_layout = packed_documents(cu, sum(lens), _params())
    host_layout = packed_documents(cu, sum(lens), _params(), bounds=cu.tolist())
    for field in ("q_bounds", "k_bounds", "c_bounds", "q_start", "k_start", "c_start", "row_pos", "row_key_start",
                  "row_slc_start", "block_docs"):
        got, want = getattr(host_layout, field), getattr(device_layout, field)
        assert got.dtype == want.dtype and torch.equal(got, want), field
    assert device_layout.host_q is None and host_layout.host_q == host_layout.host_k == tuple(cu.tolist())
    assert host_layout.host_c == tuple(device_layout.c_bounds.tolist())
    for rows in ("queries", "keys", "compressed"):
        for got, want in zip(host_layout.tiles(rows, 4, host_layout.bounds(rows)[2][-1]),
                             device_layout.tiles(rows, 4, host_layout.bounds(rows)[2][-1])):
            assert torch.equal(got, want), rows


def test_host_layouts_are_built_once_per_layout():
    cu = _cu([40, 24])
    first = packed_documents(cu, 64, _params(), bounds=[0, 40, 64])
    again = packed_documents(cu, 64, dataclasses.replace(_params(), scale=0.5, window=7), bounds=(0, 40, 64))
    assert again is first  # the layout depends on the block sizes only
    assert first.tiles("queries", 16, 64)[0] is again.tiles("keys", 16, 64)[0]
    assert packed_documents(cu, 64, _params(select_block=32), bounds=[0, 40, 64]) is not first


def test_host_bounds_must_cover_the_rows():
    with pytest.raises(ValueError, match="bounds end at 60 but there are num_rows=64"):
        packed_documents(_cu([40, 24]), 64, _params(), bounds=[0, 40, 60])


def test_document_piece_places_its_queries_and_keys():
    q_pos = torch.arange(21, 30)
    piece = document_piece(q_pos, num_keys=13, key_start=17, num_compressed_keys=5)
    assert piece.q_bounds.tolist() == [0, 9] and piece.k_bounds.tolist() == [0, 13]
    assert piece.c_bounds.tolist() == [0, 5]
    assert piece.q_start.tolist() == [21] and piece.k_start.tolist() == [17] and piece.c_start.tolist() == [0]
    assert (piece.host_q, piece.host_k, piece.host_c) == ((0, 9), (0, 13), (0, 5))
    assert piece.block_docs is None  # no selection tables unless asked
    selected = document_piece(q_pos, num_keys=40, select_block=16)
    assert selected.row_pos.tolist() == q_pos.tolist()
    assert selected.row_key_start.tolist() == selected.row_slc_start.tolist() == [0] * 9
    assert list(zip(*selected.block_docs.tolist())) == [(0, 0, 40), (0, 1, 40), (0, 2, 40)]
    with pytest.raises(ValueError, match="key_start=3"):
        document_piece(q_pos, num_keys=40, key_start=3, select_block=16)
