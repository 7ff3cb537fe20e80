"""CPU stand-ins for the megatron-core training parts that allocate on CUDA (0.16 through 0.19).

Megatron's DDP grad buffers, its optimizers (loss-scale and norm tensors), its schedules (token
counter) and dist_checkpointing's writer all create tensors on `torch.cuda.current_device()`. On a
CPU-only machine the loop uses these three small replacements with the same interfaces and the
same arithmetic (per-token loss: gradients summed over data-parallel ranks, then divided by the
global token count; Adam with decoupled weight decay; clipping by the global grad norm over
tensor-parallel shards). On CUDA the loop uses megatron-core's own classes.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import get_model_config


class HostDataParallel(MegatronModule):
    """Data parallelism on the host: gradients accumulate in param.grad over micro-batches and are
    summed over the data-parallel (x context-parallel) group in finish_grad_sync."""

    def __init__(self, config, module: torch.nn.Module):
        super().__init__(config=config)
        self.module = module
        self.ddp_config = DistributedDataParallelConfig()
        self.group = parallel_state.get_data_parallel_group(with_context_parallel=True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        yield

    def zero_grad_buffer(self) -> None:
        for param in self.module.parameters():
            param.grad = None

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads or dist.get_world_size(self.group) == 1:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.group)
        for grad, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(synced)

    def scale_gradients(self, scale) -> None:
        for param in self.module.parameters():
            if param.grad is not None:
                param.grad.mul_(scale)

    def sharded_state_dict(self, *args, **kwargs):
        return self.module.sharded_state_dict(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)


def forward_backward_on_host(*, forward_step_func, data_iterator, model, num_microbatches: int,
                             seq_length: int, micro_batch_size: int, forward_only: bool = False, **unused):
    """megatron's forward_backward_no_pipelining for per-token losses: the loss function returns
    (loss summed over tokens, token count, report); gradients are finalized with the global count."""
    model = model[0] if isinstance(model, list) else model
    data_iterator = data_iterator[0] if isinstance(data_iterator, list) else data_iterator
    config = get_model_config(model)
    reports = []
    total_tokens = torch.zeros([], dtype=torch.int)
    for _ in range(num_microbatches):
        output, loss_func = forward_step_func(data_iterator, model)
        loss_sum, num_tokens, report = loss_func(output)
        total_tokens += num_tokens.to(torch.int)
        reports.append(report)
        if not forward_only:
            loss_sum.backward()
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model], total_tokens)
    return reports


def _no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """megatron's default: biases and 1-D parameters (norm weights) get no weight decay."""
    return name.endswith(".bias") or param.dim() == 1


class HostAdam:
    """Adam with decoupled weight decay and global-norm clipping, with the MegatronOptimizer calls the
    loop makes: zero_grad, step -> (updated, grad_norm, num_zeros), param_groups, state dicts."""

    def __init__(self, model_chunks: List[torch.nn.Module], lr: float, weight_decay: float, betas, eps: float,
                 clip_grad: float):
        decay, no_decay = [], []
        for chunk in model_chunks:
            for name, param in chunk.named_parameters():
                if param.requires_grad:
                    (no_decay if _no_weight_decay(name, param) else decay).append(param)
        self.params = decay + no_decay
        self.clip_grad = clip_grad
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}],
            lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
        )

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def grad_norm(self) -> float:
        """L2 norm of the whole model's gradient: each tensor-parallel shard counted once."""
        squares = torch.zeros([], dtype=torch.float64)
        for param in self.params:
            if param.grad is not None and tensor_parallel.param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.double().pow(2).sum()
        dist.all_reduce(squares, group=parallel_state.get_model_parallel_group())
        return squares.sqrt().item()

    def step(self):
        norm = self.grad_norm()
        if self.clip_grad > 0:
            coefficient = self.clip_grad / (norm + 1.0e-6)
            if coefficient < 1.0:
                for param in self.params:
                    if param.grad is not None:
                        param.grad.mul_(coefficient)
        self.optimizer.step()
        return True, norm, None

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)
