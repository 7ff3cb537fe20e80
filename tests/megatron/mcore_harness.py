"""Shared set-up for the Megatron-Core tests: process groups on gloo, tiny NSA GPT models, batches.

Used by the single-process tests (pytest's own process) and by megatron_parallel_worker.py (torchrun).
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 96


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env() -> dict:
    """Environment for child processes: the repository importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def run_torchrun(script: Path, nproc: int, args, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", str(script), *map(str, args)]
    return subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def init_single_process() -> None:
    """A gloo world of one process with Megatron's parallel state (TP = PP = CP = 1)."""
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
    set_parallel(tp=1, pp=1)


def set_parallel(tp: int = 1, pp: int = 1) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def tiny_config(**overrides):
    """A 2-layer NSA model small enough for CPU, with blocks small enough that every branch matters
    at ~40 tokens: l=8, d=4, l'=8, n=3, w=8; 4 query heads in 2 KV groups; d_k=12, d_v=8."""
    from megatron_nsa import NSATransformerConfig

    return NSATransformerConfig(**tiny_fields(**overrides))


# Megatron-LM's values (after its validate_args) of the flags megatron_nsa.megatron_lm reads, besides the
# model's sizes: what `pretrain_gpt.py --transformer-impl local --position-embedding-type none` gives.
MEGATRON_LM_ARGS = dict(
    spec=None, yaml_cfg=None, attention_backend="auto", num_experts=None, experimental_attention_variant=None,
    heterogeneous_layers_config_path=None, mtp_num_layers=None, multi_latent_attention=False,
    rotary_interleaved=False, hybrid_context_parallel=False, transformer_impl="local", context_parallel_size=1,
    tensor_model_parallel_size=1, sft=False, position_embedding_type="none", rotary_base=10000, rotary_percent=1.0,
    apply_rope_fusion=True, create_attention_mask_in_dataloader=True, normalization="LayerNorm", qk_layernorm=False, attention_dropout=0.0, seq_length=256,
)


def megatron_lm_args(**fields):
    """The args namespace Megatron-LM's pretrain_gpt would hold for a model with these NSATransformerConfig
    `fields`: nsa_* ones given as --nsa-* flags (parsed by megatron_nsa.megatron_lm's own parser, the
    value head dim as --kv-channels), the others as Megatron-LM's args; resolved as the entry point does."""
    import argparse

    from megatron_nsa.megatron_lm.arguments import add_nsa_arguments, flag_name, resolve_nsa_arguments

    values = dict(MEGATRON_LM_ARGS)
    flags = []
    for name, value in fields.items():
        if name == "nsa_v_head_dim":
            values["kv_channels"] = value
        elif name.startswith("nsa_") and isinstance(value, bool):
            flags.append(flag_name(name) if value else flag_name(name).replace("--", "--no-", 1))
        elif name.startswith("nsa_"):
            flags += [flag_name(name), "none" if value is None else str(value)]
        else:
            values[name] = value
    args = add_nsa_arguments(argparse.ArgumentParser()).parse_args(flags)
    for name, value in values.items():
        setattr(args, name, value)
    return resolve_nsa_arguments(args, have_transformer_engine=False)


def config_from_megatron_lm_args(args, config_class):
    """What Megatron-LM's core_transformer_config_from_args does with the fields: copy args by name."""
    import dataclasses

    return config_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)
                           if hasattr(args, f.name)})


def config_from_flags(**overrides):
    """tiny_config's model (with `overrides`), built as megatron_nsa.megatron_lm.pretrain_gpt builds it."""
    from megatron_nsa.megatron_lm.arguments import nsa_transformer_config

    return nsa_transformer_config(megatron_lm_args(**tiny_fields(**overrides)), config_from_megatron_lm_args)


def tiny_fields(**overrides) -> dict:
    fields = dict(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, nsa_qk_head_dim=12, nsa_v_head_dim=8,
        ffn_hidden_size=64, nsa_compress_block_size=8, nsa_compress_stride=4, nsa_select_block_size=8,
        nsa_select_count=3, nsa_window_size=8, nsa_compression="linear", nsa_backend="torch", nsa_rotary_base=10000.0,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        init_method_std=0.05,
    )
    fields.update(overrides)
    return fields


def build_gpt(config, seed: int, pre_process: bool = True, post_process: bool = True,
              position_embedding_type: str = "none", share_embeddings: bool = True, spec=None):
    """A GPTModel of NSA layers (the block spec, so that sequence parallelism works without apex)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_nsa.spec import get_gpt_decoder_block_nsa_spec

    torch.manual_seed(seed)
    if torch.cuda.is_available():  # Megatron's dropout forks the model-parallel CUDA RNG on GPUs
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return GPTModel(
        config, spec if spec is not None else get_gpt_decoder_block_nsa_spec(config), vocab_size=VOCAB,
        max_sequence_length=256,
        pre_process=pre_process, post_process=post_process, position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=share_embeddings,
    )


def token_batch(seed: int, batch: int, seq_len: int):
    """input ids, labels [b, s] and position ids [b, s] (0 .. s-1)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, seq_len + 1), generator=generator)
    positions = torch.arange(seq_len)[None].expand(batch, seq_len)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), positions


class _CudaDevicesOnCpu(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.cuda,):
            return args[0]
        return func(*args, **kwargs)


def _is_cuda(device) -> bool:
    return isinstance(device, int) or (device is not None and torch.device(device).type == "cuda")


@contextlib.contextmanager
def _no_rng_fork(self, name=None):
    yield


@contextlib.contextmanager
def megatron_cuda_calls_on_cpu():
    """Test-only: let Megatron-Core code that hard-codes CUDA (sequence-parallel collectives,
    pipeline schedules and p2p buffers, GPTModel's rotary table) run on a CPU-only machine, by
    sending CUDA placements to the CPU and skipping the CUDA RNG fork around dropout (the tests
    use dropout 0). NSA's own code never needs this."""
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    saved = torch.cuda.current_device, torch.cuda.synchronize, CudaRNGStatesTracker.fork
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    CudaRNGStatesTracker.fork = _no_rng_fork
    try:
        with _CudaDevicesOnCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, CudaRNGStatesTracker.fork = saved
