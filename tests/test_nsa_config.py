"""NSAConfig: the paper's defaults, every validation error (field, value and what is allowed), frozen
instances, suggestions for misspelled settings, choices and help read from the one declaration."""
from __future__ import annotations

import dataclasses
import math
import re
import typing

import pytest
import torch

from megatron_nsa import KVCompressor, NSAConfig
from megatron_nsa.config import (
    COMPRESSION_KINDS, NSA_FIELD_NAMES, Compression, literal_choices, nsa_config_from, setting_choices,
)


def test_defaults_are_the_papers():
    """docs/semantics.md, table "Shapes and names": l=32, d=16, l'=64, n=16, 1 initial and 2 local blocks, w=512."""
    config = NSAConfig()
    assert (config.compress_block_size, config.compress_stride, config.select_block_size) == (32, 16, 64)
    assert (config.select_count, config.select_init_blocks, config.select_local_blocks) == (16, 1, 2)
    assert config.window_size == 512
    assert config.compression in ("mean", "linear", "mlp")
    assert config.softmax_scale is None


def test_softmax_scale_defaults_to_inverse_sqrt_head_dim():
    assert NSAConfig().scale_for(192) == 1.0 / math.sqrt(192)
    assert NSAConfig(softmax_scale=0.25).scale_for(192) == 0.25


def test_nsa_config_from_copies_every_field():
    class Carrier:
        pass

    carrier = Carrier()
    source = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=5,
                       select_init_blocks=2, select_local_blocks=3, window_size=7, compression="mlp",
                       compress_mlp_hidden=9, separate_kv=True, softmax_scale=0.5)
    for field in dataclasses.fields(NSAConfig):
        setattr(carrier, field.name, getattr(source, field.name))
    assert nsa_config_from(carrier) == source


def test_nsa_config_from_validates():
    class Carrier:
        pass

    carrier = Carrier()
    for field in dataclasses.fields(NSAConfig):
        setattr(carrier, field.name, getattr(NSAConfig(), field.name))
    carrier.compress_stride = 5
    with pytest.raises(ValueError, match="compress_stride=5 must divide compress_block_size=32"):
        nsa_config_from(carrier)


POSITIVE_FIELDS = ["compress_block_size", "compress_stride", "select_block_size", "select_count", "window_size"]
NON_NEGATIVE_FIELDS = ["select_init_blocks", "select_local_blocks"]

BAD_FIELDS = (
    [(f"{name}={value!r}", {name: value}, rf"{name}={value!r} is not allowed: it must be an integer >= 1")
     for name in POSITIVE_FIELDS for value in (0, -4, 2.0, True, "8", None)]
    + [(f"{name}={value!r}", {name: value}, rf"{name}={value!r} is not allowed: it must be an integer >= 0")
       for name in NON_NEGATIVE_FIELDS for value in (-1, 1.0, False, None)]
    + [
        ("stride_not_dividing_l", dict(compress_block_size=32, compress_stride=12, select_block_size=48),
         "compress_stride=12 must divide compress_block_size=32"),
        ("stride_not_dividing_lp", dict(compress_block_size=32, compress_stride=16, select_block_size=72),
         "compress_stride=16 must divide select_block_size=72"),
        ("l_above_lp", dict(compress_block_size=64, compress_stride=16, select_block_size=32),
         "compress_block_size=64 must be <= select_block_size=32"),
        ("n_below_forced", dict(select_count=2, select_init_blocks=1, select_local_blocks=2),
         r"select_count=2 is smaller than the forced blocks select_init_blocks \+ select_local_blocks = 3; "
         r"allowed: select_count >= 3"),
        ("n_below_forced_init", dict(select_count=4, select_init_blocks=5, select_local_blocks=0),
         "select_count=4 is smaller than the forced blocks"),
        ("compression_unknown", dict(compression="max"),
         r"compression='max' is not allowed; choose one of \('mean', 'linear', 'mlp'\)"),
        ("compression_case", dict(compression="Mean"), "compression='Mean' is not allowed"),
        ("mlp_hidden_zero", dict(compress_mlp_hidden=0), "compress_mlp_hidden=0 is not allowed: it must be an integer >= 1"),
        ("mlp_hidden_float", dict(compress_mlp_hidden=8.0), "compress_mlp_hidden=8.0 is not allowed"),
        ("separate_kv_int", dict(separate_kv=1), "separate_kv=1 is not allowed: it must be True or False"),
        ("separate_kv_str", dict(separate_kv="yes"), "separate_kv='yes' is not allowed"),
    ]
    + [(f"softmax_scale={value!r}", dict(softmax_scale=value),
        rf"softmax_scale={value!r} is not allowed: it must be None or a finite number > 0")
       for value in (0.0, -0.1, float("inf"), float("nan"), True, "0.1")]
)


@pytest.mark.parametrize("fields,message", [c[1:] for c in BAD_FIELDS], ids=[c[0] for c in BAD_FIELDS])
def test_invalid_field_raises_naming_field_value_and_allowed(fields, message):
    with pytest.raises(ValueError, match=message):
        NSAConfig(**fields)


