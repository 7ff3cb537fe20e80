"""Which packed rows are which document at which positions: the one layout every kernel reads.

Every kernel works on packed tensors [rows, H, D] cut into segments (a batch [B, T] is B documents of T
tokens). A Layout says, per segment, which rows of the queries, of the keys and of the compressed keys
belong to it and at which positions of its document they sit; the selected branch's per-row tables and
the tile tables (tiles of rows that never cross a segment end) derive from it. Build one with
packed_documents() (whole documents: queries are keys) or document_piece() (queries of one document at
explicit positions, as context parallelism runs them). Nothing here waits for the GPU.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Optional, Sequence, Tuple

import numpy
import torch

from .constants import LAYOUT_CACHE_SIZE, TILE_CACHE_SIZE
from .params import KernelParams

RowKind = Literal["queries", "keys", "compressed"]
Tiles = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (tile_start [NT], tile_end [NT], tile_segment [NT]) int32


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Segment i (a whole document, or a piece of one) holds

      queries          rows q_bounds[i]..q_bounds[i+1] of Q, at positions q_start[i], q_start[i] + 1, ...
      token keys       rows k_bounds[i]..k_bounds[i+1] of K / V, at positions k_start[i], k_start[i] + 1, ...
      compressed keys  rows c_bounds[i]..c_bounds[i+1] of the compressed K / V: compressed blocks
                       c_start[i], c_start[i] + 1, ... of the document

    and, for the selected branch (token keys from position 0 on, in selection blocks numbered globally
    across segments; None where the layout serves no selected branch):

      row_pos [Tq]        position of each query row in its document
      row_key_start [Tq]  key row of position 0 of each query row's document
      row_slc_start [Tq]  global id of the first selection block of each query row's document
      block_docs [3, B]   per global selection block: its document's first key row, its id within the
                          document, the document's end row (B a host-known bound: blocks past the real
                          ones are all 0 and hold no key)

    Bounds [N+1] and starts [N] are int32 on the data's device, as are the row tables (block_docs int64).
    host_q / host_k / host_c: the bounds as host ints when known; tile tables are then built on the host,
    once per layout.
    """

    q_bounds: torch.Tensor
    k_bounds: torch.Tensor
    c_bounds: torch.Tensor
    q_start: torch.Tensor
    k_start: torch.Tensor
    c_start: torch.Tensor
    row_pos: Optional[torch.Tensor] = None
    row_key_start: Optional[torch.Tensor] = None
    row_slc_start: Optional[torch.Tensor] = None
    block_docs: Optional[torch.Tensor] = None
    host_q: Optional[tuple] = None
    host_k: Optional[tuple] = None
    host_c: Optional[tuple] = None

    @property
    def num_blocks(self) -> int:
        """Global selection blocks (a host-known bound)."""
        return self.block_docs.shape[1]

    def bounds(self, rows: RowKind) -> Tuple[torch.Tensor, torch.Tensor, Optional[tuple]]:
        """(bounds [N+1], first position or compressed block of each segment [N], bounds on the host or None)
        of the segments' queries, token keys or compressed keys."""
        if rows == "queries":
            return self.q_bounds, self.q_start, self.host_q
        if rows == "keys":
            return self.k_bounds, self.k_start, self.host_k
        if rows == "compressed":
            return self.c_bounds, self.c_start, self.host_c
        raise ValueError(f"rows={rows!r} is not allowed; choose 'queries', 'keys' or 'compressed'")

    def tiles(self, rows: RowKind, block: int, num_rows: int) -> Tiles:
        """Tiles of at most `block` rows of the queries, token keys or compressed keys (num_rows of them),
        each inside one segment: tiles() below, built on the host when the bounds are known there."""
        bounds, _, host = self.bounds(rows)
        if host is None:
            return tiles(bounds, block, num_rows)
        return _host_tiles(host, block, num_rows, bounds.device)


