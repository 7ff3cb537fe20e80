"""A GPTModel of NSA layers under context parallelism against the same model without it (torchrun, gloo):

    python -m torch.distributed.run --nproc-per-node=N tests/context_parallel/megatron_cp_worker.py OUT.json TP CP \
        [MODES]

Every rank first runs the model at TP = CP = 1 on the whole batch (the reference), then at TP x CP
(N = TP * CP) on its share of the sequence (Megatron's get_batch_on_this_cp_rank), for an unpacked batch of 2 rows
and for packed documents (THD, global cu_seqlens), once per exchange mode in MODES (comma-separated
nsa_cp_exchange values, default 'allgather'). Per-token losses must match the reference's
tokens; parameter gradients, summed over the CP group (what Megatron's DDP does over its
data-and-context-parallel group) and gathered over TP, must match the reference's. NSA's own
RoPE at global positions, learned 'linear' compression; the model is built as
megatron_nsa.megatron_lm.pretrain_gpt builds it from its flags. The model runs in float64: the gradient of
the keys' compression position embedding nearly cancels (a shift common to all compressed keys
leaves the softmax unchanged; only RoPE breaks the symmetry), so float32 leaves it mostly noise.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "megatron"))  # mcore_harness

VOCAB = 64
SEQ_LEN = 64  # chunks of 16 tokens at CP = 2: two selection blocks, two windows
DOC_BOUNDS = [0, 11, 40, 41, 64]


def set_parallel(tp: int, cp: int) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)


def build_model(tp: int, cp: int, exchange: str = "allgather"):
    """The model as megatron_nsa.megatron_lm.pretrain_gpt builds it from `--tensor-model-parallel-size TP
    --context-parallel-size CP --position-embedding-type none --nsa-cp-exchange MODE ...`."""
    from megatron.core.models.gpt import GPTModel

    from mcore_harness import config_from_flags
    from megatron_nsa import get_gpt_layer_nsa_spec

    config = config_from_flags(
        nsa_compression="linear", nsa_backend="torch", tensor_model_parallel_size=tp, context_parallel_size=cp,
        nsa_cp_exchange=exchange, nsa_cp_node_size=1 if exchange == "hierarchical" else None, seq_length=SEQ_LEN,
    )
    torch.manual_seed(7)
    model = GPTModel(config, get_gpt_layer_nsa_spec(), vocab_size=VOCAB, max_sequence_length=SEQ_LEN,
                     position_embedding_type="none")
    return model.double()


def megatron_cp_share(batch: dict) -> dict:
    """This CP rank's share of the batch as Megatron-LM's get_batch hands it over: tokens, labels and
    positions through Megatron's get_batch_on_this_cp_rank (its load-balanced zigzag layout), document
    boundaries (cu_seqlens) global, as Megatron-LM's per-sequence balancing leaves them."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    sequences = {key: value for key, value in batch.items() if key != "cu_seqlens"}
    return {**get_batch_on_this_cp_rank(sequences), "cu_seqlens": batch["cu_seqlens"]}


def batches():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ_LEN + 1), generator=generator)
    unpacked = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                "position_ids": torch.arange(SEQ_LEN).expand(2, SEQ_LEN), "cu_seqlens": None}
    packed = {"tokens": tokens[:1, :-1], "labels": tokens[:1, 1:],
              "position_ids": torch.arange(SEQ_LEN)[None], "cu_seqlens": torch.tensor(DOC_BOUNDS, dtype=torch.int32)}
    return {"unpacked": unpacked, "packed": packed}


def per_token_loss(model, batch):
    from megatron.core.packed_seq_params import PackedSeqParams

    packed = None
    if batch["cu_seqlens"] is not None:
        cu, longest = batch["cu_seqlens"], int((batch["cu_seqlens"][1:] - batch["cu_seqlens"][:-1]).max())
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"], packed_seq_params=packed)


def full_grads(model, cp_group, tp_group):
    """name -> gradient as at TP = 1, summed over the CP group."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad, group=cp_group)
        if getattr(param, "tensor_model_parallel", False):
            parts = [torch.empty_like(grad) for _ in range(dist.get_world_size(tp_group))]
            dist.all_gather(parts, grad.contiguous(), group=tp_group)
            grad = torch.cat(parts, dim=param.partition_dim)
        grads[name] = grad
    return grads


def compare(tp: int, cp: int, modes=("allgather",)):
    from megatron.core import parallel_state

    from megatron.core.utils import get_batch_on_this_cp_rank

    results = {}
    for kind, batch in batches().items():
        set_parallel(1, 1)
        reference = build_model(1, 1)
        ref_loss = per_token_loss(reference, batch)  # [b, S]
        ref_loss.sum().backward()
        ref_grads = {n: p.grad for n, p in reference.named_parameters()}

        for mode in modes:
            set_parallel(tp, cp)
            model = build_model(tp, cp, mode)
            cp_group = parallel_state.get_context_parallel_group()
            loss = per_token_loss(model, megatron_cp_share(batch))
            loss.sum().backward()
            grads = full_grads(model, cp_group, parallel_state.get_tensor_model_parallel_group())
            expected_loss = get_batch_on_this_cp_rank({"tokens": ref_loss})["tokens"]
            assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
            results[f"{kind}/{mode}"] = _result(loss, expected_loss, grads, ref_grads)
    return results


def _result(loss, expected_loss, grads, ref_grads):
    return {
        "loss_max_abs_diff": float((loss - expected_loss).abs().max()),
        "loss_abs_max": float(expected_loss.abs().max()),
        "grad_abs_max": {n: float(ref_grads[n].abs().max()) for n in grads},
        "grad_max_rel_diff": {n: float((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max())
                              for n in grads},
    }


def main():
    out, tp, cp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    modes = tuple(sys.argv[4].split(",")) if len(sys.argv) > 4 else ("allgather",)
    dist.init_process_group("gloo")
    results = compare(tp, cp, modes)
    if dist.get_rank() == 0:
        with open(out, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
