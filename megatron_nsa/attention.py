"""`NSASelfAttention`: Native Sparse Attention as a Megatron-Core self-attention layer.

The layer owns its projections, because NSA's gates need the layer input, which Megatron's core
attention never sees:

- one fused column-parallel `linear_qkv`, laid out per KV group (so that tensor parallelism
  splits whole groups): [G*d_k queries | n_b*d_k keys | n_b*d_v values | G*3 gate logits],
  n_b = 3 with separate K/V per branch (cmp, slc, win), else 1; G = query heads per KV head;
- the compression phi (`KVCompressor`, shared across heads, replicated on TP ranks: its gradients
  are summed over the TP group by a hook, since every rank only sees its own heads' share);
- optional per-head norms of queries and keys (`q_layernorm`, `k_layernorm`, Megatron's qk_layernorm:
  one norm over each head's d_k dims, shared by all heads and, with separate K/V, by the three key
  branches; replicated on TP ranks with the same gradient hook), applied before RoPE;
- the NSA core (`core_attention`, an `NSACoreAttention`) and the row-parallel `linear_proj`.

RoPE: queries and the selection / window keys are rotated at their positions; compressed keys
are compressed un-rotated and then rotated at their block's last token. With packed documents
(THD), positions restart at 0 in every document. Input and output are Megatron's [s, b, h].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import torch
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import Attention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.utils import get_pg_rank, get_pg_size

from .block_score_loss import attach_loss, block_score_loss
from .compat import module_name_kwargs
from .compression import KVCompressor
from .config import NSAConfig
from .functional import default_backend, nsa_attention
from .rope import Rotary
from .transformer_config import check_megatron_fields, nsa_layer_settings


@dataclasses.dataclass
class NSASelfAttentionSubmodules:
    linear_qkv: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    q_layernorm: Union[ModuleSpec, type, None] = None  # None: no query norm
    k_layernorm: Union[ModuleSpec, type, None] = None  # None: no key norm


class NSACoreAttention(MegatronModule):
    """The NSA core, without parameters: `nsa_attention` on per-head tensors, or, with context
    parallelism, `megatron_nsa.context_parallel.nsa_attention_cp` on this rank's share.

    Takes the keywords Megatron's Attention passes to a core attention; only pg_collection matters.
    """

    def __init__(self, config, layer_number=None, attn_mask_type=None, attention_type=None, cp_comm_type=None,
                 softmax_scale=None, pg_collection=None, **builder_kwargs):
        super().__init__(config=config)
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()

    def forward(self, q, k, v, gates, config: NSAConfig, cu_seqlens=None, compressor=None, backend=None,
                compressed_rope=None):
        """Same arguments as megatron_nsa.nsa_attention; [b, t, H, D] tensors (t: this rank's tokens)."""
        if get_pg_size(self.cp_group) == 1:
            return nsa_attention(q, k, v, gates, config, cu_seqlens=cu_seqlens, compressor=compressor,
                                 backend=backend, compressed_rope=compressed_rope)
        # ---- Context-parallel call site (megatron_nsa.context_parallel) ----------------------------
        from .context_parallel import nsa_attention_cp

        return nsa_attention_cp(q, k, v, gates, config, self.cp_group, compressor=compressor, backend=backend,
                                compressed_rope=compressed_rope, cu_seqlens=cu_seqlens,
                                exchange=getattr(self.config, "nsa_cp_exchange", "allgather"),
                                node_size=getattr(self.config, "nsa_cp_node_size", None))


class NSASelfAttention(Attention):
    """Self-attention with Native Sparse Attention (causal by construction).

    NSA settings come from an NSATransformerConfig, or, with a plain TransformerConfig, from the
    spec's params `nsa_config` (an NSAConfig) and `nsa_backend`. Selective recompute of the core:
    config.recompute_granularity='selective' with 'core_attn' in config.recompute_modules.
    """

    def __init__(self, config, submodules: NSASelfAttentionSubmodules, layer_number: int,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, cp_comm_type: Optional[str] = None,
                 pg_collection=None, nsa_config: Optional[NSAConfig] = None, nsa_backend: Optional[str] = None,
                 **attention_kwargs):
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={attn_mask_type} is not supported: NSA is causal (AttnMaskType.causal)")
        settings = nsa_layer_settings(config, nsa_config, nsa_backend)
        tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        check_megatron_fields(config, get_pg_size(tp_group))
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, attention_type="self", cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection, **attention_kwargs)
        self.settings = dataclasses.replace(settings, backend=bound_backend(settings.backend))
        self.core_config = dataclasses.replace(settings.nsa, separate_kv=True)  # k / v always reach the core as triples
        self.key_hidden_size, self.val_hidden_size = settings.qk_head_dim, settings.v_head_dim
        self.heads_per_group = config.num_attention_heads // config.num_query_groups
        self.kv_branches = 3 if settings.nsa.separate_kv else 1
        group = self.heads_per_group
        self.group_split = [group * settings.qk_head_dim, self.kv_branches * settings.qk_head_dim,
                            self.kv_branches * settings.v_head_dim, group * 3]
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, config.num_query_groups * sum(self.group_split),
            config=config, init_method=config.init_method, gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias, skip_bias_add=False, is_expert=False,
            tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp,
            **module_name_kwargs(attention_kwargs.get("name"), "linear_qkv"),
        )
        self.compressor = None
        if settings.nsa.compression != "mean":
            self.compressor = KVCompressor.from_config(settings.nsa, settings.qk_head_dim, settings.v_head_dim,
                                                       device=_param_device(config), dtype=config.params_dtype)
        if getattr(config, "qk_layernorm", False) and None in (submodules.q_layernorm, submodules.k_layernorm):
            raise ValueError("qk_layernorm=True but the layer spec has no q/k norms (q_layernorm="
                             f"{submodules.q_layernorm}, k_layernorm={submodules.k_layernorm}); build it with "
                             "get_gpt_layer_nsa_spec(qk_layernorm=True)")
        self.q_layernorm = self._head_norm(submodules.q_layernorm, config)
        self.k_layernorm = self._head_norm(submodules.k_layernorm, config)
        replicated = [module for module in (self.compressor, self.q_layernorm, self.k_layernorm) if module is not None]
        if replicated and self.world_size > 1:
            sum_grads_over_group([p for module in replicated for p in module.parameters()], self.pg_collection.tp)
        self.own_rotary = None
        if settings.rotary_base is not None:
            self.own_rotary = Rotary.from_base(settings.rotary_base, settings.rotary_dim)
        if settings.block_score_loss_coeff > 0 and get_pg_size(self.pg_collection.cp) > 1:
            raise ValueError(f"nsa_block_score_loss_coeff={settings.block_score_loss_coeff} needs context parallel "
                             f"size 1 (got {get_pg_size(self.pg_collection.cp)}); allowed with context parallelism: 0")
        if settings.block_score_loss_coeff > 0 and self.k_layernorm is not None:
            raise ValueError(f"nsa_block_score_loss_coeff={settings.block_score_loss_coeff} with qk_layernorm=True: "
                             "the key norm is shared by the three key branches, so the loss would change the "
                             "selected and window keys too; allowed: qk_layernorm=False, or the coefficient 0")
        # the block score loss of this layer's training forwards since a monitor last read it (sum, count)
        self.block_score_loss_sum = torch.zeros((), dtype=torch.float32)
        self.block_score_loss_count = 0

    def _head_norm(self, norm_spec, config) -> Optional[torch.nn.Module]:
        """A norm over one head's d_k dims built from the spec (None: no norm), on the device and in the
        dtype where Megatron creates parameters."""
        if norm_spec is None:
            return None
        norm = build_module(norm_spec, hidden_size=self.settings.qk_head_dim, config=config,
                            eps=config.layernorm_epsilon)
        return norm.to(device=_param_device(config), dtype=config.params_dtype)

    # ------------------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None,
                sequence_len_offset=None, *, inference_params=None, **other_inputs):
        """hidden_states [s, b, h] -> (output [s, b, h], bias). attention_mask is not used (NSA is causal)."""
        _reject_unsupported(key_value_states=key_value_states, inference_context=inference_context,
                            inference_params=inference_params, rotary_pos_cos=rotary_pos_cos,
                            rotary_pos_sin=rotary_pos_sin, rotary_pos_cos_sin=rotary_pos_cos_sin,
                            attention_bias=attention_bias, sequence_len_offset=sequence_len_offset, **other_inputs)
        q, k, v, gates = self.get_query_key_value_tensors(hidden_states)
        seq_len, batch = q.shape[:2]
        cu_seqlens = self._cu_seqlens(packed_seq_params, seq_len, batch)
        rotary = self._rotary(rotary_pos_emb)
        if rotary is not None:
            positions = self._token_positions(seq_len, cu_seqlens, q.device)
            if get_pg_size(self.pg_collection.cp) > 1:  # a table Megatron sliced to this CP rank: global -> local rows
                from .context_parallel.rope import cp_rotary

                rotary = cp_rotary(rotary, seq_len, cu_seqlens, self.pg_collection.cp)
            else:  # token and compressed-key positions are below seq_len: check the table once, on the host
                rotary = rotary.covering(seq_len)
            q = rotary(q, positions)
            rotated = rotary(k[1], positions)
            k = (k[0], rotated, rotated if k[2] is k[1] else rotary(k[2], positions))
        batch_first = lambda t: t.transpose(0, 1)  # noqa: E731  [s, b, ...] <-> [b, s, ...]
        core_out = self._nsa_core(batch_first(q), tuple(map(batch_first, k)), tuple(map(batch_first, v)),
                                  batch_first(gates), cu_seqlens, rotary)
        if self.settings.block_score_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            core_out = self._with_block_score_loss(core_out, hidden_states, batch_first(q), batch_first(k[1]),
                                                   cu_seqlens, rotary)
        core_out = batch_first(core_out).reshape(seq_len, batch, -1)  # [s, b, H_q * d_v]
        return self.linear_proj(core_out)

    def _with_block_score_loss(self, core_out, hidden_states, q, k_slc, cu_seqlens, rotary):
        """core_out carrying this layer's block score loss (megatron_nsa/block_score_loss.py) into backward.

        The compressed keys are projected once more from the detached layer input, so that the loss trains the
        compressed-key rows of linear_qkv and the compressor and nothing before them (as DeepSeek-V3.2 detaches
        its indexer's input): a gradient into the residual stream would retrain every earlier layer toward it.
        Weighted so that it adds nsa_block_score_loss_coeff * loss to the per-token language-model loss the
        optimizer sees: with calculate_per_token_loss Megatron divides every gradient by the batch's token
        count, so the loss enters once per token of this micro-batch; without, Megatron divides each
        micro-batch's loss by the number of micro-batches, and so is this one."""
        _, k, _, _ = self.get_query_key_value_tensors(hidden_states.detach())
        k_cmp = k[0].transpose(0, 1)  # [b, s, H_kv, d_k], un-rotated
        loss = block_score_loss(q, k_cmp, k_slc, self.core_config, self.settings.block_score_loss_queries,
                                cu_seqlens, self.compressor, rotary)
        self.block_score_loss_sum = self.block_score_loss_sum.to(loss.device) + loss.detach()
        self.block_score_loss_count += 1
        if self.config.calculate_per_token_loss:
            weight = self.settings.block_score_loss_coeff * q.shape[0] * q.shape[1]
        else:
            weight = self.settings.block_score_loss_coeff / _micro_batches()
        return attach_loss(core_out, loss, weight)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, *args, **kwargs):
        """hidden_states [s, b, h] -> q [s, b, H_q, d_k]; k, v: (cmp, slc, win) triples of [s, b, H_kv, d]
        (the same tensor three times when K/V are shared); gates [s, b, H_q, 3] in (0, 1).

        H_q and H_kv count this tensor-parallel rank's heads. q and k are normalized per head when the
        spec gives q_layernorm / k_layernorm.
        """
        mixed, _ = self.linear_qkv(hidden_states)  # [s, b, H_kv * sum(group_split)]
        seq_len, batch = mixed.shape[:2]
        num_kv, group = self.num_query_groups_per_partition, self.heads_per_group
        qk_dim, v_dim = self.settings.qk_head_dim, self.settings.v_head_dim
        grouped = mixed.view(seq_len, batch, num_kv, sum(self.group_split))
        q, k, v, gate_logits = torch.split(grouped, self.group_split, dim=-1)
        q = q.reshape(seq_len, batch, num_kv * group, qk_dim)
        k = k.reshape(seq_len, batch, num_kv, self.kv_branches, qk_dim)
        if self.q_layernorm is not None:
            q = self.q_layernorm(q)
        if self.k_layernorm is not None:
            k = self.k_layernorm(k)
        k = k.unbind(3)
        v = v.reshape(seq_len, batch, num_kv, self.kv_branches, v_dim).unbind(3)
        gates = torch.sigmoid(gate_logits.reshape(seq_len, batch, num_kv * group, 3))
        if self.kv_branches == 1:
            k, v = k * 3, v * 3
        return q, k, v, gates

    def _nsa_core(self, q, k, v, gates, cu_seqlens=None, compressed_rope=None):
        """The one call of the NSA core. q [b, t, H_q, d_k]; k / v (cmp, slc, win) triples of
        [b, t, H_kv, d] (compressed keys un-rotated); gates [b, t, H_q, 3] -> [b, t, H_q, d_v].
        """
        core = functools.partial(self.core_attention, config=self.core_config, cu_seqlens=cu_seqlens,
                                 compressor=self.compressor, backend=self.settings.backend,
                                 compressed_rope=compressed_rope)
        if self.checkpoint_core_attention and self.training:
            return torch.utils.checkpoint.checkpoint(core, q, k, v, gates, use_reentrant=False,
                                                     preserve_rng_state=False)
        return core(q, k, v, gates)

    def _token_positions(self, seq_len: int, cu_seqlens: Optional[torch.Tensor], device) -> torch.Tensor:
        """RoPE position of this rank's tokens [s]: index in the sequence (with context parallelism,
        in the whole sequence, through Megatron's load-balanced layout), counted from the start of
        the token's document when packed (cu_seqlens: global boundaries)."""
        cp_size = get_pg_size(self.pg_collection.cp)
        if cp_size == 1:
            positions = torch.arange(seq_len, device=device)
        else:
            from .context_parallel import LoadBalancedLayout

            layout = LoadBalancedLayout(seq_len * cp_size, cp_size, self.settings.nsa)
            positions = layout.positions(get_pg_rank(self.pg_collection.cp), device=device)
        if cu_seqlens is None:
            return positions
        starts = cu_seqlens.to(device=device, dtype=torch.int64)
        document = torch.searchsorted(starts[1:], positions, right=True)
        return positions - starts[document]

    def _rotary(self, rotary_pos_emb) -> Optional[Rotary]:
        if self.own_rotary is not None:
            if rotary_pos_emb is not None:
                raise ValueError(
                    "RoPE would be applied twice: the model passes rotary_pos_emb (GPTModel with "
                    "position_embedding_type='rope') and nsa_rotary_base is set; use one of them"
                )
            return self.own_rotary
        if rotary_pos_emb is None:
            return None
        if isinstance(rotary_pos_emb, tuple):
            raise ValueError("rotary_pos_emb as a (query, key) tuple is not supported by NSA self-attention")
        rotary = Rotary.from_table(rotary_pos_emb)
        if rotary.rot_dim > self.settings.qk_head_dim:
            raise ValueError(
                f"rotary_pos_emb rotates {rotary.rot_dim} dims but qk_head_dim={self.settings.qk_head_dim}"
            )
        return rotary

    def _cu_seqlens(self, packed_seq_params: Optional[PackedSeqParams], seq_len: int, batch: int):
        """Document boundaries of packed (THD) input, or None."""
        if packed_seq_params is None:
            return None
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(
                f"packed_seq_params.qkv_format={packed_seq_params.qkv_format!r} is not supported; allowed: 'thd'"
            )
        if batch != 1:
            raise ValueError(f"packed sequences (THD) need batch size 1 in [s, b, h] input, got b={batch}")
        padded = packed_seq_params.cu_seqlens_q_padded
        cu_seqlens = padded if padded is not None else packed_seq_params.cu_seqlens_q
        if cu_seqlens is None:
            raise ValueError("packed_seq_params.cu_seqlens_q is None; THD input needs document boundaries")
        return cu_seqlens


