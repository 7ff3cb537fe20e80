"""Halo exchange: each chunk receives the last tokens of the chunk before it, with autograd.

In the load-balanced layout rank r holds chunks r (slot 0) and 2C-1-r (slot 1). The chunk before
slot 0 is rank r-1's slot 0; the chunk before slot 1 is rank r+1's slot 1, or this rank's own
slot 0 on rank C-1. Rank 0's slot 0 (chunk 0) has no chunk before it: its halo is zeros, and
the positions it stands for (< 0) lie in no document, so no branch reads it.

Backward sends every halo gradient back to where the halo came from and adds it to the
gradient of those tokens.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .comm import Communicator

SELF = -1  # peer meaning "this rank"


def halo_routes(cp_size: int, rank: int):
    """(sends, recvs) of rank: sends [(my slot whose tail goes out, peer rank or SELF, peer slot)],
    recvs [(peer rank, my slot whose halo comes in)]."""
    sends, recvs = [], []
    if rank < cp_size - 1:
        sends.append((0, rank + 1, 0))
        recvs.append((rank + 1, 1))
    else:
        sends.append((0, SELF, 1))
    if rank > 0:
        sends.append((1, rank - 1, 1))
        recvs.append((rank - 1, 0))
    return sends, recvs


def _tail(x: torch.Tensor, slot: int, chunk_len: int, length: int) -> torch.Tensor:
    """The last `length` tokens of slot's chunk: x [B, 2c, H, D] -> [B, length, H, D] (a view)."""
    end = (slot + 1) * chunk_len
    return x[:, end - length:end]


def _pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


class HaloExchange(torch.autograd.Function):
    """halos = HaloExchange.apply(comm, chunk_len, lengths, *xs)

    xs: local tensors [B, 2c, H, D] (one dtype); lengths[i]: halo tokens of xs[i] (0 allowed).
    Returns one halo per x, [B, 2, lengths[i], H, D]: [:, slot] are the lengths[i] tokens just
    before that slot's chunk.
    """

    @staticmethod
    def forward(ctx, comm: Communicator, chunk_len: int, lengths: Tuple[int, ...], *xs):
        ctx.comm, ctx.chunk_len, ctx.lengths = comm, chunk_len, lengths
        ctx.shapes = [x.shape for x in xs]
        halos = [x.new_zeros(x.shape[0], 2, n, *x.shape[2:]) for x, n in zip(xs, lengths)]
        sends, recvs = halo_routes(comm.size, comm.rank)
        outgoing, incoming = [], []
        for my_slot, peer, peer_slot in sends:
            tails = [_tail(x, my_slot, chunk_len, n) for x, n in zip(xs, lengths)]
            if peer == SELF:
                for halo, tail in zip(halos, tails):
                    halo[:, peer_slot] = tail
            else:
                outgoing.append((_pack(tails), peer))
        for peer, my_slot in recvs:
            incoming.append((xs[0].new_empty(sum(h[:, my_slot].numel() for h in halos)), peer, my_slot))
        comm.exchange(outgoing, [(buf, peer) for buf, peer, _ in incoming], "halo fwd")
        for buf, _, my_slot in incoming:
            for halo, piece in zip(halos, _unpack(buf, [h[:, my_slot] for h in halos])):
                halo[:, my_slot] = piece
        return tuple(halos)

    @staticmethod
    def backward(ctx, *halo_grads):
        comm, chunk_len, lengths = ctx.comm, ctx.chunk_len, ctx.lengths
        grads = [g.new_zeros(shape) for g, shape in zip(halo_grads, ctx.shapes)]
        sends, recvs = halo_routes(comm.size, comm.rank)
        outgoing = [(_pack([g[:, my_slot] for g in halo_grads]), peer) for peer, my_slot in recvs]
        incoming = []
        for my_slot, peer, peer_slot in sends:
            if peer == SELF:
                for grad, g, n in zip(grads, halo_grads, lengths):
                    _tail(grad, my_slot, chunk_len, n).add_(g[:, peer_slot])
            else:
                incoming.append((grads[0].new_empty(sum(g[:, peer_slot].numel() for g in halo_grads)), peer, my_slot))
        comm.exchange(outgoing, [(buf, peer) for buf, peer, _ in incoming], "halo bwd")
        for buf, _, my_slot in incoming:
            tails = [_tail(grad, my_slot, chunk_len, n) for grad, n in zip(grads, lengths)]
            for tail, piece in zip(tails, _unpack(buf, tails)):
                tail.add_(piece)
        return (None, None, None, *grads)


def exchange_halos(comm: Communicator, chunk_len: int, lengths: Sequence[int], *xs: torch.Tensor):
    """Differentiable halos of xs (see HaloExchange)."""
    return HaloExchange.apply(comm, chunk_len, tuple(lengths), *xs)
