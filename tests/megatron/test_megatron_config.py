"""NSATransformerConfig: NSA fields, head dims, defaults, and the errors it promises (naming the field)."""
from __future__ import annotations

import dataclasses

import pytest

from mcore_harness import tiny_config


def test_carries_every_nsa_field_with_nsa_defaults():
    from megatron_nsa import NSAConfig, NSATransformerConfig
    from megatron_nsa.config import NSA_FIELD_NAMES

    config = NSATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    defaults = NSAConfig()
    for name in NSA_FIELD_NAMES:
        assert getattr(config, name) == getattr(defaults, name), name
    assert config.nsa_config() == defaults
    assert config.qk_head_dim == config.v_head_dim == config.kv_channels == 16


def test_head_dims_may_differ_and_set_kv_channels():
    config = tiny_config(qk_head_dim=24, v_head_dim=8)
    assert (config.qk_head_dim, config.v_head_dim, config.kv_channels) == (24, 8, 8)
    assert dataclasses.replace(config.nsa_config(), window_size=16).window_size == 16


@pytest.mark.parametrize("overrides,message", [
    (dict(compress_stride=3), "compress_stride=3 must divide compress_block_size=8"),
    (dict(select_block_size=4), "compress_block_size=8 must be <= select_block_size=4"),
    (dict(window_size=0), "window_size=0 is not allowed"),
    (dict(select_count=2, select_init_blocks=1, select_local_blocks=2), "select_count=2"),
    (dict(compression="max"), "compression='max' is not allowed"),
    (dict(softmax_scale=-1.0), "softmax_scale=-1.0 is not allowed"),
    (dict(qk_head_dim=0), "qk_head_dim=0 is not allowed"),
    (dict(v_head_dim=8, kv_channels=16), "kv_channels=16 must equal v_head_dim=8"),
    (dict(nsa_backend="cuda"), "nsa_backend='cuda' is not allowed"),
    (dict(nsa_rotary_base=0.0), "nsa_rotary_base=0.0 is not allowed"),
    (dict(nsa_rotary_dim=7), "nsa_rotary_dim=7 is not allowed"),
    (dict(nsa_rotary_dim=14), "nsa_rotary_dim=14 is not allowed"),
    (dict(nsa_rotary_base=None, nsa_rotary_dim=8), "nsa_rotary_dim=8 needs nsa_rotary_base"),
    (dict(qk_head_dim=11), "qk_head_dim=11 is odd"),
    (dict(multi_latent_attention=True), "multi_latent_attention=True is not supported"),
    (dict(num_attention_heads=8, num_query_groups=2, tensor_model_parallel_size=4),
     "num_query_groups=2 is not divisible by the tensor-parallel size 4"),
])
def test_invalid_configs_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)


def test_settings_given_twice_are_rejected():
    from megatron_nsa import NSAConfig
    from megatron_nsa.transformer_config import nsa_layer_settings

    with pytest.raises(ValueError, match="given twice"):
        nsa_layer_settings(tiny_config(), nsa_config=NSAConfig())
    with pytest.raises(ValueError, match="nsa_backend='gpu' is not allowed"):
        from megatron.core.transformer.transformer_config import TransformerConfig

        nsa_layer_settings(TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4), nsa_backend="gpu")
