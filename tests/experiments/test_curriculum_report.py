"""experiments/curriculum_report.py: the answer loss at the stage ends and at chosen steps, each run's recall
curve, needle grids (with the selection rate, the needle block's rank and the silenced grid where a run has
them) in one markdown and one JSON file; bad --run arguments are named."""
from __future__ import annotations

import json

import pytest

from experiments import curriculum_report

DEPTHS = [0.0, 50.0, 100.0]


def _write_run(directory, losses, needle_accuracy, selected=None, silenced=None, rank=None):
    """A run directory as the curriculum script leaves it: losses {step: loss}; needle at 8k and 16k."""
    directory.mkdir()
    with open(directory / "metrics.jsonl", "w") as f:
        for step, loss in losses.items():
            f.write(json.dumps({"step": step, "loss": loss + 0.01, "lr": 1e-3}) + "\n")
            f.write(json.dumps({"step": step, "validation_loss": loss}) + "\n")
    for step, length in ((1000, 256), (3400, 8192)):
        recall = {"step": step, "seq_length": length, "samples": 16, "attention": "nsa",
                  "stated": {"1": [3, 4], "4+": [9, 10]}, "distance": {"<= 16": [5, 5], "> 4096": [1, 4]}}
        (directory / f"recall_step_{step}.json").write_text(json.dumps(recall))
    grid = lambda value: {length: {f"{d:g}": value for d in DEPTHS} for length in ("8192", "16384")}  # noqa: E731
    needle = {"step": 3400, "lengths": [8192, 16384], "depths": DEPTHS, "samples": [10, 10],
              "accuracy": grid(needle_accuracy)}
    if selected is not None:
        needle["needle_block_selected"] = grid(selected)
    (directory / "needle.json").write_text(json.dumps(needle))
    if silenced is not None:
        (directory / "needle_silenced.json").write_text(json.dumps(
            {"step": 3400, "lengths": [8192], "depths": DEPTHS, "samples": [10], "silenced_branches": ["cmp", "win"],
             "accuracy": {"8192": {f"{d:g}": silenced for d in DEPTHS}}}))
    if rank is not None:
        (directory / "needle_ranks.json").write_text(json.dumps(
            {"step": 3400, "lengths": [8192], "depths": DEPTHS, "samples": [4], "candidate_blocks": {"8192": 128},
             "select_count": 16, "needle_block_rank": {"8192": {f"{d:g}": rank for d in DEPTHS}},
             "needle_block_target_rank": {"8192": {f"{d:g}": 4.0 for d in DEPTHS}}}))


def test_report_puts_the_runs_side_by_side(tmp_path, capsys):
    _write_run(tmp_path / "nsa", {1000: 0.5, 2000: 0.25, 3400: 0.125}, 0.9, selected=0.7, silenced=0.8, rank=20.5)
    _write_run(tmp_path / "dense", {1000: 0.75, 2000: 0.375, 3400: 0.0625}, 1.0)
    out = tmp_path / "results" / "report_h100"
    assert curriculum_report.main(["--run", f"nsa={tmp_path / 'nsa'}", "--run", f"dense={tmp_path / 'dense'}",
                                   "--gpu", "NVIDIA H100 80GB HBM3", "--out", str(out), "--steps", "2000",
                                   "--commit", "abc1234", "--title", "Gaps"]) == 0
    text = (tmp_path / "results" / "report_h100.md").read_text()
    assert text.startswith("# Gaps\n") and "Recorded at commit `abc1234`" in text and "(NVIDIA H100 80GB HBM3)" in text
    assert "| step | 1,000 (256) | 2,000 | 3,400 (8,192) |" in text  # stage ends with their lengths, and --steps
    assert "| nsa | 0.5000 | 0.2500 | 0.1250 |" in text and "| dense | 0.7500 | 0.3750 | 0.0625 |" in text
    assert "| 3400 | 8,192 | 75.0% | 90.0% | 100.0% | - | - | - | - | 25.0% |" in text  # the recall curve
    assert "Needle, nsa, step 3,400 (10 samples per cell):" in text and "| mean | 90.0% | 90.0% |" in text
    assert "| mean | 100.0% | 100.0% |" in text  # dense's grid
    assert "Needle block selected at the question, nsa" in text and "| mean | 70.0% | 70.0% |" in text
    assert "Needle, nsa, with the branches cmp win off:" in text and "| mean | 80.0% |" in text
    assert ("Needle block's median rank at the question, nsa, step 3,400 (1 = highest score; the top 16 are "
            "selected; candidate blocks 128 at 8,192):" in text) and "| 50% | 20.5 |" in text
    assert "The same rank by the block score loss's target" in text and "| 50% | 4 |" in text
    assert "selected at the question, dense" not in text and "dense, with the branches" not in text
    assert "rank at the question, dense" not in text
    report = json.loads((tmp_path / "results" / "report_h100.json").read_text())
    assert report["recorded"]["commit"] == "abc1234" and report["recorded"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert report["runs"]["dense"]["validation_answer_loss"] == {"1000": 0.75, "2000": 0.375, "3400": 0.0625}
    assert report["runs"]["nsa"]["needle_silenced"]["silenced_branches"] == ["cmp", "win"]
    assert text in capsys.readouterr().out


@pytest.mark.parametrize("run, message", [
    ("nsa", "--run 'nsa' must look like NAME=DIR"),
    ("nsa=/no/such/dir", "no directory '/no/such/dir'"),
    ("nsa={empty}", "holds no metrics.jsonl"),
])
def test_bad_runs_are_named(tmp_path, capsys, run, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exited:
        curriculum_report.main(["--run", run.format(empty=tmp_path / "empty"), "--gpu", "H100", "--out",
                                str(tmp_path / "r")])
    assert exited.value.code == 2 and message in capsys.readouterr().err


def test_run_names_must_differ(tmp_path, capsys):
    _write_run(tmp_path / "a", {100: 1.0}, 0.5)
    with pytest.raises(SystemExit):
        curriculum_report.main(["--run", f"x={tmp_path / 'a'}", "--run", f"x={tmp_path / 'a'}", "--gpu", "H100",
                                "--out", str(tmp_path / "r")])
    assert "--run names must differ, got ['x', 'x']" in capsys.readouterr().err
