"""NSA against dense attention with the project's own training stack: same model, same data, same tokens.

    python -m experiments.nsa_vs_dense --experiment lm --out OUT          # real text at 8k: validation loss
    python -m experiments.nsa_vs_dense --experiment retrieval --out OUT   # retrieval at 8k, needle at 8k-32k
    python -m experiments.nsa_vs_dense --experiment retrieval --out OUT --tiny   # CPU check of the logic

(from the repository root).

Each experiment trains configs/small_{lm,retrieval}_8k.yaml twice, NSA first, then its dense twin
(model.attention=dense), each as its own `python -m megatron_nsa.training.train` process:

  1. --steps auto: a short NSA run measures the step time; the step count is what fits --time-budget-s
     (less if --deadline-s cannot take two such runs and the evaluation).
  2. NSA trains that many steps (SIGTERM, i.e. save and stop, if it runs past the budget).
  3. dense trains exactly the steps NSA completed, on the same samples in the same order, with the same
     learning-rate schedule (decay over the planned steps): equal tokens (it may take up to 1.5x NSA's
     budget when the deadline allows; if it is stopped early, the report says the tokens differ).
  4. Each model's final checkpoint is evaluated in this process right after it trains (megatron_nsa.eval), so
     that a job stopped later keeps it: validation loss on the same batches (lm), needle accuracy over
     depths x lengths (retrieval) and the answer-token loss.

--stages runs a length curriculum first, e.g. `--stages 128:200 512:150,retrieval.mean_gap=4`: each
stage (LENGTH:STEPS[,section.key=value...]) trains that many steps at LENGTH tokens with the batch scaled
to the same tokens per step, and the next stage (the last one at --seq-length) resumes its checkpoint.
Both models run the same stages; the learning rate decays over all of them.

--only nsa and --only dense --pair OUT/<experiment>/summary.json split the two models over two jobs (each
model then has a whole job): the dense run must have the NSA run's overrides and stages, trains the step
count its summary records on the same schedule, and writes the report of both.

The budget counts from each run's first completed step (start-up and kernel compilation excluded).
--deadline-s bounds the whole script: the dense run's budget shrinks to leave time for evaluation, and a
warm-up stage that would run past it is stopped (that model then trains no further; dense then trains
the steps NSA reached).
Writes under OUT/<experiment>/: {nsa,dense}/train.log, metrics.jsonl, checkpoints (removed at the end
unless --keep-checkpoints), summary.json (written after every stage, so a killed run leaves what it
had), and the report of experiments/plot_nsa_vs_dense.py (markdown table, PNGs when matplotlib is
installed), named nsa_vs_dense_<experiment>_<gpu>[_<variant>] (--variant).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

from benchmarks.recording import REPO, recorded
from megatron_nsa.data.retrieval import RetrievalFormat
from megatron_nsa.eval.haystack import check_grid_lengths
from megatron_nsa.training.config import load_recipe

from . import plot_nsa_vs_dense

RECIPES = {"lm": "configs/small_lm_8k.yaml", "retrieval": "configs/small_retrieval_8k.yaml"}
DEPTHS = [float(d) for d in range(0, 101, 10)]
CALIBRATION_STEPS = 8
RUN_OVERHEAD_S = 30.0  # a training process's start-up (imports, data, cached kernels) and final save on a GPU
# Toy sizes for --tiny (CPU, fp32): 2 layers, 128 tokens, NSA blocks that all matter at 128 tokens.
# Learned positions (the dense model's RoPE needs CUDA) with room for the longer needle lengths.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.kv_channels=16", "model.position_embedding_type=learned_absolute", "model.max_position_embeddings=256",
        "model.make_vocab_size_divisible_by=64", "nsa.compress_block_size=8",
        "nsa.compress_stride=4", "nsa.select_block_size=16", "nsa.select_count=3", "nsa.window_size=32",
        "training.micro_batch_size=2", "training.global_batch_size=4", "training.eval_steps=1", "optimizer.lr=3e-3",
        "training.device=cpu"]
TINY_RETRIEVAL = ["retrieval.num_keys=256", "retrieval.num_values=64"]  # enough keys for 256-token needles
DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
STAGE_KEYS = ("data.seq_length", "training.global_batch_size", "training.micro_batch_size")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=tuple(RECIPES), required=True)
    parser.add_argument("--out", required=True, help="output directory ($OUT on the GPU machine)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="training seconds per model from its first step (default 180)")
    parser.add_argument("--steps", default=None, help="'auto' (fill the time budget; the default) or a step count "
                                                      "(tiny default 8)")
    parser.add_argument("--deadline-s", type=float, default=500.0,
                        help="the whole script's time: the dense run stops early enough to leave the evaluation "
                             "its time (0: no deadline)")
    parser.add_argument("--seq-length", type=int, default=None, help="training context (default 8192; tiny 128)")
    parser.add_argument("--eval-lengths", type=int, nargs="+", default=None,
                        help="retrieval: needle context lengths (default 8192 16384 32768; tiny 128 256)")
    parser.add_argument("--samples", type=int, nargs="+", default=None,
                        help="retrieval: needle samples per cell, per length (default 40 20 10; tiny 2)")
    parser.add_argument("--depths", type=float, nargs="+", default=None, help="needle depths %% (default 0..100/10)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="final validation: global batches of the recipe (default 16; tiny 2)")
    parser.add_argument("--eval-reserve-s", type=float, default=None,
                        help="seconds the deadline keeps for evaluating both models (default 45 lm, 100 retrieval)")
    parser.add_argument("--cache-dir", default=None, help="data.cache_dir for the corpus (default: the recipe's)")
    parser.add_argument("--stages", nargs="+", default=[], metavar="LENGTH:STEPS[,section.key=value...]",
                        help="length curriculum before the --seq-length training: each stage trains STEPS steps at "
                             "LENGTH tokens (a divisor of --seq-length; same tokens per step) with its overrides; "
                             "it takes every word after it, so give the recipe overrides before it")
    parser.add_argument("--only", choices=("nsa", "dense"), default=None,
                        help="train and evaluate one model: nsa, or dense paired with an earlier --only nsa run")
    parser.add_argument("--pair", default=None, metavar="SUMMARY",
                        help="with --only dense: the summary.json of the --only nsa run to match and report with")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument("--variant", default=None,
                        help="what differs from the default run, the last part of the report's file names")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on CPU, fixed steps: checks the logic")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides for both models")
    args = parser.parse_args(argv)
    defaults = dict(seq_length=(128, 8192), eval_batches=(2, 16), samples=([2], [40, 20, 10]),
                    eval_lengths=([128, 256], [8192, 16384, 32768]), depths=([0.0, 50.0, 100.0], DEPTHS),
                    time_budget_s=(120.0, 180.0), eval_reserve_s=(30.0, 45.0 if args.experiment == "lm" else 100.0))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.steps is None:
        args.steps = "8" if args.tiny else "auto"
    if args.steps != "auto" and not (args.steps.isdigit() and int(args.steps) >= 2):
        parser.error(f"--steps {args.steps} is not allowed: 'auto' or an integer >= 2")
    if args.experiment == "retrieval" and len(args.samples) not in (1, len(args.eval_lengths)):
        parser.error(f"--samples takes one count or one per --eval-lengths ({len(args.eval_lengths)})")
    if (args.only == "dense") != (args.pair is not None):
        parser.error("--only dense and --pair SUMMARY go together: dense trains the step count of an earlier "
                     "--only nsa run, whose summary.json --pair names")
    try:
        args.stages = [parse_stage(text, args.seq_length) for text in args.stages]
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_stage(text: str, seq_length: int) -> dict:
    """'LENGTH:STEPS[,section.key=value...]' -> {length, steps, overrides}; ValueError naming what is wrong."""
    head, *overrides = text.split(",")
    fields = head.split(":")
    if len(fields) != 2 or not all(f.isdigit() for f in fields):
        raise ValueError(f"--stages {text!r} is not allowed: write LENGTH:STEPS[,section.key=value...], "
                         "e.g. 512:150,retrieval.mean_gap=4")
    length, steps = int(fields[0]), int(fields[1])
    if not 0 < length < seq_length or seq_length % length:
        raise ValueError(f"--stages {text!r}: length {length} is not allowed: it must be smaller than --seq-length "
                         f"{seq_length} and divide it (the batch grows by --seq-length / length)")
    if steps < 1:
        raise ValueError(f"--stages {text!r}: steps {steps} is not allowed: at least 1")
    for override in overrides:
        key = override.split("=", 1)[0]
        if "=" not in override or key in STAGE_KEYS:
            raise ValueError(f"--stages {text!r}: override {override!r} is not allowed: give section.key=value, "
                             f"other than {', '.join(STAGE_KEYS)} (the stage sets those)")
    return {"length": length, "steps": steps, "overrides": overrides}


def stage_overrides(stage: dict, settings) -> List[str]:
    """Length and batch of a stage: the recipe's tokens per step (global and micro batch scaled alike)."""
    ratio = settings.data.seq_length // stage["length"]
    return [f"data.seq_length={stage['length']}",
            f"training.global_batch_size={settings.training.global_batch_size * ratio}",
            f"training.micro_batch_size={settings.training.micro_batch_size * ratio}", *stage["overrides"]]


