"""The evaluation commands on a checkpoint of a real (tiny, seconds-long) training run on CPU, and their
answers to bad input."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
# configs/tiny.yaml shrunk to seconds on the retrieval task: 2 layers, 64 tokens, learned positions for 256,
# keys for needles of up to 256 tokens.
TINY_RUN = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.num_query_groups=2",
    "model.max_position_embeddings=256", "data.source=retrieval", "data.seq_length=64", "retrieval.num_keys=128",
    "retrieval.num_values=32", "nsa.compress_block_size=8",
    "nsa.compress_stride=4", "nsa.select_block_size=16", "nsa.select_count=3", "nsa.window_size=16",
    "training.micro_batch_size=2", "training.global_batch_size=4", f"training.train_steps={STEPS}",
    "training.eval_interval=2", "training.eval_steps=2", "optimizer.warmup_steps=1", "optimizer.lr=3e-3",
    "logging.log_interval=1", "checkpoint.save_interval=0",
]


def env() -> dict:
    variables = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    variables["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), variables.get("PYTHONPATH")]))
    return variables


def run_module(module: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(work dir, checkpoint dir, validation losses by step) of a 4-step NSA run on the retrieval task."""
    workdir = tmp_path_factory.mktemp("eval_run")
    metrics = workdir / "metrics.jsonl"
    result = run_module("megatron_nsa.training.train", REPO / "configs" / "tiny.yaml", *TINY_RUN,
                        f"checkpoint.dir={workdir / 'ckpt'}", f"logging.metrics_file={metrics}", cwd=workdir)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return workdir, workdir / "ckpt", {r["step"]: r["validation_loss"] for r in records if "validation_loss" in r}


