"""benchmarks/cp_scale_model.py on tiny synthetic bench_cp results: the fits, the byte formulas, monotonicity,
and the best-mode table."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import cp_scale_model as model

A_MS, B_MS = 2e-3, 1.5e-8  # synthetic truth: ms per local token, ms per (local token x token)


def _row(gpus, seq_len, mode="allgather", factor=1.0, fetch_fraction=None):
    local = seq_len / gpus
    no_comm = (A_MS * local + B_MS * local * seq_len) * factor
    return dict(seq_len=seq_len, gpus=gpus, mode=mode, step_ms=no_comm * 1.05, no_comm_step_ms=no_comm,
                comm_only_ms=2.0, exposed_ms=no_comm * 0.05, peak_gib=1e-4 * local, head_group_size=1,
                bytes_received={"selection fwd": 4e8 * (gpus - 1) / gpus}, fetch_fraction=fetch_fraction)


def _write(tmp_path, gpus, rows, **extra):
    path = tmp_path / f"bench_cp_synthetic_x{gpus}.json"
    path.write_text(json.dumps({"rows": rows, "config": dict(model.DEFAULT_SIZES), **extra}))
    return str(path)


@pytest.fixture
def files(tmp_path):
    one = _write(tmp_path, 1, [_row(1, 131072), _row(1, 262144)])
    two = _write(tmp_path, 2, [_row(2, 262144), _row(2, 524288), _row(2, 524288, "ring", factor=1.1),
                               _row(2, 524288, "fetch", factor=1.2, fetch_fraction=0.97)],
                 link_bandwidth={"all_gather_gb_per_s": 300.0, "all_to_all_gb_per_s": 250.0})
    return [one, two]


def test_compute_fit_recovers_the_synthetic_costs(files):
    meas = model.load(files)
    geo = model.geometry_from(meas.sizes, meas.head_group_size)
    fit = model.fit_compute(meas, geo)
    assert math.isclose(fit.a, A_MS, rel_tol=1e-6) and math.isclose(fit.b, B_MS, rel_tol=1e-6)
    assert "least squares" in fit.source
    assert math.isclose(fit.mode_factor["ring"], 1.1, rel_tol=1e-6)
    assert math.isclose(fit.mode_factor["fetch"], 1.2, rel_tol=1e-6)
    # with per-chunk times the linear and quadratic parts come from the branches
    chunks = [dict(seq_len=r["seq_len"], gpus=r["gpus"], local_tokens=r["seq_len"] // r["gpus"],
                   window_ms=A_MS * r["seq_len"] / r["gpus"] / 3, selected_ms=2 * A_MS * r["seq_len"] / r["gpus"] / 3,
                   compressed_topk_ms=B_MS * r["seq_len"] / r["gpus"] * r["seq_len"])
              for r in meas.rows if r["mode"] == "allgather"]
    meas.chunk_times = chunks
    fit = model.fit_compute(meas, geo)
    assert math.isclose(fit.a, A_MS, rel_tol=1e-6) and math.isclose(fit.b, B_MS, rel_tol=1e-6)
    assert math.isclose(fit.window_share, 1 / 3, rel_tol=1e-6) and "per-chunk" in fit.source


def test_byte_formulas_and_fetch_fraction(files):
    meas = model.load(files)
    geo = model.geometry_from(meas.sizes, 1)
    per_token = geo.kv_heads * 2 * geo.head_dim * geo.item  # 4 * 256 * 2
    assert per_token == 2048
    for mode in ("allgather", "ring", "hierarchical"):
        assert model.selection_bytes(mode, 8, 1 << 20, geo) == 3 * 7 / 8 * (1 << 20) * per_token
    assert model.selection_bytes("fetch", 8, 1 << 20, geo, 0.25) == 0.25 * 3 * 7 / 8 * (1 << 20) * per_token
    assert model.selection_bytes("allgather", 1, 1 << 20, geo) == 0
    # f = 1 - exp(-(L/corr)(n - forced)/N_remote); falls as C grows, rises with the correlation length's inverse
    local, remote = (1 << 20) / 64, ((1 << 20) - (1 << 20) / 64) / geo.select_block
    expected = 1 - math.exp(-local * (geo.select_count - geo.forced) / remote)
    assert math.isclose(model.fetch_fraction(64, 1 << 20, geo, 1.0), expected)
    fractions = [model.fetch_fraction(c, 1 << 22, geo, 64.0) for c in model.GPU_COUNTS]
    assert all(a > b for a, b in zip(fractions, fractions[1:])) and 0 < fractions[-1] < fractions[0] <= 1
    assert model.fetch_fraction(64, 1 << 22, geo, 1.0) >= model.fetch_fraction(64, 1 << 22, geo, 64.0)


def test_predictions_are_monotone_and_the_table_is_produced(files, tmp_path):
    out = tmp_path / "model.md"
    result = model.run(model.parse_args(["--results", *files, "--out", str(out)]))
    geo, compute, links = result["geometry"], result["compute"], result["links"]
    assert links.nvlink_gbs == 300.0 and links.inter_gbs == 50.0
    for mode in model.MODES:
        single = model.predict(mode, 1, 1 << 18, geo, compute, links, None, 1.0)
        assert single["exposed_ms"] == 0
        steps = [model.predict(mode, c, 1 << 22, geo, compute, links, None, 1.0)["step_ms"] for c in model.GPU_COUNTS]
        assert all(a > b for a, b in zip(steps, steps[1:])), (mode, steps)  # more GPUs: faster per step
        by_tokens = [model.predict(mode, 64, s, geo, compute, links, None, 1.0)["step_ms"] for s in model.TOKENS]
        assert all(a < b for a, b in zip(by_tokens, by_tokens[1:])), (mode, by_tokens)
        # slower links never make a step faster
        slow = model.Links(links.nvlink_gbs, links.inter_gbs / 4, links.gpus_per_node, links.latency_ms, "")
        assert model.predict(mode, 64, 1 << 22, geo, compute, slow, None, 1.0)["step_ms"] >= \
            model.predict(mode, 64, 1 << 22, geo, compute, links, None, 1.0)["step_ms"]
    # the measured rows are checked: the synthetic step is the no-comm step + 5%, so the error stays small
    assert len(result["checks"]) == 6
    assert all(abs(c["error"]) < 0.15 for c in result["checks"] if c["gpus"] == 1)
    table = result["table"]
    assert set(table) == {(c, s) for c in model.GPU_COUNTS for s in model.TOKENS}
    assert {cell["best"] for cell in table.values()} <= set(model.MODES) | {"OOM", "layout"}
    text = out.read_text()
    assert "## Best mode (predicted step time)" in text and "| 1024 |" in text and "16M" in text
    # memory: per-token fit from the allgather rows; ring's buffer is the smallest at scale
    preds = table[(1024, 16 << 20)]["predictions"]
    assert preds["ring"]["memory_gib"] < preds["allgather"]["memory_gib"]


def test_bad_settings_are_rejected(files):
    with pytest.raises(SystemExit):
        model.parse_args(["--results", *files, "--inter-node-gbps", "0"])
    with pytest.raises(ValueError, match="mode='spiral'"):
        meas = model.load(files)
        geo = model.geometry_from(meas.sizes, 1)
        model.exposed_ms("spiral", 8, 1 << 20, geo, model.fit_compute(meas, geo),
                         model.Links(300.0, 50.0, 8, 0.02, ""), 1.0)
