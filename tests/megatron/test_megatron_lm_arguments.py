"""megatron_nsa.megatron_lm.arguments: the --nsa-* flags generated from NSATransformerConfig, --nsa-config,
the position embedding, every refusal (naming flag, value and what is allowed), and the NSA model built from
the flags. Megatron-LM's training package is not needed: its parser is stood in for by a plain argparse
parser with the Megatron-LM flags these functions read, at Megatron-LM's defaults."""
from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest
import torch

from megatron_nsa import NSAConfig, NSATransformerConfig
from megatron_nsa.megatron_lm.arguments import (NSAArgumentError, add_nsa_arguments, flag_name, flags_in_message,
                                                nsa_block_spec_builder, nsa_flags, nsa_transformer_config,
                                                resolve_nsa_arguments)
from megatron_nsa.transformer_config import nsa_layer_field_names

from mcore_harness import MEGATRON_LM_ARGS, config_from_megatron_lm_args as config_from_args, megatron_lm_args

MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
             ffn_hidden_size=64, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
             add_bias_linear=False, init_method_std=0.05, position_embedding_type="rope", normalization="RMSNorm")


def parse(*flags: str, **megatron) -> argparse.Namespace:
    """Parsed `flags` (--nsa-* ones) on top of Megatron-LM's values (overridden by `megatron`)."""
    args = add_nsa_arguments(argparse.ArgumentParser()).parse_args(list(flags))
    for name, value in {**MEGATRON_LM_ARGS, **MODEL, **megatron}.items():
        setattr(args, name, value)
    return args


def resolved_config(*flags: str, **megatron) -> NSATransformerConfig:
    args = resolve_nsa_arguments(parse(*flags, **megatron), have_transformer_engine=False)
    return nsa_transformer_config(args, config_from_args)


def test_one_flag_per_nsa_field_but_the_value_head_dim():
    names = {flag.field for flag in nsa_flags()}
    assert names == set(nsa_layer_field_names()) - {"nsa_v_head_dim"}
    assert {"nsa_" + f.name for f in dataclasses.fields(NSAConfig)} <= names
    compression = next(flag for flag in nsa_flags() if flag.field == "nsa_compression")
    assert compression.flag == "--nsa-compression" and compression.choices == ("mean", "linear", "mlp")
    help_text = add_nsa_arguments(argparse.ArgumentParser()).format_help()
    for field in dataclasses.fields(NSAConfig):
        assert flag_name("nsa_" + field.name) in help_text
    assert "--no-nsa-separate-kv" in help_text


def test_flags_reach_the_layer_settings():
    config = resolved_config("--nsa-compress-block-size", "16", "--nsa-compress-stride", "8", "--nsa-select-block-size",
                             "32", "--nsa-select-count", "5", "--nsa-select-init-blocks", "0",
                             "--nsa-select-local-blocks", "1", "--nsa-window-size", "64", "--nsa-compression", "mlp",
                             "--nsa-compress-mlp-hidden", "24", "--nsa-separate-kv", "--nsa-softmax-scale", "0.125",
                             "--nsa-qk-head-dim", "12", "--nsa-backend", "torch", "--nsa-cp-exchange", "ring",
                             "--nsa-rotary-base", "500000", "--nsa-rotary-dim", "8",
                             position_embedding_type="none")
    assert config.nsa_config() == NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=32,
                                            select_count=5, select_init_blocks=0, select_local_blocks=1,
                                            window_size=64, compression="mlp", compress_mlp_hidden=24,
                                            separate_kv=True, softmax_scale=0.125)
    assert (config.nsa_qk_head_dim, config.nsa_v_head_dim, config.kv_channels) == (12, 8, 8)
    assert (config.nsa_backend, config.nsa_cp_exchange) == ("torch", "ring")
    assert (config.nsa_rotary_base, config.nsa_rotary_dim, config.apply_rope_fusion) == (500000.0, 8, False)


