"""phi: maps the l keys (or values) of one compressed block to one token (docs/semantics.md, Eq. 7).

Parameters are shared across heads. 'mean' has none; 'linear' and 'mlp' add a learned
intra-block position embedding to each of the l tokens, flatten the block and map it back
to one head-dim vector.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy
import torch
from torch import nn

from .config import COMPRESSION_KINDS


def block_windows(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """The compressed blocks of one sequence: x [T, H, D] -> [N_cmp, l, H, D], block i = tokens [i*d, i*d + l)."""
    if x.shape[0] < block_size:
        return x.new_zeros((0, block_size) + tuple(x.shape[1:]))
    return x.unfold(0, block_size, stride).permute(0, 3, 1, 2)


class _BlockMap(nn.Module):
    """One phi for one of K or V: [N, l, H, D] -> [N, H, D]."""

    def __init__(self, kind: str, block_size: int, head_dim: int, hidden: Optional[int], device=None, dtype=None):
        super().__init__()
        self.kind = kind
        if kind == "mean":
            return
        factory = {"device": device, "dtype": dtype}
        self.pos_emb = nn.Parameter(torch.zeros(block_size, head_dim, **factory))
        flat = block_size * head_dim
        if kind == "linear":
            self.proj = nn.Linear(flat, head_dim, bias=False, **factory)
        else:
            width = hidden if hidden is not None else 2 * head_dim
            self.proj = nn.Sequential(
                nn.Linear(flat, width, **factory), nn.GELU(), nn.Linear(width, head_dim, **factory)
            )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        if self.kind == "mean":
            return
        nn.init.normal_(self.pos_emb, std=0.02)
        if self.kind == "linear":
            # Start near average pooling, so that training begins from the parameter-free phi.
            block_size, head_dim = self.pos_emb.shape
            weight = self.proj.weight
            mean_pool = torch.eye(head_dim, device=weight.device, dtype=weight.dtype).repeat(1, block_size) / block_size
            weight.copy_(mean_pool + 0.02 * torch.randn_like(weight) / block_size**0.5)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return windows.mean(dim=1)
        n, l, h, dim = windows.shape
        shifted = windows + self.pos_emb[None, :, None, :].to(windows.dtype)
        flat = shifted.permute(0, 2, 1, 3).reshape(n, h, l * dim)  # [N, H, l*D]
        return self.proj(flat.to(self.pos_emb.dtype)).to(windows.dtype)


class KVCompressor(nn.Module):
    """The compression phi for keys and values, shared across heads.

    kind: 'mean' | 'linear' | 'mlp'. head_dim_k / head_dim_v may differ (e.g. 192 / 128).
    """

    def __init__(
        self,
        kind: str,
        block_size: int,
        head_dim_k: int,
        head_dim_v: int,
        hidden: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if kind not in COMPRESSION_KINDS:
            raise ValueError(f"compression={kind!r} is not allowed; choose one of {COMPRESSION_KINDS}")
        self.kind = kind
        self.block_size = block_size
        self.k_map = _BlockMap(kind, block_size, head_dim_k, hidden, device, dtype)
        self.v_map = _BlockMap(kind, block_size, head_dim_v, hidden, device, dtype)

    @classmethod
    def from_config(cls, config, head_dim_k: int, head_dim_v: int, device=None, dtype=None) -> "KVCompressor":
        return cls(
            config.compression, config.compress_block_size, head_dim_k, head_dim_v,
            config.compress_mlp_hidden, device=device, dtype=dtype,
        )

    def compress_k(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [N, l, H, d_k] -> [N, H, d_k]"""
        return self.k_map(windows)

    def compress_v(self, windows: torch.Tensor) -> torch.Tensor:
        """windows [N, l, H, d_v] -> [N, H, d_v]"""
        return self.v_map(windows)


