"""One results file for retrieval curriculum runs: what experiments/retrieval_curriculum_8k.sh leaves in
each run's checkpoint directory, side by side.

    python -m experiments.curriculum_report --run nsa=checkpoints/gaps --run dense=checkpoints/gaps_dense \
        --gpu "NVIDIA H100 80GB HBM3" --out benchmarks/results/<name> [--steps 2000 3000] \
        [--title "..."] [--commit abc1234]

(from the repository root). Per run it reads metrics.jsonl (validation answer loss by step),
recall_step_STEP.json (each stage's recall breakdown), needle.json and, when there, needle_silenced.json and
needle_ranks.json (`megatron_nsa.eval.needle --ranks --json`, e.g. on CPU from the exported weights), and writes
<out>.json (all of it, with the commit and GPU) and <out>.md: the validation answer loss at the stage ends
(the recall breakdowns' steps) and at --steps, recall against length and steps, the needle grid of every run
at every length, the needle block's selection rate, its rank and the silenced grid where measured.
--commit names the code that trained (default: this checkout's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional

from benchmarks.recording import recorded, recorded_line
from experiments.nsa_vs_dense import read_records
from experiments.recall_breakdown import curve, curve_markdown
from megatron_nsa.eval.report import accuracy_table, rank_table, write_json

NEEDLE_FILES = {"needle": "needle.json", "needle_silenced": "needle_silenced.json", "needle_ranks": "needle_ranks.json"}


def parse_run(text: str) -> tuple:
    """'NAME=DIR' -> (NAME, DIR), with an error that names the argument."""
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"--run {text!r} must look like NAME=DIR, e.g. nsa=checkpoints/gaps")
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"--run {text!r}: no directory {directory!r}")
    if not os.path.isfile(os.path.join(directory, "metrics.jsonl")):
        raise argparse.ArgumentTypeError(f"--run {text!r}: {directory!r} holds no metrics.jsonl (not a run's "
                                         "checkpoint.dir?)")
    return name, directory


def read_run(directory: str) -> dict:
    """A run's validation answer loss by step, recall breakdowns and needle results (those present)."""
    validation = {str(r["step"]): r["validation_loss"] for r in read_records(os.path.join(directory, "metrics.jsonl"))
                  if "validation_loss" in r}
    run = {"validation_answer_loss": validation, "recall": {str(r["step"]): r for r in curve(directory)}}
    for key, name in NEEDLE_FILES.items():
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as f:
                run[key] = json.load(f)
    return run


def loss_table(runs: Dict[str, dict], steps: List[int]) -> str:
    """Validation answer loss, one row per run, one column per step (with the stage's length when known)."""
    lengths = {}
    for run in runs.values():
        lengths.update({int(step): r["seq_length"] for step, r in run["recall"].items()})
    header = "| step | " + " | ".join(f"{step:,}" + (f" ({lengths[step]:,})" if step in lengths else "")
                                     for step in steps) + " |"
    lines = [header, "|---|" + "---:|" * len(steps)]
    for name, run in runs.items():
        losses = run["validation_answer_loss"]
        lines.append(f"| {name} | " + " | ".join(f"{losses[str(step)]:.4f}" if str(step) in losses else "-"
                                                 for step in steps) + " |")
    return "\n".join(lines)


def needle_section(name: str, needle: dict, silenced: Optional[dict], ranks: Optional[dict] = None) -> List[str]:
    """The markdown of one run's needle results."""
    lengths, depths = needle["lengths"], needle["depths"]
    counts = sorted(set(needle["samples"]))
    samples = str(counts[0]) if len(counts) == 1 else " / ".join(str(count) for count in needle["samples"])
    lines = [f"Needle, {name}, step {needle['step']:,} ({samples} samples per cell):", "",
             accuracy_table(needle["accuracy"], lengths, depths), ""]
    if "needle_block_selected" in needle:
        lines += [f"Needle block selected at the question, {name} (share of layers x KV heads):", "",
                  accuracy_table(needle["needle_block_selected"], lengths, depths), ""]
    if silenced:
        off = " ".join(silenced.get("silenced_branches", []))
        lines += [f"Needle, {name}, with the branches {off} off:", "",
                  accuracy_table(silenced["accuracy"], silenced["lengths"], silenced["depths"]), ""]
    if ranks:
        candidates = ", ".join(f"{blocks} at {int(length):,}" for length, blocks in ranks["candidate_blocks"].items())
        lines += [f"Needle block's median rank at the question, {name}, step {ranks['step']:,} (1 = highest score; "
                  f"the top {ranks['select_count']} are selected; candidate blocks {candidates}):", "",
                  rank_table(ranks["needle_block_rank"], ranks["lengths"], ranks["depths"]), ""]
        if "needle_block_target_rank" in ranks:  # results of the needle command before it had the target
            lines += [f"The same rank by the block score loss's target (the selected branch's own attention per "
                      f"block, without selection), {name}:", "",
                      rank_table(ranks["needle_block_target_rank"], ranks["lengths"], ranks["depths"]), ""]
    return lines


def report(runs: Dict[str, dict], steps: List[int], title: str, info: Dict[str, str]) -> str:
    stage_ends = sorted({int(step) for run in runs.values() for step in run["recall"]})
    lines = [f"# {title}", "", recorded_line(info), "",
             "Validation loss on the answer tokens (step, and the stage's length at its last step):", "",
             loss_table(runs, sorted(set(stage_ends) | set(steps))), ""]
    for name, run in runs.items():
        if run["recall"]:
            by_step = [run["recall"][step] for step in sorted(run["recall"], key=int)]
            lines += [f"Recall against length and steps, {name} (answer accuracy on each stage's validation "
                      "sequences):", "", curve_markdown(by_step), ""]
    for name, run in runs.items():
        if "needle" in run:
            lines += needle_section(name, run["needle"], run.get("needle_silenced"), run.get("needle_ranks"))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", type=parse_run, required=True, metavar="NAME=DIR",
                        help="a run's checkpoint.dir under a name (repeat for each run)")
    parser.add_argument("--gpu", required=True, help="the GPU the runs trained on, e.g. 'NVIDIA H100 80GB HBM3'")
    parser.add_argument("--out", required=True, help="a path without suffix: the report goes to it + .md and + .json")
    parser.add_argument("--steps", type=int, nargs="*", default=[], help="more steps for the loss table")
    parser.add_argument("--title", default="Retrieval curriculum", help="the report's heading")
    parser.add_argument("--commit", default=None, help="the code that trained (default: this checkout's)")
    args = parser.parse_args(argv)
    names = [name for name, _ in args.run]
    if len(set(names)) != len(names):
        parser.error(f"--run names must differ, got {names}")
    runs = {name: read_run(directory) for name, directory in args.run}
    info = recorded(args.gpu)
    if args.commit:
        info["commit"] = args.commit
    text = report(runs, args.steps, args.title, info)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    write_json(args.out + ".json", {"recorded": info, "runs": runs})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
