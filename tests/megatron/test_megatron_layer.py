"""NSASelfAttention and the NSA GPT layer on one process: the layer against the pure-PyTorch
reference, packed documents, GPTModel forward/backward, selective recompute, RoPE conventions."""
from __future__ import annotations

import math

import pytest
import torch

from mcore_harness import build_gpt, megatron_cuda_calls_on_cpu, tiny_config, token_batch

pytestmark = pytest.mark.usefixtures("megatron_world")


def build_attention(config, **spec_kwargs):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_nsa import get_gpt_layer_nsa_spec

    spec = get_gpt_layer_nsa_spec(use_transformer_engine=False, **spec_kwargs).submodules.self_attention
    return build_module(spec, config=config, layer_number=1)


def complex_rope(x: torch.Tensor, positions: torch.Tensor, rot_dim: int, base: float) -> torch.Tensor:
    """RoPE written independently of megatron_nsa.rope: dims (i, i + r/2) form a complex number
    turned by the angle position * base^(-2i/r). x [N, ..., D], positions [N]."""
    half = rot_dim // 2
    freqs = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / rot_dim)
    turn = torch.polar(torch.ones(len(positions), half, dtype=torch.float64), positions.double()[:, None] * freqs)
    turn = turn.view(len(positions), *([1] * (x.dim() - 2)), half)
    z = torch.complex(x[..., :half].double(), x[..., half:rot_dim].double()) * turn
    return torch.cat([z.real, z.imag, x[..., rot_dim:].double()], dim=-1).to(x.dtype)


def head_norm_by_hand(x: torch.Tensor, norm, config) -> torch.Tensor:
    """RMSNorm / LayerNorm over the last dim, written out, with `norm`'s weights (and bias)."""
    if config.normalization == "RMSNorm":
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon) * norm.weight
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + config.layernorm_epsilon) * norm.weight + \
        norm.bias


def layer_by_hand(layer, x, config, head_norms: bool = False):
    """The NSA layer computed from its weights and the reference: the fused projection laid out per
    KV group as [G*d_k | n_b*d_k | n_b*d_v | G*3], per-head q/k norms when `head_norms`, RoPE on q and
    selection/window keys, compressed keys rotated at their block's last token, then the output projection."""
    from megatron_nsa.reference import nsa_reference

    seq_len, batch = x.shape[:2]
    heads, groups = config.num_attention_heads, config.num_query_groups
    per_group, dk, dv = heads // groups, config.nsa_qk_head_dim, config.nsa_v_head_dim
    branches = 3 if config.nsa_separate_kv else 1
    mixed = (x @ layer.linear_qkv.weight.T).view(seq_len, batch, groups, -1)
    sizes = [per_group * dk, branches * dk, branches * dv, per_group * 3]
    q, k, v, gate_logits = torch.split(mixed, sizes, dim=-1)
    q = q.reshape(seq_len, batch, heads, dk)
    k = k.reshape(seq_len, batch, groups, branches, dk)
    v = v.reshape(seq_len, batch, groups, branches, dv)
    if head_norms:
        q, k = head_norm_by_hand(q, layer.q_layernorm, config), head_norm_by_hand(k, layer.k_layernorm, config)
    gates = torch.sigmoid(gate_logits.reshape(seq_len, batch, heads, 3))
    positions = torch.arange(seq_len)
    rope = lambda t, pos: complex_rope(t, pos, config.nsa_qk_head_dim, config.nsa_rotary_base)  # noqa: E731
    branch = lambda t, i: t[:, :, :, i % branches].transpose(0, 1)  # noqa: E731  -> [b, s, H_kv, d]
    kv_cmp = (branch(k, 0), branch(v, 0))
    kv_slc = (rope(k[:, :, :, 1 % branches], positions).transpose(0, 1), branch(v, 1))
    kv_win = (rope(k[:, :, :, 2 % branches], positions).transpose(0, 1), branch(v, 2))
    out = nsa_reference(rope(q, positions).transpose(0, 1), kv_cmp, kv_slc, kv_win, gates.transpose(0, 1),
                        config.nsa_config(), compressor=layer.compressor, rope=rope)
    return out.transpose(0, 1).reshape(seq_len, batch, heads * dv) @ layer.linear_proj.weight.T


