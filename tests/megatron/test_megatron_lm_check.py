"""benchmarks/megatron_lm_check.py's reading of Megatron-LM's log: losses, iteration times, peak memory, the
resume comparison and the speed rows (the GPU runs themselves are not run here)."""
from __future__ import annotations

import random

from benchmarks import megatron_lm_check as check


def _log_line(iteration: int, total: int, ms: float, loss: float) -> str:
    # Megatron-LM's training log line, as its training loop prints it with log interval 1
    return (f" [2026-12-06 19:00:00] iteration {iteration:8d}/{total:8d} | consumed samples: {iteration * 8:12d} | "
            f"elapsed time per iteration (ms): {ms:.1f} | learning rate: 3.000000E-04 | global batch size:     8 | "
            f"lm loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 | "
            f"number of nan iterations:   0 |")


def _megatron_log(losses: dict, times: dict, total: int) -> list:
    # As Megatron-LM prints a run: its first iteration is logged without resetting the loss sum and the
    # interval timer, so the second line shows the mean of the first two iterations.
    lines, iterations = [], sorted(losses)
    for position, i in enumerate(iterations):
        loss, ms = losses[i], times[i]
        if position == 1:
            first = iterations[0]
            loss, ms = (losses[first] + loss) / 2, (times[first] + ms) / 2
        lines.append(_log_line(i, total, ms, loss))
    return lines


def _memory_line(iteration: int, peak: float) -> str:
    return (f"[Rank 0] (after {iteration} iterations) memory (MB) | allocated: 100.00 | max allocated: {peak:.2f} | "
            f"reserved: 300.00 | max reserved: 400.00")


def test_parse_log_reads_every_iteration_and_the_largest_peak():
    rng = random.Random(3)
    losses = {i: rng.uniform(2, 11) for i in range(1, 9)}
    times = {i: rng.uniform(100, 900) for i in range(1, 9)}
    lines = ["warming up", _memory_line(1, 2048.0), *_megatron_log(losses, times, 8), _memory_line(8, 4096.5)]
    log = check.parse_log("\n".join(lines))
    assert set(log.losses) == set(losses) and log.peak_mib == 4096.5
    for i in losses:
        assert abs(log.losses[i] - losses[i]) < 3e-6 * losses[i] and abs(log.times_ms[i] - times[i]) < 0.15
    row = check.speed_row(log, seq_len=32768, batch=2)
    timed = sorted(t for i, t in log.times_ms.items() if i >= check.TIMED_FROM)
    assert row["iteration_ms"] == round(timed[len(timed) // 2], 1) and row["peak_gib"] == round(4096.5 / 1024, 2)
    assert abs(row["tokens_per_s"] - 2 * 32768 / (timed[len(timed) // 2] / 1000)) <= 0.5


def test_resume_comparison_finds_the_largest_difference():
    first_losses = {i: 10.0 - 0.2 * i for i in range(1, 31)}
    first = check.parse_log("\n".join(_megatron_log(first_losses, dict.fromkeys(first_losses, 200.0), 30)))
    resumed_losses = {i: 10.0 - 0.2 * i + (0.01 if i == 21 else 0.0) for i in range(16, 31)}
    resumed = check.parse_log("\n".join(_megatron_log(resumed_losses, dict.fromkeys(resumed_losses, 200.0), 30)))
    comparison = check.resume_comparison(first, resumed, 16, 30)
    assert comparison["iterations"] == list(range(16, 31))
    assert abs(comparison["max_abs_diff"] - 0.01) < 1e-5
    markdown = check.markdown(dict(gpu="NVIDIA H100", commit="abc1234", date="2026-12-06T19:00+00:00",
                                   megatron_lm="core_v0.19.0",
                                   train=dict(initial_loss=9.8, final_loss=4.0, iterations=30), resume=comparison,
                                   speed=[check.speed_row(first, 8192, 8)]))
    assert "abc1234" in markdown and "NVIDIA H100" in markdown and "| 8192 | 8 | 200.0 |" in markdown
    two = check.markdown(dict(gpu="NVIDIA H200", gpus=2, flags="--context-parallel-size 2", commit="abc1234",
                              date="2026-12-06T19:00+00:00", megatron_lm="core_v0.19.0",
                              train=dict(initial_loss=9.8, final_loss=4.0, iterations=30), resume=comparison, speed=[]))
    assert "on 2 x NVIDIA H200" in two and "`--context-parallel-size 2`" in two


def test_the_second_logged_iteration_is_its_own_loss_not_the_mean_of_two():
    # Losses Megatron-LM core_v0.19.0 printed for iterations 16 and 17 of a run resumed from iteration 15
    # (benchmarks/results/megatron_lm_h100.json): 17 printed as the mean of 16 and 17.
    resumed = check.parse_log("\n".join([_log_line(16, 30, 500.0, 0.5113366), _log_line(17, 30, 500.0, 0.4721127),
                                         _log_line(18, 30, 500.0, 0.3978485)]))
    assert abs(resumed.losses[17] - 0.4328888) < 2e-7 and resumed.losses[18] == 0.3978485
    assert resumed.losses[16] == 0.5113366 and resumed.times_ms[17] == 500.0


def test_commands_carry_the_gpu_count_and_flags():
    command = check.pretrain_command(8192, 8, 30, ["--context-parallel-size", "2"], nproc=2)
    assert command[command.index("--nproc-per-node") + 1] == "2" and command[-2:] == ["--context-parallel-size", "2"]
    flags = command[command.index("megatron_nsa.megatron_lm.pretrain_gpt") + 1:]
    assert flags[flags.index("--seq-length") + 1] == "8192" and "--attention-dropout" in flags


def test_a_failed_run_leaves_no_timing():
    log = check.parse_log("Traceback (most recent call last):\nRuntimeError: CUDA out of memory", returncode=1)
    row = check.speed_row(log, 65536, 2)
    assert "iteration_ms" not in row and row["returncode"] == 1 and row["peak_gib"] is None
