"""Find a training checkpoint and the recipe it was trained with, without loading megatron-core
(so that a wrong path fails in a second, not after the imports).

`--checkpoint` may name a run's checkpoint.dir (its newest complete step_XXXXXXXX/ is used) or one
step directory. The recipe is the one stored in its meta.json (training runs save it there), or a
YAML file given with `--recipe` (for checkpoints written before recipes were stored); `key=value`
overrides apply on top of either.
"""
from __future__ import annotations

import copy
import json
import os
from typing import List, Optional

from megatron_nsa.training.config import BadInputError, Recipe, load_recipe, recipe_from_mapping

# the names of megatron_nsa.training.checkpoint (which imports megatron-core)
META = "meta.json"
STEP_PREFIX = "step_"
WEIGHTS_FORMAT = "weights"  # meta.json's format of a weights-only export (megatron_nsa.eval.export)
WEIGHTS_FILE = "model.pt"  # the export's state dict


class EvalInputError(BadInputError):
    """An evaluation that cannot start; the message names the parameter, the value and what is allowed."""


def resolve_checkpoint(path: str) -> str:
    """A step directory holding meta.json: `path` itself, or the newest one inside `path`; relative when `path` is
    (results files then name the run's directory, not the machine's)."""
    if not os.path.isdir(path):
        raise EvalInputError(f"--checkpoint {path!r} is not a directory: give a training run's checkpoint.dir or "
                             "one of its step_XXXXXXXX directories")
    if os.path.isfile(os.path.join(path, META)):
        return os.path.normpath(path)
    steps = sorted(int(name[len(STEP_PREFIX):]) for name in os.listdir(path)
                   if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit()
                   and os.path.isfile(os.path.join(path, name, META)))
    if not steps:
        raise EvalInputError(f"--checkpoint {path!r} holds no complete checkpoint (a step_XXXXXXXX directory with "
                             f"{META}); point it at a training run's checkpoint.dir or a step directory")
    return os.path.normpath(os.path.join(path, f"{STEP_PREFIX}{steps[-1]:08d}"))


def read_meta(step_dir: str) -> dict:
    try:
        with open(os.path.join(step_dir, META)) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise EvalInputError(f"--checkpoint {step_dir!r}: cannot read {META} ({err})") from None


def checkpoint_recipe(step_dir: str, meta: dict, recipe_path: Optional[str], overrides: List[str]) -> Recipe:
    if recipe_path is not None:
        return load_recipe(recipe_path, overrides)
    if "recipe" not in meta:
        raise EvalInputError(f"--checkpoint {step_dir!r} stores no recipe in its {META} (written by an older "
                             "version); pass the training recipe with --recipe CONFIG.yaml")
    return recipe_from_mapping(meta["recipe"], overrides, source=os.path.join(step_dir, META))


def trained_positions(recipe: Recipe) -> int:
    """The size of the position table the model was built with (what learned_absolute models can read)."""
    return recipe.model.max_position_embeddings or recipe.data.seq_length


def eval_recipe(recipe: Recipe, positions: int) -> Recipe:
    """The recipe of a one-process evaluation of the trained model: no parallelism, recompute, checkpoints
    or logging, the position table of the trained model (`positions`)."""
    recipe = copy.deepcopy(recipe)
    recipe.model.max_position_embeddings = positions
    recipe.model.recompute = "none"
    par = recipe.parallel
    par.tensor_model_parallel_size = par.pipeline_model_parallel_size = par.context_parallel_size = 1
    par.sequence_parallel = par.use_distributed_optimizer = False
    recipe.checkpoint.dir = None
    recipe.logging.tensorboard_dir = recipe.logging.metrics_file = None
    return recipe


def check_length(recipe: Recipe, positions: int, length: int, option: str) -> None:
    """Learned absolute positions end at the trained table; RoPE models take any length."""
    if recipe.model.position_embedding_type == "learned_absolute" and length > positions:
        raise EvalInputError(
            f"{option} {length} is not allowed: the model has learned positions for {positions} tokens "
            "(model.position_embedding_type=learned_absolute); use lengths <= that, or a model trained with rope"
        )
