"""The NSA branches one document piece at a time, with explicit query positions.

Same signatures as megatron_nsa.reference's branch functions, so that context parallelism
(megatron_nsa.context_parallel) can run its local queries against gathered or halo keys with the
Triton kernels: `config` is any object with megatron_nsa.NSAConfig's field names, read once into the
kernels' KernelParams. Query positions must be contiguous (q_pos[i] = q_pos[0] + i).
"""
from __future__ import annotations

import torch

from .band import band_attention
from .combine import gated_combine
from .layout import document_piece
from .params import KernelParams
from .selected import selected_backward, used_slots_first
from .selected import selected_attention as _selected_attention
from .topk import select_blocks as _select_blocks


def compressed_attention(q, compressed_k, compressed_v, q_pos, config, scale):
    """-> (out [Tq, H_q, d_v], lse [Tq, H_q], scores): `scores` is what select_blocks needs (q, compressed K,
    lse, the layout and the parameters)."""
    params = KernelParams.from_config(config, scale)
    layout = document_piece(q_pos, num_compressed_keys=compressed_k.shape[0])
    out, lse = band_attention(q, compressed_k, compressed_v, layout, "compressed", params)
    return out, lse, (q.detach(), compressed_k.detach(), lse, layout, params)


def select_blocks(scores, q_pos, num_slc, num_kv_heads, config):
    """-> selected_block_idx [Tq, H_kv, n] int64, ascending, -1 padded."""
    q, compressed_k, lse, layout, params = scores
    return _select_blocks(q.contiguous(), compressed_k.contiguous(), lse, layout, params).long()


def selected_attention(q, k, v, selected_block_idx, q_pos, config, scale):
    """Keys at positions 0..Tk-1 of the document."""
    layout = document_piece(q_pos, num_keys=k.shape[0], select_block=config.select_block_size)
    return _selected_attention(q, k, v, used_slots_first(selected_block_idx.to(torch.int32)), layout,
                               KernelParams.from_config(config, scale))


def selected_attention_backward(q, k, v, selected_block_idx, q_pos, config, scale, grad_out, lse, delta):
    """(dQ, dK, dV) of these keys' share of an attention whose softmax spans more keys: lse and
    delta = rowsum(dO * O) [Tq, H_q] are the whole softmax's (e.g. merged over a ring's pieces)."""
    layout = document_piece(q_pos, num_keys=k.shape[0], select_block=config.select_block_size)
    stats = torch.stack([lse.float(), delta.float()])  # [2, Tq, H_q]: the kernels read both with one stride
    idx = used_slots_first(selected_block_idx.to(torch.int32)).contiguous()
    return selected_backward(_dense_rows(q), k.contiguous(), v.contiguous(), idx, layout,
                             KernelParams.from_config(config, scale), _dense_rows(grad_out), stats[0], stats[1])


def _dense_rows(x):
    """x itself when its last dim is dense (the kernels take the token and head strides, so a head slice
    of a wider tensor needs no copy), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def window_attention(q, k, v, q_pos, k_start, config, scale):
    """Keys at positions k_start..k_start+Tk-1."""
    layout = document_piece(q_pos, num_keys=k.shape[0], key_start=k_start)
    return band_attention(q, k, v, layout, "window", KernelParams.from_config(config, scale))


__all__ = ["compressed_attention", "select_blocks", "selected_attention", "selected_attention_backward",
           "window_attention", "gated_combine"]
