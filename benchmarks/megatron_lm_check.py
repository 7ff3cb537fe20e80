"""Megatron-LM's pretrain_gpt with NSA on one GPU, end to end, through megatron_nsa.megatron_lm.pretrain_gpt:

1. train: the paper's attention shape (mlp compression, separate K/V per branch, d_k 192 / d_v 128,
   NSA's own RoPE through --position-embedding-type none), 8k tokens, 30 iterations, torch_dist
   checkpoints at iterations 15 and 30 (distributed optimizer);
2. resume: load iteration 15 (saving into another folder) and train to 30: its losses must
   continue the first run's (iterations 16..30 compared);
3. speed: iteration time, tokens/s and peak memory at 8k, 32k and 64k tokens per sequence; the 64k run
   saves at iteration 4 and a last run resumes there, continuing its losses at 64k.

Several GPUs: `--nproc 2 --flags "--context-parallel-size 2 --nsa-cp-exchange ring" --variant cp2_ring`
(every run gets the flags; results megatron_lm_2x<gpu>_<variant>.*). Mock data (Megatron-LM's
MockGPTDataset, NullTokenizer). Writes megatron_lm_<gpu>.md and .json (GPU,
commit and date inside) and the runs' logs into --out. Needs Megatron-LM's root on PYTHONPATH
(docs/megatron.md); benchmarks/megatron_lm_check.sh prepares a bare GPU machine and runs this.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from benchmarks.recording import gpu_tag

REPO_ROOT = Path(__file__).resolve().parents[1]

MODEL_FLAGS = [
    "--transformer-impl", "local", "--num-layers", "4", "--hidden-size", "1024", "--num-attention-heads", "16",
    "--group-query-attention", "--num-query-groups", "4", "--kv-channels", "128", "--ffn-hidden-size", "2816",
    "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--position-embedding-type", "none", "--rotary-base", "10000",
]
PAPER_NSA_FLAGS = ["--nsa-compression", "mlp", "--nsa-separate-kv", "--nsa-qk-head-dim", "192",
                   "--nsa-backend", "triton"]
TRAINING_FLAGS = [
    "--micro-batch-size", "1", "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "5", "--weight-decay", "0.1", "--clip-grad", "1.0", "--bf16", "--seed", "1234",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000", "--eval-iters", "0",
    "--eval-interval", "100000", "--log-interval", "1", "--ckpt-format", "torch_dist",
    "--no-gradient-accumulation-fusion", "--distributed-timeout-minutes", "10", "--num-workers", "1",
]
# Megatron-LM core_v0.19.0's distributed optimizer cannot load a torch_dist checkpoint without apex or
# Transformer Engine (DistributedOptimizer.state_dict asserts one Adam step count while the optimizer has no
# state yet); the train/resume pair then uses Megatron-LM's other optimizer.
APEX_OR_TE = any(importlib.util.find_spec(name) is not None for name in ("apex", "transformer_engine"))
RESUME_OPTIMIZER = ["--use-distributed-optimizer"] if APEX_OR_TE else []
SPEED_SHAPES = ((8192, 8), (32768, 2), (65536, 2))  # (tokens per sequence, sequences per iteration)
SPEED_ITERATIONS = 8
LONG_RESUME_SEQ_LEN, LONG_RESUME_FROM = 65536, 4  # the 64k run saves at iteration 4; a second run resumes there
TIMED_FROM = 4  # iterations before this one are warm-up (Triton compiles, allocator growth)

ITERATION_LINE = re.compile(
    r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([\d.]+) \|.*?lm loss: ([\d.E+-]+) \|")
MEMORY_LINE = re.compile(r"memory \(MB\) \| allocated: [\d.]+ \| max allocated: ([\d.]+)")


@dataclasses.dataclass
class RunLog:
    """What one pretrain_gpt run printed: per iteration its loss and time, and the peak allocated memory."""

    losses: Dict[int, float]
    times_ms: Dict[int, float]
    peak_mib: Optional[float]
    returncode: int


def parse_log(text: str, returncode: int = 0) -> RunLog:
    """Per-iteration losses and times of a run logged at interval 1.

    Megatron-LM logs a run's first iteration without resetting its loss sum and interval timer, so the
    second line it prints is the mean of the first two iterations; that iteration's own loss and time are
    recovered here (second = 2 * printed - first), which makes a resumed run comparable with the first run.
    """
    losses, times = {}, {}
    for match in ITERATION_LINE.finditer(text):
        iteration = int(match.group(1))
        times[iteration] = float(match.group(2))
        losses[iteration] = float(match.group(3))
    logged = sorted(losses)
    if len(logged) >= 2 and logged[1] == logged[0] + 1:
        first, second = logged[:2]
        losses[second] = round(2 * losses[second] - losses[first], 10)  # 10 digits: no float residue
        times[second] = round(2 * times[second] - times[first], 10)
    peaks = [float(value) for value in MEMORY_LINE.findall(text)]
    return RunLog(losses=losses, times_ms=times, peak_mib=max(peaks) if peaks else None, returncode=returncode)


def speed_row(log: RunLog, seq_len: int, batch: int) -> dict:
    """Median iteration time over the timed iterations, tokens/s, peak memory."""
    timed = sorted(t for i, t in log.times_ms.items() if i >= TIMED_FROM)
    row = dict(seq_len=seq_len, sequences=batch, iterations_timed=len(timed), returncode=log.returncode,
               peak_gib=None if log.peak_mib is None else round(log.peak_mib / 1024, 2))
    if timed:
        median_ms = timed[len(timed) // 2]
        row.update(iteration_ms=round(median_ms, 1), tokens_per_s=round(seq_len * batch / (median_ms / 1000)))
    return row


def resume_comparison(first: RunLog, resumed: RunLog, start: int, end: int) -> dict:
    """Losses of the resumed run against the first run's at the same iterations."""
    common = [i for i in range(start, end + 1) if i in first.losses and i in resumed.losses]
    diffs = [abs(first.losses[i] - resumed.losses[i]) for i in common]
    return dict(iterations=common, max_abs_diff=max(diffs) if diffs else None,
                first=[first.losses[i] for i in common], resumed=[resumed.losses[i] for i in common],
                initial_loss=first.losses.get(1))


