"""Scale model of NSA context parallelism: step time and memory per GPU of each exchange mode, 8-1024 GPUs.

    python -m benchmarks.cp_scale_model                                   # the H200 results in benchmarks/results
    python -m benchmarks.cp_scale_model --results a.json b.json --gpus-per-node 8 --inter-node-gbps 400

Inputs: bench_cp JSON files (benchmarks/bench_cp.py; one per GPU count: bench_cp_h200, bench_cp_2xh200, ...)
and settings for the links.
Everything is per GPU, one NSA layer core (the benchmark's shapes), forward + backward, batch 1.

Compute (ms), L = S / C local tokens:   T(C, S) = a * L + b * L * S
  the window and selected branches and everything else are linear in L (a); the compressed branch
  and the top-n scoring pass see all S/d compressed blocks (b, the O(S^2/d) part). With per-chunk
  times in the JSON (bench_cp's chunk_times) a comes from window + selected + the rest of the
  no-communication step, b from compressed + top-n; without them (older files) a and b are a
  least-squares fit of the measured no-communication step times of 'allgather', and the branch
  split below is the FLOP ratio (window w keys : selected n l' keys). A mode's own compute
  overhead (ring's per-piece calls and merges, fetch's compaction) is its measured
  no-communication step over allgather's at the same point (1.0 where not measured).

Bytes per step received by one GPU (h KV heads, D = d_k + d_v, e bytes per value):
  V = (C-1)/C S h D e (the remote selection K/V), P = S/C h D e (one rank's piece)
  allgather     3 V    (gather, backward re-gather, backward reduce-scatter)
  ring          3 V    (C-1 steps of P per pass: K/V forward, K/V backward, dK/dV backward)
  hierarchical  3 V    of which 3 (C/m - 1) P cross nodes, the rest (m-1) P per step inside the node
  fetch         3 f V  f = fraction of remote blocks the rank's queries select (below)
  every mode:   compressed 2 V/d (blocking, before top-n), halos 2 * 2 w h D e
Links: inside a node (m GPUs) NVLink at --nvlink-gbs (default: measured by bench_cp's probe, or
derived from its comm-only replay), across nodes --inter-node-gbps per GPU (400 Gb/s); a transfer
takes latency + bytes / bandwidth; an all-gather or ring step spanning nodes runs at the
inter-node rate; fetch's all-to-all sends (m-1)/(C-1) of its bytes over NVLink and the rest across
nodes at the same time.

fetch fraction: a rank's L queries pick n - (forced) blocks each per KV head among the
N = (S - L)/l' remote blocks; if every --fetch-corr-tokens consecutive queries pick alike and
groups pick independently, f = 1 - exp(-(L / corr) (n - forced) / N). corr = 1 (independent
queries) is docs/design.md's estimate and the default; bench_cp's measured f (random inputs) is
printed beside it. A second table uses corr = l' (the queries of one block choose alike).

Overlap (which compute hides which communication; the rest is exposed and adds to the step):
  forward/backward split of a branch: 1 : 2.5 (the benchmark's FLOP model), G = KV-head groups.
  allgather: forward gather under window + compressed forward; backward: the first group's
    re-gather exposed, group g's under group g-1's selected backward; reduce-scatters exposed
    (synchronous in the code).
  ring: forward step 1's transfer under window + compressed forward, step t's under the attention
    of one visiting piece (selected forward / C); backward: piece + dK/dV accumulator per step
    under selected backward / C; the backward's first piece exposed.
  hierarchical: as ring with C/m steps, each max(inter-node piece, (m-1) intra-node pieces),
    under selected / (C/m).
  fetch: ids exchange exposed (latency); K/V: the first group exposed, group g under group g-1's
    selected attention; backward re-fetch likewise, the returned dK/dV under the next groups'
    recompute, the last group's return exposed.
  compressed all-gather and halos: exposed in every mode.

Memory per GPU: peak = m_tok * L + the mode's buffer, m_tok fitted on 'allgather' rows after
removing its buffer (2 S h_g D e: gathered K/V and their gradient); ring 5 P_g (own, visiting,
arriving piece, dK/dV accumulators), hierarchical 5 m P_g, fetch 3 f S h_g D e (received + compact
+ gradient); h_g = KV heads per group.

Output: predicted vs measured for every measured row (goal: within 15%), the table of the best
mode for 8..1024 GPUs x 1M..16M tokens (modes whose memory does not fit --gpu-memory-gib are
excluded), printed and written to benchmarks/results/cp_scale_model_<gpu>.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
from typing import Dict, List, Optional

import numpy as np

from benchmarks.recording import RESULTS_DIR, recorded, recorded_line, result_stem

RESULTS = RESULTS_DIR
MODES = ("allgather", "ring", "fetch", "hierarchical")
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
TOKENS = (1 << 20, 2 << 20, 4 << 20, 8 << 20, 16 << 20)
BACKWARD_OVER_FORWARD = 2.5
# bench_cp.py's full-size shapes (older JSON files do not record them)
DEFAULT_SIZES = dict(heads=64, kv_heads=4, head_dim=128, dtype="bfloat16",
                     config=dict(compress_block_size=32, compress_stride=16, select_block_size=64, select_count=16,
                                 select_init_blocks=1, select_local_blocks=2, window_size=512))
ITEM_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass
class Geometry:
    heads: int
    kv_heads: int
    head_dim: int
    item: int
    stride: int  # d
    select_block: int  # l'
    select_count: int  # n
    forced: int  # init + local blocks
    window: int
    head_group: int  # KV heads per group (h_g)

    @property
    def groups(self) -> int:
        return math.ceil(self.kv_heads / self.head_group)

    def per_token(self, heads: Optional[int] = None) -> float:
        """Bytes of selection K/V per token for `heads` KV heads (default all)."""
        return (heads or self.kv_heads) * 2 * self.head_dim * self.item


def geometry_from(sizes: dict, head_group_size: Optional[int]) -> Geometry:
    config = dict(DEFAULT_SIZES["config"], **sizes.get("config", {}))
    kv_heads = sizes["kv_heads"]
    return Geometry(sizes["heads"], kv_heads, sizes["head_dim"], ITEM_BYTES[sizes["dtype"]],
                    config["compress_stride"], config["select_block_size"], config["select_count"],
                    config.get("select_init_blocks", 1) + config.get("select_local_blocks", 2), config["window_size"],
                    min(head_group_size or kv_heads, kv_heads))


@dataclasses.dataclass
class Measurements:
    rows: List[dict]  # successful rows of every file, each with 'mode'
    chunk_times: List[dict]
    bandwidth: Dict[int, dict]  # GPU count -> link_bandwidth
    sizes: dict
    head_group_size: Optional[int]
    files: List[str]


def load(paths: List[str]) -> Measurements:
    rows, times, bandwidth, sizes, groups = [], [], {}, None, set()
    for path in paths:
        data = json.load(open(path))
        sizes = sizes or data.get("config")
        for row in data["rows"]:
            if "step_ms" in row:
                rows.append(dict(row, mode=row.get("mode", "allgather")))
                groups.add(row.get("head_group_size"))
        times += [t for t in data.get("chunk_times", []) if "error" not in t]
        if data.get("link_bandwidth"):
            gpus = next(r["gpus"] for r in data["rows"] if "gpus" in r)
            bandwidth[gpus] = data["link_bandwidth"]
    if not rows:
        raise SystemExit(f"no measured rows in {paths}")
    group = max((g for g in groups if g is not None), default=None)
    return Measurements(rows, times, bandwidth, sizes or DEFAULT_SIZES, group, list(paths))


def default_paths(gpu: str) -> List[str]:
    """bench_cp's result files of this GPU model: one GPU (bench_cp_<gpu>.json) and several
    (bench_cp_<C>x<gpu>.json)."""
    return sorted(glob.glob(os.path.join(RESULTS, f"bench_cp_{gpu}.json"))
                  + glob.glob(os.path.join(RESULTS, f"bench_cp_[0-9]*x{gpu}.json")))


# ---------------------------------------------------------------------------------------------
# Compute


@dataclasses.dataclass
class ComputeModel:
    a: float  # ms per local token (linear part)
    b: float  # ms per (local token x sequence token) (compressed + scoring)
    window_share: float  # of the linear part: window branch
    selected_share: float  # of the linear part: selected branch
    mode_factor: Dict[str, float]
    source: str

    def total(self, cp_size: int, seq_len: int, mode: str = "allgather") -> float:
        local = seq_len / cp_size
        return (self.a * local + self.b * local * seq_len) * self.mode_factor.get(mode, 1.0)

    def branches(self, cp_size: int, seq_len: int) -> Dict[str, float]:
        """ms of window, compressed (+ top-n) and selected, forward + backward."""
        local = seq_len / cp_size
        return {"window": self.a * local * self.window_share, "compressed": self.b * local * seq_len,
                "selected": self.a * local * self.selected_share}


def _lstsq(columns, target) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(np.array(columns, dtype=np.float64).T, np.array(target, dtype=np.float64), rcond=None)
    return np.clip(coef, 0.0, None)


def fit_compute(meas: Measurements, geo: Geometry, exclude: Optional[tuple] = None) -> ComputeModel:
    """Fit a and b (see the module docstring); `exclude` = (gpus, seq_len) left out (cross-validation)."""
    keep = lambda r: exclude is None or (r["gpus"], r["seq_len"]) != exclude  # noqa: E731
    base = [r for r in meas.rows if r["mode"] == "allgather" and keep(r)]
    no_comm = {(r["gpus"], r["seq_len"]): r["no_comm_step_ms"] for r in base}
    times = [t for t in meas.chunk_times if (t["gpus"], t["seq_len"]) in no_comm]
    if times:
        local = [t["local_tokens"] for t in times]
        seq = [t["seq_len"] for t in times]
        linear = [no_comm[(t["gpus"], t["seq_len"])] - t["compressed_topk_ms"] for t in times]
        (a,) = _lstsq([local], linear)
        (b,) = _lstsq([[x * s for x, s in zip(local, seq)]], [t["compressed_topk_ms"] for t in times])
        window = sum(t["window_ms"] for t in times) / sum(linear)
        selected = sum(t["selected_ms"] for t in times) / sum(linear)
        source = f"per-chunk branch times of {len(times)} measured point(s)"
    else:
        local = [r["seq_len"] / r["gpus"] for r in base]
        a, b = _lstsq([local, [x * r["seq_len"] for x, r in zip(local, base)]], [r["no_comm_step_ms"] for r in base])
        keys_window, keys_selected = geo.window, geo.select_count * geo.select_block
        window = keys_window / (keys_window + keys_selected)
        selected = keys_selected / (keys_window + keys_selected)
        source = (f"least squares on the no-communication step times of {len(base)} allgather row(s) "
                  f"(no per-chunk times in the files; branch split from the FLOP ratio)")
    model = ComputeModel(float(a), float(b), window, selected, {}, source)
    for mode in MODES:
        ratios = [r["no_comm_step_ms"] / model.total(r["gpus"], r["seq_len"]) for r in meas.rows
                  if r["mode"] == mode and keep(r)]
        ours = [r["no_comm_step_ms"] / model.total(r["gpus"], r["seq_len"]) for r in base]
        if ratios and mode != "allgather":
            model.mode_factor[mode] = float(np.mean(ratios) / np.mean(ours))
    return model


# ---------------------------------------------------------------------------------------------
# Communication and memory


@dataclasses.dataclass
class Links:
    nvlink_gbs: float  # GB/s per GPU inside a node
    inter_gbs: float  # GB/s per GPU across nodes
    gpus_per_node: int
    latency_ms: float
    nvlink_source: str

    def rate(self, cp_size: int) -> float:
        """Bytes per ms of a collective or ring step over cp_size consecutive GPUs."""
        return (self.nvlink_gbs if cp_size <= self.gpus_per_node else self.inter_gbs) * 1e6

    def transfer(self, nbytes: float, cp_size: int) -> float:
        return self.latency_ms + nbytes / self.rate(cp_size) if nbytes > 0 else 0.0


def fetch_fraction(cp_size: int, seq_len: int, geo: Geometry, corr_tokens: float) -> float:
    local = seq_len / cp_size
    remote_blocks = (seq_len - local) / geo.select_block
    if remote_blocks <= 0:
        return 0.0
    picks = local / corr_tokens * (geo.select_count - geo.forced)
    return 1.0 - math.exp(-picks / remote_blocks)


def selection_bytes(mode: str, cp_size: int, seq_len: int, geo: Geometry, fraction: float = 1.0) -> float:
    """Bytes one GPU receives for the selection branch in one step (the formulas of the docstring)."""
    volume = (cp_size - 1) / cp_size * seq_len * geo.per_token()
    return 3 * volume * (fraction if mode == "fetch" else 1.0)


def exposed_ms(mode: str, cp_size: int, seq_len: int, geo: Geometry, compute: ComputeModel, links: Links,
               fraction: float) -> Dict[str, float]:
    """Exposed communication (ms) by part, following the overlap model of the module docstring."""
    if cp_size == 1:
        return {"selection": 0.0, "compressed+halo": 0.0}
    groups = geo.groups
    fwd = 1.0 / (1.0 + BACKWARD_OVER_FORWARD)
    branch = compute.branches(cp_size, seq_len)
    before_selection = (branch["window"] + branch["compressed"]) * fwd
    slc_f, slc_b = branch["selected"] * fwd, branch["selected"] * (1 - fwd)
    volume = (cp_size - 1) / cp_size * seq_len * geo.per_token()
    piece = seq_len / cp_size * geo.per_token()
    m = min(links.gpus_per_node, cp_size)
    if mode == "allgather":
        gather = links.transfer(volume, cp_size)
        per_group = gather / groups
        exposed = max(0.0, gather - before_selection)
        exposed += per_group + max(0.0, (gather - slc_b) * (groups - 1) / groups)
        exposed += gather  # reduce-scatters
    elif mode in ("ring", "hierarchical"):
        if mode == "ring" or m == 1:  # a ring step spans the group: across nodes once C > m
            steps, step_comm = cp_size, links.transfer(piece, cp_size)
        else:
            steps = cp_size // m
            across = links.transfer(piece, cp_size) if steps > 1 else 0.0
            step_comm = max(across, links.transfer((m - 1) * piece, m))
        first = max(0.0, step_comm - before_selection)
        exposed = first + (steps - 2) * max(0.0, step_comm - slc_f / steps) if steps > 1 else first
        exposed += step_comm + (steps - 1) * max(0.0, 2 * step_comm - slc_b / steps)
    elif mode == "fetch":
        moved = volume * fraction
        inside = moved * (m - 1) / (cp_size - 1)
        across = moved - inside
        one = max(links.transfer(inside, m), links.transfer(across, cp_size))
        ids = 2 * groups * links.latency_ms
        exposed = ids + one / groups + max(0.0, (one - slc_f) * (groups - 1) / groups)
        exposed += one / groups + max(0.0, (2 * one - slc_b) * (groups - 1) / groups) + one / groups
    else:
        raise ValueError(f"mode={mode!r} is not allowed; choose one of {MODES}")
    compressed = 2 * links.transfer(volume / geo.stride, cp_size)
    halos = 2 * links.transfer(2 * geo.window * geo.per_token(), cp_size)
    return {"selection": exposed, "compressed+halo": compressed + halos}


def buffer_bytes(mode: str, cp_size: int, seq_len: int, geo: Geometry, links: Links, fraction: float) -> float:
    group_token = geo.per_token(geo.head_group)
    piece = seq_len / cp_size * group_token
    if mode == "allgather":
        return 2 * seq_len * group_token
    if mode == "ring":
        return 5 * piece
    if mode == "hierarchical":
        return 5 * min(links.gpus_per_node, cp_size) * piece
    return 3 * fraction * seq_len * group_token


def fit_memory(meas: Measurements, geo: Geometry, links: Links) -> Optional[float]:
    """GiB per local token beside the modes' buffers (None when no peak memory was measured, e.g. CPU)."""
    points = [(r["peak_gib"] - buffer_bytes("allgather", r["gpus"], r["seq_len"], geo, links, 1.0) / 2**30,
               r["seq_len"] / r["gpus"]) for r in meas.rows if r["mode"] == "allgather"
              and r.get("peak_gib") == r.get("peak_gib") and r.get("peak_gib") is not None]
    if not points:
        return None
    return sum(p for p, _ in points) / sum(t for _, t in points)


