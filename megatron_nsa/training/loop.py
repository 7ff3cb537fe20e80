"""The training loop, top to bottom: set up, resume, then step / log / validate / checkpoint until done.

Losses are per token: each micro-batch returns its summed loss and token count, and gradients are
divided by the global token count, so every data-parallel and context-parallel layout computes the same
update as one process would.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from . import checkpoint as ckpt
from .config import Recipe
from .data import build_datasets, micro_batches
from .metrics import GateMonitor, Metrics, model_flops_per_token
from .model import build_model
from .optimizer import build_optimizer, build_scheduler
from .parallel import Launch, connect_schedule, forward_backward_function, initialize, wrap_model
from .tokenizer import recipe_tokenizer


@dataclasses.dataclass
class RunSummary:
    final_step: int
    stopped_by_signal: bool
    last_loss: Optional[float]
    last_validation_loss: Optional[float]
    checkpoint: Optional[str]


class StopSignal:
    """SIGTERM (e.g. SLURM preemption) asks the loop to save and stop at the end of the current step."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got the signal."""
        flag = torch.tensor([int(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """(summed loss, token count, report [summed loss, token count]) of one micro-batch."""
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def make_forward_step(launch: Launch, recipe: Recipe):
    shard = None
    if launch.cp_size > 1:
        from megatron_nsa.context_parallel import shard_batch_for_rank

        shard = functools.partial(shard_batch_for_rank, cp_size=launch.cp_size, cp_rank=launch.cp_rank,
                                  config=recipe.nsa)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        if shard is not None:
            batch = shard(batch)
        per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return per_token_loss, functools.partial(loss_func, batch["loss_mask"])

    return forward_step


def mean_loss(reports: List[dict], device: torch.device) -> Optional[float]:
    """Token-weighted loss over micro-batches and data/context-parallel ranks (None off the last stage)."""
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    for report in reports:
        totals += report["lm loss"].to(device)
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (totals[0] / totals[1]).item() if parallel_state.is_pipeline_last_stage() else None


def train(recipe: Recipe) -> RunSummary:
    # ---- set-up: every check that can fail does so before the first step -------------------------
    launch = initialize(recipe)
    tokenizer = recipe_tokenizer(recipe)
    core_model = build_model(recipe, tokenizer.vocab_size, launch.on_cuda, launch.bf16)
    model = wrap_model(core_model, recipe, launch)
    optimizer = build_optimizer(recipe, [model], launch.on_cuda, launch.bf16)
    scheduler = build_scheduler(recipe, optimizer)
    connect_schedule(model, optimizer, launch)

    checkpointer, progress = None, ckpt.Progress()
    if recipe.checkpoint.dir:
        checkpointer = ckpt.Checkpointer(recipe, launch, core_model, optimizer, scheduler)
        latest = checkpointer.latest() if recipe.checkpoint.resume else None
        if latest:
            progress = checkpointer.load(latest)
            if launch.is_logger:
                print(f"resumed from {latest} at step {progress.step}", flush=True)
                if progress.step >= recipe.training.train_steps:
                    print(f"nothing to train: the checkpoint is at training.train_steps={recipe.training.train_steps}; "
                          "raise train_steps, or set checkpoint.resume=false (or another checkpoint.dir) to start "
                          "afresh", flush=True)

    train_cfg, seq_length = recipe.training, recipe.data.seq_length
    train_set, valid_set = build_datasets(recipe, tokenizer, train_cfg.train_steps * train_cfg.global_batch_size,
                                          train_cfg.eval_steps * train_cfg.global_batch_size)
    batches = functools.partial(micro_batches, micro_batch_size=train_cfg.micro_batch_size,
                                dp_rank=launch.dp_rank, dp_size=launch.dp_size, device=launch.device)
    train_iterator = batches(train_set, progress.consumed_samples)
    num_microbatches = train_cfg.global_batch_size // (train_cfg.micro_batch_size * launch.dp_size)
    forward_backward = functools.partial(
        forward_backward_function(launch), forward_step_func=make_forward_step(launch, recipe), model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=train_cfg.micro_batch_size,
        decoder_seq_length=seq_length,
    )

    tensorboard_dir = recipe.logging.tensorboard_dir or (
        os.path.join(recipe.checkpoint.dir, "tensorboard") if recipe.checkpoint.dir else None)
    flops_per_token = model_flops_per_token(core_model, core_model.config, seq_length, recipe.model.attention,
                                            recipe.nsa)
    metrics = Metrics(train_cfg.train_steps, train_cfg.global_batch_size * seq_length, flops_per_token,
                      launch.world_size, launch.device, tensorboard_dir, recipe.logging.metrics_file, launch.is_logger)
    gates = GateMonitor(core_model, launch.device) if recipe.model.attention == "nsa" else None
    stop = StopSignal()
    if launch.is_logger:
        print(f"training {recipe.model.attention} GPT: {sum(p.numel() for p in core_model.parameters()):,} "
              f"parameters on this rank, {launch.world_size} process(es) on {launch.device.type}, "
              f"steps {progress.step}..{train_cfg.train_steps}", flush=True)

    # ---- the loop ----------------------------------------------------------------------------------
    loss = validation_loss = saved = None
    stopped = False
    while progress.step < train_cfg.train_steps:
        started = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(data_iterator=train_iterator, forward_only=False)
        updated, grad_norm, _ = optimizer.step()
        grad_norm = None if grad_norm is None else float(grad_norm)
        if updated:
            scheduler.step(increment=1)
        loss = mean_loss(reports, launch.device)
        progress.step += 1
        progress.consumed_samples += train_cfg.global_batch_size
        lr = float(optimizer.param_groups[0]["lr"])
        metrics.step(progress.step, loss or 0.0, lr, grad_norm, time.perf_counter() - started)

        if progress.step % recipe.logging.log_interval == 0 or progress.step == train_cfg.train_steps:
            metrics.log(progress.step, lr, grad_norm, gates.pop() if gates else {})
        if valid_set is not None and train_cfg.eval_interval and (
                progress.step % train_cfg.eval_interval == 0 or progress.step == train_cfg.train_steps):
            validation_loss = evaluate(forward_backward, model, batches(valid_set, 0), train_cfg.eval_steps, launch)
            metrics.validation(progress.step, validation_loss)
        save_now = checkpointer and recipe.checkpoint.save_interval and \
            progress.step % recipe.checkpoint.save_interval == 0
        stopped = stop.agreed(launch.device)
        if checkpointer and (save_now or stopped or progress.step == train_cfg.train_steps):
            saved = checkpointer.save(progress)
        if stopped:
            if launch.is_logger:
                print(f"SIGTERM: stopped at step {progress.step}" + (f", saved {saved}" if checkpointer else ""),
                      flush=True)
            break
    metrics.close()
    return RunSummary(progress.step, stopped, loss, validation_loss, saved)


def evaluate(forward_backward, model, iterator, eval_steps: int, launch: Launch) -> Optional[float]:
    """Loss on the first eval_steps global batches of the validation split (the same ones every time)."""
    model.eval()
    reports = []
    with torch.no_grad():
        for _ in range(eval_steps):
            reports += forward_backward(data_iterator=iterator, forward_only=True)
    model.train()
    return mean_loss(reports, launch.device)