def pretrain_command(seq_len: int, batch: int, iterations: int, extra: List[str], nproc: int = 1) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", "29517",
            "-m", "megatron_nsa.megatron_lm.pretrain_gpt", *MODEL_FLAGS, *PAPER_NSA_FLAGS, *TRAINING_FLAGS,
            "--seq-length", str(seq_len), "--max-position-embeddings", str(seq_len),
            "--global-batch-size", str(batch), "--train-iters", str(iterations),
            "--log-memory-interval", str(iterations), *extra]


def run(name: str, command: List[str], out: Path, timeout: int) -> RunLog:
    print(f"== {name}: {' '.join(command[5:])}", flush=True)
    started = time.time()
    # A session of its own, so that a timeout ends torchrun, the trainer and its data-loader workers together
    # (a survivor would hold GPU and host memory during the next run).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        code = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        code = -9
    text = output.decode(errors="replace")
    (out / f"{name}.log").write_text(text)
    log = parse_log(text, code)
    print(f"   rc={code} in {time.time() - started:.0f} s; iterations logged: {len(log.losses)}", flush=True)
    if code != 0:
        print("\n".join(text.splitlines()[-25:]), flush=True)
    return log


def commit_of_tree() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def markdown(result: dict) -> str:
    gpus = result.get("gpus", 1)
    where = f"one {result['gpu']}" if gpus == 1 else f"{gpus} x {result['gpu']}"
    flags = f" Flags added to every run: `{result['flags']}`." if result.get("flags") else ""
    lines = [f"# Megatron-LM pretrain_gpt with NSA on {where}", "",
             f"Commit {result['commit']}, {result['date']}. Megatron-LM {result['megatron_lm']}, "
             f"`benchmarks/megatron_lm_check.py`. Model: 4 layers, hidden 1024, 16 query heads in 4 KV groups, "
             f"NSA with mlp compression, separate K/V, d_k 192 / d_v 128, NSA's own RoPE, Triton backend; bf16, "
             f"torch_dist checkpoints, mock data; the distributed optimizer in the 8k and 32k speed runs (and in "
             f"the runs that save and resume when apex or Transformer Engine is installed).{flags}", "",
             "## Train, save, resume", ""]
    train, resume = result["train"], result["resume"]
    lines.append(f"Train: loss {train['initial_loss']} at iteration 1, {train['final_loss']} at "
                 f"{train['iterations']}; checkpoints at 15 and 30.")
    if resume.get("max_abs_diff") is not None:
        lines.append(f"Resume from iteration 15: iterations {resume['iterations'][0]}..{resume['iterations'][-1]} "
                     f"match the first run within {resume['max_abs_diff']:.2e} (largest absolute loss difference); "
                     f"loss {resume['resumed'][0]} at {resume['iterations'][0]} against {resume['first'][0]}.")
    else:
        lines.append(f"Resume: no comparable iterations (return code {resume.get('returncode')}).")
    long = result.get("resume_long")
    if long and long.get("max_abs_diff") is not None:
        lines.append(f"At {long['seq_len']} tokens: the speed run saved at iteration {long['iterations'][0] - 1}; "
                     f"resumed there, iterations {long['iterations'][0]}..{long['iterations'][-1]} match it within "
                     f"{long['max_abs_diff']:.2e} (losses {long['resumed']} against {long['first']}).")
    elif long:
        lines.append(f"At {long.get('seq_len')} tokens: no comparable iterations after the resume "
                     f"(return code {long.get('returncode')}).")
    lines += ["", f"## Speed ({where})", "",
              "| tokens / sequence | sequences / iteration | iteration (ms) | tokens/s | peak allocated (GiB) |",
              "| --- | --- | --- | --- | --- |"]
    for row in result["speed"]:
        lines.append(f"| {row['seq_len']} | {row['sequences']} | {row.get('iteration_ms', 'failed')} | "
                     f"{row.get('tokens_per_s', '-')} | {row['peak_gib']} |")
    lines += ["", f"Iteration time: median of iterations {TIMED_FROM}..{SPEED_ITERATIONS} (Megatron-LM's log, "
                  f"log interval 1; the 8k row: {TIMED_FROM}..30 of the train run); peak: the largest "
                  f"'max allocated' of Megatron-LM's memory reports.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="results folder")
    parser.add_argument("--work", default="/tmp/megatron_lm_check", help="checkpoints of the check (a new folder)")
    parser.add_argument("--gpu-tag", default=None, help="file name tag (default: h100 / h200 from the GPU name)")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes) per run")
    parser.add_argument("--flags", default="", help="Megatron-LM / NSA flags added to every run, e.g. "
                                                     "'--context-parallel-size 2 --nsa-cp-exchange ring'")
    parser.add_argument("--variant", default=None, help="file name suffix: megatron_lm_<gpu>_<variant>")
    parser.add_argument("--commit", default=None, help="commit of the code measured (default: git rev-parse)")
    parser.add_argument("--timeouts", type=int, nargs=5, default=[170, 110, 110, 130, 110], metavar="S",
                        help="seconds for the train, resume, 32k, 64k and 64k-resume runs")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists() and any(work.iterdir()):
        raise SystemExit(f"--work {work} is not empty; give a new folder (this check never overwrites checkpoints)")
    first_dir, resume_dir = work / "train", work / "resume"
    gpu = gpu_name()
    tag = gpu_tag(args.nproc, gpu) if args.gpu_tag is None else (
        args.gpu_tag if args.nproc == 1 else f"{args.nproc}x{args.gpu_tag}")
    if args.variant:
        tag = f"{tag}_{args.variant}"
    extra = args.flags.split()
    command = functools.partial(pretrain_command, nproc=args.nproc)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    result = dict(gpu=gpu, gpus=args.nproc, flags=args.flags, commit=args.commit or commit_of_tree(), date=date,
                  megatron_lm=os.environ.get("MEGATRON_LM_VERSION", "core_v0.19.0"), train={}, resume={}, speed=[])

    def write() -> None:  # after every run, so that a cut-off check still leaves what it measured
        (out / f"megatron_lm_{tag}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"megatron_lm_{tag}.md").write_text(markdown(result))

    train = run("train", command(8192, 8, 30, [*RESUME_OPTIMIZER, *extra, "--save", str(first_dir),
                                               "--save-interval", "15"]), out, args.timeouts[0])
    last = max(train.losses, default=0)
    result["train"] = dict(returncode=train.returncode, iterations=last, initial_loss=train.losses.get(1),
                           final_loss=train.losses.get(last), losses=train.losses)
    result["speed"].append(speed_row(train, 8192, 8))
    write()
    resumed = run("resume", command(8192, 8, 30, [
        *RESUME_OPTIMIZER, *extra, "--load", str(first_dir), "--ckpt-step", "15", "--exit-on-missing-checkpoint",
        "--save", str(resume_dir), "--save-interval", "100000"]), out, args.timeouts[1])
    result["resume"] = dict(resume_comparison(train, resumed, 16, 30), returncode=resumed.returncode)
    write()
    long_dir, long_resume_dir = work / "train_64k", work / "resume_64k"
    for (seq_len, batch), timeout in zip(SPEED_SHAPES[1:], args.timeouts[2:4]):
        if seq_len == LONG_RESUME_SEQ_LEN:  # the longest run also saves, for the resume at that length
            options = [*RESUME_OPTIMIZER, "--save", str(long_dir), "--save-interval", str(LONG_RESUME_FROM)]
        else:
            options = ["--use-distributed-optimizer"]
        log = run(f"speed_{seq_len // 1024}k", command(seq_len, batch, SPEED_ITERATIONS, [*options, *extra]),
                  out, timeout)
        if seq_len == LONG_RESUME_SEQ_LEN:
            long_first = log
        result["speed"].append(speed_row(log, seq_len, batch))
        write()
    long_resumed = run(f"resume_{LONG_RESUME_SEQ_LEN // 1024}k", command(LONG_RESUME_SEQ_LEN, 2, SPEED_ITERATIONS, [
        *RESUME_OPTIMIZER, *extra, "--load", str(long_dir), "--ckpt-step", str(LONG_RESUME_FROM),
        "--exit-on-missing-checkpoint", "--save", str(long_resume_dir), "--save-interval", "100000"]),
        out, args.timeouts[4])
    result["resume_long"] = dict(resume_comparison(long_first, long_resumed, LONG_RESUME_FROM + 1, SPEED_ITERATIONS),
                                 seq_len=LONG_RESUME_SEQ_LEN, returncode=long_resumed.returncode)
    write()
    print(markdown(result))
    return 0 if train.returncode == 0 and resumed.returncode == 0 and long_resumed.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