class Clock:
    def __init__(self, deadline_s: float):
        self.start = time.monotonic()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if not self.deadline_s else self.deadline_s - self.elapsed()


def read_records(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def child_env() -> dict:
    """This environment for a training process, without the torch.distributed variables that evaluating a
    model in this process set (its port stays taken while this process lives)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def train(name: str, workdir: str, recipe: str, overrides: List[str], budget_s: float) -> dict:
    """One training process; SIGTERM (save and stop) once it has trained budget_s seconds past its first step."""
    os.makedirs(workdir, exist_ok=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    command = [sys.executable, "-m", "megatron_nsa.training.train", os.path.join(REPO, recipe), *overrides,
               f"logging.metrics_file={metrics}", "logging.log_interval=1"]
    print(f"[{name}] {' '.join(command[3:])}", flush=True)
    started = time.monotonic()
    first_step = stopped_at = None
    with open(os.path.join(workdir, "train.log"), "w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=child_env(), stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(0.5)
            if first_step is None and any("loss" in r for r in read_records(metrics)):
                first_step = time.monotonic()
            if first_step is not None and stopped_at is None and time.monotonic() - first_step > budget_s:
                print(f"[{name}] time budget of {budget_s:.0f} s reached: SIGTERM (save and stop)", flush=True)
                process.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > 180:
                process.kill()
        returncode = process.wait()
    records = read_records(metrics)
    with open(os.path.join(workdir, "train.log")) as f:
        log_text = f.read()
    steps = [r for r in records if "loss" in r]
    if returncode != 0 and not steps:
        raise RuntimeError(f"[{name}] training failed (exit {returncode}) before its first step:\n{log_text[-3000:]}")
    error = None
    if returncode != 0:  # e.g. saving the checkpoint failed: keep what the run measured
        error = f"exit {returncode}: {log_text[-1500:]}"
        print(f"[{name}] training process failed after {steps[-1]['step']} steps:\n{log_text[-3000:]}", flush=True)
    parameters = re.search(r"GPT: ([\d,]+) parameters", log_text)
    step_times = [r["step_time"] for r in steps[2:]] or [r["step_time"] for r in steps]
    return {
        "parameters": int(parameters.group(1).replace(",", "")) if parameters else None,
        "steps": steps[-1]["step"],
        "stopped_by_budget": stopped_at is not None,
        "wall_s": time.monotonic() - started,
        "train_s": (time.monotonic() - first_step) if first_step else None,
        "median_step_s": statistics.median(step_times) if step_times else None,
        "tokens_per_second": statistics.median(r["tokens_per_second"] for r in steps[2:]) if len(steps) > 2 else None,
        "peak_memory_gib": max((r["peak_memory_gib"] for r in steps), default=None),
        "train_loss": [[r["step"], r["loss"]] for r in steps],
        "validation_loss": [[r["step"], r["validation_loss"]] for r in records if "validation_loss" in r],
        "gates": {k: steps[-1][k] for k in ("gate_cmp", "gate_slc", "gate_win") if k in steps[-1]},
        "error": error,
    }


def plan_steps(args, recipe: str, common: List[str], workdir: str, clock: Clock,
               stage_steps: int, num_stages: int, num_models: int, eval_reserve_s: float) -> Dict[str, float]:
    """--steps auto: time CALIBRATION_STEPS NSA steps; plan the steps that fill the NSA budget: --time-budget-s,
    or less when the deadline cannot take num_models such runs (dense assumed as slow as NSA), each with
    RUN_OVERHEAD_S of start-up and saving, plus both models' warm-up stages (stage_steps steps in
    num_stages processes each, at the calibrated step time: a stage has the same tokens per step) and the
    evaluation reserve."""
    if args.steps != "auto":
        return {"steps": int(args.steps), "calibration_step_s": None, "nsa_budget_s": args.time_budget_s}
    run = train("calibration", workdir, recipe, common + [
        "model.attention=nsa", f"training.train_steps={CALIBRATION_STEPS}", "optimizer.warmup_steps=1",
        "training.eval_interval=0", "checkpoint.dir=null"], budget_s=120)
    stages_s = stage_steps * run["median_step_s"] + num_stages * RUN_OVERHEAD_S  # per model
    budget = min(args.time_budget_s,
                 (clock.left() - eval_reserve_s - num_models * (RUN_OVERHEAD_S + stages_s)) / num_models)
    if budget < args.time_budget_s:
        print(f"[plan] --deadline-s {args.deadline_s:.0f}: NSA budget lowered to {budget:.0f} s", flush=True)
    steps = max(10, int(0.97 * budget / run["median_step_s"]))
    print(f"[plan] NSA step {run['median_step_s']:.3f} s -> {steps} steps in {budget:.0f} s"
          + (f" after {stage_steps} warm-up steps (about {stages_s:.0f} s)" if num_stages else ""), flush=True)
    return {"steps": steps, "calibration_step_s": run["median_step_s"], "nsa_budget_s": budget}


def train_stages(name: str, workdir: str, recipe: str, stage_runs: List[List[str]], fixed: List[str],
                 budget_s: Callable[[], float]) -> List[dict]:
    """The warm-up stages of one model, each resuming the previous one's checkpoint: stage_runs holds each
    stage's overrides (length, batch, its own settings, schedule); fixed the model's and checkpoint's.
    Each stage may train budget_s() seconds (asked when it starts); a stage stopped by it ends the list."""
    runs = []
    for number, overrides in enumerate(stage_runs, 1):
        resume = "checkpoint.resume=true" if number > 1 else "checkpoint.resume=false"
        run = train(f"{name} stage {number}", os.path.join(workdir, f"stage_{number}"), recipe,
                    overrides + fixed + [resume], budget_s=max(10.0, budget_s()))
        if run["error"]:
            raise RuntimeError(f"[{name}] warm-up stage {number} failed: {run['error']}")
        runs.append(run)
        if run["stopped_by_budget"]:
            print(f"[{name}] the deadline stopped warm-up stage {number} at step {run['steps']}: no further "
                  "training for this model", flush=True)
            break
    return runs


def merge_stages(stage_runs: List[dict], run: dict) -> dict:
    """One model's record over its warm-up stages and its main run: curves joined (global step numbers),
    peak memory over all; steps, times and throughput stay the main run's."""
    merged = dict(run)
    for key in ("train_loss", "validation_loss"):
        merged[key] = [point for stage in stage_runs for point in stage[key]] + run[key]
    merged["peak_memory_gib"] = max([r["peak_memory_gib"] for r in stage_runs + [run] if r["peak_memory_gib"]],
                                    default=None)
    merged["stages"] = [{"steps": r["steps"], "wall_s": r["wall_s"], "validation_loss": r["validation_loss"][-1:]}
                        for r in stage_runs]
    return merged