@pytest.mark.parametrize("separate_kv,compression", [(False, "linear"), (True, "mlp"), (False, "mean")])
def test_layer_matches_hand_computation(separate_kv, compression):
    config = tiny_config(nsa_separate_kv=separate_kv, nsa_compression=compression, params_dtype=torch.float64)
    torch.manual_seed(0)
    layer = build_attention(config)
    x = torch.randn(37, 2, config.hidden_size, dtype=torch.float64)
    output, bias = layer(x, None)
    assert bias is None and output.shape == x.shape
    torch.testing.assert_close(output, layer_by_hand(layer, x, config), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("separate_kv,normalization", [(False, "RMSNorm"), (True, "LayerNorm")])
def test_qk_layernorm_matches_hand_computation(separate_kv, normalization):
    """Per-head q/k norms (random weights, so that a norm applied to the wrong tensor or dims shows),
    before RoPE; the key norm is shared by the three key branches."""
    config = tiny_config(nsa_separate_kv=separate_kv, normalization=normalization, params_dtype=torch.float64)
    layer = build_attention(config, qk_layernorm=True)
    assert layer.q_layernorm.weight.shape == layer.k_layernorm.weight.shape == (config.nsa_qk_head_dim,)
    with torch.no_grad():
        for param in [*layer.q_layernorm.parameters(), *layer.k_layernorm.parameters()]:
            param.copy_(torch.randn_like(param))
    x = torch.randn(37, 2, config.hidden_size, dtype=torch.float64)
    output, _ = layer(x, None)
    # atol: the layer's RoPE angles are float32 (the hand's float64), and unit-RMS q/k scaled by random
    # weights make larger logits than the plain layer's
    torch.testing.assert_close(output, layer_by_hand(layer, x, config, head_norms=True), rtol=1e-7, atol=2e-8)
    without_norms = build_attention(config)
    without_norms.load_state_dict({n: t for n, t in layer.state_dict().items() if "layernorm" not in n})
    assert (without_norms(x, None)[0] - output).abs().max() > 1e-3
    output.square().sum().backward()
    for norm in (layer.q_layernorm, layer.k_layernorm):
        assert all(param.grad.abs().max() > 0 for param in norm.parameters())
    with pytest.raises(ValueError, match=r"qk_layernorm=True but the layer spec has no q/k norms"):
        build_attention(tiny_config(qk_layernorm=True))


def test_triton_backend_matches_torch_backend():
    """The layer on the Triton kernels (interpreted on CPU) against the same layer on the torch backend."""
    pytest.importorskip("nsa_kernels")
    results = {}
    for backend in ("torch", "triton"):
        config = tiny_config(nsa_backend=backend, nsa_qk_head_dim=16, nsa_v_head_dim=16, nsa_separate_kv=True)
        torch.manual_seed(0)
        layer = build_attention(config)
        x = torch.randn(40, 1, config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True)
        output, _ = layer(x, None)
        output.square().sum().backward()
        results[backend] = [output, x.grad] + [p.grad for p in layer.parameters()]
    for torch_result, triton_result in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(triton_result, torch_result, rtol=1e-4, atol=1e-6)


def test_packed_documents_match_documents_one_by_one():
    from megatron.core.packed_seq_params import PackedSeqParams

    model = build_gpt(tiny_config(num_layers=1), seed=1).double()
    lengths = [13, 29, 6, 22]  # a document shorter than one compressed block (l=8) included
    tokens, _, _ = token_batch(2, batch=1, seq_len=sum(lengths))
    bounds = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds, cu_seqlens_kv=bounds,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    probe = torch.randn(1, sum(lengths), 96, dtype=torch.float64)  # a random read-out of the logits, for gradients

    logits = model(tokens, None, None, packed_seq_params=packed)
    (logits * probe).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    one_by_one = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        doc_logits = model(tokens[:, start:end], None, None)
        (doc_logits * probe[:, start:end]).sum().backward()
        one_by_one.append(doc_logits)
    torch.testing.assert_close(logits, torch.cat(one_by_one, dim=1), rtol=1e-10, atol=1e-10)
    for name, param in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], param.grad, rtol=1e-9, atol=1e-10, msg=lambda m: name + m)


def test_gpt_model_forward_backward_reaches_every_parameter():
    config = tiny_config(nsa_separate_kv=True, nsa_compression="mlp")
    model = build_gpt(config, seed=2)
    tokens, labels, positions = token_batch(3, batch=2, seq_len=40)
    loss = model(tokens, positions, None, labels=labels).mean()
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(96)) < 1.0
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().max() > 0, f"{name} got a zero gradient"