def test_the_dataloader_builds_no_attention_mask():
    # NSA never reads the mask; Megatron-LM's default would build an S x S one for every sample.
    args = megatron_lm_args()
    assert args.create_attention_mask_in_dataloader is False


def test_context_parallel_sequence_that_shards_is_accepted():
    config = resolved_config("--nsa-cp-exchange", "ring", context_parallel_size=2, seq_length=2048)
    assert config.context_parallel_size == 2 and config.nsa_cp_exchange == "ring"


def test_defaults_are_nsa_configs():
    config = resolved_config()
    assert config.nsa_config() == NSAConfig()
    assert config.nsa_backend is None and config.nsa_rotary_base is None and config.nsa_cp_exchange == "allgather"


def test_nsa_config_file_fills_what_the_flags_leave(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  num_layers: 24\nnsa:\n  select_count: 8\n  window_size: 128\n  compression: linear\n"
                    "  qk_head_dim: 12\n  v_head_dim: 8\n  backend: torch\n")
    config = resolved_config("--nsa-config", str(path), "--nsa-window-size", "256")
    assert (config.nsa_select_count, config.nsa_window_size, config.nsa_compression) == (8, 256, "linear")
    assert (config.nsa_qk_head_dim, config.nsa_v_head_dim, config.nsa_backend) == (12, 8, "torch")


@pytest.mark.parametrize("content,message", [
    ("nsa:\n  windw_size: 64\n", "'windw_size' is not an NSA setting; did you mean 'window_size'?"),
    ("nsa:\n  v_head_dim: 16\n", "v_head_dim: 16 but --kv-channels is 8; the value head dim of NSA layers is "
                                 "--kv-channels: pass --kv-channels 16"),
    ("- 1\n- 2\n", "expected a mapping of NSA settings"),
])
def test_nsa_config_file_errors(tmp_path, content, message):
    path = tmp_path / "nsa.yaml"
    path.write_text(content)
    with pytest.raises(NSAArgumentError) as error:
        resolved_config("--nsa-config", str(path))
    assert message in str(error.value) and str(path) in str(error.value)


def test_position_embedding_none_means_nsas_own_rope():
    config = resolved_config(position_embedding_type="none", rotary_base=500000, rotary_percent=0.5)
    assert (config.nsa_rotary_base, config.nsa_rotary_dim) == (500000.0, 4)
    with_rope = resolved_config(position_embedding_type="rope")
    assert with_rope.nsa_rotary_base is None
    learned = resolved_config(position_embedding_type="learned_absolute")
    assert learned.nsa_rotary_base is None


@pytest.mark.parametrize("flags,megatron,message", [
    ((), dict(spec=["megatron_nsa.spec", "nsa_layer_spec"]), "--spec megatron_nsa.spec nsa_layer_spec: this entry "
                                                            "point builds the NSA layer spec itself"),
    ((), dict(yaml_cfg="model.yaml"), "--yaml-cfg model.yaml"),
    ((), dict(attention_backend="local"), "--attention-backend local makes Megatron-LM replace the attention core"),
    ((), dict(num_experts=8), "--num-experts 8: the NSA layer spec has a dense MLP"),
    ((), dict(experimental_attention_variant="dsa"), "--experimental-attention-variant dsa is not supported"),
    ((), dict(mtp_num_layers=1), "--mtp-num-layers 1 is not supported"),
    ((), dict(multi_latent_attention=True), "--multi-latent-attention is not supported with NSA layers"),
    ((), dict(rotary_interleaved=True), "--rotary-interleaved is not supported with NSA layers"),
    ((), dict(transformer_impl="inference_optimized"), "--transformer-impl inference_optimized is not supported"),
    ((), dict(transformer_impl="transformer_engine"), "transformer-engine is not installed; allowed: "
                                                      "--transformer-impl local"),
    ((), dict(sft=True, context_parallel_size=2), "--sft with --context-parallel-size 2"),
    ((), dict(attention_dropout=0.1), "--attention-dropout 0.1 (Megatron-LM's default is 0.1): NSA layers have no"),
    ((), dict(reset_attention_mask=True), "--reset-attention-mask puts document boundaries into a dense"),
    ((), dict(position_embedding_type="yarn"), "--position-embedding-type yarn is not supported by NSA layers; "
                                               "allowed: ('rope', 'none', 'learned_absolute')"),
    (("--nsa-rotary-base", "10000"), dict(position_embedding_type="rope"), "--nsa-rotary-base 10000.0 with "
                                                                           "--position-embedding-type rope"),
])
def test_megatron_settings_nsa_cannot_honour_are_refused(flags, megatron, message):
    with pytest.raises(NSAArgumentError) as error:
        resolved_config(*flags, **megatron)
    assert message in str(error.value)


