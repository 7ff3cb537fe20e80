"""Does in-context recall emerge at short length? A learning-rate sweep for NSA, then its dense twin.

    python -m experiments.retrieval_emergence [--recipe configs/retrieval_emergence_cpu.yaml]
        [--lrs 3e-4 1e-3 3e-3] [--steps 400] [--out OUT] [--variant NAME] [key=value ...]

(from the repository root). Trains the recipe (NSA) once per learning rate with the project's trainer
(`python -m megatron_nsa.training.train`, one process each, same samples in the same order), picks the
rate with the lowest final validation loss on answers, trains the dense twin (model.attention=dense) at
that rate on the same samples and steps, then runs the needle test at the trained length on every final
checkpoint (megatron_nsa.eval.needle, depths 0-100%). Writes OUT/<run>/{train.log, metrics.jsonl,
needle.json} and the report benchmarks/results/retrieval_emergence_<cpu|gpu>[_<variant>].{json,md}
(validation loss on answers against steps for every run, needle accuracy per depth). Checkpoints stay in
OUT (a fresh OUT for each sweep: the trainer refuses to start afresh in a directory that holds a run).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List

import numpy

from benchmarks.recording import gpu_tag, recorded, recorded_line, result_stem
from megatron_nsa.data.retrieval import FIRST_KEY_ID, VALID_STREAM, RetrievalDataset, RetrievalFormat
from megatron_nsa.training.config import load_recipe

DEPTHS = (0, 25, 50, 75, 100)


def train(recipe: str, name: str, overrides: List[str], out: str) -> Dict:
    """One training run in its own process -> {name, overrides, validation [(step, loss)], wall_s, checkpoint}."""
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    checkpoint = os.path.join(run_dir, "checkpoints")
    command = [sys.executable, "-m", "megatron_nsa.training.train", recipe, *overrides,
               f"checkpoint.dir={checkpoint}", f"logging.metrics_file={metrics}"]
    start = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    wall_s = time.time() - start
    with open(metrics) as f:
        lines = [json.loads(line) for line in f]
    validation = [(line["step"], line["validation_loss"]) for line in lines if "validation_loss" in line]
    print(f"{name}: validation loss {validation[-1][1]:.4f} after {validation[-1][0]} steps, {wall_s:.0f} s",
          flush=True)
    return {"name": name, "overrides": overrides, "validation": validation, "wall_s": round(wall_s, 1),
            "checkpoint": checkpoint}


def needle(run: Dict, length: int, samples: int, selections: bool) -> None:
    """Adds to `run` the needle accuracy per depth (percent) at `length` tokens on its final checkpoint and,
    with `selections` (NSA), the share of layers x KV heads whose selected blocks hold the needle."""
    path = os.path.join(os.path.dirname(run["checkpoint"]), "needle.json")
    subprocess.run([sys.executable, "-m", "megatron_nsa.eval.needle", "--checkpoint", run["checkpoint"],
                    "--lengths", str(length), "--depths", *map(str, DEPTHS), "--samples", str(samples),
                    "--format", "retrieval", "--json", path, *(["--selections"] if selections else [])],
                   check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        result = json.load(f)
    run["needle"] = {depth: 100.0 * accuracy for depth, accuracy in result["accuracy"][str(length)].items()}
    if selections:
        run["needle_block_selected"] = {depth: 100.0 * share
                                        for depth, share in result["needle_block_selected"][str(length)].items()}


def key_blind_loss(recipe, num_samples: int) -> float:
    """Answer loss of the best model that knows the facts stated so far but not which key holds which value:
    each value weighted by the number of facts that hold it (a query asks a uniformly drawn fact), on the
    recipe's validation samples. Only a loss below it is recall by key."""
    fmt = RetrievalFormat.of(recipe.retrieval)
    dataset = RetrievalDataset(fmt, recipe.data.seq_length, num_samples, recipe.training.seed, VALID_STREAM)
    losses = []
    for index in range(num_samples):
        item = dataset[index]
        tokens = item["tokens"]  # [seq_length]
        is_key = (tokens >= FIRST_KEY_ID) & (tokens < fmt.first_value_id)  # [seq_length]
        for position in numpy.flatnonzero(item["loss_mask"]):
            starts = numpy.flatnonzero(is_key[:position])  # earlier records (their keys)
            facts = dict(zip(tokens[starts].tolist(), tokens[starts + 1].tolist()))  # key -> its value
            held = sum(value == item["labels"][position] for value in facts.values())
            losses.append(-math.log(held / len(facts)))
    return float(numpy.mean(losses))


