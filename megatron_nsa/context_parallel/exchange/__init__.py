"""How remote K/V reach a rank: one small interface, `KVExchange` (base.py), with one mode per module.

Every mode gathers the compressed K/V in global order (every rank needs all of them before top-n
scoring). Modes differ in how the selection branch gets its keys:

- 'allgather' (allgather.py): the selection K/V of the whole sequence, gathered asynchronously from
  the layer's entry, KV heads a group at a time; memory O(sequence) per head group.
- 'ring' (ring.py): K/V chunks travel a ring of point-to-point transfers while each rank attends to
  the visiting chunk, merging partial results by log-sum-exp; memory O(chunk).
- 'hierarchical' (hierarchical.py): all-gather inside a node, ring across nodes.
- 'fetch' (fetch.py): each rank fetches only the blocks its queries selected.

All modes compute the same result (docs/context_parallel.md compares their traffic and memory).
EXCHANGES maps each mode name to its class; build_exchange and make_exchange build one.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

from ..comm import Communicator
from .allgather import AllGatherExchange
from .base import KVExchange
from .fetch import FetchExchange
from .hierarchical import HierarchicalExchange, check_node_size
from .ring import RingExchange

EXCHANGES: Dict[str, Type[KVExchange]] = {
    "allgather": AllGatherExchange,
    "ring": RingExchange,
    "hierarchical": HierarchicalExchange,
    "fetch": FetchExchange,
}
EXCHANGE_MODES = tuple(EXCHANGES)


def check_exchange_mode(mode) -> None:
    """ValueError for a mode name build_exchange cannot build, naming it and the allowed ones."""
    if mode not in EXCHANGES:
        raise ValueError(f"exchange={mode!r} is not allowed; choose one of {EXCHANGE_MODES} or a KVExchange object")


def build_exchange(mode: str, comm: Communicator, node_size: Optional[int] = None) -> KVExchange:
    """The KVExchange of `mode` on a given Communicator (e.g. a LocalCommunicator for timing).

    node_size: CP ranks per node, for 'hierarchical' only (a divisor of the CP size); ignored otherwise.
    """
    check_exchange_mode(mode)
    if mode == "hierarchical":
        return HierarchicalExchange(comm, node_size)
    return EXCHANGES[mode](comm)


def make_exchange(mode, cp_group, node_size: Optional[int] = None) -> KVExchange:
    """A KVExchange for `mode` (one of EXCHANGE_MODES, or a KVExchange object, returned as is) on cp_group."""
    if isinstance(mode, KVExchange):
        return mode
    check_exchange_mode(mode)
    return build_exchange(mode, Communicator(cp_group), node_size)


__all__ = ["EXCHANGES", "EXCHANGE_MODES", "KVExchange", "AllGatherExchange", "RingExchange", "HierarchicalExchange",
           "FetchExchange", "check_exchange_mode", "check_node_size", "build_exchange", "make_exchange"]