def saved_bytes_during(step, probe_module):
    """Bytes of the distinct storages autograd keeps for backward while `step()` runs forward,
    counting the inputs of `probe_module` (what a checkpoint keeps alive instead)."""
    storages = {}

    def remember(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(tensor):
        remember(tensor)
        return tensor

    def remember_inputs(module, args):
        for arg in args:
            for tensor in arg if isinstance(arg, tuple) else (arg,):
                remember(tensor)

    handle = probe_module.register_forward_pre_hook(remember_inputs)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step()
    handle.remove()
    return result, sum(storages.values())


def test_selective_recompute_keeps_less_and_gives_the_same_gradients():
    results = {}
    for recompute in (False, True):
        extra = dict(recompute_granularity="selective", recompute_modules=["core_attn"]) if recompute else {}
        config = tiny_config(**extra)
        torch.manual_seed(4)
        layer = build_attention(config)
        layer.train()
        x = torch.randn(48, 2, config.hidden_size, generator=torch.Generator().manual_seed(5), requires_grad=True)
        output, saved = saved_bytes_during(lambda: layer(x, None)[0], layer.core_attention)
        output.square().sum().backward()
        results[recompute] = (output.detach(), saved, x.grad, {n: p.grad for n, p in layer.named_parameters()})
    plain, recomputed = results[False], results[True]
    torch.testing.assert_close(recomputed[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(recomputed[2], plain[2], rtol=1e-6, atol=1e-7)
    for name, grad in plain[3].items():
        torch.testing.assert_close(recomputed[3][name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert recomputed[1] < plain[1] / 2, f"recompute keeps {recomputed[1]} bytes, without it {plain[1]}"


def test_rotary_table_matches_megatron_apply_rotary_pos_emb():
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_nsa.rope import Rotary

    config = tiny_config()
    seq_len = 50
    with megatron_cuda_calls_on_cpu():  # RotaryEmbedding moves its table to "cuda"
        table = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, rotary_base=500,
                                use_cpu_initialization=True)(seq_len)  # [S, 1, 1, 8]
    x = torch.randn(seq_len, 2, 3, 12)
    expected = apply_rotary_pos_emb(x, table, config=config)
    positions = torch.arange(seq_len)
    torch.testing.assert_close(Rotary.from_table(table)(x, positions), expected)
    torch.testing.assert_close(Rotary.from_base(500.0, 8)(x, positions), expected)
    torch.testing.assert_close(complex_rope(x, positions, 8, 500.0), expected)


def test_gpt_rope_and_nsa_own_rope_give_the_same_model():
    """GPTModel(position_embedding_type='rope') passes its table; the layer rotates with it exactly as
    with its own RoPE of the same base over the same dims (kv_channels = v_head_dim = 8 of 12)."""
    tokens, labels, positions = token_batch(6, batch=2, seq_len=40)
    losses = []
    for own_rope in (True, False):
        config = tiny_config(nsa_rotary_base=10000.0 if own_rope else None, nsa_rotary_dim=8 if own_rope else None)
        model = build_gpt(config, seed=7, position_embedding_type="none" if own_rope else "rope")
        with megatron_cuda_calls_on_cpu():
            losses.append(model(tokens, positions, None, labels=labels))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    no_rope = build_gpt(tiny_config(nsa_rotary_base=None), seed=7)
    assert not torch.allclose(no_rope(tokens, positions, None, labels=labels), losses[0], atol=1e-3)


def test_plain_transformer_config_with_spec_settings():
    """The Megatron-LM `--spec` path: a plain TransformerConfig, NSA settings in the spec's params."""
    from megatron.core.transformer.spec_utils import import_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_nsa import NSAConfig, NSASelfAttention

    spec = import_module(("megatron_nsa.spec", "nsa_layer_local_spec"))
    assert spec.submodules.self_attention.module is NSASelfAttention
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                               use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    nsa = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=8, select_count=3, window_size=8)
    layer = build_attention(config, nsa_config=nsa, nsa_backend="torch")
    assert layer.settings.nsa == nsa and layer.settings.qk_head_dim == layer.settings.v_head_dim == 8
    x = torch.randn(40, 1, 32)
    output, _ = layer(x, None)
    output.sum().backward()
    assert output.shape == x.shape and layer.linear_qkv.weight.grad.abs().max() > 0


def test_forward_rejects_what_it_cannot_honour():
    from megatron.core.packed_seq_params import PackedSeqParams

    layer = build_attention(tiny_config())
    x = torch.randn(16, 2, 32)
    with pytest.raises(ValueError, match="RoPE would be applied twice"):
        layer(x, None, rotary_pos_emb=torch.zeros(16, 1, 1, 12))
    with pytest.raises(ValueError, match="qkv_format='sbhd'"):
        layer(x, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))
    bounds = torch.tensor([0, 6, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="batch size 1"):
        layer(x, None, packed_seq_params=PackedSeqParams(qkv_format="thd", cu_seqlens_q=bounds))
    with pytest.raises(NotImplementedError, match="inference_context"):
        layer(x, None, inference_context=object())
