"""A trained checkpoint as a model for evaluation, in one process (CUDA when visible, else CPU).

The model is the training stack's own GPTModel (megatron_nsa.training.model.build_model) from the
checkpoint's recipe, with the weights of its `model` state: megatron dist_checkpointing shards
(written on CUDA), the host format (written on CPU) or a weights-only export (megatron_nsa.eval.export,
either device).
"""
from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from typing import List, Optional

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402
from megatron.core.transformer.module import Float16Module  # noqa: E402

from megatron_nsa.training.config import Recipe, check_fields, wants_cuda  # noqa: E402
from megatron_nsa.training.model import build_model  # noqa: E402
from megatron_nsa.data.datasets import recipe_tokenizer  # noqa: E402

from .checkpoints import (WEIGHTS_FILE, WEIGHTS_FORMAT, EvalInputError, checkpoint_recipe, eval_recipe,  # noqa: E402
                          read_meta, resolve_checkpoint, trained_positions)


@dataclasses.dataclass
class LoadedModel:
    recipe: Recipe  # the evaluation recipe (one process)
    step_dir: str
    step: int
    model: torch.nn.Module  # what to call: GPTModel, wrapped in Float16Module for bf16
    tokenizer: object
    device: torch.device
    max_positions: int  # the learned position table's size (learned_absolute)

    @property
    def attention(self) -> str:
        return self.recipe.model.attention

    def _positions(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s] -> logits [b, s, padded vocab] (float32)."""
        return self.model(tokens, self._positions(tokens), None).float()

    def token_losses(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens, labels [b, s] -> cross-entropy of each label [b, s] (float32)."""
        return self.model(tokens, self._positions(tokens), None, labels=labels).float()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_one_process(on_cuda: bool, seed: int) -> None:
    """torch.distributed and megatron's parallel state for a world of one (kept when already set up)."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
    if dist.get_world_size() != 1:
        raise EvalInputError(f"evaluation runs in one process, this one has WORLD_SIZE={dist.get_world_size()}; "
                             "start it with python, not torchrun")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    torch.manual_seed(seed)
    if on_cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _load_weights(core: torch.nn.Module, step_dir: str, meta: dict, on_cuda: bool) -> None:
    if meta.get("format") == "host":
        if meta.get("layout", {}).get("world_size") != 1:
            raise EvalInputError(
                f"--checkpoint {step_dir!r} was written on CPU by {meta['layout'].get('world_size')} processes; "
                "CPU checkpoints load only in the layout that wrote them: evaluate checkpoints of one-process runs"
            )
        state = torch.load(os.path.join(step_dir, "rank_00000.pt"), map_location="cpu", weights_only=False)["model"]
    elif meta.get("format") == WEIGHTS_FORMAT:
        state = torch.load(os.path.join(step_dir, WEIGHTS_FILE), map_location="cpu", weights_only=False)
    elif meta.get("format") == "dist_checkpointing":
        if not on_cuda:
            raise EvalInputError(f"--checkpoint {step_dir!r} was written on CUDA (megatron dist_checkpointing); "
                                 "evaluate it on a machine with a GPU, or export its weights there "
                                 "(python -m megatron_nsa.eval.export) and evaluate those")
        state = dist_checkpointing.load({"model": core.sharded_state_dict()}, step_dir)["model"]
    else:
        raise EvalInputError(f"--checkpoint {step_dir!r} has an unknown format {meta.get('format')!r} in meta.json")
    core.load_state_dict(state)


def load_model(checkpoint: str, recipe_path: Optional[str] = None, overrides: List[str] = (),
               device: str = "auto") -> LoadedModel:
    """Build the checkpoint's model and load its weights (eval mode, no gradients needed)."""
    step_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    trained_recipe = checkpoint_recipe(step_dir, meta, recipe_path, [])
    max_positions = trained_positions(trained_recipe)
    recipe = eval_recipe(checkpoint_recipe(step_dir, meta, recipe_path, list(overrides)), max_positions)
    recipe.training.device = device
    check_fields(recipe)
    on_cuda = wants_cuda(recipe)
    precision = recipe.training.precision
    bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
    if bf16 and not on_cuda:
        raise EvalInputError("training.precision=bf16 needs CUDA; evaluate on CPU with training.precision=fp32")
    init_one_process(on_cuda, recipe.training.seed)
    tokenizer = recipe_tokenizer(trained_recipe)  # the vocabulary the model was built for, whatever data it reads now
    core = build_model(recipe, tokenizer.vocab_size, on_cuda, bf16)
    _load_weights(core, step_dir, meta, on_cuda)
    model = Float16Module(core.config, core) if bf16 else core
    model.eval()
    return LoadedModel(recipe, step_dir, int(meta.get("step", 0)), model, tokenizer,
                       torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu"),
                       max_positions)


def release(loaded: LoadedModel) -> None:
    """Free the model's memory before the next one is loaded."""
    loaded.model = None
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
