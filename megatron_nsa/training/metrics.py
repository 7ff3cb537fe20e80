"""What a run reports: one progress line per log interval, TensorBoard scalars, a loss-curve PNG.

The console's loss is the mean over the steps of its log interval; TensorBoard holds the same value as
train/loss_mean (at the log steps) and every step's own loss as train/loss.

TFLOP/s counts the model's own arithmetic per token (matmuls: 6 * weights; attention: 3x forward over
the keys each query actually attends: every earlier token for dense, compressed + selected + window
keys for NSA), so tokens/s is the fair NSA-vs-dense comparison and TFLOP/s tells hardware efficiency.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy
import torch

from megatron.core import parallel_state

GATE_BRANCHES = ("cmp", "slc", "win")


def mean_keys_per_query(seq_length: int, attention: str, nsa=None) -> float:
    """Average number of keys one query attends over positions 0..S-1 (causal)."""
    t = numpy.arange(seq_length, dtype=numpy.float64)
    if attention == "dense":
        return float((t + 1).mean())
    l, d, lp = nsa.compress_block_size, nsa.compress_stride, nsa.select_block_size
    compressed = numpy.where(t >= l - 1, numpy.floor((t - l + 1) / d) + 1, 0)
    selected = numpy.minimum(nsa.select_count * lp, t + 1)
    window = numpy.minimum(nsa.window_size, t + 1)
    return float((compressed + selected + window).mean())


def model_flops_per_token(model: torch.nn.Module, config, seq_length: int, attention: str, nsa=None) -> float:
    """Training FLOPs per token of the whole model (all tensor/pipeline shards), forward + backward."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    matmul_weights = 0
    for name, param in model.named_parameters():
        if param.dim() < 2 or "position_embeddings" in name:
            continue
        if "word_embeddings" in name and not getattr(model, "share_embeddings_and_output_weights", False):
            continue  # an untied input embedding is a lookup, not a matmul
        matmul_weights += param.numel() * (tp if getattr(param, "tensor_model_parallel", False) else 1)
    counts = torch.tensor([matmul_weights], dtype=torch.float64,
                          device="cuda" if torch.cuda.is_available() and next(model.parameters()).is_cuda else "cpu")
    torch.distributed.all_reduce(counts, group=parallel_state.get_pipeline_model_parallel_group())
    qk_dim = getattr(config, "qk_head_dim", None) or config.kv_channels
    v_dim = getattr(config, "v_head_dim", None) or config.kv_channels
    attention_forward = 2 * config.num_attention_heads * (qk_dim + v_dim) * mean_keys_per_query(seq_length, attention, nsa)
    return 6 * counts.item() + 3 * config.num_layers * attention_forward


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / (2**30 if sys.platform == "darwin" else 2**20)


class GateMonitor:
    """Mean NSA gate value per branch, collected by forward pre-hooks on the NSA cores while training."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from megatron_nsa.attention import NSACoreAttention

        self.device = device
        self.sums: Optional[torch.Tensor] = None
        self.calls = 0
        for module in model.modules():
            if isinstance(module, NSACoreAttention):
                module.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if not module.training or len(args) < 4:
            return
        gates = args[3].detach()  # [b, t, H_q, 3]
        means = gates.float().mean(dim=tuple(range(gates.dim() - 1)))
        self.sums = means if self.sums is None else self.sums + means
        self.calls += 1

    def pop(self) -> Dict[str, float]:
        """Means since the last call over every layer of the model (a collective over tensor and pipeline ranks)."""
        totals = torch.zeros(4, dtype=torch.float32, device=self.device)
        if self.sums is not None:
            totals[:3] = self.sums
            totals[3] = self.calls
        torch.distributed.all_reduce(totals, group=parallel_state.get_model_parallel_group())
        self.sums, self.calls = None, 0
        if totals[3] == 0:
            return {}
        return dict(zip(GATE_BRANCHES, (totals[:3] / totals[3]).tolist()))


class BlockScoreLossMonitor:
    """Mean block score loss (megatron_nsa/block_score_loss.py) of the NSA layers' training forwards."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        from megatron_nsa.attention import NSASelfAttention

        self.device = device
        self.layers = [module for module in model.modules()
                       if isinstance(module, NSASelfAttention) and module.settings.block_score_loss_coeff > 0]

    def pop(self) -> Optional[float]:
        """The mean since the last call over every layer of the model (a collective over tensor and pipeline
        ranks); None when the loss is off."""
        totals = torch.zeros(2, dtype=torch.float32, device=self.device)
        for layer in self.layers:
            totals[0] += layer.block_score_loss_sum.to(self.device)
            totals[1] += layer.block_score_loss_count
            layer.block_score_loss_sum = torch.zeros_like(layer.block_score_loss_sum)
            layer.block_score_loss_count = 0
        torch.distributed.all_reduce(totals, group=parallel_state.get_model_parallel_group())
        return (totals[0] / totals[1]).item() if totals[1] > 0 else None


