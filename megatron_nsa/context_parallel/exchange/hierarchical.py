"""'hierarchical' exchange: all-gather inside a node, ring across nodes.

The CP group is cut into nodes of m consecutive CP ranks (`node_size`; m = 1 is 'ring', m = C an
all-gather of everything). Each rank carries one piece (two chunks of selection K/V) round the
ring of nodes, rank r -> r+m, so that a rank sends (C/m - 1) pieces across nodes per pass instead
of the ring's C-1; at each step the m pieces its node carries are all-gathered inside the node
(point-to-point batches in the CP group: a layer call cannot create the per-node process groups,
since every rank of the world would have to take part) and attended to as in 'ring'. Backward
reduces each visiting piece's dK/dV inside the node onto the rank that carries it, which passes
the accumulator on with the piece. The schedule, overlap and merging are ring.py's; the
node's pieces make memory O(m * chunk).

Compressed tokens go round the plain ring (S/d tokens: small).
"""
from __future__ import annotations

from ..comm import Communicator
from .ring import NodeRingExchange


def check_node_size(node_size, cp_size: int, name: str = "node_size") -> None:
    """node_size must be a positive divisor of the CP size; the error names both and the allowed values."""
    allowed = [m for m in range(1, cp_size + 1) if cp_size % m == 0]
    if isinstance(node_size, bool) or not isinstance(node_size, int) or node_size not in allowed:
        raise ValueError(
            f"{name}={node_size!r} is not allowed for exchange='hierarchical' with context_parallel_size="
            f"{cp_size}: it must be the number of consecutive CP ranks per node, a divisor of {cp_size}: {allowed}"
        )


class HierarchicalExchange(NodeRingExchange):
    mode = "hierarchical"

    def __init__(self, comm: Communicator, node_size: int):
        check_node_size(node_size, comm.size)
        super().__init__(comm, node_size=node_size)
