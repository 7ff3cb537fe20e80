"""NSA on packed sequences with the Triton kernels: the three branches and the gated combination."""
from __future__ import annotations

import torch

from .band import band_attention
from .combine import gated_combine
from .layout import Docs, make_docs
from .selected import packed_layout, selected_attention
from .topk import select_blocks


def nsa_core(q, kv_slc, kv_win, compressed_kv, gates, docs: Docs, config, scale: float, return_intermediates=False):
    """q [T, H_q, d_k]; kv_slc / kv_win (k [T, H_kv, d_k], v [T, H_kv, d_v]); compressed_kv
    (k [N_cmp, H_kv, d_k], v [N_cmp, H_kv, d_v]) packed per document as docs.cu_cmp; gates [T, H_q, 3].

    Returns out [T, H_q, d_v] (and a dict of per-branch results when asked).
    """
    tokens, compressed = docs.token_segments, docs.cmp_segments
    cmp_out, cmp_lse = band_attention(q, *compressed_kv, tokens, compressed, "compressed", config, scale)
    selected_block_idx = select_blocks(q.detach(), compressed_kv[0].detach(), cmp_lse, tokens, compressed, config,
                                       scale)
    slc_layout = packed_layout(docs, config.select_block_size)
    slc_out, slc_lse = selected_attention(q, *kv_slc, selected_block_idx, slc_layout, config, scale)
    win_out, win_lse = band_attention(q, *kv_win, tokens, tokens, "window", config, scale)
    out = gated_combine(gates, cmp_out, slc_out, win_out)
    if not return_intermediates:
        return out
    return out, dict(cmp_out=cmp_out, cmp_lse=cmp_lse, slc_out=slc_out, slc_lse=slc_lse, win_out=win_out,
                     win_lse=win_lse, selected_block_idx=selected_block_idx)


__all__ = ["nsa_core", "make_docs", "Docs"]
