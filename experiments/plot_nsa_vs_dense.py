"""Report of experiments/nsa_vs_dense.py: markdown summary, loss-curve PNG, needle heat-map PNGs.

    python -m experiments.plot_nsa_vs_dense OUT/lm/summary.json [--out-dir benchmarks/results] [--variant 16k]

Files are named nsa_vs_dense_<experiment>_<gpu>[_<variant>].md / _loss.png / _needle_{nsa,dense}.png (and
a copy of the summary as .json). The markdown is always written; PNGs only when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

from benchmarks.recording import RESULTS_DIR, gpu_model_tag, recorded_line, result_stem
from megatron_nsa.eval.plots import accuracy_heatmap, loss_curves
from megatron_nsa.eval.report import accuracy_table, write_json

LOSS_GOAL = 0.01  # NSA validation loss within 1% of dense (or better)
ACCURACY_GOAL = 0.99  # NSA needle accuracy at every depth up to the trained length
TITLES = {"lm": "language modelling on real text", "retrieval": "synthetic key/value retrieval"}
NAMES = {"nsa": "NSA", "dense": "dense"}


def compared_losses(summary: dict) -> Optional[Tuple[float, float, str]]:
    """(NSA loss, dense loss, where from): the final evaluations, or else the last training validation
    both runs reached (when an evaluation failed)."""
    models = summary["models"]
    finals = [models.get(m, {}).get("final", {}).get("loss") for m in ("nsa", "dense")]
    if None not in finals:
        return finals[0], finals[1], "final evaluation"
    curves = [dict(map(tuple, models.get(m, {}).get("validation_loss", []))) for m in ("nsa", "dense")]
    common = set(curves[0]) & set(curves[1])
    if not common:
        return None
    step = max(common)
    return curves[0][step], curves[1][step], f"training validation at step {step}"


def min_accuracy_within(needle: dict, max_length: int) -> Optional[float]:
    values = [acc for length, row in needle["accuracy"].items() if int(length) <= max_length for acc in row.values()]
    return min(values) if values else None


def _fmt(value, pattern: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, pattern)


def model_table(summary: dict) -> str:
    unit = "bits/byte" if "lm" == summary["experiment"] else "bits/answer byte"
    lines = [f"| model | parameters | steps | tokens | train s | tokens/s | peak GiB | final val. loss | perplexity | "
             f"{unit} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in summary["models"].items():
        final = run.get("final", {})
        lines.append(
            f"| {NAMES[name]} | {_fmt(run.get('parameters'), ',')} | {run['steps']} | {run['tokens']:,} | "
            f"{_fmt(run.get('train_s'), '.0f')} | {_fmt(run.get('tokens_per_second'), ',.0f')} | "
            f"{_fmt(run.get('peak_memory_gib'), '.1f')} | {_fmt(final.get('loss'), '.4f')} | "
            f"{_fmt(final.get('perplexity'), '.3f')} | {_fmt(final.get('bits_per_token'), '.4f')} |")
    return "\n".join(lines)


def curve_table(summary: dict) -> str:
    curves = {name: dict(map(tuple, run["validation_loss"])) for name, run in summary["models"].items()}
    steps = sorted(set().union(*(c.keys() for c in curves.values())))
    lines = ["| step | " + " | ".join(NAMES[n] for n in curves) + " |", "|---:|" + "---:|" * len(curves)]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(_fmt(curves[n].get(step), ".4f", "") for n in curves) + " |")
    return "\n".join(lines)


def write_report(summary: dict, out_dir: str, variant: Optional[str] = None) -> Dict[str, Optional[str]]:
    """Markdown (+ PNGs when possible) into out_dir as nsa_vs_dense_<experiment>_<gpu>[_<variant>].*;
    returns {kind: path or None}."""
    experiment = summary["experiment"]
    env = summary.get("environment", {})
    base = result_stem(f"nsa_vs_dense_{experiment}", gpu_model_tag(env.get("device", "cpu")), variant, out_dir)
    written: Dict[str, Optional[str]] = {"json": base + ".json"}
    write_json(base + ".json", summary)
    seq = summary["seq_length"]
    curves = {NAMES[n]: [tuple(p) for p in run["validation_loss"]] for n, run in summary["models"].items()}
    written["loss_png"] = loss_curves(curves, base + "_loss.png",
                                      f"NSA vs dense, {TITLES[experiment]}, {seq:,} tokens ({env.get('device', '')})",
                                      ylabel="validation loss" + (" (answer tokens)" if experiment == "retrieval"
                                                                  else " (nats per byte)"))
    parts: List[str] = [
        f"### NSA vs dense: {TITLES[experiment]} at {seq:,} tokens ({env.get('device', 'unknown device')})",
        "",
        f"Recipe `{summary['recipe']}` with `{' '.join(summary['overrides'])}`; both models the same but for the "
        f"attention core, trained on the same samples in the same order with the same schedule "
        f"({summary['steps']} planned steps of {summary['global_batch_size']} x {seq:,} tokens, budget "
        f"{summary['time_budget_s']:.0f} s per model). Versions: "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device") + ".",
        "",
        *([recorded_line(summary["recorded"]), ""] if "recorded" in summary else []),
        model_table(summary),
        "",
    ]
    if summary.get("paired_from"):
        dense_device = summary.get("environment_dense", {}).get("device", "unknown device")
        parts += [f"NSA and dense trained in separate jobs (`--only nsa`, then `--only dense --pair`; dense on "
                  f"{dense_device}).", ""]
    if summary.get("stages"):
        described = ", ".join(f"{stage['length']:,} tokens x {stage['steps']} steps"
                              + (f" (`{' '.join(stage['overrides'])}`)" if stage["overrides"] else "")
                              for stage in summary["stages"])
        parts += [f"Both models first trained the same length curriculum, each stage resuming the previous one's "
                  f"checkpoint with the same tokens per step: {described}; then {seq:,} tokens. Steps, tokens and "
                  f"curves count the stages; the planned steps above do not.", ""]
    if not summary.get("equal_tokens", True):
        parts += ["**The two models did not train the same number of tokens** (the dense run hit its time budget); "
                  "compare the curves at equal steps below.", ""]
    for name, run in summary["models"].items():
        if run.get("stopped_in_stage"):
            parts += [f"**The deadline stopped {NAMES[name]} in warm-up stage {run['stopped_in_stage']}** at step "
                      f"{run['steps']}: it never trained at {seq:,} tokens.", ""]
        for kind in ("error", "final_error"):
            if run.get(kind):
                parts += [f"**{NAMES[name]} {'training' if kind == 'error' else 'evaluation'} failed**: "
                          f"`{run[kind].splitlines()[-1] if run[kind].strip() else run[kind]}`", ""]
    compared = compared_losses(summary)
    if compared is not None:
        nsa, dense, source = compared
        gap = (nsa - dense) / dense
        verdict = "met" if gap <= LOSS_GOAL else "not met"
        goal = f" (goal: at most +1%: {verdict})" if experiment == "lm" else ""
        parts += [f"NSA validation loss relative to dense ({source}): **{100 * gap:+.2f}%** "
                  f"({nsa:.4f} vs {dense:.4f}){goal}.", ""]
    parts += ["Validation loss during training (the training run's own validation batches):", "",
              curve_table(summary), ""]
    if written["loss_png"]:
        parts += [f"![validation loss]({os.path.basename(written['loss_png'])})", ""]
    if experiment == "retrieval":
        for name, run in summary["models"].items():
            needle = run.get("final", {}).get("needle")
            if not needle:
                continue
            lengths, depths = needle["lengths"], needle["depths"]
            parts += [f"Needle accuracy, {NAMES[name]} ({needle['scoring']}; samples per cell "
                      f"{', '.join(map(str, needle['samples']))} for lengths {', '.join(f'{x:,}' for x in lengths)}):",
                      "", accuracy_table(needle["accuracy"], lengths, depths), ""]
            png = accuracy_heatmap(needle["accuracy"], lengths, depths, f"{base}_needle_{name}.png",
                                   f"needle accuracy, {NAMES[name]}, trained at {seq:,} ({env.get('device', '')})")
            written[f"needle_{name}_png"] = png
            if png:
                parts += [f"![needle accuracy {NAMES[name]}]({os.path.basename(png)})", ""]
            if "needle_block_selected" in needle:
                parts += [f"How often {NAMES[name]}'s selection at the question holds the needle's block (share of "
                          "layers x KV heads; a needle never selected is seen only through the window and the "
                          "compressed branch):", "",
                          accuracy_table(needle["needle_block_selected"], lengths, depths), ""]
        nsa_needle = summary["models"].get("nsa", {}).get("final", {}).get("needle")
        if nsa_needle:
            lowest = min_accuracy_within(nsa_needle, seq)
            if lowest is not None:
                verdict = "met" if lowest >= ACCURACY_GOAL else "not met"
                parts += [f"Lowest NSA accuracy over depths at lengths up to the trained {seq:,}: **{100 * lowest:.0f}%**"
                          f" (goal: at least 99% at every depth: {verdict}).", ""]
    markdown = "\n".join(parts)
    os.makedirs(out_dir, exist_ok=True)
    with open(base + ".md", "w") as f:
        f.write(markdown)
    written["markdown"] = base + ".md"
    print(markdown)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", help="summary.json written by experiments/nsa_vs_dense.py")
    parser.add_argument("--out-dir", default=RESULTS_DIR)
    parser.add_argument("--variant", default=None, help="what differs from the default run (file name suffix)")
    args = parser.parse_args(argv)
    with open(args.summary) as f:
        summary = json.load(f)
    write_report(summary, args.out_dir, args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
