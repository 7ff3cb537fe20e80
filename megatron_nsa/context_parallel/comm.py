"""The collectives context parallelism uses, on one process group, with a byte count.

`Communicator` runs them; `LocalCommunicator` does no communication at all (outputs are filled
from local data of the right shape), so that a benchmark can time a step without its
communication and call the difference the exposed communication time.
"""
from __future__ import annotations

import collections
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _Done:
    """A finished piece of work (what a local or synchronous operation returns)."""

    def wait(self):
        return True


class _Works:
    """Point-to-point operations in flight; wait() waits for all of them."""

    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()
        self.works = []
        return True


class Communicator:
    """all-gather, reduce-scatter and batched point-to-point on `group`.

    bytes_received[kind] counts what this rank receives (ring algorithms: (C-1)/C of the gathered
    buffer for all-gather and of the input for reduce-scatter; the receive buffers for p2p).
    `kind` is a label chosen by the caller, e.g. 'selection fwd'. With record=True every operation
    is also listed in `recorded` as (name, output shape, input shape, dtype, kind), so that a
    benchmark can replay the communication alone.
    """

    def __init__(self, group, record: bool = False):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.bytes_received = collections.Counter()
        self.record = record
        self.recorded = []

    def _count(self, kind: str, nbytes: float) -> None:
        self.bytes_received[kind] += int(nbytes)

    def _note(self, name: str, out_shape, in_shape, dtype, kind: str) -> None:
        if self.record:
            self.recorded.append((name, tuple(out_shape), tuple(in_shape), dtype, kind))

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, kind: str, async_op: bool = False):
        """out [C * N, ...] <- every rank's inp [N, ...], in rank order."""
        self._note("all_gather", out.shape, inp.shape, inp.dtype, kind)
        self._count(kind, out.numel() * out.element_size() * (self.size - 1) / self.size)
        if self.size == 1:
            out.copy_(inp)
            return _Done()
        work = _all_gather(out, inp, group=self.group, async_op=async_op)
        return work if async_op else _Done()

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, kind: str, async_op: bool = False):
        """out [N, ...] <- the sum over ranks of inp [C * N, ...] rows of this rank."""
        self._note("reduce_scatter", out.shape, inp.shape, inp.dtype, kind)
        self._count(kind, inp.numel() * inp.element_size() * (self.size - 1) / self.size)
        if self.size == 1:
            out.copy_(inp)
            return _Done()
        work = _reduce_scatter(out, inp, group=self.group, async_op=async_op)
        return work if async_op else _Done()

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
                   kind: str, async_op: bool = False):
        """out [sum(out_splits), ...] <- out_splits[p] rows from each rank p; inp rows go in_splits[p] to rank p."""
        self._note("all_to_all", (tuple(out.shape), tuple(out_splits)), (tuple(inp.shape), tuple(in_splits)),
                   inp.dtype, kind)
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        self._count(kind, (sum(out_splits) - out_splits[self.rank]) * row_bytes)
        if self.size == 1:
            out.copy_(inp)
            return _Done()
        work = dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=self.group,
                                      async_op=async_op)
        return work if async_op else _Done()

    def exchange(self, sends: Sequence[Tuple[torch.Tensor, int]], recvs: Sequence[Tuple[torch.Tensor, int]],
                 kind: str) -> None:
        """Send each (tensor, peer) and receive each (buffer, peer) in one batch; peers are group ranks."""
        self.start_exchange(sends, recvs, kind).wait()

    def start_exchange(self, sends: Sequence[Tuple[torch.Tensor, int]], recvs: Sequence[Tuple[torch.Tensor, int]],
                       kind: str):
        """exchange() without waiting: returns a handle whose wait() completes the batch. The sent
        tensors must stay unchanged and the buffers unread until then."""
        self._note("exchange", [(tuple(b.shape), p) for b, p in recvs], [(tuple(t.shape), p) for t, p in sends],
                   recvs[0][0].dtype if recvs else None, kind)
        self._count(kind, sum(buf.numel() * buf.element_size() for buf, _ in recvs))
        ops: List[dist.P2POp] = []
        for tensor, peer in sends:
            ops.append(dist.P2POp(dist.isend, tensor, dist.get_global_rank(self.group, peer), self.group))
        for buf, peer in recvs:
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(self.group, peer), self.group))
        return _Works(dist.batch_isend_irecv(ops) if ops else [])


class LocalCommunicator(Communicator):
    """Same shapes, no communication: every received buffer is filled from this rank's own data.

    Results are wrong on purpose; only for timing a step without its communication. Bytes are
    counted as if the operations had run.
    """

    def all_gather(self, out, inp, kind, async_op=False):
        self._count(kind, out.numel() * out.element_size() * (self.size - 1) / self.size)
        out.view(self.size, *inp.shape).copy_(inp.unsqueeze(0).expand(self.size, *inp.shape))
        return _Done()

    def reduce_scatter(self, out, inp, kind, async_op=False):
        self._count(kind, inp.numel() * inp.element_size() * (self.size - 1) / self.size)
        out.copy_(inp.view(self.size, *out.shape)[self.rank])
        return _Done()

    def all_to_all(self, out, inp, out_splits, in_splits, kind, async_op=False):
        """The rows this rank sends stand in for the rows it receives (zeros where it sends fewer)."""
        row_bytes = out[0].numel() * out.element_size() if out.shape[0] else 0
        self._count(kind, (sum(out_splits) - out_splits[self.rank]) * row_bytes)
        rows = min(out.shape[0], inp.shape[0])
        out[:rows].copy_(inp[:rows])
        out[rows:].zero_()
        return _Done()

    def start_exchange(self, sends, recvs, kind):
        """In the halo and ring patterns a rank receives as many buffers as it sends, pairwise of one size."""
        self._count(kind, sum(buf.numel() * buf.element_size() for buf, _ in recvs))
        for (buf, _), (tensor, _) in zip(recvs, sends):
            buf.copy_(tensor.view_as(buf))
        return _Done()