def num_compressed(seq_lens, block: int, stride: int):
    """Compressed blocks per document: floor((T - l) / d) + 1 when T >= l, else 0 (an integer torch
    tensor or numpy array)."""
    return (seq_lens >= block) * ((seq_lens - block) // stride + 1)


def segment_of(cu: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Segment of each id for segments [cu[i], cu[i+1]) (int64 cu); ids past the last segment get N.
    A search, not repeat_interleave: its output size is known, so nothing waits for the GPU."""
    return torch.searchsorted(cu[1:].contiguous(), ids, right=True)


def max_pieces(num_items: int, num_segments: int, piece: int) -> int:
    """An upper bound on sum_i ceil(len_i / piece) over num_segments lengths that sum to num_items."""
    return (num_items + num_segments * (piece - 1)) // piece


def packed_documents(cu_seqlens: torch.Tensor, num_rows: int, params: KernelParams,
                     bounds: Optional[Sequence[int]] = None) -> Layout:
    """The layout of whole documents cu_seqlens [N+1] over num_rows (= cu_seqlens[-1]) packed rows, queries
    and keys the same rows. With `bounds` (cu_seqlens on the host) it is built on the host and cached per
    layout; without, it is computed on the device from host-known sizes."""
    if bounds is not None:
        return _host_documents(tuple(int(b) for b in bounds), num_rows, params.compress_block,
                               params.compress_stride, params.select_block, cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    device = cu.device
    lens = cu[1:] - cu[:-1]
    num_docs = lens.numel()
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    cu_cmp = torch.cat([zero, torch.cumsum(num_compressed(lens, params.compress_block, params.compress_stride), 0)])
    blocks_per_doc = torch.div(lens + params.select_block - 1, params.select_block, rounding_mode="floor")
    cu_slc = torch.cat([zero, torch.cumsum(blocks_per_doc, 0)])
    doc_of_row = segment_of(cu, torch.arange(num_rows, device=device))
    row_doc_start = cu[:-1][doc_of_row].to(torch.int32)
    block_ids = torch.arange(max_pieces(num_rows, num_docs, params.select_block), device=device)  # host-known bound
    doc_of_block = segment_of(cu_slc, block_ids).clamp(max=num_docs - 1)
    real = block_ids < cu_slc[-1]  # ids past the real blocks: no keys (document end 0)
    block_docs = torch.stack([torch.where(real, cu[:-1][doc_of_block], 0),
                              torch.where(real, block_ids - cu_slc[:-1][doc_of_block], 0),
                              torch.where(real, cu[1:][doc_of_block], 0)]).contiguous()
    zeros = torch.zeros(num_docs, dtype=torch.int32, device=device)
    cu32 = cu.to(torch.int32)
    return Layout(
        q_bounds=cu32, k_bounds=cu32, c_bounds=cu_cmp.to(torch.int32), q_start=zeros, k_start=zeros, c_start=zeros,
        row_pos=torch.arange(num_rows, device=device, dtype=torch.int32) - row_doc_start,
        row_key_start=row_doc_start, row_slc_start=cu_slc[:-1][doc_of_row].to(torch.int32), block_docs=block_docs,
    )


def document_piece(q_pos: torch.Tensor, num_keys: int = 0, key_start: int = 0, num_compressed_keys: int = 0,
                   select_block: Optional[int] = None) -> Layout:
    """One segment: queries at positions q_pos [Tq] (contiguous: q_pos[i] = q_pos[0] + i) of a document
    whose token keys are num_keys rows at positions key_start.. and whose compressed keys are
    num_compressed_keys rows from compressed block 0. With `select_block`, the selected branch's tables
    too (its keys must then start at position 0)."""
    device = q_pos.device
    num_queries = q_pos.numel()
    ints = upload(numpy.asarray([0, num_queries, 0, num_keys, 0, num_compressed_keys, key_start, 0],
                                dtype=numpy.int32), device)  # the segment's bounds and starts, in one copy
    q_start = q_pos[:1].to(torch.int32) if num_queries else torch.zeros(1, device=device, dtype=torch.int32)
    selection = {}
    if select_block is not None:
        if key_start != 0:
            raise ValueError(f"the selected branch's keys start at position 0, got key_start={key_start}")
        num_blocks = -(-num_keys // select_block)
        zeros = torch.zeros(num_queries, device=device, dtype=torch.int32)
        block_docs = torch.stack([torch.zeros(num_blocks, dtype=torch.int64, device=device),
                                  torch.arange(num_blocks, device=device),
                                  torch.full((num_blocks,), num_keys, dtype=torch.int64, device=device)]).contiguous()
        selection = dict(row_pos=q_pos.to(torch.int32).contiguous(), row_key_start=zeros, row_slc_start=zeros,
                         block_docs=block_docs)
    return Layout(q_bounds=ints[0:2], k_bounds=ints[2:4], c_bounds=ints[4:6], q_start=q_start, k_start=ints[6:7],
                  c_start=ints[7:8], host_q=(0, num_queries), host_k=(0, num_keys), host_c=(0, num_compressed_keys),
                  **selection)


def tiles(cu_rows: torch.Tensor, block: int, num_rows: int) -> Tiles:
    """Tiles of at most `block` rows that stay inside one segment of `cu_rows` (num_rows = cu_rows[-1]).

    Returns (tile_start [NT], tile_end [NT], tile_segment [NT]) int32. NT is an upper bound known on the
    host (max_pieces), so that nothing waits for the GPU; the tiles past the real ones are empty
    (start = end = num_rows) and their programs return at once.
    """
    cu = cu_rows.to(torch.int64)
    num_segments = cu.numel() - 1
    lens = cu[1:] - cu[:-1]
    counts = torch.div(lens + block - 1, block, rounding_mode="floor")
    cu_tiles = torch.cat([torch.zeros(1, dtype=torch.int64, device=cu.device), torch.cumsum(counts, 0)])
    tile_ids = torch.arange(max_pieces(num_rows, num_segments, block), device=cu.device)
    segment = segment_of(cu_tiles, tile_ids).clamp(max=num_segments - 1)
    real = tile_ids < cu_tiles[-1]
    start = torch.where(real, cu[:-1][segment] + (tile_ids - cu_tiles[:-1][segment]) * block, num_rows)
    end = torch.where(real, torch.minimum(start + block, cu[1:][segment]), num_rows)
    return start.to(torch.int32), end.to(torch.int32), segment.to(torch.int32)


def host_tiles(host_cu: Sequence[int], block: int, num_rows: int):
    """tiles() on the host: the same tables, padding included, as numpy arrays (start, end, segment)."""
    cu = numpy.asarray(host_cu, dtype=numpy.int64)
    num_segments = len(cu) - 1
    counts = -(-numpy.diff(cu) // block)
    segment = numpy.repeat(numpy.arange(num_segments), counts)
    first_tile = numpy.concatenate([[0], numpy.cumsum(counts)])[:-1]
    start = cu[:-1][segment] + (numpy.arange(len(segment)) - first_tile[segment]) * block
    end = numpy.minimum(start + block, cu[1:][segment])
    num_padding = max_pieces(num_rows, num_segments, block) - len(segment)
    pad = lambda real, value: numpy.concatenate([real, numpy.full(num_padding, value)])  # noqa: E731
    return pad(start, num_rows), pad(end, num_rows), pad(segment, max(num_segments - 1, 0))


def upload(array: numpy.ndarray, device) -> torch.Tensor:
    """A host array on `device`. non_blocking: the copy is staged at once and nothing waits for the
    kernels already queued."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def _upload(rows: Sequence[numpy.ndarray], device) -> list:
    """Host int arrays as int32 views of one tensor on `device`, in one copy."""
    table = upload(numpy.concatenate(rows).astype(numpy.int32), device)
    return list(torch.split(table, [len(r) for r in rows]))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _host_documents(host_cu: tuple, num_rows: int, compress_block: int, compress_stride: int, select_block: int,
                    device) -> Layout:
    cu = numpy.asarray(host_cu, dtype=numpy.int64)
    if cu[-1] != num_rows:
        raise ValueError(f"bounds end at {cu[-1]} but there are num_rows={num_rows} packed rows")
    lens = numpy.diff(cu)
    cu_cmp = numpy.concatenate([[0], numpy.cumsum(num_compressed(lens, compress_block, compress_stride))])
    blocks_per_doc = -(-lens // select_block)
    cu_slc = numpy.concatenate([[0], numpy.cumsum(blocks_per_doc)])
    row_doc_start = numpy.repeat(cu[:-1], lens)
    cu_t, cu_cmp_t, zeros, row_doc_start_t, row_slc_start, row_pos = _upload(
        [cu, cu_cmp, numpy.zeros(len(lens), dtype=numpy.int64), row_doc_start, numpy.repeat(cu_slc[:-1], lens),
         numpy.arange(num_rows) - row_doc_start], device)
    doc_of_block = numpy.repeat(numpy.arange(len(lens)), blocks_per_doc)
    num_real = len(doc_of_block)
    block_docs = numpy.zeros((3, max_pieces(num_rows, len(lens), select_block)), dtype=numpy.int64)
    block_docs[0, :num_real] = cu[:-1][doc_of_block]
    block_docs[1, :num_real] = numpy.arange(num_real) - cu_slc[:-1][doc_of_block]
    block_docs[2, :num_real] = cu[1:][doc_of_block]
    return Layout(q_bounds=cu_t, k_bounds=cu_t, c_bounds=cu_cmp_t, q_start=zeros, k_start=zeros, c_start=zeros,
                  row_pos=row_pos, row_key_start=row_doc_start_t, row_slc_start=row_slc_start,
                  block_docs=upload(block_docs, device), host_q=host_cu, host_k=host_cu,
                  host_c=tuple(int(c) for c in cu_cmp))


@functools.lru_cache(maxsize=TILE_CACHE_SIZE)
def _host_tiles(host_cu: tuple, block: int, num_rows: int, device) -> Tiles:
    return tuple(_upload(host_tiles(host_cu, block, num_rows), device))