def report(summary: Dict) -> str:
    runs = summary["runs"]
    steps = [step for step, _ in runs[0]["validation"]]
    lines = [f"# Retrieval emergence at {summary['seq_length']} tokens ({summary['device']})", "",
             recorded_line(summary["recorded"]), "",
             f"Recipe `{summary['recipe']}` trained by `python -m experiments.retrieval_emergence` "
             f"(overrides: `{' '.join(summary['overrides']) or 'none'}`), {summary['steps']} steps of "
             f"{summary['tokens_per_step']:,} tokens. Validation loss on the answer tokens (guessing among "
             f"{summary['num_values']} values: ln {summary['num_values']} = {math.log(summary['num_values']):.3f}; "
             f"knowing the values stated so far but not their keys: {summary['key_blind_loss']:.3f}, "
             "so only a loss below that is recall by key):",
             "", "| run | " + " | ".join(f"step {s}" for s in steps) + " | wall s |",
             "|---|" + "---|" * (len(steps) + 1)]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(f"{loss:.3f}" for _, loss in run["validation"])
                     + f" | {run['wall_s']:.0f} |")
    lines += ["", f"Needle accuracy at {summary['seq_length']} tokens ({summary['needle_samples']} samples per "
              "depth; 0% = the first token, 100% = just before the question):", "",
              "| run | " + " | ".join(f"{d}%" for d in DEPTHS) + " |", "|---|" + "---|" * len(DEPTHS)]
    for run in runs:
        lines.append(f"| {run['name']} | " + " | ".join(f"{run['needle'][str(d)]:.0f}" for d in DEPTHS) + " |")
    lines += ["", "NSA: share of layers x KV heads whose selected blocks at the question hold the needle (percent):",
              "", "| run | " + " | ".join(f"{d}%" for d in DEPTHS) + " |", "|---|" + "---|" * len(DEPTHS)]
    for run in runs:
        if "needle_block_selected" in run:
            lines.append(f"| {run['name']} | "
                         + " | ".join(f"{run['needle_block_selected'][str(d)]:.0f}" for d in DEPTHS) + " |")
    lines += ["", f"Best NSA learning rate: {summary['best_lr']:g} (lowest final validation loss); the dense twin "
              "trained at that rate on the same samples and steps.", "",
              "Reading the needle tables: the needle is a fact stated once, so a model that does not recall by key "
              "scores at chance: one in the number of distinct values in the context (about 1 in 7 with 8 facts of "
              f"16 values), at worst 1 / {summary['num_values']} = {100 / summary['num_values']:.0f}%. The needle's block is "
              "always selected at depths 0% and 100%, which fall in NSA's always-selected initial and local blocks; "
              "only the middle depths test the selection.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="configs/retrieval_emergence_cpu.yaml")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--needle-samples", type=int, default=40)
    parser.add_argument("--out", default="checkpoints/retrieval_emergence")
    parser.add_argument("--variant", default=None)
    parser.add_argument("--report", metavar="SUMMARY_JSON", default=None,
                        help="rewrite the markdown report of an earlier sweep's JSON, training nothing")
    parser.add_argument("overrides", nargs="*", help="recipe overrides section.key=value for every run")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            summary = json.load(f)
        if "key_blind_loss" not in summary:  # a summary written before the baseline was recorded
            recipe = load_recipe(summary["recipe"], summary["overrides"])
            summary["key_blind_loss"] = key_blind_loss(recipe, recipe.training.eval_steps
                                                       * recipe.training.global_batch_size)
            with open(args.report, "w") as f:
                json.dump(summary, f, indent=1)
        with open(os.path.splitext(args.report)[0] + ".md", "w") as f:
            f.write(report(summary))
        return
    if args.steps < 1:
        parser.error(f"--steps={args.steps} is not allowed: at least 1")
    if any(lr <= 0 for lr in args.lrs):
        parser.error(f"--lrs={args.lrs} is not allowed: every rate must be > 0")
    overrides = [*args.overrides, f"training.train_steps={args.steps}"]
    recipe = load_recipe(args.recipe, overrides)  # bad recipes and overrides stop here, before any training
    if os.path.exists(args.out):
        parser.error(f"--out={args.out} exists: give each sweep a fresh directory (its runs' checkpoints go there)")
    runs = [train(args.recipe, f"nsa_lr{lr:g}", [*overrides, f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}"],
                  args.out) for lr in args.lrs]
    best = min(range(len(runs)), key=lambda i: runs[i]["validation"][-1][1])
    best_lr = args.lrs[best]
    runs.append(train(args.recipe, f"dense_lr{best_lr:g}",
                      [*runs[best]["overrides"], "model.attention=dense"], args.out))
    for run in runs:
        needle(run, recipe.data.seq_length, args.needle_samples, selections=run["name"].startswith("nsa"))
    device = "cpu" if recipe.training.device == "cpu" else None
    tag = gpu_tag(device_name=device)
    summary = {"recorded": recorded(), "device": "CPU" if tag == "cpu" else tag, "recipe": args.recipe,
               "overrides": args.overrides, "steps": args.steps, "seq_length": recipe.data.seq_length,
               "tokens_per_step": recipe.data.seq_length * recipe.training.global_batch_size,
               "num_values": recipe.retrieval.num_values, "needle_samples": args.needle_samples,
               "key_blind_loss": key_blind_loss(recipe, recipe.training.eval_steps * recipe.training.global_batch_size),
               "best_lr": best_lr, "runs": runs}
    stem = result_stem("retrieval_emergence", tag, args.variant)
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(report(summary))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
