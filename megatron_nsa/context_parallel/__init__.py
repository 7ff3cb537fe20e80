"""Context parallelism for NSA: the sequence sharded over a process group (docs/design.md, "Context parallelism")."""
from .attention import nsa_attention_cp
from .branches import Branches, resolve_branches, torch_branches
from .comm import Communicator, LocalCommunicator
from .exchange import EXCHANGE_MODES, EXCHANGES, KVExchange, build_exchange, make_exchange
from .layout import SEQUENCE_KEYS, LoadBalancedLayout, check_cp_sequence, shard_batch_for_rank

__all__ = [
    "nsa_attention_cp", "Branches", "resolve_branches", "torch_branches", "Communicator", "LocalCommunicator",
    "EXCHANGE_MODES", "EXCHANGES", "KVExchange", "build_exchange", "make_exchange", "SEQUENCE_KEYS",
    "LoadBalancedLayout", "check_cp_sequence", "shard_batch_for_rank",
]