def predict(mode: str, cp_size: int, seq_len: int, geo: Geometry, compute: ComputeModel, links: Links,
            memory_per_token: Optional[float], corr_tokens: float, fraction: Optional[float] = None) -> dict:
    fraction = fetch_fraction(cp_size, seq_len, geo, corr_tokens) if fraction is None else fraction
    comp = compute.total(cp_size, seq_len, mode)
    parts = exposed_ms(mode, cp_size, seq_len, geo, compute, links, fraction)
    exposed = sum(parts.values())
    memory = None
    if memory_per_token is not None:
        memory = memory_per_token * seq_len / cp_size + buffer_bytes(mode, cp_size, seq_len, geo, links,
                                                                     fraction) / 2**30
    return {"mode": mode, "gpus": cp_size, "seq_len": seq_len, "compute_ms": comp, "exposed_ms": exposed,
            "step_ms": comp + exposed, "memory_gib": memory, "fetch_fraction": fraction if mode == "fetch" else None,
            "selection_bytes": selection_bytes(mode, cp_size, seq_len, geo, fraction)}


def fits(cp_size: int, seq_len: int, geo: Geometry) -> bool:
    """bench_cp's layout rule: chunks S/(2C) a multiple of l' and at least w long."""
    chunk = seq_len / (2 * cp_size)
    return chunk == int(chunk) and int(chunk) % geo.select_block == 0 and chunk >= geo.window