def schedule_overrides(steps_planned: int, steps_to_run: int, tiny: bool) -> List[str]:
    """The same schedule for both models: warm-up, then decay over the planned steps; ten validations."""
    warmup = 1 if tiny else max(1, min(30, steps_planned // 5))
    return [f"training.train_steps={steps_to_run}", f"optimizer.decay_steps={steps_planned}",
            f"optimizer.warmup_steps={warmup}", f"training.eval_interval={max(1, steps_planned // 10)}"]


def evaluate(args, name: str, checkpoint: str, batch_size: int) -> dict:
    """The final checkpoint's validation loss (and, for retrieval, needle accuracy) in this process."""
    from megatron_nsa.eval.loss import validation_loss
    from megatron_nsa.eval.model_loader import load_model, release
    from megatron_nsa.eval.needle import needle_grid

    started = time.monotonic()
    loaded = load_model(checkpoint, device="cpu" if args.tiny else "auto")
    result = {"step": loaded.step, **validation_loss(loaded, args.eval_batches, batch_size)}
    print(f"[{name}] final validation loss {result['loss']:.4f} ({result['tokens']:,} target tokens)", flush=True)
    if args.experiment == "retrieval":
        samples = args.samples * len(args.eval_lengths) if len(args.samples) == 1 else args.samples
        result["needle"] = needle_grid(loaded, "retrieval", args.eval_lengths, args.depths, samples, seed=0,
                                       batch_size=4, selections=name == "nsa")
    release(loaded)
    result["eval_s"] = time.monotonic() - started
    return result


def device_description(tiny: bool) -> Dict[str, str]:
    """Versions (from package metadata, without importing) and the GPU's name (nvidia-smi: no CUDA context
    in this process while the training processes run)."""
    info = {}
    for package in ("torch", "megatron-core", "triton"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    info["device"] = "cpu"
    if not tiny and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=60)
        if query.returncode == 0 and query.stdout.strip():
            info["device"] = query.stdout.strip().splitlines()[0]
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock(args.deadline_s)
    recipe = RECIPES[args.experiment]
    out = os.path.abspath(os.path.join(args.out, args.experiment))
    os.makedirs(out, exist_ok=True)
    tiny = TINY + (TINY_RETRIEVAL if args.experiment == "retrieval" else []) if args.tiny else []
    common = [*tiny, f"data.seq_length={args.seq_length}", *args.overrides]
    if args.cache_dir:
        common.append(f"data.cache_dir={os.path.abspath(args.cache_dir)}")
    try:  # before any training: the recipe of every stage, and the needle lengths against the key range
        settings = load_recipe(os.path.join(REPO, recipe), common)
        stage_common = [common + stage_overrides(stage, settings) for stage in args.stages]
        for overrides in stage_common:
            load_recipe(os.path.join(REPO, recipe), overrides)
        if args.experiment == "retrieval":
            check_grid_lengths(args.eval_lengths, "retrieval", RetrievalFormat.of(settings.retrieval))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    batch = settings.training.global_batch_size
    stage_steps = sum(stage["steps"] for stage in args.stages)
    summary = {"experiment": args.experiment, "recipe": recipe, "overrides": common, "seq_length": args.seq_length,
               "global_batch_size": batch, "time_budget_s": args.time_budget_s, "tiny": args.tiny,
               "stages": args.stages, "environment": device_description(args.tiny), "models": {}}
    summary["recorded"] = recorded(summary["environment"]["device"])
    if args.pair:
        try:
            summary = paired_summary(args.pair, summary)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    summary_path = os.path.join(out, "summary.json")

    def save():
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=1)

    names = [args.only] if args.only else ["nsa", "dense"]
    if not args.pair:  # --eval-reserve-s is for both models' evaluations
        summary.update(plan_steps(args, recipe, common, os.path.join(out, "calibration"), clock, stage_steps,
                                  len(args.stages), len(names), args.eval_reserve_s / 2 * len(names)))
    planned = stage_steps + summary["steps"]  # global step numbers: the warm-up stages come first
    save()
    steps_to_run = planned
    for name in names:
        workdir = os.path.join(out, name)
        fixed = [f"model.attention={name}", f"checkpoint.dir={os.path.join(workdir, 'checkpoints')}",
                 "checkpoint.save_interval=0", "checkpoint.keep_last=1"]
        # dense trains NSA's steps: fewer than the stages hold when the deadline stopped NSA in one of them
        nsa_stopped_in_stage = name == "dense" and "stopped_in_stage" in summary["models"]["nsa"]
        step_limit = summary["models"]["nsa"]["steps"] if nsa_stopped_in_stage else planned
        done, stage_runs = 0, []
        for stage, overrides in zip(args.stages, stage_common):
            if done < step_limit:
                done = min(done + stage["steps"], step_limit)
                stage_runs.append(overrides + schedule_overrides(planned, done, args.tiny))
        reserve_s = args.eval_reserve_s / 2 * (len(names) - names.index(name))  # this model's and later ones'
        stage_results = train_stages(name, workdir, recipe, stage_runs, fixed,
                                     budget_s=lambda: clock.left() - reserve_s - RUN_OVERHEAD_S)
        stopped_in_stage = bool(stage_results) and stage_results[-1]["stopped_by_budget"]
        if stopped_in_stage or nsa_stopped_in_stage:  # no training at the full length
            run = merge_stages(stage_results[:-1], stage_results[-1])
            if stopped_in_stage:
                run["stopped_in_stage"] = len(stage_results)
        else:
            budget = summary["nsa_budget_s"]
            if name == "dense":
                steps_to_run = summary["models"]["nsa"]["steps"]
                nsa = summary["models"]["nsa"]
                overhead = 1.3 * (nsa["wall_s"] - (nsa["train_s"] or 0.0))  # start-up, compilation, saving
                # equal tokens first: dense may take up to 1.5x NSA's budget if the deadline allows
                budget = max(10.0, min(1.5 * budget, clock.left() - overhead - reserve_s))
            overrides = common + schedule_overrides(planned, steps_to_run, args.tiny) + fixed + [
                f"checkpoint.resume={'true' if args.stages else 'false'}"]
            run = merge_stages(stage_results, train(name, workdir, recipe, overrides, budget))
        run["tokens"] = run["steps"] * batch * args.seq_length
        summary["models"][name] = run
        save()
        print(f"[{name}] {run['steps']} steps in {run['train_s'] or 0:.0f} s"
              f" ({run['tokens_per_second'] or 0:,.0f} tokens/s)", flush=True)
        # evaluated at once, so that a job stopped during the next model keeps this one's results
        checkpoint = os.path.join(workdir, "checkpoints")
        try:
            run["final"] = evaluate(args, name, checkpoint, batch)
        except Exception as err:  # noqa: BLE001 - report the other model and the training curves all the same
            run["final_error"] = f"{type(err).__name__}: {err}"
            print(f"[{name}] evaluation failed: {type(err).__name__}: {err}", flush=True)
        save()
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
    summary["wall_s"] = clock.elapsed()
    if args.only == "nsa":
        save()
        print(f"done in {clock.elapsed():.0f} s: {summary_path}; train the dense twin in another job with the same "
              f"arguments and --only dense --pair {summary_path}", flush=True)
        return 0
    summary["equal_tokens"] = summary["models"]["nsa"]["steps"] == summary["models"]["dense"]["steps"]
    save()
    plot_nsa_vs_dense.write_report(summary, out, variant=args.variant)
    print(f"done in {clock.elapsed():.0f} s: {summary_path}", flush=True)
    return 0


def paired_summary(path: str, summary: dict) -> dict:
    """The summary of an --only nsa run (`path`) that this --only dense run completes: ValueError unless it
    holds a finished NSA run of the same experiment, overrides, stages and length as `summary` (this run's)."""
    if not os.path.isfile(path):
        raise ValueError(f"--pair {path}: no such file (the summary.json of an --only nsa run)")
    with open(path) as f:
        paired = json.load(f)
    for key in ("experiment", "overrides", "stages", "seq_length", "global_batch_size", "tiny"):
        if paired.get(key) != summary[key]:
            raise ValueError(f"--pair {path}: its {key} is {paired.get(key)!r} but this run's is {summary[key]!r}; "
                             "the dense twin must repeat the NSA run's arguments")
    nsa = paired.get("models", {}).get("nsa")
    if nsa is None or "final" not in nsa or "dense" in paired["models"]:
        raise ValueError(f"--pair {path}: it holds no finished --only nsa run (an NSA model, evaluated, and no "
                         "dense one)")
    if paired["environment"].get("device") != summary["environment"]["device"]:
        print(f"[pair] NSA ran on {paired['environment'].get('device')}, dense on "
              f"{summary['environment']['device']}: their speeds do not compare", flush=True)
    paired["environment_dense"] = summary["environment"]
    paired["paired_from"] = os.path.abspath(path)
    return paired


if __name__ == "__main__":
    sys.exit(main())
