"""A deliberately simple NSA oracle: one query token and one head at a time (docs/semantics.md).

Written from the spec alone; it shares no code with megatron_nsa.reference. Slow on purpose:
every rule is a plain loop or a plain comparison, so that a reader can check it line by line.
Positions are 0-indexed within one sequence (one batch row or one packed document).
"""
from __future__ import annotations

import math

import torch


def compress_blocks(keys, values, config, compressor=None, rope=None):
    """Compressed keys/values of one sequence, block by block.

    keys [T, H_kv, d_k], values [T, H_kv, d_v] -> lists of [H_kv, d_k] / [H_kv, d_v], one per block.
    Block i covers tokens [i*d, i*d + l); it exists when it fits in the sequence.
    """
    l, d = config.compress_block_size, config.compress_stride
    seq_len = keys.shape[0]
    cmp_keys, cmp_values = [], []
    i = 0
    while i * d + l <= seq_len:
        key_block, value_block = keys[i * d:i * d + l], values[i * d:i * d + l]  # [l, H_kv, d]
        if compressor is None:
            key, value = key_block.mean(dim=0), value_block.mean(dim=0)
        else:
            key, value = apply_phi(compressor.k_map, key_block), apply_phi(compressor.v_map, value_block)
        if rope is not None:
            key = rope(key[None], torch.tensor([i * d + l - 1]))[0]
        cmp_keys.append(key)
        cmp_values.append(value)
        i += 1
    return cmp_keys, cmp_values


def apply_phi(block_map, block):
    """phi of one block from the parameters of a compression map: block [l, H, D] -> [H, D].

    Each head separately: add the position embedding to each of the l tokens, concatenate the
    tokens (token 0 first) into one l*D vector and map it to D.
    """
    if block_map.kind == "mean":
        return block.mean(dim=0)
    out = []
    for head in range(block.shape[1]):
        flat = (block[:, head, :] + block_map.pos_emb).reshape(-1)  # [l*D]
        if block_map.kind == "linear":
            out.append(block_map.proj.weight @ flat)
        else:
            first, second = block_map.proj[0], block_map.proj[2]
            hidden = first.weight @ flat + first.bias
            hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact GELU
            out.append(second.weight @ hidden + second.bias)
    return torch.stack(out)


def attend(query, keys, values, value_dim, scale):
    """Softmax attention of one query over lists of keys and values.

    Returns (output [value_dim], lse, probs [len(keys)]); with no key: (zeros, -inf, []).
    """
    if not keys:
        return query.new_zeros(value_dim), query.new_tensor(float("-inf")), []
    logits = torch.stack([scale * torch.dot(query, key) for key in keys])
    lse = torch.logsumexp(logits, dim=0)
    probs = torch.exp(logits - lse)
    return sum(p * value for p, value in zip(probs, values)), lse, list(probs)


def overlap_tokens(cmp_block, slc_block, config):
    """Tokens shared by compressed block i and selection block j, counted one by one."""
    l, d, lp = config.compress_block_size, config.compress_stride, config.select_block_size
    cmp_tokens = set(range(cmp_block * d, cmp_block * d + l))
    slc_tokens = set(range(slc_block * lp, (slc_block + 1) * lp))
    return len(cmp_tokens & slc_tokens)


def choose_blocks(scores, t, config):
    """The selected block ids (ascending) for a query at position t, given scores[j] of blocks j <= t // l'."""
    current = t // config.select_block_size
    candidates = list(range(current + 1))
    forced = [j for j in candidates
              if j < config.select_init_blocks or j > current - config.select_local_blocks]
    others = [j for j in candidates if j not in forced]
    others.sort(key=lambda j: (-float(scores[j]), j))  # higher score first, then lower id
    chosen = forced + others
    return sorted(chosen[:config.select_count])