class Metrics:
    """Accumulates steps between log lines; prints on the logging rank and writes TensorBoard."""

    def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, num_gpus: int,
                 device: torch.device, tensorboard_dir: Optional[str], metrics_file: Optional[str], is_logger: bool):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.num_gpus = num_gpus
        self.device = device
        self.is_logger = is_logger
        self.unit = "GPU" if device.type == "cuda" else "process"
        self.writer = None
        if is_logger and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)
        self.metrics_file = metrics_file if is_logger else None
        if self.metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.metrics_file)), exist_ok=True)
        self._reset()
        self.recent_step_time: Optional[float] = None
        self.history: Dict[str, List[Tuple[int, float]]] = {"train": [], "validation": []}  # (step, loss)

    def _reset(self):
        self.loss_sum, self.steps, self.seconds = 0.0, 0, 0.0

    def _append(self, record: dict) -> None:
        if self.metrics_file:
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, loss: float, lr: float, grad_norm: Optional[float], seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.seconds += seconds
        self.history["train"].append((step, loss))
        if self.writer:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                self.writer.add_scalar("train/grad_norm", grad_norm, step)

    def log(self, step: int, lr: float, grad_norm: Optional[float], gate_means: Dict[str, float],
            block_score_loss: Optional[float] = None) -> Dict[str, float]:
        """Report the steps since the last log line; returns the reported values."""
        step_time = self.seconds / max(self.steps, 1)
        self.recent_step_time = step_time
        tokens_per_second = self.tokens_per_step / step_time
        values = {
            "loss": self.loss_sum / max(self.steps, 1),
            "tokens_per_second": tokens_per_second,
            "tflops_per_gpu": tokens_per_second * self.flops_per_token / self.num_gpus / 1e12,
            "step_time": step_time,
            "peak_memory_gib": peak_memory_gib(self.device),
        }
        if block_score_loss is not None:
            values["block_score_loss"] = block_score_loss
        if self.is_logger:
            left = time.strftime("%H:%M:%S", time.gmtime(step_time * (self.total_steps - step)))
            norm = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
            gates = " ".join(f"{k}={v:.3f}" for k, v in gate_means.items())
            print(f"step {step:>6}/{self.total_steps} | loss {values['loss']:.4f} | lr {lr:.2e} | grad norm {norm} | "
                  f"{tokens_per_second:,.0f} tok/s | {values['tflops_per_gpu']:.2f} TFLOP/s/{self.unit} | "
                  f"mem {values['peak_memory_gib']:.2f} GiB | {left} left" + (f" | gates {gates}" if gates else "")
                  + (f" | block score loss {block_score_loss:.4f}" if block_score_loss is not None else ""),
                  flush=True)
            if self.writer:
                self.writer.add_scalar("train/loss_mean", values["loss"], step)
                self.writer.add_scalar("perf/tokens_per_second", tokens_per_second, step)
                self.writer.add_scalar("perf/tflops_per_gpu", values["tflops_per_gpu"], step)
                self.writer.add_scalar("perf/step_time_s", step_time, step)
                self.writer.add_scalar("perf/peak_memory_gib", values["peak_memory_gib"], step)
                for branch, value in gate_means.items():
                    self.writer.add_scalar(f"nsa/gate_{branch}", value, step)
                if block_score_loss is not None:
                    self.writer.add_scalar("nsa/block_score_loss", block_score_loss, step)
            self._append({"step": step, "lr": lr, "grad_norm": grad_norm, **values,
                          **{f"gate_{k}": v for k, v in gate_means.items()}})
        self._reset()
        return values

    def validation(self, step: int, loss: float) -> None:
        if self.is_logger:
            self.history["validation"].append((step, loss))
            print(f"step {step:>6}/{self.total_steps} | validation loss {loss:.4f}", flush=True)
            if self.writer:
                self.writer.add_scalar("val/loss", loss, step)
            self._append({"step": step, "validation_loss": loss})

    def write_loss_curve(self, path: str) -> Optional[str]:
        """The losses of this process's steps as a PNG at `path` (logging rank, matplotlib importable);
        returns the path written, or None."""
        if not self.is_logger or not self.history["train"]:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # an optional dependency: the curve is also in TensorBoard
            return None
        figure, axes = plt.subplots(figsize=(7, 4))
        for name, points in self.history.items():
            if points:
                steps, losses = zip(*points)
                axes.plot(steps, losses, label=f"{name} loss", marker="o" if name == "validation" else None)
        axes.set_xlabel("step")
        axes.set_ylabel("loss per token")
        axes.legend()
        axes.grid(alpha=0.3)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        return path

    def close(self) -> None:
        if self.writer:
            self.writer.close()
