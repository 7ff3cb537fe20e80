"""NSATransformerConfig: the nsa_ fields derived from NSAConfig, head dims, defaults, the layer's backend
bound at build time, and the errors it promises (naming the field)."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from mcore_harness import tiny_config


def test_carries_every_nsa_config_field_with_prefix_default_type_and_help():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nsa import NSAConfig, NSATransformerConfig

    config = NSATransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)
    defaults = NSAConfig()
    megatron_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    ours = {f.name: f for f in dataclasses.fields(NSATransformerConfig)}
    nsa_hints, our_hints = typing.get_type_hints(NSAConfig), typing.get_type_hints(NSATransformerConfig)
    for field in dataclasses.fields(NSAConfig):
        name = "nsa_" + field.name
        assert name in ours and name not in megatron_fields, name
        assert getattr(config, name) == getattr(defaults, field.name), name
        assert our_hints[name] == nsa_hints[field.name], name
        assert ours[name].metadata == field.metadata, name
    assert config.nsa_config() == defaults
    assert config.nsa_qk_head_dim == config.nsa_v_head_dim == config.kv_channels == 16


def test_no_nsa_field_shadows_a_megatron_field():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nsa.transformer_config import nsa_layer_field_names

    names = nsa_layer_field_names()
    assert names and all(name.startswith("nsa_") for name in names)
    assert not set(names) & {f.name for f in dataclasses.fields(TransformerConfig)}


def test_cp_exchange_choices_are_the_registered_exchanges():
    from megatron_nsa.context_parallel import EXCHANGE_MODES
    from megatron_nsa.transformer_config import CPExchange

    assert set(typing.get_args(CPExchange)) == set(EXCHANGE_MODES)


def test_nsa_transformer_fields_round_trip():
    from megatron_nsa import NSAConfig
    from megatron_nsa.transformer_config import nsa_transformer_fields

    nsa = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=4, window_size=32,
                    compression="mlp", separate_kv=True, softmax_scale=0.25)
    config = tiny_config(**nsa_transformer_fields(nsa))
    assert config.nsa_config() == nsa


def test_head_dims_may_differ_and_set_kv_channels():
    config = tiny_config(nsa_qk_head_dim=24, nsa_v_head_dim=8)
    assert (config.nsa_qk_head_dim, config.nsa_v_head_dim, config.kv_channels) == (24, 8, 8)
    assert dataclasses.replace(config.nsa_config(), window_size=16).window_size == 16


@pytest.mark.parametrize("overrides,message", [
    (dict(nsa_compress_stride=3), "nsa_compress_stride=3 must divide nsa_compress_block_size=8"),
    (dict(nsa_select_block_size=4), "nsa_compress_block_size=8 must be <= nsa_select_block_size=4"),
    (dict(nsa_window_size=0), "nsa_window_size=0 is not allowed"),
    (dict(nsa_select_count=2, nsa_select_init_blocks=1, nsa_select_local_blocks=2), "nsa_select_count=2"),
    (dict(nsa_compression="max"), "nsa_compression='max' is not allowed"),
    (dict(nsa_softmax_scale=-1.0), "nsa_softmax_scale=-1.0 is not allowed"),
    (dict(nsa_qk_head_dim=0), "nsa_qk_head_dim=0 is not allowed"),
    (dict(nsa_v_head_dim=8, kv_channels=16), "kv_channels=16 must equal nsa_v_head_dim=8"),
    (dict(nsa_backend="cuda"), "nsa_backend='cuda' is not allowed"),
    (dict(nsa_rotary_base=0.0), "nsa_rotary_base=0.0 is not allowed"),
    (dict(nsa_rotary_dim=7), "nsa_rotary_dim=7 is not allowed"),
    (dict(nsa_rotary_dim=14), "nsa_rotary_dim=14 is not allowed"),
    (dict(nsa_rotary_base=None, nsa_rotary_dim=8), "nsa_rotary_dim=8 needs nsa_rotary_base"),
    (dict(nsa_qk_head_dim=11), "nsa_qk_head_dim=11 is odd"),
    (dict(window_size=(8, 0)), "window_size=(8, 0) is Megatron's dense-attention setting"),
    (dict(softmax_scale=0.5), "softmax_scale=0.5 is Megatron's dense-attention setting"),
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


@pytest.mark.parametrize("requested", [None, "torch"])
def test_layer_binds_its_backend_when_built(requested):
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from mcore_harness import init_single_process
    from megatron_nsa.spec import get_gpt_layer_nsa_spec

    init_single_process()
    layer = build_module(get_gpt_layer_nsa_spec(use_transformer_engine=False),
                         config=tiny_config(nsa_backend=requested), layer_number=1)
    expected = requested or ("triton" if torch.cuda.is_available() else "torch")
    assert layer.self_attention.settings.backend == expected