def oracle_sequence(q, kv_cmp, kv_slc, kv_win, gates, config, compressor=None, rope=None, positions=None):
    """NSA of one sequence, token by token.

    q [T, H_q, d_k]; kv_* (k [T, H_kv, d_k], v [T, H_kv, d_v]); gates [T, H_q, 3].
    positions: the query tokens to compute (default all). Returns a dict of per-token results:
    out, cmp_out, slc_out, win_out [len(positions), H_q, d_v]; cmp_lse, slc_lse, win_lse
    [len(positions), H_q]; selected [len(positions), H_kv, n] (ascending, -1 padded).
    """
    seq_len, num_q_heads, head_dim_k = q.shape
    num_kv_heads, value_dim = kv_slc[0].shape[1], kv_slc[1].shape[-1]
    group = num_q_heads // num_kv_heads
    scale = config.softmax_scale if config.softmax_scale is not None else 1.0 / math.sqrt(head_dim_k)
    l, d, lp, w = config.compress_block_size, config.compress_stride, config.select_block_size, config.window_size
    cmp_keys, cmp_values = compress_blocks(*kv_cmp, config, compressor, rope)
    positions = range(seq_len) if positions is None else positions

    rows = {name: [] for name in ("out", "cmp_out", "slc_out", "win_out", "cmp_lse", "slc_lse", "win_lse", "selected")}
    for t in positions:
        visible = [i for i in range(len(cmp_keys)) if i * d + l - 1 <= t]
        num_slc_blocks = t // lp + 1
        token = {name: [] for name in rows}
        cmp_results, block_scores = [], [[0.0] * num_slc_blocks for _ in range(num_kv_heads)]
        for h in range(num_q_heads):
            g = h // group
            out, lse, probs = attend(q[t, h], [cmp_keys[i][g] for i in visible],
                                     [cmp_values[i][g] for i in visible], value_dim, scale)
            cmp_results.append((out, lse))
            for p, i in zip(probs, visible):
                for j in range(i * d // lp, (i * d + l - 1) // lp + 1):  # the selection blocks block i touches
                    block_scores[g][j] += float(p.detach()) * overlap_tokens(i, j, config) / d

        selected = [choose_blocks(block_scores[g], t, config) for g in range(num_kv_heads)]
        for h in range(num_q_heads):
            g = h // group
            slc_tokens = [s for j in selected[g] for s in range(j * lp, (j + 1) * lp) if s <= t]
            win_tokens = list(range(max(0, t - w + 1), t + 1))
            slc_out, slc_lse, _ = attend(q[t, h], [kv_slc[0][s, g] for s in slc_tokens],
                                         [kv_slc[1][s, g] for s in slc_tokens], value_dim, scale)
            win_out, win_lse, _ = attend(q[t, h], [kv_win[0][s, g] for s in win_tokens],
                                         [kv_win[1][s, g] for s in win_tokens], value_dim, scale)
            cmp_out, cmp_lse = cmp_results[h]
            gate_cmp, gate_slc, gate_win = gates[t, h]
            token["out"].append(gate_cmp * cmp_out + gate_slc * slc_out + gate_win * win_out)
            for name, value in (("cmp_out", cmp_out), ("slc_out", slc_out), ("win_out", win_out),
                                ("cmp_lse", cmp_lse), ("slc_lse", slc_lse), ("win_lse", win_lse)):
                token[name].append(value)
        padded = [sel + [-1] * (config.select_count - len(sel)) for sel in selected]
        token["selected"] = [torch.tensor(p, dtype=torch.int64) for p in padded]
        for name in rows:
            rows[name].append(torch.stack(token[name]))
    return {name: torch.stack(value) for name, value in rows.items()}


def oracle_batch(q, kv_cmp, kv_slc, kv_win, gates, config, cu_seqlens=None, compressor=None, rope=None):
    """oracle_sequence over every batch row ([B, T, ...] inputs) or every packed document (B == 1).

    Returns the per-token dict with rows in token order, batch rows one after the other ([B*T, ...]).
    """
    batch, seq_len = q.shape[:2]
    if cu_seqlens is None:
        spans = [(b, 0, seq_len) for b in range(batch)]
    else:
        bounds = [int(x) for x in cu_seqlens]
        spans = [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1) if bounds[i + 1] > bounds[i]]
    parts = []
    for b, start, end in spans:
        cut = lambda x: x[b, start:end]  # noqa: E731
        parts.append(oracle_sequence(cut(q), tuple(map(cut, kv_cmp)), tuple(map(cut, kv_slc)),
                                     tuple(map(cut, kv_win)), cut(gates), config, compressor, rope))
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
