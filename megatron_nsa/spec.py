"""Layer specs: a Megatron-Core GPT TransformerLayer whose self-attention is NSA.

    from megatron_nsa import get_gpt_layer_nsa_spec
    GPTModel(config, transformer_layer_spec=get_gpt_layer_nsa_spec(), ...)

Megatron-LM: `python -m megatron_nsa.megatron_lm.pretrain_gpt` builds the spec from its `--nsa-*`
flags (docs/megatron.md). `--spec megatron_nsa.spec nsa_layer_spec` (Transformer Engine linears when
transformer-engine is installed, local ones otherwise) or `nsa_layer_local_spec` with Megatron-LM's own
pretrain_gpt.py gives NSAConfig's defaults only.

Sequence parallelism without apex or Transformer Engine: Megatron's plain-PyTorch norm refuses it,
so the local layers here use `SequenceParallelTorchNorm`; pass the GPTModel the block spec of
`get_gpt_decoder_block_nsa_spec(config)` so that the final norm is one too.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import LayerNormImpl as MegatronBlockNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from .attention import NSACoreAttention, NSASelfAttention, NSASelfAttentionSubmodules
from .compat import HAVE_TE, megatron_gpt_layer_spec
from .config import NSAConfig


def get_gpt_layer_nsa_spec(nsa_config: Optional[NSAConfig] = None, nsa_backend: Optional[str] = None,
                           use_transformer_engine: Optional[bool] = None, normalization: Optional[str] = None,
                           core_attention=NSACoreAttention, qk_layernorm: bool = False) -> ModuleSpec:
    """ModuleSpec of a whole TransformerLayer with NSA self-attention.

    nsa_config / nsa_backend: NSA settings for a plain TransformerConfig; leave None with an
        NSATransformerConfig (it carries them).
    use_transformer_engine: TE linears (None: when transformer-engine is installed).
    normalization: 'LayerNorm' | 'RMSNorm' for local layers (TE layers follow config.normalization).
    core_attention: the module computing attention from per-head q, k, v, gates (default: NSA).
    qk_layernorm: normalize each head's queries and keys (config.normalization, PyTorch's norm, before
        RoPE), as Megatron's qk_layernorm: attention logits then no longer grow with the hidden states.
    The layer's input layernorm, MLP and residuals are Megatron-Core's own GPT layer's.
    """
    use_te = HAVE_TE if use_transformer_engine is None else use_transformer_engine
    base = megatron_gpt_layer_spec(use_te, normalization)
    dense_attention = base.submodules.self_attention.submodules
    params = {"attn_mask_type": AttnMaskType.causal}
    if nsa_config is not None:
        params["nsa_config"] = nsa_config
    if nsa_backend is not None:
        params["nsa_backend"] = nsa_backend
    nsa_attention = ModuleSpec(
        module=NSASelfAttention,
        params=params,
        submodules=NSASelfAttentionSubmodules(
            linear_qkv=dense_attention.linear_qkv,
            core_attention=core_attention,
            linear_proj=dense_attention.linear_proj,
            q_layernorm=HeadNorm if qk_layernorm else None,
            k_layernorm=HeadNorm if qk_layernorm else None,
        ),
    )
    layer = dataclasses.replace(base.submodules, self_attention=nsa_attention)
    for norm in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer, norm) is WrappedTorchNorm:
            layer = dataclasses.replace(layer, **{norm: SequenceParallelTorchNorm})
    return dataclasses.replace(base, submodules=layer)


def get_gpt_decoder_block_nsa_spec(config, vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                                   **layer_spec_kwargs) -> TransformerBlockSubmodules:
    """The decoder block of this pipeline stage: NSA layers (get_gpt_layer_nsa_spec(**layer_spec_kwargs))
    and a final norm of the same kind as the layers' (sequence-parallel capable)."""
    layer = get_gpt_layer_nsa_spec(**layer_spec_kwargs)
    uses_torch_norm = layer.submodules.pre_mlp_layernorm is SequenceParallelTorchNorm
    final_norm = SequenceParallelTorchNorm if uses_torch_norm else MegatronBlockNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage, pp_rank),
                                      layer_norm=final_norm)


class SequenceParallelTorchNorm:
    """PyTorch LayerNorm / RMSNorm (config.normalization) usable with sequence parallelism.

    Megatron's WrappedTorchNorm, plus what apex's and TE's norms do for sequence parallelism:
    mark the parameters `sequence_parallel`, so that finalize_model_grads sums their gradients
    over the tensor-parallel group (each rank normalizes only its part of the sequence).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused_norm_options):
        norm = torch_norm(config, hidden_size, eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


class HeadNorm:
    """PyTorch LayerNorm / RMSNorm (config.normalization) over one head's dims, for NSA's q/k norms. Its
    parameters are not marked `sequence_parallel`: NSASelfAttention sums their gradients over the
    tensor-parallel group itself (each rank normalizes only its own heads)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        return torch_norm(config, hidden_size, eps)


def torch_norm(config, hidden_size: int, eps: float) -> torch.nn.Module:
    """PyTorch's LayerNorm or RMSNorm, as config.normalization asks."""
    norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
    if config.normalization not in norms:
        raise ValueError(f"normalization={config.normalization!r} is not allowed; choose one of {tuple(norms)}")
    if config.layernorm_zero_centered_gamma:
        raise ValueError("layernorm_zero_centered_gamma=True is not supported by the PyTorch norm; allowed: False")
    return norms[config.normalization](hidden_size, eps=eps)


nsa_layer_spec = get_gpt_layer_nsa_spec()
nsa_layer_local_spec = get_gpt_layer_nsa_spec(use_transformer_engine=False)
