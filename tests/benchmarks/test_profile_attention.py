"""benchmarks/profile_attention.py: the per-kernel table and the host-or-GPU verdict (the GPU run itself
needs CUDA)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.profile_attention import kernel_rows, markdown

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def event(key, count, device_us, device_type=CUDA):
    return SimpleNamespace(key=key, count=count, self_device_time_total=device_us, device_type=device_type)


def test_kernel_rows_are_per_step_gpu_kernels_most_time_first():
    events = [event("_band_fwd", 10, 4000.0), event("aten::add", 30, 0.0, CPU), event("_selected_fwd", 5, 9000.0),
              event("Memcpy HtoD", 5, 50.0), event("idle", 5, 0.0)]
    rows = kernel_rows(events, steps=5)
    assert [r["kernel"] for r in rows] == ["_selected_fwd", "_band_fwd", "Memcpy HtoD"]
    assert rows[0] == dict(kernel="_selected_fwd", ms=1.8, launches=1.0)
    assert rows[1]["launches"] == 2.0 and abs(rows[1]["ms"] - 0.8) < 1e-12


def test_markdown_names_what_bounds_each_case():
    kernels = [dict(kernel="_selected_fwd", ms=2.0, launches=1.0), dict(kernel="_band_fwd", ms=1.0, launches=2.0)]
    rows = [dict(shape="64/4/128/128", seq_len=8192, host_ms=8.2, gpu_ms=10.9, wall_ms=11.3, launches=120.0,
                 kernels=kernels),
            dict(shape="16/4/128/128", seq_len=8192, host_ms=7.7, gpu_ms=5.4, wall_ms=7.7, launches=147.0,
                 kernels=kernels)]
    table = markdown(rows, "GPU X", top=1)
    assert "| 64/4/128/128 | 8192 | 120 | 8.20 | 10.90 | 11.30 | GPU |" in table
    assert "| 16/4/128/128 | 8192 | 147 | 7.70 | 5.40 | 7.70 | host |" in table
    assert table.count("`_selected_fwd`") == 2 and "`_band_fwd`" not in table  # top=1 per case
