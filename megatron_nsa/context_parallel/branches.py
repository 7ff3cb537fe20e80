"""The per-branch NSA functions context parallelism is built from, as a pluggable object.

Contract (the signatures of megatron_nsa.reference; one document piece at a time, positions
within the document):

    compressed_attention(q, compressed_k, compressed_v, q_pos, config, scale) -> (out, lse, scores)
    select_blocks(scores, q_pos, num_slc, num_kv_heads, config) -> selected_block_idx [Tq, H_kv, n]
    selected_attention(q, k, v, selected_block_idx, q_pos, config, scale) -> (out, lse)   keys at 0..Tk-1
    window_attention(q, k, v, q_pos, k_start, config, scale) -> (out, lse)                keys at k_start..

`scores` is whatever the backend's select_blocks needs (the reference: compressed probabilities
[Tq, H_q, N_cmp]); context parallelism only passes it on. All four are differentiable in
q / k / v except select_blocks. Optional (fused kernels; default: the plain expression, and
autograd through a recomputed selected_attention):

    gated_combine(gates [.., H_q, 3], cmp_out, slc_out, win_out [.., H_q, d_v]) -> out [.., H_q, d_v]
    selected_attention_backward(q, k, v, selected_block_idx, q_pos, config, scale, grad_out, lse, delta)
        -> (dq, dk, dv): these keys' share of the gradients of an attention whose softmax also spans
        keys elsewhere; lse and delta = rowsum(dO * O) [Tq, H_q] (float32) are the whole softmax's
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from .. import reference
from ..functional import BACKENDS

BRANCH_FUNCTIONS = ("compressed_attention", "select_blocks", "selected_attention", "window_attention")


def torch_gated_combine(gates, cmp_out, slc_out, win_out):
    """docs/semantics.md, Eq. 5."""
    return gates[..., 0:1] * cmp_out + gates[..., 1:2] * slc_out + gates[..., 2:3] * win_out


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def recomputed_selected_backward(selected_attention: Callable) -> Callable:
    """selected_attention_backward by autograd: recompute this share (out_c, lse_c), weigh it by
    w = exp(lse_c - lse), and feed it dO_c = w dO, dlse_c = w (rowsum(dO * out_c) - delta)."""

    def backward(q, k, v, selected_block_idx, q_pos, config, scale, grad_out, lse, delta):
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]
            out_c, lse_c = selected_attention(*leaves, selected_block_idx, q_pos, config, scale)
        acc_dtype = torch.promote_types(lse.dtype, torch.float32)
        weight = torch.exp(lse_c.detach().to(acc_dtype) - finite_or_zero(lse.to(acc_dtype)))  # [Tq, H_q]
        grad_lse = weight * ((grad_out.to(acc_dtype) * out_c.detach().to(acc_dtype)).sum(-1) - delta)
        grads = torch.autograd.grad((out_c, lse_c), leaves, ((weight[..., None] * grad_out).to(out_c.dtype),
                                                             grad_lse.to(lse_c.dtype)), allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads))

    return backward


@dataclasses.dataclass(frozen=True)
class Branches:
    name: str
    compressed_attention: Callable
    select_blocks: Callable
    selected_attention: Callable
    window_attention: Callable
    upcast_half: bool  # compute float16 / bfloat16 inputs in float32 (the reference's rule)
    gated_combine: Callable = torch_gated_combine
    fused_selected_backward: Optional[Callable] = None

    @property
    def selected_attention_backward(self) -> Callable:
        """The module docstring's selected_attention_backward: the fused one when the backend has it."""
        return self.fused_selected_backward or recomputed_selected_backward(self.selected_attention)

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if self.upcast_half and dtype in (torch.float16, torch.bfloat16):
            return torch.float32
        return dtype


torch_branches = Branches("torch", reference.compressed_attention, reference.select_blocks,
                          reference.selected_attention, reference.window_attention, upcast_half=True)


def missing_triton_functions() -> Optional[list]:
    """Names of BRANCH_FUNCTIONS that nsa_kernels lacks; None when nsa_kernels does not import."""
    try:
        import nsa_kernels
    except ImportError:
        return None
    return [name for name in BRANCH_FUNCTIONS if not hasattr(nsa_kernels, name)]


def triton_branches() -> Branches:
    missing = missing_triton_functions()
    if missing is None:
        raise RuntimeError("backend='triton' needs the nsa_kernels package and triton; install them or use 'torch'")
    if missing:
        raise RuntimeError(
            f"backend='triton' with context parallelism needs nsa_kernels to export {list(BRANCH_FUNCTIONS)} "
            f"with explicit query positions (the signatures of megatron_nsa.reference); missing: {missing}. "
            f"Use backend='torch' until they exist."
        )
    import nsa_kernels

    return Branches("triton", *(getattr(nsa_kernels, name) for name in BRANCH_FUNCTIONS), upcast_half=False,
                    gated_combine=getattr(nsa_kernels, "gated_combine", torch_gated_combine),
                    fused_selected_backward=getattr(nsa_kernels, "selected_attention_backward", None))


def resolve_branches(backend, device: torch.device) -> Branches:
    """backend: 'torch' | 'triton' | a Branches object | None (triton on CUDA when its branch
    functions exist, torch otherwise)."""
    if isinstance(backend, Branches):
        return backend
    if backend is None:
        backend = "triton" if device.type == "cuda" and missing_triton_functions() == [] else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {BACKENDS}, a Branches object, or None")
    if backend == "torch":
        return torch_branches
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (q is on {device}) or TRITON_INTERPRET=1 for the CPU interpreter"
        )
    return triton_branches()
