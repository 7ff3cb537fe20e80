"""The training loop, top to bottom: set up, resume, then step / log / validate / checkpoint until done.

Losses are per token: each micro-batch returns its summed loss and token count, and gradients are
divided by the global token count, so every data-parallel and context-parallel layout computes the same
update as one process would.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_nsa.data.datasets import build_datasets, micro_batches, recipe_tokenizer

from . import checkpoint as ckpt
from .config import Recipe
from .metrics import BlockScoreLossMonitor, GateMonitor, Metrics, model_flops_per_token
from .model import build_model
from .optimizer import build_optimizer, build_scheduler
from .parallel import Launch, connect_schedule, forward_backward_function, initialize, wrap_model
from .stop import StopSignal


@dataclasses.dataclass
class RunSummary:
    final_step: int
    stopped_by_signal: bool
    last_loss: Optional[float]
    last_validation_loss: Optional[float]
    checkpoint: Optional[str]  # the last checkpoint this run saved (it exists), or None
    checkpoint_dir: Optional[str]  # where this run keeps its checkpoints (a new subdirectory with new_run_subdir)
    tensorboard_dir: Optional[str]
    loss_curve: Optional[str]  # a PNG of the loss curve, when matplotlib is importable

    def resume_hint(self, new_run_subdir: bool) -> str:
        """How to continue this run."""
        if new_run_subdir:
            return f"to resume, run the same command with checkpoint.dir={self.checkpoint_dir} checkpoint.new_run_subdir=false"
        return "run the same command to resume"

    def lines(self, recipe: Recipe) -> List[str]:
        """The end-of-run summary: where the results are and what to run next."""
        out = [f"done: step {self.final_step}/{recipe.training.train_steps}"
               + (f", loss {self.last_loss:.4f} (the last step's)" if self.last_loss is not None else "")
               + (f", validation loss {self.last_validation_loss:.4f}" if self.last_validation_loss is not None else "")]
        if self.checkpoint:
            out.append(f"  final checkpoint: {self.checkpoint}")
        if self.tensorboard_dir:
            out.append(f"  tensorboard --logdir {self.tensorboard_dir}   (console loss = train/loss_mean: the mean "
                       "over each log interval; train/loss: every step)")
        if self.loss_curve:
            out.append(f"  loss curve: {self.loss_curve}")
        if self.checkpoint_dir and self.checkpoint:
            out.append(f"  next: python -m megatron_nsa.eval.loss --checkpoint {self.checkpoint_dir}   (validation "
                       "loss on the recipe's validation batches)")
        return out


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


def train(recipe: Recipe, stop: StopSignal) -> RunSummary:
    # ---- set-up: every check that can fail does so before the first step -------------------------
    launch = initialize(recipe)
    plan = ckpt.agreed_plan(recipe.checkpoint, launch) if recipe.checkpoint.dir else None
    tokenizer = recipe_tokenizer(recipe)
    core_model = build_model(recipe, tokenizer.vocab_size, launch.on_cuda, launch.bf16)
    model = wrap_model(core_model, recipe, launch)
    optimizer = build_optimizer(recipe, [model], launch.on_cuda, launch.bf16)
    scheduler = build_scheduler(recipe, optimizer)
    connect_schedule(model, optimizer, launch)

    checkpointer, progress = None, ckpt.Progress()
    if plan:
        checkpointer = ckpt.Checkpointer(recipe, launch, core_model, optimizer, scheduler, plan)
        if plan.resume_from:
            progress = checkpointer.load(plan.resume_from)
            if launch.is_logger:
                print(f"resumed from {plan.resume_from} at step {progress.step}", flush=True)
                if progress.step >= recipe.training.train_steps:
                    print(f"nothing to train: the checkpoint is at training.train_steps={recipe.training.train_steps}; "
                          "raise train_steps, or start a new run (checkpoint.dir=NEW_DIR, or "
                          "checkpoint.new_run_subdir=true)", flush=True)
        elif launch.is_logger:
            print(f"checkpoints of this run go to {plan.directory}", flush=True)

    train_cfg, seq_length = recipe.training, recipe.data.seq_length
    train_set, valid_set = build_datasets(recipe, tokenizer, train_cfg.train_steps * train_cfg.global_batch_size,
                                          train_cfg.eval_steps * train_cfg.global_batch_size)
    batches = functools.partial(micro_batches, micro_batch_size=train_cfg.micro_batch_size,
                                dp_rank=launch.dp_rank, dp_size=launch.dp_size, device=launch.device,
                                num_workers=recipe.data.num_workers)
    train_iterator = batches(train_set, progress.consumed_samples)
    num_microbatches = train_cfg.global_batch_size // (train_cfg.micro_batch_size * launch.dp_size)
    forward_backward = functools.partial(
        forward_backward_function(launch), forward_step_func=make_forward_step(launch, recipe), model=[model],
        num_microbatches=num_microbatches, seq_length=seq_length, micro_batch_size=train_cfg.micro_batch_size,
        decoder_seq_length=seq_length,
    )

    tensorboard_dir = recipe.logging.tensorboard_dir or (os.path.join(plan.directory, "tensorboard") if plan else None)
    flops_per_token = model_flops_per_token(core_model, core_model.config, seq_length, recipe.model.attention,
                                            recipe.nsa)
    metrics = Metrics(train_cfg.train_steps, train_cfg.global_batch_size * seq_length, flops_per_token,
                      launch.world_size, launch.device, tensorboard_dir, recipe.logging.metrics_file, launch.is_logger)
    gates = GateMonitor(core_model, launch.device) if recipe.model.attention == "nsa" else None
    score_loss = BlockScoreLossMonitor(core_model, launch.device) if recipe.model.attention == "nsa" else None
    if launch.is_logger:
        print(f"training {recipe.model.attention} GPT: {sum(p.numel() for p in core_model.parameters()):,} "
              f"parameters on this rank, {launch.world_size} process(es) on {launch.device.type}, "
              f"steps {progress.step}..{train_cfg.train_steps}", flush=True)

    # ---- the loop ----------------------------------------------------------------------------------
    loss = validation_loss = None
    saved = plan.resume_from if plan else None  # the newest checkpoint of this run so far
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
            metrics.log(progress.step, lr, grad_norm, gates.pop() if gates else {},
                        score_loss.pop() if score_loss else None)
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
    curve_dir = plan.directory if plan else (os.path.dirname(os.path.abspath(recipe.logging.metrics_file))
                                             if recipe.logging.metrics_file else None)
    loss_curve = metrics.write_loss_curve(os.path.join(curve_dir, "loss.png")) if curve_dir else None
    summary = RunSummary(progress.step, stopped, loss, validation_loss, saved, plan.directory if plan else None,
                         tensorboard_dir, loss_curve)
    if launch.is_logger and not stopped:
        print("\n".join(summary.lines(recipe)), flush=True)
    return summary


def evaluate(forward_backward, model, iterator, eval_steps: int, launch: Launch) -> Optional[float]:
    """Loss on the first eval_steps global batches of the validation split (the same ones every time)."""
    model.eval()
    reports = []
    with torch.no_grad():
        for _ in range(eval_steps):
            reports += forward_backward(data_iterator=iterator, forward_only=True)
    model.train()
    return mean_loss(reports, launch.device)
