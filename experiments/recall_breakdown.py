"""Which answers does a retrieval-trained model recall? Accuracy on the answer tokens of its own validation
sequences, split by how often the asked fact was stated before the question and by how far back its
nearest statement is.

    python -m experiments.recall_breakdown --checkpoint DIR [--samples 256] [--json OUT.json]
    python -m experiments.recall_breakdown --curve DIR [--table OUT.md]

(from the repository root). The second form tabulates the DIR/recall_step_STEP.json files that
experiments/retrieval_curriculum_8k.sh writes after each stage: recall against length and steps.

A model that pools a fact's many restatements does well on facts stated several times and poorly on a
fact stated once, whatever its distance; a needle is a fact stated once, so only the "stated once" column
predicts the needle test (megatron_nsa.eval.needle). Answers are scored as the needle test scores them:
correct when the argmax prediction is the value.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy
import torch

STATED_BUCKETS = (1, 2, 3, 4)  # times the fact was stated before the question; the last bucket is ">= 4"
DISTANCE_BUCKETS = (16, 64, 256, 1024, 4096)  # upper bounds in tokens; the last bucket is "more"


def answer_contexts(tokens: numpy.ndarray, loss_mask: numpy.ndarray) -> List[Tuple[int, int, int]]:
    """For a sequence (tokens [s], loss_mask [s] over the labels = tokens shifted by one): one
    (position, times stated, distance) per answer, where position p holds the asked key (its label is the
    value), times stated counts the earlier records with that key, and distance is p minus the position of
    the nearest of them (0 when the key never appeared before)."""
    answers = []
    last_seen: Dict[int, int] = {}
    count: Dict[int, int] = {}
    for position, token in enumerate(tokens.tolist()):
        if loss_mask[position]:
            answers.append((position, count.get(token, 0), position - last_seen.get(token, position)))
        last_seen[token] = position
        count[token] = count.get(token, 0) + 1
    return answers


def bucket(value: int, bounds) -> str:
    for bound in bounds:
        if value <= bound:
            return f"<= {bound}"
    return f"> {bounds[-1]}"


def breakdown(hits: List[Tuple[int, int, bool]]) -> Dict[str, Dict[str, List[int]]]:
    """(times stated, distance, correct) per answer -> {"stated": {bucket: [correct, total]}, "distance": ...}."""
    table: Dict[str, Dict[str, List[int]]] = {"stated": {}, "distance": {}}
    for stated, distance, correct in hits:
        if stated == 0:
            continue  # a key never seen before has no answer to recall
        times = f"{STATED_BUCKETS[-1]}+" if stated >= STATED_BUCKETS[-1] else str(stated)
        for name, key in (("stated", times), ("distance", bucket(distance, DISTANCE_BUCKETS))):
            cell = table[name].setdefault(key, [0, 0])
            cell[0] += int(correct)
            cell[1] += 1
    return table


def evaluate(checkpoint: str, samples: int, batch_size: int = 16) -> dict:
    from megatron_nsa.data.retrieval import VALID_STREAM, RetrievalDataset, RetrievalFormat
    from megatron_nsa.eval.model_loader import load_model, release

    loaded = load_model(checkpoint)
    recipe = loaded.recipe
    dataset = RetrievalDataset(RetrievalFormat.of(recipe.retrieval), recipe.data.seq_length, samples,
                               recipe.training.seed, VALID_STREAM)
    hits = []
    with torch.no_grad():
        for start in range(0, samples, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, samples))]
            tokens = torch.tensor(numpy.stack([item["tokens"] for item in items]), device=loaded.device)  # [b, s]
            predicted = loaded.logits(tokens).argmax(-1).cpu().numpy()  # [b, s]
            for row, item in enumerate(items):
                for position, stated, distance in answer_contexts(item["tokens"], item["loss_mask"]):
                    hits.append((stated, distance, bool(predicted[row, position] == item["labels"][position])))
    result = {"checkpoint": loaded.step_dir, "step": loaded.step, "attention": loaded.attention,
              "seq_length": recipe.data.seq_length, "samples": samples, **breakdown(hits)}
    release(loaded)
    return result


def markdown(result: dict) -> str:
    lines = [f"{result['attention']} step {result['step']}, {result['samples']} validation sequences of "
             f"{result['seq_length']} tokens: answer accuracy (argmax)", ""]
    orders = {"stated": [*map(str, STATED_BUCKETS[:-1]), f"{STATED_BUCKETS[-1]}+"],
              "distance": [*(f"<= {bound}" for bound in DISTANCE_BUCKETS), f"> {DISTANCE_BUCKETS[-1]}"]}
    for name, title in (("stated", "times the fact was stated before"),
                        ("distance", "tokens back to its nearest statement")):
        cells = result[name]
        keys = [key for key in orders[name] if key in cells]
        lines += [f"| {title} | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys),
                  "| accuracy | " + " | ".join(f"{100 * cells[k][0] / cells[k][1]:.1f}%" for k in keys) + " |",
                  "| answers | " + " | ".join(str(cells[k][1]) for k in keys) + " |", ""]
    return "\n".join(lines)


def curve(directory: str) -> List[dict]:
    """The recall breakdowns DIR/recall_step_STEP.json, by step."""
    results = []
    for name in os.listdir(directory):
        match = re.fullmatch(r"recall_step_(\d+)\.json", name)
        if match:
            with open(os.path.join(directory, name)) as f:
                results.append(json.load(f))
    return sorted(results, key=lambda result: result["step"])


def curve_markdown(results: List[dict]) -> str:
    """One row per breakdown: accuracy on facts stated once and four or more times, and by distance."""
    distances = [*(f"<= {bound}" for bound in DISTANCE_BUCKETS), f"> {DISTANCE_BUCKETS[-1]}"]
    stated = ["1", f"{STATED_BUCKETS[-1]}+"]

    def cell(cells: Dict[str, List[int]], key: str) -> str:
        return f"{100 * cells[key][0] / cells[key][1]:.1f}%" if key in cells else "-"

    lines = ["| step | tokens | stated once | stated 4+ times | " + " | ".join(f"{d} back" for d in distances) + " |",
             "|---:|---:|" + "---:|" * (len(stated) + len(distances))]
    for result in results:
        row = [str(result["step"]), f"{result['seq_length']:,}"]
        row += [cell(result["stated"], key) for key in stated] + [cell(result["distance"], key) for key in distances]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training run's checkpoint.dir or a step directory")
    source.add_argument("--curve", metavar="DIR", help="tabulate DIR/recall_step_STEP.json by step instead")
    parser.add_argument("--samples", type=int, default=256, help="validation sequences")
    parser.add_argument("--json", default=None, help="write the counts here")
    parser.add_argument("--table", default=None, help="with --curve: write the table here too")
    args = parser.parse_args(argv)
    if args.curve:
        results = curve(args.curve)
        if not results:
            parser.error(f"--curve {args.curve}: no recall_step_STEP.json files there")
        table = curve_markdown(results)
        print(table)
        if args.table:
            with open(args.table, "w") as f:
                f.write(table + "\n")
        return
    if args.samples < 1:
        parser.error(f"--samples={args.samples} is not allowed: at least 1")
    result = evaluate(args.checkpoint, args.samples)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
