"""Adam (megatron.core.optimizer on CUDA: bf16 params with fp32 main weights, optional distributed
optimizer) and the warmup + decay learning-rate schedule (megatron's OptimizerParamScheduler)."""
from __future__ import annotations

from typing import List

import torch

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from .config import Recipe
from .host_fallback import HostAdam


def build_optimizer(recipe: Recipe, model_chunks: List[torch.nn.Module], on_cuda: bool, bf16: bool):
    opt = recipe.optimizer
    if not on_cuda:
        return HostAdam(model_chunks, lr=opt.lr, weight_decay=opt.weight_decay,
                        betas=(opt.adam_beta1, opt.adam_beta2), eps=opt.adam_eps, clip_grad=opt.clip_grad)
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(config, model_chunks)


def build_scheduler(recipe: Recipe, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 to lr over warmup_steps, then decay to min_lr at decay_steps (one step = one
    optimizer step). On resume the recipe defines the schedule and the checkpoint only the step reached,
    so a run can be extended by raising training.train_steps."""
    opt = recipe.optimizer
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps,
        lr_decay_steps=opt.decay_steps or recipe.training.train_steps,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=recipe.training.train_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