def test_distributed_optimizer_resume_without_fused_adam_is_refused(tmp_path):
    """Megatron-LM's distributed optimizer cannot load a checkpoint with PyTorch's Adam: stop before training
    when --load holds one; a first run (nothing to load) and the other optimizer go ahead."""
    args = dict(use_distributed_optimizer=True, load=str(tmp_path))
    resolve_nsa_arguments(parse(**args), have_transformer_engine=False, have_fused_adam=False)  # nothing saved yet
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("15")
    with pytest.raises(NSAArgumentError, match=r"--use-distributed-optimizer with --load .* without apex or "
                                               r"Transformer Engine"):
        resolve_nsa_arguments(parse(**args), have_transformer_engine=False, have_fused_adam=False)
    resolve_nsa_arguments(parse(**args), have_transformer_engine=False, have_fused_adam=True)
    resolve_nsa_arguments(parse(load=str(tmp_path)), have_transformer_engine=False, have_fused_adam=False)


@pytest.mark.parametrize("flags,megatron,message", [
    (("--nsa-compress-stride", "3"), {}, "--nsa-compress-stride=3 must divide --nsa-compress-block-size=32"),
    (("--nsa-select-count", "2"), {}, "--nsa-select-count=2 is smaller than the forced blocks"),
    (("--nsa-window-size", "0"), {}, "--nsa-window-size=0 is not allowed"),
    (("--nsa-rotary-dim", "7"), dict(position_embedding_type="none"), "--nsa-rotary-dim=7 is not allowed"),
    (("--nsa-cp-exchange", "hierarchical", "--nsa-cp-node-size", "3"), dict(context_parallel_size=4),
     "--nsa-cp-node-size"),
    ((), dict(context_parallel_size=2, seq_length=1000), "--seq-length 1000: sequence length 1000 cannot be sharded "
                                                          "over --context-parallel-size=2: it must be a multiple of "
                                                          "2 * 2 * select_block_size l'=64 = 256"),
    ((), dict(context_parallel_size=4, seq_length=2048), "gives chunks of 2048 / 8 = 256 tokens, shorter than "
                                                         "window_size w=512"),
    ((), dict(num_query_groups=2, num_attention_heads=4, tensor_model_parallel_size=4),
     "--num-query-groups=2 is not divisible by the tensor-parallel size 4"),
])
def test_bad_values_name_their_flag(flags, megatron, message):
    with pytest.raises(NSAArgumentError) as error:
        resolved_config(*flags, **megatron)
    assert message in str(error.value)


@pytest.mark.parametrize("flags,message", [
    (("--nsa-compression", "max"), "invalid choice: 'max'"),
    (("--nsa-select-count", "many"), "invalid int value: 'many'"),
    (("--nsa-backend", "cuda"), "invalid choice"),
    (("--nsa-windw-size", "64"), "unrecognized arguments: --nsa-windw-size"),
])
def test_the_parser_refuses_bad_flag_values(flags, message, capsys):
    with pytest.raises(SystemExit):
        add_nsa_arguments(argparse.ArgumentParser()).parse_args(list(flags))
    assert message in capsys.readouterr().err


