"""Multi-process checks of the NSA GPT model, run by torchrun with 2 processes:

    python -m torch.distributed.run --nproc-per-node=2 tests/megatron/megatron_parallel_worker.py OUT.json \
        [--device cpu|cuda] [--backend torch|triton] [--scenarios tp,pp]

tp: the same model (same master weights) at TP=1, TP=2 and TP=2 with sequence parallelism:
    losses and full (gathered) gradients. pp: PP=1 and PP=2 trained for a few optimizer steps with
    Megatron's pipeline schedules from the same initial weights: the losses.
Rank 0 writes the measured differences as JSON; test_megatron_parallel.py asserts on them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
from functools import partial

import torch
import torch.distributed as dist

from mcore_harness import build_gpt, config_from_flags, megatron_cuda_calls_on_cpu, set_parallel, token_batch

TINY = {}  # mcore_harness.tiny_fields' defaults: CPU sized
GPU_SIZED = dict(hidden_size=256, nsa_qk_head_dim=64, nsa_v_head_dim=64, ffn_hidden_size=512,
                 nsa_compress_block_size=32, nsa_compress_stride=16, nsa_select_block_size=64, nsa_select_count=4, nsa_window_size=64)


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backend", choices=("torch", "triton"), default="torch")
    parser.add_argument("--scenarios", default="tp,pp")
    return parser.parse_args()


class Run:
    def __init__(self, args):
        self.device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
        self.sizes = GPU_SIZED if args.device == "cuda" else TINY
        self.seq_len = 256 if args.device == "cuda" else 40
        self.backend = args.backend

    def config(self, **overrides):
        """The model as megatron_nsa.megatron_lm.pretrain_gpt builds it from its command line."""
        return config_from_flags(nsa_backend=self.backend, **self.sizes, **overrides)

    def model(self, config, seed, **kwargs):
        return build_gpt(config, seed, **kwargs).to(self.device)

    def cuda_shim(self):
        return megatron_cuda_calls_on_cpu() if self.device.type == "cpu" else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Tensor (and sequence) parallelism


def _full(tensor, param, group):
    """The TP=1 view of a tensor-parallel parameter (or its gradient): gathered along its partition dim."""
    if not getattr(param, "tensor_model_parallel", False):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def _loss_and_grads(run, model, sequence_parallel=False):
    from megatron.core import parallel_state

    ids, labels, positions = (t.to(run.device) for t in token_batch(11, batch=2, seq_len=run.seq_len))
    with run.cuda_shim():  # Megatron's sequence-parallel collectives allocate on "cuda"
        loss = model(ids, positions, None, labels=labels).float().mean()
        loss.backward()
    group = parallel_state.get_tensor_model_parallel_group()
    weights, grads = {}, {}
    for name, param in model.named_parameters():
        grad = param.grad
        if sequence_parallel and getattr(param, "sequence_parallel", False):
            dist.all_reduce(grad, group=group)  # what finalize_model_grads does for these
        weights[name] = _full(param.detach(), param, group).float().cpu()
        grads[name] = _full(grad, param, group).float().cpu()
    return float(loss), weights, grads


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def scenario_tp(run):
    """TP=2 (with and without sequence parallelism) against TP=1, with per-head q/k norms: like the
    compressor, they are replicated on TP ranks and see only their rank's heads."""
    from megatron_nsa.spec import get_gpt_decoder_block_nsa_spec

    with_head_norms = lambda config: run.model(  # noqa: E731
        config, seed=3, spec=get_gpt_decoder_block_nsa_spec(config, qk_layernorm=True))
    set_parallel(tp=1)
    ref_loss, ref_weights, ref_grads = _loss_and_grads(run, with_head_norms(run.config()))
    results = {"tp1": {"loss": ref_loss, "compressor_grad_abs_max": max(
        float(g.abs().max()) for n, g in ref_grads.items() if ".compressor." in n)}}
    for sequence_parallel in (False, True):
        set_parallel(tp=2)
        config = run.config(tensor_model_parallel_size=2, sequence_parallel=sequence_parallel)
        loss, weights, grads = _loss_and_grads(run, with_head_norms(config), sequence_parallel)
        assert weights.keys() == ref_weights.keys(), sorted(set(weights) ^ set(ref_weights))
        results["tp2_sp" if sequence_parallel else "tp2"] = {
            "loss": loss,
            "weight_max_abs_diff": max(float((weights[n] - ref_weights[n]).abs().max()) for n in weights),
            "grad_max_rel_diff": {n: _max_rel_diff(grads[n], ref_grads[n]) for n in grads},
        }
    return results


# ---------------------------------------------------------------------------------------------
# Pipeline parallelism with Megatron's schedules


def _forward_step(run, data_iterator, model):
    ids, labels, positions = (t.to(run.device) for t in next(data_iterator))
    output = model(ids, positions, None, labels=labels)

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    return output, loss_func


def _train(run, model, steps=3, microbatches=2):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        batches = iter([token_batch(100 * step + m, batch=1, seq_len=run.seq_len) for m in range(microbatches)])
        with run.cuda_shim():
            stored = forward_backward(forward_step_func=partial(_forward_step, run), data_iterator=batches,
                                      model=[model], num_microbatches=microbatches, seq_length=run.seq_len,
                                      micro_batch_size=1, forward_only=False)
        optimizer.step()
        if stored:
            losses.append(float(sum(d["loss"] for d in stored) / len(stored)))
    return losses


def _global_name(model, name: str) -> str:
    """Parameter name in the PP=1 model: local layer index -> global layer index."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match is None:
        return name
    global_index = model.decoder.layers[int(match.group(1))].layer_number - 1
    return f"decoder.layers.{global_index}." + name[match.end():]


def scenario_pp(run):
    from megatron.core import parallel_state

    set_parallel(pp=1)
    model = run.model(run.config(pipeline_dtype=torch.float32), seed=5, share_embeddings=False)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    pp1_losses = _train(run, model)

    set_parallel(pp=2)
    config = run.config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    stage = run.model(config, seed=6, share_embeddings=False,
                      pre_process=parallel_state.is_pipeline_first_stage(),
                      post_process=parallel_state.is_pipeline_last_stage())
    with torch.no_grad():
        for name, param in stage.named_parameters():
            param.copy_(initial[_global_name(stage, name)])
    pp2_losses = _train(run, stage)  # only the last stage has losses
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, (pp2_losses, len(stage.decoder.layers)))
    return {"pp1_losses": pp1_losses, "pp2_losses": per_rank[-1][0],
            "pp2_layers_per_stage": [layers for _, layers in per_rank]}


def main():
    args = parse_args()
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    if args.device == "cuda":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    run = Run(args)
    scenarios = {"tp": scenario_tp, "pp": scenario_pp}
    results = {name: scenarios[name](run) for name in args.scenarios.split(",")}
    if dist.get_rank() == 0:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
