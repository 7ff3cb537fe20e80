"""NSASelfAttention with nsa_block_score_loss_coeff: the forward is unchanged, the backward adds exactly the
weighted gradient of the layer's block score loss, and the settings are checked."""
from __future__ import annotations

import pytest
import torch

from mcore_harness import tiny_config

pytestmark = pytest.mark.usefixtures("megatron_world")

SEQ, BATCH = 70, 2  # 70 tokens of 8-token blocks: blocks 1 .. current - 2 are ranked from position 32 on


def build_attention(config):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_nsa import get_gpt_layer_nsa_spec

    spec = get_gpt_layer_nsa_spec(use_transformer_engine=False).submodules.self_attention
    return build_module(spec, config=config, layer_number=1)


def parameter_grads(layer, x):
    """(output, {parameter: gradient}, input gradient) of sum(output^2)."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    output, _ = layer(x, None)
    output.square().sum().backward()
    return output.detach(), {name: p.grad.clone() for name, p in layer.named_parameters()}, x.grad


def loss_of_layer(layer, x, queries: int):
    """The layer's block score loss computed from its own projections, as the layer should."""
    from megatron_nsa.block_score_loss import block_score_loss

    q, k, _, _ = layer.get_query_key_value_tensors(x)
    positions = torch.arange(x.shape[0])
    rotary = layer.own_rotary
    first = lambda t: t.transpose(0, 1)  # noqa: E731
    return block_score_loss(first(rotary(q, positions)), first(k[0]), first(rotary(k[1], positions)),
                            layer.core_config, queries, compressor=layer.compressor, rope=rotary)


@pytest.mark.parametrize("per_token", [False, True])
def test_backward_adds_the_weighted_loss_gradient(per_token):
    coeff, queries = 0.7, 16
    fields = dict(params_dtype=torch.float64, nsa_separate_kv=True, nsa_compression="mlp",
                  calculate_per_token_loss=per_token, init_method_std=0.3)  # peaked attention: a loss well above 0
    torch.manual_seed(0)
    plain = build_attention(tiny_config(**fields))
    with_loss = build_attention(tiny_config(**fields, nsa_block_score_loss_coeff=coeff,
                                            nsa_block_score_loss_queries=queries))
    with_loss.load_state_dict(plain.state_dict())
    x = torch.randn(SEQ, BATCH, plain.config.hidden_size, dtype=torch.float64)
    out_plain, grads_plain, input_grad_plain = parameter_grads(plain, x)
    out_loss, grads_loss, input_grad_loss = parameter_grads(with_loss, x)
    assert torch.equal(out_plain, out_loss)
    assert torch.equal(input_grad_plain, input_grad_loss)  # nothing of the loss reaches the residual stream

    loss = loss_of_layer(with_loss, x, queries)
    assert loss.item() > 1e-3
    names = [name for name, _ in with_loss.named_parameters()]
    loss_grads = dict(zip(names, torch.autograd.grad(loss, list(with_loss.parameters()), allow_unused=True)))
    weight = coeff * SEQ * BATCH if per_token else coeff
    for name in names:
        extra = loss_grads[name]
        expected = grads_plain[name] if extra is None else grads_plain[name] + weight * extra
        torch.testing.assert_close(grads_loss[name], expected, rtol=1e-9, atol=1e-12)
    assert loss_grads["compressor.k_map.proj.0.weight"].abs().max() > 0
    assert loss_grads["linear_proj.weight"] is None and loss_grads["compressor.v_map.proj.0.weight"] is None
    assert with_loss.block_score_loss_count == 1
    assert with_loss.block_score_loss_sum.item() == pytest.approx(loss.item(), rel=1e-9)


def test_no_loss_outside_training():
    layer = build_attention(tiny_config(nsa_block_score_loss_coeff=1.0))
    x = torch.randn(SEQ, 1, layer.config.hidden_size)
    with torch.no_grad():
        layer(x, None)
    layer.eval()
    layer(x, None)
    assert layer.block_score_loss_count == 0


@pytest.mark.parametrize("fields,message", [
    (dict(nsa_block_score_loss_coeff=-0.1), r"nsa_block_score_loss_coeff=-0.1 is not allowed: it must be a finite "
                                            r"number >= 0"),
    (dict(nsa_block_score_loss_coeff=float("nan")), r"nsa_block_score_loss_coeff=nan is not allowed"),
    (dict(nsa_block_score_loss_queries=0), r"nsa_block_score_loss_queries=0 is not allowed: it must be an "
                                           r"integer >= 1"),
    (dict(nsa_block_score_loss_coeff=0.5, context_parallel_size=2),
     r"nsa_block_score_loss_coeff=0.5 needs context_parallel_size 1 \(got 2\)"),
])
def test_bad_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_shared_key_norm_is_refused():
    from megatron.core.transformer.spec_utils import build_module

    from megatron_nsa import get_gpt_layer_nsa_spec

    spec = get_gpt_layer_nsa_spec(use_transformer_engine=False, qk_layernorm=True).submodules.self_attention
    with pytest.raises(ValueError, match=r"nsa_block_score_loss_coeff=0.5 with qk_layernorm=True: the key norm is "
                                         r"shared by the three key branches"):
        build_module(spec, config=tiny_config(qk_layernorm=True, nsa_block_score_loss_coeff=0.5), layer_number=1)