def test_flags_in_message_only_rewrites_known_names():
    args = resolve_nsa_arguments(parse(), have_transformer_engine=False)
    assert flags_in_message("nsa_select_count=2 is smaller; allowed: nsa_select_count >= 3", args) == \
        "--nsa-select-count=2 is smaller; allowed: --nsa-select-count >= 3"
    assert flags_in_message("kv_channels=16 must equal nsa_v_head_dim=8", args) == \
        "--kv-channels=16 must equal --nsa-v-head-dim=8"
    assert flags_in_message("unknown_thing=3 and x==y", args) == "unknown_thing=3 and x==y"


def test_model_from_flags_is_the_nsa_model():
    """The decoder block the entry point hands GPTModel, built from flags: NSA attention with the flags'
    settings, per-head q/k norms with --qk-layernorm, NSA's own RoPE; its loss trains (finite gradients)."""
    from megatron.core.models.gpt import GPTModel

    from mcore_harness import VOCAB, init_single_process
    from megatron_nsa.attention import NSASelfAttention

    init_single_process()
    args = resolve_nsa_arguments(parse("--nsa-compress-block-size", "8", "--nsa-compress-stride", "4",
                                       "--nsa-select-block-size", "8", "--nsa-select-count", "3",
                                       "--nsa-window-size", "8", "--nsa-compression", "mlp", "--nsa-separate-kv",
                                       "--nsa-qk-head-dim", "12", "--nsa-backend", "torch",
                                       position_embedding_type="none", qk_layernorm=True),
                                 have_transformer_engine=False)
    config = nsa_transformer_config(args, config_from_args)
    block = nsa_block_spec_builder(args)(type("ModelConfig", (), {"transformer": config})(), vp_stage=None)
    torch.manual_seed(0)
    model = GPTModel(config, block, vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="none")
    attention = model.decoder.layers[0].self_attention
    assert isinstance(attention, NSASelfAttention) and attention.q_layernorm is not None
    assert attention.settings.nsa.compression == "mlp" and attention.settings.rotary_base == 10000.0
    assert (attention.settings.qk_head_dim, attention.settings.v_head_dim) == (12, 8)
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, torch.arange(40)[None].expand(2, -1), None, labels=tokens.roll(-1, dims=1)).mean()
    loss.backward()
    grads = [p.grad for p in attention.parameters()]
    assert torch.isfinite(loss) and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert attention.compressor is not None and any(g.abs().sum() > 0 for g in grads)


def test_flag_kinds_cover_every_field_type():
    hints = typing.get_type_hints(NSATransformerConfig)
    for flag in nsa_flags():
        assert flag.kind in (int, float, bool, str), (flag.field, hints[flag.field])


def test_the_user_guide_lists_every_nsa_flag_with_its_default():
    """docs/megatron.md's flag table names exactly the generated flags (plus --nsa-config), each with the
    default the parser uses, so the guide cannot drift from NSAConfig / NSATransformerConfig."""
    import pathlib
    import re

    guide = pathlib.Path(__file__).resolve().parents[2] / "docs" / "megatron.md"
    rows = {}
    for line in guide.read_text().splitlines():
        match = re.match(r"^\| `(--nsa-[a-z0-9-]+)", line)
        if match:
            rows[match.group(1)] = line.split(" | ")[2].strip()  # the default column
    flags = {f.flag: f for f in nsa_flags()}
    assert set(rows) - {"--nsa-config"} == set(flags)
    for name, flag in flags.items():
        if flag.default is None:
            expected = "none"
        elif isinstance(flag.default, bool):
            expected = "on" if flag.default else "off"
        else:
            expected = str(flag.default)
        assert rows[name] == expected, (name, rows[name], flag.default)
