"""The exchange mode as a config choice: NSATransformerConfig fields and the training recipe, with errors
that name the value and what is allowed."""
from __future__ import annotations

import pytest

from megatron_nsa.context_parallel.exchange import EXCHANGE_MODES, EXCHANGES, KVExchange, build_exchange

pytest.importorskip("megatron.core")


def _config(**kw):
    from megatron_nsa import NSATransformerConfig

    return NSATransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                nsa_compress_block_size=8, nsa_compress_stride=4, nsa_select_block_size=8,
                                nsa_select_count=3, nsa_window_size=8, use_cpu_initialization=True, **kw)


def test_transformer_config_takes_every_mode_and_rejects_others():
    for mode in EXCHANGE_MODES:
        extra = dict(nsa_cp_node_size=2) if mode == "hierarchical" else {}
        assert _config(nsa_cp_exchange=mode, context_parallel_size=4, **extra).nsa_cp_exchange == mode
    with pytest.raises(ValueError, match=r"nsa_cp_exchange='rings' is not allowed; choose one of .*'ring'"):
        _config(nsa_cp_exchange="rings")
    with pytest.raises(ValueError, match=r"nsa_cp_node_size=3 is not allowed .* context_parallel_size=4: .*"
                                         r"divisor of 4: \[1, 2, 4\]"):
        _config(nsa_cp_exchange="hierarchical", nsa_cp_node_size=3, context_parallel_size=4)


def test_recipe_checks_the_node_size():
    from megatron_nsa.training.config import Recipe, RecipeError, check_context_parallel_layout

    recipe = Recipe()
    recipe.model.attention = "nsa"
    recipe.parallel.context_parallel_size = 2
    recipe.data.seq_length = 4 * recipe.nsa.window_size
    recipe.parallel.cp_exchange = "hierarchical"
    recipe.parallel.cp_node_size = 2
    check_context_parallel_layout(recipe)
    recipe.parallel.cp_node_size = None
    with pytest.raises(RecipeError, match="parallel.cp_node_size=None is not allowed"):
        check_context_parallel_layout(recipe)


def test_build_exchange_names_the_node_size():
    class TwoRanks:  # build_exchange only reads the size before any communication
        size, rank = 2, 0

    assert build_exchange("ring", TwoRanks()).mode == "ring"
    assert build_exchange("hierarchical", TwoRanks(), 2).node_size == 2
    with pytest.raises(ValueError, match=r"node_size=4 is not allowed .* divisor of 2: \[1, 2\]"):
        build_exchange("hierarchical", TwoRanks(), 4)


def test_registry_builds_each_mode_and_names_unknown_ones():
    class FourRanks:  # the exchanges only read the size before any communication
        size, rank = 4, 0

    assert EXCHANGE_MODES == ("allgather", "ring", "hierarchical", "fetch")
    for mode, cls in EXCHANGES.items():
        exchange = build_exchange(mode, FourRanks(), 2)
        assert type(exchange) is cls and isinstance(exchange, KVExchange) and exchange.mode == mode
    with pytest.raises(ValueError, match=r"exchange='fetched' is not allowed; choose one of \('allgather', 'ring', "
                                         r"'hierarchical', 'fetch'\)"):
        build_exchange("fetched", FourRanks())
