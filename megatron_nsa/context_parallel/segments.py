"""What one CP rank computes: its queries cut at document boundaries, and its compressed blocks.

A segment is the part of one document that falls in one of the rank's chunks. Every NSA branch
is evaluated per segment with the reference's per-branch functions, at positions within the
document (packed documents are independent sequences; without cu_seqlens a batch row is one
document). A compressed block belongs to the rank holding its last token.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from ..reference import num_compressed_blocks, num_selection_blocks
from .layout import LoadBalancedLayout


@dataclasses.dataclass(frozen=True)
class Segment:
    """The queries of one document inside one of this rank's chunks (global token positions)."""

    row: int  # batch row
    slot: int  # 0 or 1: which of the rank's two chunks
    chunk_start: int  # global position of the chunk's first token
    doc_start: int
    doc_end: int
    q_start: int  # global positions [q_start, q_end) of the segment's queries
    q_end: int
    cmp_first: int  # within-document id of the first compressed block computed here (last token in this chunk)
    cmp_count: int
    cmp_offset: int  # row of the document's block 0 in the global compressed tensor

    @property
    def doc_len(self) -> int:
        return self.doc_end - self.doc_start

    def local_slice(self, chunk_len: int) -> slice:
        """The segment's queries in the rank's local [2c] token axis."""
        start = self.slot * chunk_len + self.q_start - self.chunk_start
        return slice(start, start + self.q_end - self.q_start)

    def query_positions(self, device) -> torch.Tensor:
        """Positions within the document, [q_end - q_start] int64."""
        return torch.arange(self.q_start - self.doc_start, self.q_end - self.doc_start, device=device)


def blocks_ending_in(doc_start: int, doc_end: int, lo: int, hi: int, config):
    """(first id, count) of a document's compressed blocks whose last token lies in [lo, hi)."""
    l, d = config.compress_block_size, config.compress_stride
    first = max(0, -((doc_start + l - 1 - lo) // d))  # ceil((lo - doc_start - l + 1) / d)
    last = (min(doc_end, hi) - doc_start - l) // d
    return first, max(0, last - first + 1)


@dataclasses.dataclass
class CPPlan:
    """Segments and compressed-block bookkeeping of one rank, for a batch of B rows."""

    layout: LoadBalancedLayout
    rank: int
    batch: int
    segments: List[Segment]  # ordered by (row, slot, q_start)
    chunk_cmp_counts: List[int]  # [2C] compressed blocks whose last token is in chunk j (per row)
    num_cmp: int  # compressed blocks of a whole row
    cmp_halo: int  # tokens before a chunk that its compressed blocks may need
    win_halo: int  # tokens before a chunk that its window needs (w - 1)
    docs: List[Tuple[int, int]] = dataclasses.field(default_factory=list)  # every document's (start, end)

    @property
    def chunk_len(self) -> int:
        return self.layout.chunk_len

    def segments_of(self, row: int, slot: Optional[int] = None) -> List[Segment]:
        return [s for s in self.segments if s.row == row and (slot is None or s.slot == slot)]

    def split_tokens(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x [B, 2c, ...] -> the segments' parts [q_end - q_start, ...], views in plan order.

        Segments tile each row's 2c tokens in order, so this is one split of the flattened token
        axis: its backward concatenates the parts' gradients once, where indexing x per segment
        would build a zero-filled gradient of x's whole size for every segment."""
        sizes = [seg.q_end - seg.q_start for seg in self.segments]
        return x.flatten(0, 1).split(sizes)

    def join_tokens(self, parts) -> torch.Tensor:
        """Inverse of split_tokens: the segments' parts in plan order -> [B, 2c, ...]."""
        joined = torch.cat(list(parts))
        return joined.view(self.batch, 2 * self.chunk_len, *joined.shape[1:])

    def num_slc(self, segment: Segment, config) -> int:
        return num_selection_blocks(segment.doc_len, config)


def build_plan(layout: LoadBalancedLayout, rank: int, batch: int, bounds: Optional[Sequence[int]],
               config) -> CPPlan:
    """The plan of CP rank `rank` for B rows of S tokens; bounds: global document bounds on the host
    (cu_seqlens as ints, B == 1), or None for one document per row."""
    if bounds is None:
        docs = [(0, layout.seq_len)]
    else:
        docs = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    cmp_offsets, total = [], 0
    for start, end in docs:
        cmp_offsets.append(total)
        total += num_compressed_blocks(end - start, config)

    def overlapping(chunk):
        lo, hi = layout.chunk_start(chunk), layout.chunk_start(chunk) + layout.chunk_len
        return [(doc, s, e) for doc, (s, e) in enumerate(docs) if s < hi and e > lo], lo, hi

    chunk_cmp_counts = []
    for chunk in range(layout.num_chunks):
        found, lo, hi = overlapping(chunk)
        chunk_cmp_counts.append(sum(blocks_ending_in(s, e, lo, hi, config)[1] for _, s, e in found))

    segments = []
    for row in range(batch):
        for slot, chunk in enumerate(layout.chunks_of(rank)):
            found, lo, hi = overlapping(chunk)
            for doc, s, e in found:
                first, count = blocks_ending_in(s, e, lo, hi, config)
                segments.append(Segment(row, slot, lo, s, e, max(s, lo), min(e, hi), first, count, cmp_offsets[doc]))

    l, d = config.compress_block_size, config.compress_stride
    aligned = all(start % d == 0 for start, _ in docs)
    return CPPlan(layout, rank, batch, segments, chunk_cmp_counts, total,
                  cmp_halo=l - d if aligned else l - 1, win_halo=config.window_size - 1, docs=docs)