def _blocks_by_offset(bounds: numpy.ndarray, block_size: int, stride: int):
    """Compressed blocks of the documents [bounds[i], bounds[i+1]), grouped by their grid offset
    (document start % stride). Yields (offset, grid_ids, local_ids): block b of a document starting at s
    is window s // stride + b of the strided grid that starts at row `offset`; local_ids holds b."""
    starts, lengths = bounds[:-1], numpy.diff(bounds)
    counts = numpy.where(lengths >= block_size, (lengths - block_size) // stride + 1, 0)  # [N docs]
    for offset in numpy.unique(starts[counts > 0] % stride):
        docs = (starts % stride == offset) & (counts > 0)
        doc_counts = counts[docs]
        local_ids = numpy.arange(doc_counts.sum()) - numpy.repeat(numpy.cumsum(doc_counts) - doc_counts, doc_counts)
        yield int(offset), numpy.repeat(starts[docs] // stride, doc_counts) + local_ids, local_ids


def _upload(array: numpy.ndarray, device: torch.device) -> torch.Tensor:
    """A host index array on `device`. non_blocking: the copy is staged at once and nothing waits for
    the kernels already queued."""
    return torch.from_numpy(array).to(device, non_blocking=True)


def compress_documents(k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, config,
                       compressor: Optional[KVCompressor] = None,
                       rope: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
                       bounds: Optional[numpy.ndarray] = None):
    """Compressed K/V of packed documents in a few batched calls, whatever the number of documents.

    k [T, H_kv, d_k], v [T, H_kv, d_v] -> (compressed_k [N_cmp, H_kv, d_k], compressed_v [N_cmp, H_kv, d_v]),
    each document's blocks in order: the values of compressing the documents one by one
    (megatron_nsa.reference.compress_packed). Documents whose starts agree modulo the stride share one
    strided view of the packed tensor (one group for a [B, T] batch when T is a multiple of the stride);
    phi runs on that view's windows and each document block is picked from it once, so the backward
    needs no atomics. `rope(x, positions)` rotates each compressed key at its block's last token position
    within its document. `bounds`: cu_seqlens on the host when the caller has them (saves a copy that
    waits for the GPU).
    """
    block_size, stride = config.compress_block_size, config.compress_stride
    if bounds is None:
        bounds = cu_seqlens.detach().to("cpu", torch.int64).numpy()
    bounds = numpy.asarray(bounds, dtype=numpy.int64)
    parts_k, parts_v, starts, local = [], [], [], []
    for offset, grid_ids, local_ids in _blocks_by_offset(bounds, block_size, stride):
        k_windows = block_windows(k[offset:], block_size, stride)  # [grid windows, l, H_kv, d_k]: a view
        v_windows = block_windows(v[offset:], block_size, stride)
        if compressor is None:
            grid_k, grid_v = k_windows.mean(dim=1), v_windows.mean(dim=1)
        else:
            grid_k, grid_v = compressor.compress_k(k_windows), compressor.compress_v(v_windows)
        if len(grid_ids) < grid_k.shape[0]:  # some windows straddle documents: keep the documents' own
            picked = _upload(grid_ids, k.device)
            grid_k, grid_v = grid_k.index_select(0, picked), grid_v.index_select(0, picked)
        parts_k.append(grid_k)
        parts_v.append(grid_v)
        starts.append(offset + grid_ids * stride)
        local.append(local_ids)
    if not parts_k:
        return k.new_zeros((0,) + tuple(k.shape[1:])), v.new_zeros((0,) + tuple(v.shape[1:]))
    compressed_k, compressed_v = torch.cat(parts_k), torch.cat(parts_v)
    local_ids = numpy.concatenate(local)
    if len(parts_k) > 1:  # back to document order, which is the order of the blocks' first rows
        order = numpy.argsort(numpy.concatenate(starts), kind="stable")
        local_ids = local_ids[order]
        order = _upload(order, k.device)
        compressed_k, compressed_v = compressed_k.index_select(0, order), compressed_v.index_select(0, order)
    if rope is not None:
        positions = _upload(local_ids * stride + block_size - 1, k.device)
        compressed_k = rope(compressed_k, positions)
    return compressed_k, compressed_v
