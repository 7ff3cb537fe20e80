"""Process groups, seeds, the data-parallel wrapper and the forward/backward schedule.

On CUDA: NCCL, megatron DDP (gradient reduction overlapped with backward), Float16Module for bf16,
and megatron's pipeline schedules from get_forward_backward_func. On CPU: gloo and the stand-ins
of host_fallback.py.
"""
from __future__ import annotations

import dataclasses
import os
import random
import socket

import numpy
import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from .config import Recipe, check_data_paths, check_layout, wants_cuda
from .host_fallback import HostDataParallel, forward_backward_on_host


@dataclasses.dataclass
class Launch:
    """Where this process sits."""

    rank: int
    world_size: int
    device: torch.device
    bf16: bool
    dp_rank: int
    dp_size: int
    cp_rank: int
    cp_size: int

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_logger(self) -> bool:
        """The rank that prints and writes TensorBoard: the last pipeline stage of the first replica."""
        return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                and self.dp_rank == 0 and self.cp_rank == 0)


def _pick_device(recipe: Recipe) -> torch.device:
    if wants_cuda(recipe):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def initialize(recipe: Recipe) -> Launch:
    """Check the layout, start torch.distributed and megatron's parallel groups, seed every RNG."""
    if "RANK" not in os.environ:  # started without torchrun: a single process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    world_size = int(os.environ["WORLD_SIZE"])
    device = _pick_device(recipe)
    check_layout(recipe, world_size, device.type == "cuda")
    check_data_paths(recipe)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    par = recipe.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
    )
    seed = recipe.training.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    precision = recipe.training.precision
    return Launch(
        rank=dist.get_rank(),
        world_size=world_size,
        device=device,
        bf16=precision == "bf16" or (precision == "auto" and device.type == "cuda"),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_size=parallel_state.get_context_parallel_world_size(),
    )


def wrap_model(model: torch.nn.Module, recipe: Recipe, launch: Launch) -> torch.nn.Module:
    """The data-parallel wrapper the optimizer and the schedule work with."""
    config = model.config
    if not launch.on_cuda:
        return HostDataParallel(config, model)
    if launch.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=recipe.parallel.overlap_grad_reduce,
        use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
        overlap_param_gather=recipe.parallel.overlap_param_gather,
    )
    wrapped = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    wrapped.broadcast_params()
    return wrapped


def connect_schedule(model: torch.nn.Module, optimizer, launch: Launch) -> None:
    """Hooks the schedule calls: no_sync while accumulating micro-batches, overlapped grad reduction,
    gradient finalization (data-parallel / tensor-parallel / embedding reductions), loss scaling."""
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    if launch.on_cuda:
        config.grad_scale_func = optimizer.scale_loss
        if model.ddp_config.overlap_grad_reduce:
            config.grad_sync_func = model.start_grad_sync
        if model.ddp_config.overlap_param_gather:
            config.param_sync_func = model.start_param_sync


def forward_backward_function(launch: Launch):
    return get_forward_backward_func() if launch.on_cuda else forward_backward_on_host
