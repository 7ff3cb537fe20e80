"""NSAConfig: the paper's defaults and every validation error (field, value and what is allowed)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_nsa import KVCompressor, NSAConfig
from megatron_nsa.config import nsa_config_from


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
