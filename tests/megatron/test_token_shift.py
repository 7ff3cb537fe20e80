"""model.token_shift: each position's embedding gains W times its predecessor's, causally, in both models;
W is a trained, saved parameter; layouts that split the sequence are refused."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa.training.config import RecipeError, check_layout, load_recipe
from megatron_nsa.training.model import build_model

pytestmark = pytest.mark.usefixtures("megatron_world")

VOCAB, SEQ = 300, 48


def tiny_model(attention: str, token_shift: bool):
    recipe = load_recipe(None, [f"model.attention={attention}", "model.num_layers=2", "model.hidden_size=64",
                                "model.num_attention_heads=4", f"data.seq_length={SEQ}", "nsa.backend=torch",
                                "nsa.compress_block_size=8", "nsa.compress_stride=4", "nsa.select_block_size=8",
                                "nsa.select_count=3", "nsa.window_size=8",
                                f"model.token_shift={str(token_shift).lower()}"])
    torch.manual_seed(torch.randint(1 << 30, ()).item())
    return build_model(recipe, VOCAB, on_cuda=False, bf16=False)


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_embedding_gains_the_shifted_previous_token_and_stays_causal(attention):
    model = tiny_model(attention, token_shift=True)
    with torch.no_grad():
        model.embedding.token_shift.weight.normal_(0, 1)  # far from its identity start
    tokens = torch.randint(VOCAB, (2, SEQ))
    positions = torch.arange(SEQ).expand(2, SEQ)
    plain = model.embedding.forward(input_ids=tokens, position_ids=positions)  # [s, b, h], no hook
    shifted = model.embedding(input_ids=tokens, position_ids=positions)
    weight = model.embedding.token_shift.weight
    torch.testing.assert_close(shifted[0], plain[0])
    torch.testing.assert_close(shifted[1:], plain[1:] + plain[:-1] @ weight.t())
    # the whole model: a token changes the logits at and after its position, never before
    logits = model(tokens, positions, attention_mask=None)  # [b, s, vocab]
    changed_at = SEQ // 2
    edited = tokens.clone()
    edited[:, changed_at] = (edited[:, changed_at] + 1) % VOCAB
    edited_logits = model(edited, positions, attention_mask=None)
    torch.testing.assert_close(edited_logits[:, :changed_at], logits[:, :changed_at])
    assert (edited_logits[:, changed_at + 1] - logits[:, changed_at + 1]).abs().max() > 1e-4


def test_shift_weight_starts_as_identity_is_trained_and_saved():
    model = tiny_model("dense", token_shift=True)
    weight = model.embedding.token_shift.weight
    torch.testing.assert_close(weight, torch.eye(64))
    assert any(param is weight for param in model.parameters())
    assert "embedding.token_shift.weight" in model.state_dict()
    tokens = torch.randint(VOCAB, (2, SEQ))
    model(tokens, torch.arange(SEQ).expand(2, SEQ), attention_mask=None).sum().backward()
    assert weight.grad is not None and weight.grad.abs().max() > 0


def test_without_token_shift_the_embedding_is_megatrons_own():
    model = tiny_model("nsa", token_shift=False)
    assert not hasattr(model.embedding, "token_shift")
    tokens = torch.randint(VOCAB, (1, SEQ))
    positions = torch.arange(SEQ).expand(1, SEQ)
    torch.testing.assert_close(model.embedding(input_ids=tokens, position_ids=positions),
                               model.embedding.forward(input_ids=tokens, position_ids=positions))


def test_layouts_that_split_the_sequence_are_refused():
    with pytest.raises(RecipeError, match=r"model.token_shift=true needs the whole sequence on each rank, but "
                                          r"context_parallel_size=2 and sequence_parallel=false"):
        check_layout(load_recipe(None, ["model.attention=nsa", "model.token_shift=true",
                                        "parallel.context_parallel_size=2", "data.seq_length=4096"]), 2,
                     on_cuda=True)
    with pytest.raises(RecipeError, match=r"context_parallel_size=1 and sequence_parallel=true"):
        check_layout(load_recipe(None, ["model.token_shift=true", "parallel.tensor_model_parallel_size=2",
                                        "parallel.sequence_parallel=true"]), 2, on_cuda=True)
    with pytest.raises(RecipeError, match="model.token_shift"):
        load_recipe(None, ["model.token_shift=sometimes"])
