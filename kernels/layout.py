"""Packed-sequence bookkeeping shared by the kernels: documents, per-row tables and tile tables.

Every kernel works on packed tensors [total_tokens, H, D] with document boundaries `cu_seqlens`
(a batch [B, T] is B documents of T tokens). A tile never crosses a document boundary.
"""
from __future__ import annotations

import dataclasses

import torch


def num_compressed(seq_lens: torch.Tensor, block: int, stride: int) -> torch.Tensor:
    """Compressed blocks per document: floor((T - l) / d) + 1 when T >= l, else 0."""
    return torch.where(seq_lens >= block, torch.div(seq_lens - block, stride, rounding_mode="floor") + 1, 0)


@dataclasses.dataclass
class Docs:
    """Document layout of one packed batch; all int32 tensors on the data's device."""

    cu_seqlens: torch.Tensor  # [N+1] token rows
    cu_cmp: torch.Tensor  # [N+1] compressed-token rows
    cu_slc: torch.Tensor  # [N+1] global selection-block ids
    row_doc_start: torch.Tensor  # [T] first token row of each row's document
    row_cmp_start: torch.Tensor  # [T] first compressed row of each row's document
    row_slc_start: torch.Tensor  # [T] first global selection-block id of each row's document

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]


def segment_of(cu: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Segment of each id for segments [cu[i], cu[i+1]) (int64 cu); ids past the last segment get N.
    A search, not repeat_interleave: its output size is known, so nothing waits for the GPU."""
    return torch.searchsorted(cu[1:].contiguous(), ids, right=True)


def make_docs(cu_seqlens: torch.Tensor, num_rows: int, cmp_block: int, cmp_stride: int, slc_block: int) -> Docs:
    """The layout of documents cu_seqlens over num_rows (= cu_seqlens[-1]) packed rows; computed on the
    device from host-known sizes, without a device-to-host copy."""
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
