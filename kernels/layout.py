"""Packed-sequence bookkeeping shared by the kernels: documents, per-row tables and tile tables.

Every kernel works on packed tensors [total_tokens, H, D] with document boundaries `cu_seqlens`
(a batch [B, T] is B documents of T tokens). A tile never crosses a document boundary.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import numpy
import torch

# Layouts built on the host are cached per layout, since every layer of a step shares one. Packed batches
# bring a new layout every step, so the caches keep only a few: tables with a row per token (12 bytes per
# token for the documents) in LAYOUT_CACHE_SIZE entries, tile tables (a row per tile, several block sizes
# per step) in TILE_CACHE_SIZE.
LAYOUT_CACHE_SIZE = 4
TILE_CACHE_SIZE = 32


def num_compressed(seq_lens, block: int, stride: int):
    """Compressed blocks per document: floor((T - l) / d) + 1 when T >= l, else 0 (an integer torch
    tensor or numpy array)."""
    return (seq_lens >= block) * ((seq_lens - block) // stride + 1)


@dataclasses.dataclass
class Docs:
    """Document layout of one packed batch; all int32 tensors on the data's device."""

    cu_seqlens: torch.Tensor  # [N+1] token rows
    cu_cmp: torch.Tensor  # [N+1] compressed-token rows
    cu_slc: torch.Tensor  # [N+1] global selection-block ids
    row_doc_start: torch.Tensor  # [T] first token row of each row's document
    row_cmp_start: torch.Tensor  # [T] first compressed row of each row's document
    row_slc_start: torch.Tensor  # [T] first global selection-block id of each row's document
    host_cu: Optional[tuple] = None  # cu_seqlens on the host, when known
    host_cmp: Optional[tuple] = None  # cu_cmp on the host, when known

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def token_segments(self) -> "Segments":
        return Segments(self.cu_seqlens, self.host_cu)

    @property
    def cmp_segments(self) -> "Segments":
        return Segments(self.cu_cmp, self.host_cmp)


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """Boundaries [N+1] of packed segments: `cu` int32 on the data's device, and `host` the same ints
    as a tuple when the host knows them. Then tile tables are built on the host, once per layout."""

    cu: torch.Tensor
    host: Optional[tuple] = None

    def tiles(self, block: int, num_rows: int):
        if self.host is None:
            return tiles(self.cu, block, num_rows)
        return _host_tiles(self.host, block, num_rows, self.cu.device)


def as_segments(cu) -> Segments:
    """A Segments as it is; a bare cu tensor as Segments with no host copy."""
    return cu if isinstance(cu, Segments) else Segments(cu)


def segment_of(cu: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Segment of each id for segments [cu[i], cu[i+1]) (int64 cu); ids past the last segment get N.
    A search, not repeat_interleave: its output size is known, so nothing waits for the GPU."""
    return torch.searchsorted(cu[1:].contiguous(), ids, right=True)


def make_docs(cu_seqlens: torch.Tensor, num_rows: int, cmp_block: int, cmp_stride: int, slc_block: int,
              bounds: Optional[Sequence[int]] = None) -> Docs:
    """The layout of documents cu_seqlens over num_rows (= cu_seqlens[-1]) packed rows. With `bounds`
    (cu_seqlens on the host) it is built on the host and cached per layout; without, it is computed on
    the device from host-known sizes. Neither waits for the GPU."""
    if bounds is not None:
        host_cu = tuple(int(b) for b in bounds)
        return _host_docs(host_cu, num_rows, cmp_block, cmp_stride, slc_block, cu_seqlens.device)
    cu = cu_seqlens.to(torch.int64)
    lens = cu[1:] - cu[:-1]
    zero = torch.zeros(1, dtype=torch.int64, device=cu.device)
    cu_cmp = torch.cat([zero, torch.cumsum(num_compressed(lens, cmp_block, cmp_stride), 0)])
    cu_slc = torch.cat([zero, torch.cumsum(torch.div(lens + slc_block - 1, slc_block, rounding_mode="floor"), 0)])
    doc_of_row = segment_of(cu, torch.arange(num_rows, device=cu.device))
    return Docs(
        cu_seqlens=cu.to(torch.int32),
        cu_cmp=cu_cmp.to(torch.int32),
        cu_slc=cu_slc.to(torch.int32),
        row_doc_start=cu[:-1][doc_of_row].to(torch.int32),
        row_cmp_start=cu_cmp[:-1][doc_of_row].to(torch.int32),
        row_slc_start=cu_slc[:-1][doc_of_row].to(torch.int32),
    )


def max_pieces(num_items: int, num_segments: int, piece: int) -> int:
    """An upper bound on sum_i ceil(len_i / piece) over num_segments lengths that sum to num_items."""
    return (num_items + num_segments * (piece - 1)) // piece


def tiles(cu_rows: torch.Tensor, block: int, num_rows: int):
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


def upload(array: numpy.ndarray, device) -> torch.Tensor:
    """A host array on `device`. non_blocking: the copy is staged at once and nothing waits for the
    kernels already queued."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def _upload(rows: Sequence[numpy.ndarray], device) -> list:
    """Host int arrays as int32 views of one tensor on `device`, in one copy."""
    table = upload(numpy.concatenate(rows).astype(numpy.int32), device)
    return list(torch.split(table, [len(r) for r in rows]))


@functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)
def _host_docs(host_cu: tuple, num_rows: int, cmp_block: int, cmp_stride: int, slc_block: int, device) -> Docs:
    cu = numpy.asarray(host_cu, dtype=numpy.int64)
    if cu[-1] != num_rows:
        raise ValueError(f"bounds end at {cu[-1]} but there are num_rows={num_rows} packed rows")
    lens = numpy.diff(cu)
    cu_cmp = numpy.concatenate([[0], numpy.cumsum(num_compressed(lens, cmp_block, cmp_stride))])
    cu_slc = numpy.concatenate([[0], numpy.cumsum(-(-lens // slc_block))])
    cu_t, cu_cmp_t, cu_slc_t, row_doc_start, row_cmp_start, row_slc_start = _upload(
        [cu, cu_cmp, cu_slc, numpy.repeat(cu[:-1], lens), numpy.repeat(cu_cmp[:-1], lens),
         numpy.repeat(cu_slc[:-1], lens)], device)
    return Docs(cu_t, cu_cmp_t, cu_slc_t, row_doc_start, row_cmp_start, row_slc_start,
                host_cu=host_cu, host_cmp=tuple(int(c) for c in cu_cmp))


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


@functools.lru_cache(maxsize=TILE_CACHE_SIZE)
def _host_tiles(host_cu: tuple, block: int, num_rows: int, device):
    return tuple(_upload(host_tiles(host_cu, block, num_rows), device))
