"""experiments/recall_breakdown.py: each answer's times-stated and distance, the bucketed table, and the table of
the curriculum's stage breakdowns by step."""
from __future__ import annotations

import json

import numpy
import pytest

from experiments.recall_breakdown import answer_contexts, breakdown, curve, curve_markdown, main, markdown
from megatron_nsa.data.retrieval import TRAIN_STREAM, RetrievalFormat, generate_sequence, sample_rng


def test_answer_contexts_of_a_hand_made_sequence():
    # records: k1 v1 | k2 v2 | k1 v1 (asked) | k3 v3 | k1 v1 (asked) | k2 v2 (asked)
    tokens = numpy.array([300, 900, 301, 901, 300, 900, 302, 902, 300, 900, 301, 901])
    labels_mask = numpy.zeros(12, dtype=bool)
    labels_mask[[4, 8, 10]] = True  # the key positions whose next token (the value) is an answer
    assert answer_contexts(tokens, labels_mask) == [(4, 1, 4), (8, 2, 4), (10, 1, 8)]


def test_answer_contexts_match_a_brute_force_count_on_task_samples():
    fmt = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8, single_facts=4)
    for index in range(5):
        tokens, answer_mask = generate_sequence(129, sample_rng(7, TRAIN_STREAM, index), fmt)
        tokens, loss_mask = tokens[:-1], answer_mask[1:]
        contexts = answer_contexts(tokens, loss_mask)
        assert [p for p, _, _ in contexts] == numpy.flatnonzero(loss_mask).tolist()
        for position, stated, distance in contexts:
            earlier = numpy.flatnonzero(tokens[:position] == tokens[position])
            assert stated == earlier.size and stated >= 1
            assert distance == position - earlier[-1]


def test_breakdown_buckets_and_skips_unseen_keys():
    table = breakdown([(1, 10, True), (1, 300, False), (5, 20, True), (4, 5000, True), (0, 0, False)])
    assert table["stated"] == {"1": [1, 2], "4+": [2, 2]}
    assert table["distance"] == {"<= 16": [1, 1], "<= 64": [1, 1], "<= 1024": [0, 1], "> 4096": [1, 1]}
    text = markdown({"attention": "nsa", "step": 7, "samples": 3, "seq_length": 128, **table})
    assert "| accuracy | 50.0% | 100.0% |" in text and "| <= 16 | <= 64 | <= 1024 | > 4096 |" in text


def test_curve_orders_the_stage_breakdowns_by_step(tmp_path):
    stages = {1400: (1024, breakdown([(1, 10, True), (1, 300, False), (4, 20, True)])),
              300: (256, breakdown([(1, 10, False), (5, 100, True)]))}
    for step, (length, table) in stages.items():
        (tmp_path / f"recall_step_{step}.json").write_text(
            json.dumps({"step": step, "seq_length": length, "attention": "nsa", "samples": 2, **table}))
    (tmp_path / "recall.json").write_text("{}")  # not a stage's breakdown: left out
    lines = curve_markdown(curve(str(tmp_path))).splitlines()
    assert lines[0].startswith("| step | tokens | stated once | stated 4+ times | <= 16 back |")
    assert lines[2] == "| 300 | 256 | 0.0% | 100.0% | 0.0% | - | 100.0% | - | - | - |"
    assert lines[3] == "| 1400 | 1,024 | 50.0% | 100.0% | 100.0% | 100.0% | - | 0.0% | - | - |"


def test_curve_of_a_directory_without_breakdowns_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--curve", str(tmp_path)])
    assert "no recall_step_STEP.json files" in capsys.readouterr().err