@pytest.mark.slow
def test_eval_loss_reproduces_the_training_validation(trained):
    workdir, checkpoint, validation = trained
    # the loop validates on eval_steps=2 global batches of 4: the same 8 samples as 2 batches of 4
    result = run_module("megatron_nsa.eval.loss", "--checkpoint", checkpoint, "--batches", 2, "--batch-size", 4,
                        "--json", workdir / "loss.json", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((workdir / "loss.json").read_text())
    assert report["step"] == STEPS and report["attention"] == "nsa" and report["seq_length"] == 64
    assert report["loss"] == pytest.approx(validation[STEPS], rel=1e-5)
    assert report["tokens"] > 0 and report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    assert f"loss {report['loss']:.4f}" in result.stdout and "bits per byte" in result.stdout


@pytest.mark.slow
def test_needle_command_writes_grid_json_and_table(trained):
    workdir, checkpoint, _ = trained
    result = run_module("megatron_nsa.eval.needle", "--checkpoint", checkpoint / "step_00000004", "--lengths", 64, 200,
                        "--depths", 0, 50, 100, "--samples", 3, 2, "--json", workdir / "needle.json",
                        "--table", workdir / "needle.md", "--png", workdir / "needle.png", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((workdir / "needle.json").read_text())
    assert report["format"] == "retrieval" and report["lengths"] == [64, 200] and report["samples"] == [3, 2]
    assert set(report["accuracy"]) == {"64", "200"} and set(report["accuracy"]["64"]) == {"0", "50", "100"}
    for grid in (report["accuracy"], report["token_accuracy"]):
        assert all(0.0 <= value <= 1.0 for row in grid.values() for value in row.values())
    table = (workdir / "needle.md").read_text()
    assert table.splitlines()[0] == "| depth \\ length | 64 | 200 |" and "| 50% |" in table
    assert table in result.stdout
    if importlib.util.find_spec("matplotlib"):
        assert (workdir / "needle.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed: skipped" in result.stdout and not (workdir / "needle.png").exists()


@pytest.mark.slow
def test_needle_selections_count_the_layers_that_select_the_needle(trained):
    """With n = 3 = one initial + two local blocks every selection is forced: the needle's block is selected
    at depth 0 (the initial block) and 100% (next to the question) in every layer and head, never at 50%."""
    workdir, checkpoint, _ = trained
    result = run_module("megatron_nsa.eval.needle", "--checkpoint", checkpoint, "--lengths", 64, 200,
                        "--depths", 0, 50, 100, "--samples", 2, "--selections", "--ranks",
                        "--json", workdir / "selected.json", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((workdir / "selected.json").read_text())
    for length in ("64", "200"):
        assert report["needle_block_selected"][length] == {"0": 1.0, "50": 0.0, "100": 1.0}
        assert report["needle_block_selected_by_layer"][length]["50"] == [0.0, 0.0]  # two layers
        # --ranks: the initial block ranks first, a block next to the question among the 3 forced, the middle after
        ranks = report["needle_block_rank"][length]
        assert ranks["0"] == 1 and ranks["100"] <= 3 < ranks["50"] <= report["candidate_blocks"][length]
        assert len(report["needle_block_rank_by_layer"][length]["50"]) == 2
        target = report["needle_block_target_rank"][length]  # the same ranks by the block score loss's target
        assert target["0"] == 1 and target["100"] <= 3 < target["50"] <= report["candidate_blocks"][length]
        assert len(report["needle_block_target_rank_by_layer"][length]["50"]) == 2
    assert report["candidate_blocks"] == {"64": 4, "200": 13} and report["select_count"] == 3
    assert "needle block selected at the question" in result.stdout and "needle block selected 66.7%" in result.stdout
    assert "needle block's median rank at the question" in result.stdout and "candidate blocks 4 at 64" in result.stdout
    assert "the same rank by the block score loss's target" in result.stdout


@pytest.mark.slow
def test_needle_with_every_branch_silenced_still_selects_and_says_so(trained):
    """--silence sets those branches' gates to 0 (tests/test_silenced_branches.py checks the outputs); the
    selection still runs, so the selections diagnostic is the same as without it."""
    workdir, checkpoint, _ = trained
    result = run_module("megatron_nsa.eval.needle", "--checkpoint", checkpoint, "--lengths", 64, "--depths", 0, 50,
                        100, "--samples", 2, "--selections", "--silence", "cmp", "slc", "win",
                        "--json", workdir / "silenced.json", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((workdir / "silenced.json").read_text())
    assert report["silenced_branches"] == ["cmp", "slc", "win"]
    assert report["needle_block_selected"]["64"] == {"0": 1.0, "50": 0.0, "100": 1.0}
    assert "branches off: cmp slc win" in result.stdout


@pytest.mark.slow
def test_eval_loss_on_an_indexed_dataset(trained, tmp_path):
    from megatron_nsa.data.build_dataset import build_indexed_dataset
    from megatron_nsa.data.tokenizer import ByteTokenizer

    workdir, checkpoint, _ = trained
    prefix = tmp_path / "corpus"
    build_indexed_dataset([REPO / "README.md", REPO / "setup.py"], str(prefix), ByteTokenizer())
    result = run_module("megatron_nsa.eval.loss", "--checkpoint", checkpoint, "--data", prefix, "--batches", 2,
                        "--batch-size", 3, "--seq-length", 50, "--json", tmp_path / "loss.json", cwd=workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "loss.json").read_text())
    assert report["data"] == [str(prefix)] and report["seq_length"] == 50
    assert report["tokens"] == 2 * 3 * 50  # every token of text is a target
    assert 0.0 < report["loss"] < 10.0


def call_main(main, argv, capsys):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_missing_or_empty_checkpoint_is_named(tmp_path, capsys):
    from megatron_nsa.eval import loss, needle

    code, err = call_main(loss.main, ["--checkpoint", tmp_path / "nowhere"], capsys)
    assert code == 2 and f"--checkpoint '{tmp_path / 'nowhere'}' is not a directory" in err
    code, err = call_main(needle.main, ["--checkpoint", tmp_path], capsys)
    assert code == 2 and f"--checkpoint '{tmp_path}' holds no complete checkpoint" in err


def test_checkpoint_is_named_as_given(tmp_path, monkeypatch):
    """A run's directory resolves to its newest complete step, named relative to where the command runs when
    given so: results files then name the run's directory, not the machine's."""
    from megatron_nsa.eval.checkpoints import resolve_checkpoint

    for step in (3, 10):
        (tmp_path / "run" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "run" / f"step_{step:08d}" / "meta.json").write_text("{}")
    (tmp_path / "run" / "step_00000020").mkdir()  # no meta.json: not complete
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("run") == os.path.join("run", "step_00000010")
    assert resolve_checkpoint("./run/step_00000003/") == os.path.join("run", "step_00000003")
    assert resolve_checkpoint(str(tmp_path / "run")) == str(tmp_path / "run" / "step_00000010")


def test_missing_dataset_files_are_named(trained, capsys):
    from megatron_nsa.eval import loss

    _, checkpoint, _ = trained
    code, err = call_main(loss.main, ["--checkpoint", checkpoint, "--data", "/no/such/corpus"], capsys)
    assert code == 2 and "--data '/no/such/corpus' is missing /no/such/corpus.bin, /no/such/corpus.idx" in err
    code, err = call_main(loss.main, ["--checkpoint", checkpoint, "--batches", 0], capsys)
    assert code == 2 and "--batches 0 is not allowed: it must be >= 1" in err


@pytest.mark.parametrize("args, message", [
    (["--depths", 0, 120], "--depths 120 is not allowed: depths are percentages from 0 to 100"),
    (["--lengths", 7], "--lengths 7 is not allowed: a sample needs at least 8 tokens"),
    (["--lengths", 64, 258], "retrieval.num_keys=128 is too small for the needle length (--lengths)=258"),
    (["retrieval.num_keys=500"], "retrieval.num_keys=500 and num_values=32 need token ids up to 789, but the "
                                 "checkpoint's vocabulary was built for num_keys=128 and num_values=32"),
    (["--lengths", 300, "--format", "text"], "--lengths 300 is not allowed: the model has learned positions for 256 "
                                             "tokens"),
    (["--lengths", 64, 128, "--samples", 1, 2, 3], "--samples 1 2 3 is not allowed: give one count, or one per length"),
    (["--samples", 0], "--samples 0 is not allowed: it must be >= 1"),
    (["training.lr=1"], "unknown recipe key 'training.lr'"),
    (["--selections", "model.attention=dense"], "--selections needs an NSA model; this one has "
                                                "model.attention='dense'"),
    (["--ranks", "model.attention=dense"], "--ranks needs an NSA model; this one has model.attention='dense'"),
])
def test_bad_needle_grids_are_named(trained, capsys, args, message):
    from megatron_nsa.eval import needle

    _, checkpoint, _ = trained
    code, err = call_main(needle.main, ["--checkpoint", checkpoint, *args], capsys)
    assert code == 2 and message in err, err


def test_needle_ranks_refuse_the_triton_backend_on_cuda(trained, monkeypatch):
    """--ranks reads block scores, which the Triton kernels never form: on CUDA it needs nsa.backend=torch
    (checked from the recipe, before any model is loaded)."""
    import torch

    from megatron_nsa.eval import needle
    from megatron_nsa.eval.checkpoints import EvalInputError, checkpoint_recipe, read_meta, resolve_checkpoint

    _, checkpoint, _ = trained
    step_dir = resolve_checkpoint(str(checkpoint))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    recipe = checkpoint_recipe(step_dir, read_meta(step_dir), None, [])
    with pytest.raises(EvalInputError, match="--ranks needs the torch NSA backend .* nsa.backend=null \\(triton on "
                                             "CUDA\\): add nsa.backend=torch or --device cpu"):
        needle.check_ranks_backend(recipe, "auto")
    needle.check_ranks_backend(recipe, "cpu")
    needle.check_ranks_backend(checkpoint_recipe(step_dir, read_meta(step_dir), None, ["nsa.backend=torch"]), "cuda")


def test_eval_loss_refuses_lengths_past_learned_positions(trained, capsys):
    from megatron_nsa.eval import loss

    _, checkpoint, _ = trained
    code, err = call_main(loss.main, ["--checkpoint", checkpoint, "--seq-length", 300], capsys)
    assert code == 2 and "--seq-length 300 is not allowed: the model has learned positions for 256 tokens" in err


@pytest.mark.slow
def test_exported_weights_evaluate_like_the_checkpoint(trained, tmp_path):
    """fp32 weights give the training checkpoint's loss exactly, bf16 weights within bf16's rounding; the export is
    the model alone (no optimizer state), and a training run refuses to resume from it."""
    import torch

    workdir, checkpoint, validation = trained
    exported = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / f"weights_{dtype}"
        result = run_module("megatron_nsa.eval.export", "--checkpoint", checkpoint, "--out", out, "--dtype", dtype,
                            cwd=workdir)
        assert result.returncode == 0, result.stderr[-2000:]
        step_dir = out / f"step_{STEPS:08d}"
        assert f"-> {step_dir}" in result.stdout
        meta = json.loads((step_dir / "meta.json").read_text())
        assert meta["format"] == "weights" and meta["dtype"] == dtype and meta["step"] == STEPS
        state = torch.load(step_dir / "model.pt", map_location="cpu", weights_only=False)
        floats = [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
        assert floats and all(v.dtype == (torch.float32 if dtype == "fp32" else torch.bfloat16) for v in floats)
        exported[dtype] = step_dir
        result = run_module("megatron_nsa.eval.loss", "--checkpoint", out, "--batches", 2, "--batch-size", 4,
                            "--json", tmp_path / f"loss_{dtype}.json", cwd=workdir)
        assert result.returncode == 0, result.stderr[-2000:]
    full = os.path.getsize(checkpoint / f"step_{STEPS:08d}" / "rank_00000.pt")
    assert os.path.getsize(exported["bf16"] / "model.pt") < full / 4  # fp32 weights + Adam's two moments
    loss_fp32 = json.loads((tmp_path / "loss_fp32.json").read_text())["loss"]
    loss_bf16 = json.loads((tmp_path / "loss_bf16.json").read_text())["loss"]
    assert loss_fp32 == pytest.approx(validation[STEPS], rel=1e-6)
    assert loss_bf16 == pytest.approx(validation[STEPS], rel=2e-2) and loss_bf16 != loss_fp32

    result = run_module("megatron_nsa.training.train", REPO / "configs" / "tiny.yaml", *TINY_RUN,
                        f"checkpoint.dir={exported['fp32'].parent}", cwd=workdir)
    assert result.returncode != 0
    assert "holds model weights alone" in result.stdout + result.stderr


def test_export_never_replaces_an_export(trained, tmp_path, capsys):
    from megatron_nsa.eval import export

    _, checkpoint, _ = trained
    existing = tmp_path / "weights" / f"step_{STEPS:08d}"
    existing.mkdir(parents=True)
    (existing / "model.pt").write_text("an earlier export")
    code, err = call_main(export.main, ["--checkpoint", checkpoint, "--out", tmp_path / "weights"], capsys)
    assert code == 2 and f"--out '{tmp_path / 'weights'}' already holds {existing}: it is not replaced" in err
    assert (existing / "model.pt").read_text() == "an earlier export"
    assert sorted(os.listdir(tmp_path / "weights")) == [existing.name]
    code, err = call_main(export.main, ["--checkpoint", checkpoint, "--out", tmp_path / "w2", "--dtype", "fp16"],
                          capsys)
    assert code == 2 and "--dtype 'fp16' is not allowed: use one of bf16, fp32" in err
