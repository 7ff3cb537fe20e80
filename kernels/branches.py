"""The NSA branches one document piece at a time, with explicit query positions.

Same signatures as megatron_nsa.reference's branch functions, so that context parallelism
(megatron_nsa.context_parallel) can run its local queries against gathered or halo keys with the
Triton kernels. Query positions must be contiguous (q_pos[i] = q_pos[0] + i).
"""
from __future__ import annotations

import numpy
import torch

from .band import band_attention
from .combine import gated_combine
from .layout import Segments, upload
from .selected import piece_layout, selected_backward, used_slots_first
from .selected import selected_attention as _selected_attention
from .topk import select_blocks as _select_blocks


def _host_ints(values, device) -> torch.Tensor:
    """A few host ints as an int32 tensor on `device`, without waiting for the GPU."""
    return upload(numpy.asarray(values, dtype=numpy.int32), device)


def _segment(q, q_pos, num_keys):
    """Segments of the queries and of the keys (one each, known on the host too), and the first query
    position (int32 tensor)."""
    device = q.device
    cu_q = Segments(_host_ints([0, q.shape[0]], device), (0, q.shape[0]))
    cu_k = Segments(_host_ints([0, num_keys], device), (0, num_keys))
    q_pos0 = q_pos[:1].to(torch.int32) if q_pos.numel() else torch.zeros(1, device=device, dtype=torch.int32)
    return cu_q, cu_k, q_pos0


def compressed_attention(q, compressed_k, compressed_v, q_pos, config, scale):
    """-> (out [Tq, H_q, d_v], lse [Tq, H_q], scores): `scores` is what select_blocks needs (q, compressed K, lse)."""
    cu_q, cu_k, q_pos0 = _segment(q, q_pos, compressed_k.shape[0])
    out, lse = band_attention(q, compressed_k, compressed_v, cu_q, cu_k, "compressed", config, scale, q_pos0=q_pos0)
    return out, lse, (q.detach(), compressed_k.detach(), lse, scale)


def select_blocks(scores, q_pos, num_slc, num_kv_heads, config):
    """-> selected_block_idx [Tq, H_kv, n] int64, ascending, -1 padded."""
    q, compressed_k, lse, scale = scores
    cu_q, cu_k, q_pos0 = _segment(q, q_pos, compressed_k.shape[0])
    return _select_blocks(q.contiguous(), compressed_k.contiguous(), lse, cu_q, cu_k, config, scale,
                          q_pos0=q_pos0).long()


def selected_attention(q, k, v, selected_block_idx, q_pos, config, scale):
    """Keys at positions 0..Tk-1 of the document."""
    layout = piece_layout(q_pos, k.shape[0], config.select_block_size)
    return _selected_attention(q, k, v, used_slots_first(selected_block_idx.to(torch.int32)), layout, config, scale)


def selected_attention_backward(q, k, v, selected_block_idx, q_pos, config, scale, grad_out, lse, delta):
    """(dQ, dK, dV) of these keys' share of an attention whose softmax spans more keys: lse and
    delta = rowsum(dO * O) [Tq, H_q] are the whole softmax's (e.g. merged over a ring's pieces)."""
    layout = piece_layout(q_pos, k.shape[0], config.select_block_size)
    stats = torch.stack([lse.float(), delta.float()])  # [2, Tq, H_q]: the kernels read both with one stride
    idx = used_slots_first(selected_block_idx.to(torch.int32)).contiguous()
    return selected_backward(_dense_rows(q), k.contiguous(), v.contiguous(), idx, layout, config, scale,
                             _dense_rows(grad_out), stats[0], stats[1])


def _dense_rows(x):
    """x itself when its last dim is dense (the kernels take the token and head strides, so a head slice
    of a wider tensor needs no copy), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def window_attention(q, k, v, q_pos, k_start, config, scale):
    """Keys at positions k_start..k_start+Tk-1."""
    cu_q, cu_k, q_pos0 = _segment(q, q_pos, k.shape[0])
    k_first = _host_ints([k_start], q.device)
    return band_attention(q, k, v, cu_q, cu_k, "window", config, scale, q_pos0=q_pos0, k_first=k_first)


__all__ = ["compressed_attention", "select_blocks", "selected_attention", "selected_attention_backward",
           "window_attention", "gated_combine"]
