"""The kernels' tables are sized from host-known bounds (nothing waits for the GPU), so they carry padding
entries: row tiles and dK/dV pieces past the real ones must be empty, and the real ones exactly the
ones a per-segment loop would make."""
import pytest
import torch

pytest.importorskip("nsa_kernels")
from nsa_kernels import selected as S  # noqa: E402
from nsa_kernels.layout import Segments, make_docs, max_pieces, tiles  # noqa: E402

LAYOUTS = [[37, 0, 5, 30], [64, 64], [1], [0, 3, 0], [200], [0]]


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


def test_make_docs_rows_and_blocks():
    lens = [37, 0, 5, 30]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    docs = make_docs(cu, sum(lens), 8, 4, 16)
    doc_of_row = [i for i, n in enumerate(lens) for _ in range(n)]
    assert docs.row_doc_start.tolist() == [cu[i].item() for i in doc_of_row]
    assert docs.cu_slc.tolist() == [0, 3, 3, 4, 6]
    assert docs.row_slc_start.tolist() == [docs.cu_slc[i].item() for i in doc_of_row]
    assert docs.cu_cmp.tolist() == [0, 8, 8, 8, 14]  # floor((T - 8) / 4) + 1 blocks when T >= 8
    layout = S.packed_layout(docs, 16)
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
    host = Segments(cu, tuple(cu.tolist())).tiles(block, sum(lens))
    for got, want in zip(host, tiles(cu, block, sum(lens))):
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("lens", LAYOUTS)
def test_host_built_docs_and_selection_layout_equal_the_device_ones(lens):
    cu = _cu(lens)
    device_docs = make_docs(cu, sum(lens), 8, 4, 16)
    host_docs = make_docs(cu, sum(lens), 8, 4, 16, bounds=cu.tolist())
    for field in ("cu_seqlens", "cu_cmp", "cu_slc", "row_doc_start", "row_cmp_start", "row_slc_start"):
        got, want = getattr(host_docs, field), getattr(device_docs, field)
        assert got.dtype == want.dtype and torch.equal(got, want), field
    assert host_docs.host_cmp == tuple(device_docs.cu_cmp.tolist())
    host_layout, device_layout = S.packed_layout(host_docs, 16), S.packed_layout(device_docs, 16)
    for field in ("row_pos", "row_key_start", "row_slc_start", "block_docs"):
        got, want = getattr(host_layout, field), getattr(device_layout, field)
        assert got.dtype == want.dtype and torch.equal(got, want), field


def test_host_layouts_are_built_once_per_layout():
    cu = _cu([40, 24])
    first, again = make_docs(cu, 64, 8, 4, 16, bounds=[0, 40, 64]), make_docs(cu, 64, 8, 4, 16, bounds=(0, 40, 64))
    assert again is first
    assert Segments(cu, (0, 40, 64)).tiles(16, 64)[0] is first.token_segments.tiles(16, 64)[0]
    assert make_docs(cu, 64, 8, 4, 32, bounds=[0, 40, 64]) is not first


def test_host_bounds_must_cover_the_rows():
    with pytest.raises(ValueError, match="bounds end at 60 but there are num_rows=64"):
        make_docs(_cu([40, 24]), 64, 8, 4, 16, bounds=[0, 40, 60])