@pytest.mark.parametrize("fields", [
    dict(compress_block_size=1, compress_stride=1, select_block_size=1, select_count=3, window_size=1),
    dict(compress_block_size=4, compress_stride=2, select_block_size=4, select_count=1, select_init_blocks=0,
         select_local_blocks=1),
    dict(select_count=3, select_init_blocks=0, select_local_blocks=0),
    dict(compression="linear", softmax_scale=2),
    dict(compression="mlp", compress_mlp_hidden=1, separate_kv=True),
])
def test_boundary_values_are_accepted(fields):
    config = NSAConfig(**fields)
    assert all(getattr(config, name) == value for name, value in fields.items())


def test_compressor_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"compression='avg' is not allowed; choose one of \('mean', 'linear', 'mlp'\)"):
        KVCompressor("avg", 4, 8, 8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_compressor_shapes_with_dk_ne_dv(kind):
    config = NSAConfig(compress_block_size=4, compress_stride=2, select_block_size=8, select_count=4,
                       compression=kind, compress_mlp_hidden=6)
    compressor = KVCompressor.from_config(config, head_dim_k=6, head_dim_v=4)
    gen = torch.Generator().manual_seed(0)
    windows_k, windows_v = torch.randn(5, 4, 3, 6, generator=gen), torch.randn(5, 4, 3, 4, generator=gen)
    assert compressor.compress_k(windows_k).shape == (5, 3, 6)
    assert compressor.compress_v(windows_v).shape == (5, 3, 4)


def test_linear_compressor_starts_near_mean_pooling():
    """The initial linear phi is close to average pooling (training starts from the parameter-free phi)."""
    torch.manual_seed(0)
    compressor = KVCompressor("linear", 8, 16, 16)
    windows = torch.randn(50, 8, 2, 16)
    mean = windows.mean(dim=1)
    error = (compressor.compress_k(windows) - mean).norm() / mean.norm()
    assert error < 0.5


def test_frozen_a_changed_setting_is_never_used_unchecked():
    config = NSAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.window_size = -5
    assert config.window_size == 512


def test_replace_makes_a_new_checked_config():
    config = NSAConfig()
    smaller = dataclasses.replace(config, window_size=64)
    assert smaller.window_size == 64 and config.window_size == 512
    with pytest.raises(ValueError, match="window_size=-5 is not allowed: it must be an integer >= 1"):
        dataclasses.replace(config, window_size=-5)
    with pytest.raises(ValueError, match="compress_stride=5 must divide compress_block_size=32"):
        dataclasses.replace(config, compress_stride=5)


@pytest.mark.parametrize("key,suggested", [("windw_size", "window_size"), ("select_cout", "select_count"),
                                           ("compresion", "compression")])
def test_misspelled_keyword_names_the_closest_setting(key, suggested):
    with pytest.raises(TypeError, match=f"unknown NSA setting '{key}'; did you mean '{suggested}'\\?"):
        NSAConfig(**{key: 64})


def test_unrelated_keyword_gets_no_suggestion():
    with pytest.raises(TypeError, match=r"unknown NSA setting 'temperature'$"):
        NSAConfig(temperature=1.0)


def test_from_mapping_reads_prefixed_keys_and_refuses_unknown_ones():
    config = NSAConfig.from_mapping({"nsa.window_size": 64, "nsa.compression": "linear"}, key_prefix="nsa.")
    assert config == NSAConfig(window_size=64, compression="linear")
    assert NSAConfig.from_mapping({}) == NSAConfig()
    with pytest.raises(ValueError, match=r"unknown NSA setting 'nsa.windw_size'; did you mean 'nsa.window_size'\?"):
        NSAConfig.from_mapping({"nsa.windw_size": 64}, key_prefix="nsa.")
    with pytest.raises(ValueError, match="unknown NSA setting 'window_size'"):  # the prefix is required
        NSAConfig.from_mapping({"window_size": 64}, key_prefix="nsa_")
    with pytest.raises(ValueError, match="select_count=2 is smaller than the forced blocks"):
        NSAConfig.from_mapping({"select_count": 2})


def test_nsa_config_from_reads_prefixed_attributes_and_names_them_in_errors():
    class Carrier:
        pass

    carrier = Carrier()
    for name in NSA_FIELD_NAMES:
        setattr(carrier, "nsa_" + name, getattr(NSAConfig(window_size=8), name))
    assert nsa_config_from(carrier, key_prefix="nsa_") == NSAConfig(window_size=8)
    from megatron_nsa.config import validate_nsa_fields

    carrier.nsa_compress_stride = 5
    with pytest.raises(ValueError, match="nsa_compress_stride=5 must divide nsa_compress_block_size=32"):
        validate_nsa_fields(carrier, key_prefix="nsa_")


def test_choices_come_from_the_literal_type():
    assert COMPRESSION_KINDS == setting_choices("compression") == typing.get_args(Compression)
    assert setting_choices("window_size") is None
    assert literal_choices(typing.Optional[typing.Literal["a", "b"]]) == (None, "a", "b")
    with pytest.raises(ValueError, match=rf"choose one of {re.escape(repr(typing.get_args(Compression)))}"):
        NSAConfig(compression="max")


def test_every_setting_carries_a_one_line_help():
    for field in dataclasses.fields(NSAConfig):
        text = field.metadata.get("help")
        assert text and "\n" not in text, field.name