def sum_grads_over_group(params, group) -> None:
    """Make each parameter's gradient the sum of its gradients on all ranks of `group`.

    For parameters replicated across tensor-parallel ranks but used on each rank with only that
    rank's heads: the full gradient is the sum of the ranks' partial ones. Runs in backward, once
    per backward pass and parameter, before the gradient is accumulated (and before Megatron's
    DDP hooks see it).
    """

    def all_reduce(grad):
        summed = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(summed, group=group)
        return summed

    for param in params:
        param.register_hook(all_reduce)


def _micro_batches() -> int:
    """Megatron's micro-batches per step, 1 where no schedule set it up (a plain forward and backward)."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    try:
        return get_num_microbatches()
    except AttributeError:  # the calculator was never initialized
        return 1


def bound_backend(requested: Optional[str]) -> str:
    """The NSA core's backend, decided once when the layer is built: the requested one, else 'triton'
    when this machine has CUDA and the kernels, else 'torch'."""
    if requested is not None:
        return requested
    return default_backend(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _param_device(config):
    """Where Megatron creates parameters: CPU with use_cpu_initialization, else the current GPU."""
    return torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()


def _reject_unsupported(**inputs) -> None:
    for name, value in inputs.items():
        if value is not None:
            raise NotImplementedError(f"NSASelfAttention does not support {name} (got a value; only None is allowed)")
