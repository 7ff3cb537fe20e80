"""No run loses another run's checkpoints: two runs in one checkpoint.dir, every checkpoint of both
accounted for (CPU end to end through launch/train.sh), and the clearest message when a directory holds
another model. Also a clean stop on Ctrl-C / SIGTERM to the whole process group."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train_harness import FAST, REPO_ROOT, TINY_RECIPE, TRAIN_SH, child_env, finish, read_records, run_training


def fingerprint(directory: Path) -> dict:
    """{checkpoint name: sha256 of every file in it}: what must stay byte for byte the same."""
    result = {}
    for step_dir in sorted(directory.glob("step_*")):
        digest = hashlib.sha256()
        for path in sorted(step_dir.rglob("*")):
            if path.is_file():
                digest.update(path.name.encode() + path.read_bytes())
        result[step_dir.name] = digest.hexdigest()
    return result


def run_id(step_dir: Path) -> str:
    return json.loads((step_dir / "meta.json").read_text())["run_id"]


def assert_ok(run):
    assert run.returncode == 0, f"training failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, corpus_cache):
    """6 steps, a checkpoint every 2, the newest 2 kept: step_00000004 and step_00000006."""
    workdir = tmp_path_factory.mktemp("first")
    ckpt = workdir / "ckpt"
    run = run_training(workdir, [f"data.cache_dir={corpus_cache}", f"checkpoint.dir={ckpt}", "training.train_steps=6",
                                 "checkpoint.save_interval=2", "checkpoint.keep_last=2"])
    assert_ok(run)
    assert sorted(fingerprint(ckpt)) == ["step_00000004", "step_00000006"]
    return run, workdir, ckpt


def test_summary_names_what_exists_and_what_to_run_next(first_run):
    """The summary's paths exist, and its evaluation command, run as printed, gives the run's last
    validation loss (eval.loss defaults to the recipe's validation batches)."""
    run, workdir, ckpt = first_run
    final = ckpt / "step_00000006"
    assert f"  final checkpoint: {final}" in run.stdout and final.is_dir()
    assert f"  tensorboard --logdir {ckpt / 'tensorboard'}" in run.stdout
    command = next(line for line in run.stdout.splitlines() if line.startswith("  next: "))
    assert command.startswith(f"  next: python -m megatron_nsa.eval.loss --checkpoint {ckpt}   (")
    args = command.split("   (")[0].split()[4:]
    env = child_env(1)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "megatron_nsa.eval.loss", *args, "--json", str(workdir / "loss.json")],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((workdir / "loss.json").read_text())
    assert report["step"] == 6
    assert report["loss"] == pytest.approx(run.validation_losses()[6], rel=1e-5)


def test_fresh_start_in_a_used_directory_is_refused_and_a_subdirectory_keeps_both_runs(tmp_path, corpus_cache,
                                                                                     first_run):
    _, workdir, ckpt = first_run
    before = fingerprint(ckpt)
    common = [f"data.cache_dir={corpus_cache}", f"checkpoint.dir={ckpt}", "checkpoint.resume=false",
              "training.train_steps=4", "checkpoint.save_interval=1", "checkpoint.keep_last=2"]

    refused = run_training(tmp_path / "refused", common)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert (f"checkpoint.dir={ckpt} holds checkpoints of an earlier run (step_00000004, step_00000006)"
            in refused.stderr)
    assert "checkpoint.new_run_subdir=true" in refused.stderr and "checkpoint.dir=NEW_DIR" in refused.stderr
    assert not refused.losses()
    assert fingerprint(ckpt) == before

    second = run_training(tmp_path / "second", common + ["checkpoint.new_run_subdir=true"])
    assert_ok(second)
    subdirs = list(ckpt.glob("run_*"))
    assert len(subdirs) == 1
    assert sorted(fingerprint(subdirs[0])) == ["step_00000003", "step_00000004"]  # its own, pruned to 2
    assert fingerprint(ckpt) == before  # the first run's checkpoints, byte for byte
    assert run_id(subdirs[0] / "step_00000004") != run_id(ckpt / "step_00000006")
    final = subdirs[0] / "step_00000004"
    assert f"  final checkpoint: {final}" in second.stdout


def test_pruning_removes_only_this_runs_checkpoints(tmp_path, corpus_cache, first_run):
    """A resumed run with keep_last=1 deletes its own older checkpoints, never a foreign one."""
    _, _, source = first_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(source, ckpt)
    foreign = ckpt / "step_00000001"
    shutil.copytree(ckpt / "step_00000004", foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps(dict(meta, run_id="another-run", step=1)))
    foreign_print = fingerprint(ckpt)["step_00000001"]

    resumed = run_training(tmp_path, [f"data.cache_dir={corpus_cache}", f"checkpoint.dir={ckpt}",
                                      "training.train_steps=8", "checkpoint.save_interval=1", "checkpoint.keep_last=1"])
    assert_ok(resumed)
    assert f"resumed from {ckpt / 'step_00000006'} at step 6" in resumed.stdout
    assert sorted(fingerprint(ckpt)) == ["step_00000001", "step_00000008"]
    assert fingerprint(ckpt)["step_00000001"] == foreign_print
    assert run_id(ckpt / "step_00000008") == run_id(source / "step_00000006")  # a resumed run keeps its id


def test_a_directory_of_another_model_is_named_first(tmp_path, corpus_cache, first_run):
    """The second README example (the dense twin) in the first one's directory: the clear cause, not the layout."""
    _, _, ckpt = first_run
    before = fingerprint(ckpt)
    dense = run_training(tmp_path, [f"data.cache_dir={corpus_cache}", f"checkpoint.dir={ckpt}", "model.attention=dense",
                                    "training.train_steps=6"])
    assert dense.returncode == 2
    assert f"checkpoint.dir={ckpt} holds a model.attention=nsa model" in dense.stderr
    assert "use another checkpoint.dir" in dense.stderr
    assert "parallel sizes" not in dense.stderr
    assert fingerprint(ckpt) == before


def _default_sigint():
    """A run started from a background job inherits SIGINT ignored; a terminal job gets it by default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stop_of_the_whole_process_group_prints_the_note_alone(tmp_path, corpus_cache, signum):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM to every process (SLURM, `timeout`): the
    workers save and stop; no torchrun traceback, no logging error, the one-line note last."""
    ckpt = tmp_path / "ckpt"
    args = [str(TRAIN_SH), str(TINY_RECIPE), *FAST, f"logging.metrics_file={tmp_path / 'metrics.jsonl'}",
            f"data.cache_dir={corpus_cache}", f"checkpoint.dir={ckpt}", "training.train_steps=1000",
            "optimizer.decay_steps=10"]
    process = subprocess.Popen(args, cwd=tmp_path, env=child_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,  # its own process group, as a terminal job
                               preexec_fn=_default_sigint)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= 2 and "loss" in r for r in read_records(tmp_path)):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.2)
    os.killpg(process.pid, signum)
    run = finish(process, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for noise in ("Traceback", "SignalException", "Logging error", "ChildFailedError"):
        assert noise not in run.stderr, run.stderr[-3000:]
    note = run.stderr.strip().splitlines()[-1]
    step = max(run.losses())
    saved = ckpt / f"step_{step:08d}"
    assert note == f"stopped by SIGTERM at step {step}; checkpoint {saved}: run the same command to resume"
    assert saved.is_dir()
