"""The pluggable branch functions: backend resolution and its errors."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa.context_parallel import resolve_branches, torch_branches
from megatron_nsa.context_parallel.branches import BRANCH_FUNCTIONS, missing_triton_functions


def test_torch_and_default_on_cpu_are_the_reference_branches():
    assert resolve_branches("torch", torch.device("cpu")) is torch_branches
    assert resolve_branches(None, torch.device("cpu")) is torch_branches
    assert resolve_branches(torch_branches, torch.device("cpu")) is torch_branches
    assert torch_branches.compute_dtype(torch.bfloat16) == torch.float32
    assert torch_branches.compute_dtype(torch.float64) == torch.float64


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend='cuda' is not allowed"):
        resolve_branches("cuda", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve_branches("triton", torch.device("cpu"))


def test_triton_names_the_missing_branch_functions(monkeypatch):
    missing = missing_triton_functions()
    if missing is None or not missing:
        pytest.skip("nsa_kernels is not importable, or already exports every branch function")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="missing: .*" + missing[0]):
        resolve_branches("triton", torch.device("cpu"))
    assert set(missing) <= set(BRANCH_FUNCTIONS)