# ---------------------------------------------------------------------------------------------
# Reports


def nvlink_from(meas: Measurements, setting: Optional[float]):
    """(GB/s, where it came from): the setting, bench_cp's all-gather probe, or its comm-only replay."""
    if setting:
        return setting, "setting --nvlink-gbs"
    probes = [bw["all_gather_gb_per_s"] for bw in meas.bandwidth.values() if "all_gather_gb_per_s" in bw]
    if probes:
        return max(probes), "bench_cp's all-gather probe"
    replays = [sum(r["bytes_received"].values()) / r["comm_only_ms"] / 1e6 for r in meas.rows
               if r["gpus"] > 1 and r.get("comm_only_ms", 0) > 0]
    if replays:
        return max(replays), "bytes received / comm-only replay ms of the measured multi-GPU rows"
    return 300.0, "default 300 GB/s (no multi-GPU measurement)"


def check_rows(meas: Measurements, geo: Geometry, compute: ComputeModel, links: Links,
               memory_per_token: Optional[float], corr_tokens: float) -> List[dict]:
    """Predicted vs measured for every measured row; 'loo' is the prediction with the compute fit
    made without that row's (C, S) point (when enough points remain)."""
    out = []
    points = {(r["gpus"], r["seq_len"]) for r in meas.rows if r["mode"] == "allgather"}
    for row in meas.rows:
        fraction = row.get("fetch_fraction")
        pred = predict(row["mode"], row["gpus"], row["seq_len"], geo, compute, links, memory_per_token, corr_tokens,
                       fraction)
        loo = None
        if len(points - {(row["gpus"], row["seq_len"])}) >= 2:
            held_out = fit_compute(meas, geo, exclude=(row["gpus"], row["seq_len"]))
            loo = predict(row["mode"], row["gpus"], row["seq_len"], geo, held_out, links, memory_per_token,
                          corr_tokens, fraction)["step_ms"]
        out.append({"mode": row["mode"], "gpus": row["gpus"], "seq_len": row["seq_len"], "measured_ms": row["step_ms"],
                    "predicted_ms": pred["step_ms"], "error": pred["step_ms"] / row["step_ms"] - 1,
                    "loo_predicted_ms": loo, "loo_error": None if loo is None else loo / row["step_ms"] - 1,
                    "measured_gib": row.get("peak_gib"), "predicted_gib": pred["memory_gib"]})
    return out


