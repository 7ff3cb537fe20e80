"""The GPT of a recipe: a Megatron-Core GPTModel with NSA layers, or its dense twin.

Both variants share everything but the attention core: the same local (non-TE) linear layers and
norms, so that NSA-vs-dense timings compare attention alone. The dense core is torch SDPA
(flash / memory-efficient kernels on GPU), not Megatron's DotProductAttention, which materialises
the [s, s] scores and allocates on CUDA.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from .config import Recipe, RecipeError, rotary_dims, rotated_head_dim
from .dense_attention import SDPACoreAttention


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron pads the vocabulary so that each tensor-parallel shard of the embedding is a round size."""
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def ffn_hidden_size(recipe: Recipe) -> int:
    model = recipe.model
    if model.ffn_hidden_size is not None:
        return model.ffn_hidden_size
    if not model.swiglu:
        return 4 * model.hidden_size
    multiple = 64 * recipe.parallel.tensor_model_parallel_size
    return int(math.ceil(8 * model.hidden_size / 3 / multiple) * multiple)


def transformer_config_kwargs(recipe: Recipe, on_cuda: bool, bf16: bool) -> dict:
    """TransformerConfig fields shared by the NSA and the dense model."""
    model, par = recipe.model, recipe.parallel
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=model.kv_channels,
        ffn_hidden_size=ffn_hidden_size(recipe),
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=False,
        normalization=model.normalization,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
        sequence_parallel=par.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_cuda,
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        qk_layernorm=model.qk_layernorm,
    )
    if model.recompute == "full":
        kwargs.update(recompute_granularity="full", recompute_method="uniform",
                      recompute_num_layers=model.recompute_num_layers)
    elif model.recompute == "selective":
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return kwargs


def dense_layer_spec(recipe: Recipe) -> ModuleSpec:
    """Megatron's local GPT layer with the SDPA core attention."""
    spec = get_gpt_layer_local_spec(normalization=recipe.model.normalization, qk_layernorm=recipe.model.qk_layernorm)
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention)
    )
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))


def nsa_rotary_dim(recipe: Recipe) -> int:
    """The q/k dims NSA's own RoPE rotates: model.rotary_percent of NSA's q/k head dim."""
    return rotary_dims(recipe.model.rotary_percent, *rotated_head_dim(recipe))


def nsa_config_and_spec(recipe: Recipe, common: dict):
    """NSATransformerConfig + NSA layer spec. RoPE, when asked for, is NSA's own (megatron_nsa.rope: Megatron's
    convention, computed without CUDA), so GPTModel then gets position_embedding_type='none'."""
    try:
        from megatron_nsa.spec import get_gpt_layer_nsa_spec
        from megatron_nsa.transformer_config import NSATransformerConfig
    except ImportError as err:
        raise RecipeError(
            f"model.attention=nsa needs megatron_nsa.spec and megatron_nsa.transformer_config ({err}); "
            "use model.attention=dense meanwhile"
        ) from None
    nsa = recipe.nsa
    rope = recipe.model.position_embedding_type == "rope"
    try:
        config = NSATransformerConfig(
            **common,
            nsa_compress_block_size=nsa.compress_block_size,
            nsa_compress_stride=nsa.compress_stride,
            nsa_select_block_size=nsa.select_block_size,
            nsa_select_count=nsa.select_count,
            nsa_select_init_blocks=nsa.select_init_blocks,
            nsa_select_local_blocks=nsa.select_local_blocks,
            nsa_window_size=nsa.window_size,
            nsa_compression=nsa.compression,
            nsa_compress_mlp_hidden=nsa.compress_mlp_hidden,
            nsa_separate_kv=nsa.separate_kv,
            nsa_softmax_scale=nsa.softmax_scale,
            nsa_qk_head_dim=nsa.qk_head_dim,
            nsa_v_head_dim=nsa.v_head_dim,
            nsa_backend=nsa.backend,
            nsa_block_score_loss_coeff=nsa.block_score_loss_coeff,
            nsa_block_score_loss_queries=nsa.block_score_loss_queries,
            nsa_cp_exchange=recipe.parallel.cp_exchange,
            nsa_cp_node_size=recipe.parallel.cp_node_size,
            nsa_rotary_base=recipe.model.rotary_base if rope else None,
            nsa_rotary_dim=nsa_rotary_dim(recipe) if rope else None,
        )
    except ValueError as err:
        raise RecipeError(f"the NSA model cannot be built from this recipe: {err}") from None
    spec = get_gpt_layer_nsa_spec(use_transformer_engine=False, normalization=recipe.model.normalization,
                                  qk_layernorm=recipe.model.qk_layernorm)
    return config, spec


def build_config_and_spec(recipe: Recipe, on_cuda: bool, bf16: bool):
    common = transformer_config_kwargs(recipe, on_cuda, bf16)
    if recipe.model.attention == "nsa":
        return nsa_config_and_spec(recipe, common)
    return TransformerConfig(**common), dense_layer_spec(recipe)


def gpt_position_embedding(recipe: Recipe) -> str:
    """What GPTModel itself applies: NSA layers rotate q/k themselves when the recipe asks for RoPE."""
    if recipe.model.attention == "nsa" and recipe.model.position_embedding_type == "rope":
        return "none"
    return recipe.model.position_embedding_type


def build_model(recipe: Recipe, vocab_size: int, on_cuda: bool, bf16: bool) -> GPTModel:
    """This pipeline stage's GPTModel (on the current CUDA device, or on CPU)."""
    config, spec = build_config_and_spec(recipe, on_cuda, bf16)
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=padded_vocab_size(vocab_size, recipe.model.make_vocab_size_divisible_by,
                                     recipe.parallel.tensor_model_parallel_size),
        max_sequence_length=recipe.model.max_position_embeddings or recipe.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not recipe.model.untie_embeddings_and_output_weights,
        position_embedding_type=gpt_position_embedding(recipe),
        rotary_base=recipe.model.rotary_base,
        rotary_percent=recipe.model.rotary_percent,
    )
    for param in model.parameters():
        tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
    if on_cuda:
        model.cuda(torch.cuda.current_device())
    return model

