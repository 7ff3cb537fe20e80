"""Validation loss of a checkpoint:

    python -m megatron_nsa.eval.loss --checkpoint CKPT_DIR [--data PREFIX ...] [--seq-length N]
        [--batches N] [--batch-size N] [--json OUT.json] [--recipe CONFIG.yaml] [section.key=value ...]

Without --data: the validation split of the checkpoint's own recipe; by default the same samples the
training run validated on (training.eval_steps global batches, in batches of training.micro_batch_size), so
the loss is the run's last validation loss. With --data: every document of those indexed datasets (PREFIX.bin / PREFIX.idx, built by
megatron_nsa.data.build_dataset). Prints the mean loss per target token, its perplexity and bits per
token (per byte with the byte tokenizer). For data.source=retrieval the loss covers the answer tokens only.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

from megatron_nsa.data.build_dataset import dataset_exists
from megatron_nsa.training.config import BadInputError

from .checkpoints import EvalInputError, check_length, checkpoint_recipe, read_meta, resolve_checkpoint, \
    trained_positions
from .report import write_json


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-nsa-eval-loss", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint.dir or one step_XXXXXXXX directory")
    parser.add_argument("--data", nargs="+", metavar="PREFIX", help="indexed dataset prefixes (all documents used)")
    parser.add_argument("--seq-length", type=int, help="tokens per sample (default: the trained data.seq_length)")
    parser.add_argument("--batches", type=int, help="batches to evaluate (default: the recipe's validation, "
                        "training.eval_steps * global_batch_size samples)")
    parser.add_argument("--batch-size", type=int, help="samples per batch (default: training.micro_batch_size)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--recipe", help="the training recipe, for checkpoints that do not store theirs")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before megatron-core is imported."""
    for name in ("batches", "batch_size", "seq_length"):
        value = getattr(args, name)
        if value is not None and value < (2 if name == "seq_length" else 1):
            raise EvalInputError(f"--{name.replace('_', '-')} {value} is not allowed: it must be >= "
                                 f"{2 if name == 'seq_length' else 1}")
    for prefix in args.data or ():
        if not dataset_exists(prefix):
            missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
            raise EvalInputError(f"--data {prefix!r} is missing {', '.join(missing)}; give the prefix of an indexed "
                                 "dataset (PREFIX.bin + PREFIX.idx, see megatron_nsa.data.build_dataset)")


def validation_loss(loaded, batches: int, batch_size: int) -> dict:
    """Mean loss over the first batches * batch_size validation samples of loaded.recipe's data."""
    import torch

    from megatron_nsa.data.datasets import build_datasets, micro_batches

    _, valid = build_datasets(loaded.recipe, loaded.tokenizer, 1, batches * batch_size)
    if valid is None:
        raise EvalInputError(f"data.split={loaded.recipe.data.split!r} leaves no validation documents; "
                             "pass --data PREFIX or an override such as data.split=98,2,0")
    iterator = micro_batches(valid, 0, batch_size, 0, 1, loaded.device)
    loss_sum = torch.zeros([], dtype=torch.float64)
    tokens = torch.zeros([], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(batches):
            batch = next(iterator)
            losses = loaded.token_losses(batch["tokens"], batch["labels"])  # [b, s]
            mask = batch["loss_mask"].float()
            loss_sum += (losses * mask).sum().double().cpu()
            tokens += mask.sum().double().cpu()
    loss = (loss_sum / tokens).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": loss / math.log(2),
            "tokens": int(tokens.item())}


def validation_batches(recipe, batches: Optional[int], batch_size: Optional[int]):
    """(batches, batch size): what the arguments give, else the recipe's validation: training.eval_steps
    global batches = eval_steps * global_batch_size samples, in micro-batches."""
    train = recipe.training
    batch_size = batch_size or train.micro_batch_size
    samples = train.eval_steps * train.global_batch_size
    return batches or max(1, -(-samples // batch_size)), batch_size


def run(args: argparse.Namespace) -> dict:
    check_args(args)
    overrides = list(args.overrides)
    if args.data:
        overrides += ["data.source=indexed", f"data.paths=[{', '.join(args.data)}]", "data.split=0,1,0"]
    step_dir = resolve_checkpoint(args.checkpoint)
    meta = read_meta(step_dir)
    positions = trained_positions(checkpoint_recipe(step_dir, meta, args.recipe, []))
    recipe = checkpoint_recipe(step_dir, meta, args.recipe, overrides)
    seq_length = args.seq_length or recipe.data.seq_length
    check_length(recipe, positions, seq_length, "--seq-length")

    from .model_loader import load_model

    loaded = load_model(step_dir, args.recipe, overrides, args.device)
    loaded.recipe.data.seq_length = seq_length
    batches, batch_size = validation_batches(loaded.recipe, args.batches, args.batch_size)
    result = validation_loss(loaded, batches, batch_size)
    result.update(checkpoint=loaded.step_dir, step=loaded.step, attention=loaded.attention,
                  data=args.data or f"{loaded.recipe.data.source} (validation split)", seq_length=seq_length,
                  batches=batches, batch_size=batch_size)
    unit = "byte" if loaded.recipe.data.tokenizer == "bytes" else "token"
    print(f"{loaded.attention} checkpoint {loaded.step_dir} (step {loaded.step}), {result['data']}, "
          f"{result['tokens']:,} target tokens at seq length {seq_length}: loss {result['loss']:.4f} | "
          f"perplexity {result['perplexity']:.3f} | {result['bits_per_token']:.4f} bits per {unit}", flush=True)
    if args.json:
        write_json(args.json, result)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