def best_table(geo, compute, links, memory_per_token, corr_tokens, gpu_memory_gib) -> Dict[tuple, dict]:
    """(C, S) -> {'best': mode or reason, 'predictions': {mode: prediction}}."""
    table = {}
    for cp_size in GPU_COUNTS:
        for seq_len in TOKENS:
            if not fits(cp_size, seq_len, geo):
                table[(cp_size, seq_len)] = {"best": "layout", "predictions": {}}
                continue
            preds = {m: predict(m, cp_size, seq_len, geo, compute, links, memory_per_token, corr_tokens)
                     for m in MODES}
            ok = {m: p for m, p in preds.items() if p["memory_gib"] is None or p["memory_gib"] <= gpu_memory_gib}
            best = min(ok, key=lambda m: ok[m]["step_ms"]) if ok else "OOM"
            table[(cp_size, seq_len)] = {"best": best, "predictions": preds}
    return table


def _tokens(seq_len: int) -> str:
    if seq_len >= 1 << 20:
        return f"{seq_len / (1 << 20):g}M"
    return f"{seq_len / 1024:g}k" if seq_len >= 1024 else str(seq_len)


def best_markdown(table) -> str:
    lines = ["| GPUs | " + " | ".join(_tokens(s) for s in TOKENS) + " |", "|---|" + "---|" * len(TOKENS)]
    for cp_size in GPU_COUNTS:
        cells = []
        for seq_len in TOKENS:
            cell = table[(cp_size, seq_len)]
            if cell["best"] in MODES:
                pred = cell["predictions"][cell["best"]]
                cells.append(f"{cell['best']} {pred['step_ms'] / 1e3:.3g} s")
            else:
                cells.append(cell["best"])
        lines.append(f"| {cp_size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_markdown(table) -> str:
    lines = ["| GPUs | S | " + " | ".join(f"{m} s (GiB)" for m in MODES) + " | fetch f |",
             "|---|---|" + "---|" * (len(MODES) + 1)]
    for (cp_size, seq_len), cell in table.items():
        if not cell["predictions"]:
            continue
        preds = cell["predictions"]
        mem = lambda p: "" if p["memory_gib"] is None else f" ({p['memory_gib']:.0f})"  # noqa: E731
        lines.append(f"| {cp_size} | {_tokens(seq_len)} | " + " | ".join(
            f"{preds[m]['step_ms'] / 1e3:.3g}{mem(preds[m])}" for m in MODES) +
            f" | {preds['fetch']['fetch_fraction']:.3f} |")
    return "\n".join(lines)


def check_markdown(checks) -> str:
    lines = ["| mode | GPUs | S | measured ms | predicted ms | error | leave-one-out ms (error) | peak GiB measured / "
             "predicted |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        loo = "-" if c["loo_predicted_ms"] is None else f"{c['loo_predicted_ms']:.0f} ({100 * c['loo_error']:+.1f}%)"
        mem = "-" if c["predicted_gib"] is None or c["measured_gib"] is None else \
            f"{c['measured_gib']:.1f} / {c['predicted_gib']:.1f}"
        lines.append(f"| {c['mode']} | {c['gpus']} | {_tokens(c['seq_len'])} | {c['measured_ms']:.0f} | "
                     f"{c['predicted_ms']:.0f} | {100 * c['error']:+.1f}% | {loo} | {mem} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", nargs="+", help="bench_cp JSON files (default: bench_cp_<gpu>.json and "
                                                     "bench_cp_<C>x<gpu>.json)")
    parser.add_argument("--gpu", default="h200", help="GPU of the default result files and of the report's name")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--inter-node-gbps", type=float, default=400.0, help="Gb/s per GPU across nodes")
    parser.add_argument("--nvlink-gbs", type=float, default=None,
                        help="GB/s per GPU inside a node (default: from the measurements)")
    parser.add_argument("--latency-us", type=float, default=20.0, help="per transfer")
    parser.add_argument("--gpu-memory-gib", type=float, default=140.0, help="usable memory per GPU (H200: ~140)")
    parser.add_argument("--head-group-size", type=int, default=None,
                        help="KV heads per exchange group (default: the measured runs' largest)")
    parser.add_argument("--fetch-corr-tokens", type=float, default=1.0,
                        help="consecutive queries assumed to select alike (fetch fraction; 1 = independent)")
    parser.add_argument("--out", default=None,
                        help="markdown report (default benchmarks/results/cp_scale_model_<gpu>.md; '' none)")
    args = parser.parse_args(argv)
    for name in ("gpus_per_node",):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    for name in ("inter_node_gbps", "latency_us", "gpu_memory_gib", "fetch_corr_tokens"):
        if getattr(args, name) < 0 or (name != "latency_us" and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be > 0")
    if args.out is None:
        args.out = result_stem("cp_scale_model", args.gpu) + ".md"
    return args


def run(args) -> dict:
    paths = args.results or default_paths(args.gpu)
    if not paths:
        raise SystemExit(f"no bench_cp results for --gpu {args.gpu} in {RESULTS}; pass --results")
    meas = load(paths)
    geo = geometry_from(meas.sizes, args.head_group_size or meas.head_group_size)
    compute = fit_compute(meas, geo)
    nvlink, nvlink_source = nvlink_from(meas, args.nvlink_gbs)
    links = Links(nvlink, args.inter_node_gbps / 8, args.gpus_per_node, args.latency_us / 1e3, nvlink_source)
    memory_per_token = fit_memory(meas, geo, links)
    checks = check_rows(meas, geo, compute, links, memory_per_token, args.fetch_corr_tokens)
    table = best_table(geo, compute, links, memory_per_token, args.fetch_corr_tokens, args.gpu_memory_gib)
    local_corr = best_table(geo, compute, links, memory_per_token, float(geo.select_block), args.gpu_memory_gib)
    measured_f = [r["fetch_fraction"] for r in meas.rows if r.get("fetch_fraction") is not None]

    worst = max(abs(c["error"]) for c in checks)
    lines = [
        "# NSA context parallelism: scale model (benchmarks/cp_scale_model.py)", "",
        recorded_line(recorded()), "",
        f"Inputs: {', '.join(os.path.relpath(p, os.path.dirname(RESULTS)) for p in paths)}. One NSA layer core "
        f"(H_q={geo.heads}, H_kv={geo.kv_heads}, head dim {geo.head_dim}, {geo.item}-byte values, KV heads per "
        f"group {geo.head_group}), forward + backward, per GPU.", "",
        f"- compute: T = a L + b L S with a = {compute.a * 1e3:.4g} us/token, b = {compute.b * 1e9:.4g} ps/token^2; "
        f"fitted from {compute.source}; mode factors {compute.mode_factor or '(none measured)'}",
        f"- links: NVLink {links.nvlink_gbs:.3g} GB/s per GPU ({links.nvlink_source}), across nodes "
        f"{args.inter_node_gbps:.0f} Gb/s = {links.inter_gbs:.0f} GB/s per GPU, {links.gpus_per_node} GPUs per node, "
        f"{args.latency_us:.0f} us per transfer",
        f"- memory: {'%.4g KiB per local token + the mode buffer' % (memory_per_token * 2**20) if memory_per_token else 'not measured'}"
        f"; GPU memory {args.gpu_memory_gib:.0f} GiB",
        f"- fetch fraction: f = 1 - exp(-(L/corr)(n - forced)/N_remote), corr = {args.fetch_corr_tokens:g} tokens"
        + (f"; measured f (random inputs): {', '.join(f'{f:.3f}' for f in measured_f)}" if measured_f else ""), "",
        f"## Predicted vs measured (worst error {100 * worst:.1f}%; goal 15%)", "", check_markdown(checks), "",
        f"## Best mode (predicted step time), corr = {args.fetch_corr_tokens:g}", "", best_markdown(table), "",
        f"## Best mode if the queries of one selection block choose alike (corr = {geo.select_block})", "",
        best_markdown(local_corr), "",
        f"## Every mode (corr = {args.fetch_corr_tokens:g}): step s (memory GiB)", "", detail_markdown(table), "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            handle.write(report)
    return {"checks": checks, "table": table, "compute": compute, "links": links, "geometry": geo,
            "memory_per_token": memory_per_token}


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
