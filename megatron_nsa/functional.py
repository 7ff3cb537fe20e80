"""`nsa_attention`: the functional entry point, with input checks and the backend switch."""
from __future__ import annotations

import contextlib
import contextvars
import os
import typing
from typing import Iterator, List, Literal, Optional, Sequence, Tuple, Union

import numpy
import torch

from .config import NSAConfig
from .block_score_loss import ranked_target_scores
from .compression import compress_documents
from .reference import RopeFn, nsa_reference

Backend = Literal["torch", "triton"]
BACKENDS = typing.get_args(Backend)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

KV = Union[torch.Tensor, Sequence[torch.Tensor]]


@contextlib.contextmanager
def _recording_into(records_var: contextvars.ContextVar) -> Iterator[List[torch.Tensor]]:
    """A new list in `records_var` for the block (an enclosing block's list is restored after it)."""
    records: List[torch.Tensor] = []
    token = records_var.set(records)
    try:
        yield records
    finally:
        records_var.reset(token)


# The list that recorded_selections() opened in this context, None outside one.
_selection_records: contextvars.ContextVar[Optional[List[torch.Tensor]]] = contextvars.ContextVar(
    "nsa_selection_records", default=None)


@contextlib.contextmanager
def recorded_selections() -> Iterator[List[torch.Tensor]]:
    """Record which blocks NSA's selection branch picks.

    Inside the block, every nsa_attention call (torch or triton backend) appends the blocks its queries
    selected to the yielded list, in call order (a model's layers in order): selected_block_idx
    [B * T, H_kv, n] int64 on the host, rows in batch-then-token order, block ids counted from each
    sequence's (or packed document's) start, ascending, -1 in unused slots. Outputs and gradients are
    unchanged. A nested block records into its own list. Context-parallel calls (nsa_attention_cp) are
    not recorded.

        with recorded_selections() as selections:
            logits = model(tokens)
        first_layer = selections[0]
    """
    with _recording_into(_selection_records) as records:
        yield records


# The list that recorded_block_scores() opened in this context, None outside one.
_score_records: contextvars.ContextVar[Optional[List[torch.Tensor]]] = contextvars.ContextVar(
    "nsa_block_score_records", default=None)


@contextlib.contextmanager
def recorded_block_scores() -> Iterator[List[torch.Tensor]]:
    """Record the scores by which NSA's selection ranks the blocks (the torch backend only: the Triton
    kernels rank the blocks in registers and never form their scores; a triton call inside raises).

    Inside the block, every nsa_attention call appends reference.ranked_block_scores of its queries to the
    yielded list, in call order: [B * T, H_kv, N_slc] float32 on the host, rows as in
    recorded_selections, +inf for forced blocks, -inf for blocks a query cannot select. The selection
    keeps the n highest (ties to the lower block id). Outputs and gradients are unchanged.
    """
    with _recording_into(_score_records) as records:
        yield records


# The list and query positions that recorded_target_scores() opened in this context, None outside one.
_target_records: contextvars.ContextVar[Optional[Tuple[List[torch.Tensor], Optional[Sequence[int]]]]] = \
    contextvars.ContextVar("nsa_target_score_records", default=None)


@contextlib.contextmanager
def recorded_target_scores(positions: Optional[Sequence[int]] = None) -> Iterator[List[torch.Tensor]]:
    """Record, per block, the attention the selected branch's queries and keys would give it without
    selection (the block score loss's target, megatron_nsa/block_score_loss.py): how the blocks would rank
    if the block scores had learned where the selected branch looks.

    Inside the block, every nsa_attention call (either backend) appends block_score_loss.ranked_target_scores
    of its queries to the yielded list, in call order: [B * T, H_kv, N_slc] on the host, rows and +inf / -inf
    as in recorded_block_scores; with `positions` (token indices within each sequence), those queries'
    alone, [B * len(positions), H_kv, N_slc] (one full causal attention per call otherwise). Outputs and
    gradients are unchanged.
    """
    records: List[torch.Tensor] = []
    token = _target_records.set((records, positions))
    try:
        yield records
    finally:
        _target_records.reset(token)


BRANCHES = ("cmp", "slc", "win")  # the order of the gates' last dimension

# The branches silenced_branches() turned off in this context.
_silenced: contextvars.ContextVar[Tuple[str, ...]] = contextvars.ContextVar("nsa_silenced_branches", default=())


@contextlib.contextmanager
def silenced_branches(*branches: str) -> Iterator[None]:
    """Turn NSA branches off, to see which one carries a result (an evaluation ablation).

    Inside the block every nsa_attention (and nsa_attention_cp) call multiplies the gates of `branches`
    ('cmp', 'slc', 'win') by 0, so its output is the gated sum of the other branches alone. The selection
    still runs on the compressed scores, whether or not the compressed branch is silenced. A nested block
    replaces the outer one's set.

        with silenced_branches("cmp", "win"):
            logits = model(tokens)          # the selected branch alone
    """
    unknown = [branch for branch in branches if branch not in BRANCHES]
    if unknown:
        raise ValueError(f"silenced_branches{branches} names {unknown}: a branch must be one of {BRANCHES}")
    token = _silenced.set(tuple(branches))
    try:
        yield
    finally:
        _silenced.reset(token)


def silenced_gates(gates: torch.Tensor) -> torch.Tensor:
    """gates [..., 3] with the silenced branches' columns set to 0 (gates itself when none is silenced)."""
    silenced = _silenced.get()
    if not silenced:
        return gates
    keep = torch.tensor([branch not in silenced for branch in BRANCHES], dtype=gates.dtype, device=gates.device)
    return gates * keep


def default_backend(device: torch.device) -> str:
    """triton on CUDA (when the kernels import), torch elsewhere."""
    if device.type == "cuda" and triton_backend_available():
        return "triton"
    return "torch"


def triton_backend_available() -> bool:
    try:
        import nsa_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def _nsa_triton(q, ks, vs, gates, config: NSAConfig, cu_seqlens, bounds, compressor, compressed_rope,
                records: Optional[List[torch.Tensor]] = None):
    """The Triton path: batch rows become packed documents; compression runs in PyTorch
    (batched over the documents: megatron_nsa.compression.compress_documents). `bounds`: cu_seqlens on
    the host (None without cu_seqlens). Nothing here waits for the GPU: sizes come from the host
    (except the copy of the selected blocks to `records`, when recorded_selections() asks for them)."""
    from nsa_kernels import KernelParams, nsa_core, packed_documents

    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (q is on {q.device}) or TRITON_INTERPRET=1 for the CPU interpreter"
        )
    batch, seq_len, num_q_heads = q.shape[:3]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seq_len
        bounds = numpy.arange(batch + 1) * seq_len
    packed = lambda t: t.reshape(batch * seq_len, *t.shape[2:])  # noqa: E731
    params = KernelParams.from_config(config, config.scale_for(q.shape[-1]))
    layout = packed_documents(cu_seqlens, batch * seq_len, params, bounds)
    compressed_kv = compress_documents(packed(ks[0]), packed(vs[0]), cu_seqlens, config, compressor, compressed_rope,
                                       bounds)
    out = nsa_core(packed(q), (packed(ks[1]), packed(vs[1])), (packed(ks[2]), packed(vs[2])), compressed_kv,
                   packed(gates), layout, params, return_intermediates=records is not None)
    if records is not None:
        out, intermediates = out
        records.append(intermediates["selected_block_idx"].detach().to("cpu", torch.int64))
    return out.view(batch, seq_len, num_q_heads, -1)


def _type_name(value) -> str:
    """numpy.ndarray, list, NoneType: the type as a user would write it."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_type_name(value)}")


def branch_tensors(name: str, value: KV, separate: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cmp, slc, win) tensors of k or v."""
    if separate:
        if isinstance(value, torch.Tensor) or not isinstance(value, (tuple, list)) or len(value) != 3:
            raise ValueError(
                f"{name} must be a (cmp, slc, win) triple of tensors when config.separate_kv=True, "
                f"got {_type_name(value)}"
            )
        return tuple(value)
    if isinstance(value, (tuple, list)):
        raise ValueError(
            f"{name} must be one tensor shared by the branches when config.separate_kv=False, "
            f"got a {type(value).__name__}; set separate_kv=True to pass (cmp, slc, win) triples"
        )
    _require_tensor(name, value)
    return value, value, value


def check_inputs(q, ks, vs, gates, cu_seqlens, config: NSAConfig):
    """Type, shape, dtype, device and gate-range checks; errors name the tensor. Returns cu_seqlens on the
    host (a tuple), or None without cu_seqlens.

    Gates must lie in [0, 1]; that is checked on CPU tensors only, where it costs a scan and no wait (on
    CUDA it would make the host wait for the GPU at every layer)."""
    _require_tensor("q", q)
    if q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor [B, T, H_q, d_k], got shape {tuple(q.shape)}")
    for axis, size in zip("BT", q.shape[:2]):
        if size < 1:
            raise ValueError(f"q has {axis}={size} (shape {tuple(q.shape)}); allowed: {axis} >= 1")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; allowed: {_FLOAT_DTYPES}")
    batch, seq_len, num_q_heads, head_dim_qk = q.shape
    named = [(f"k[{b}]" if len(set(map(id, ks))) > 1 else "k", t) for b, t in zip(("cmp", "slc", "win"), ks)]
    named += [(f"v[{b}]" if len(set(map(id, vs))) > 1 else "v", t) for b, t in zip(("cmp", "slc", "win"), vs)]
    named.append(("gates", gates))
    for name, t in named:
        _require_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(t.shape)}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name} has [B, T] = {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all inputs must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    k0, v0 = ks[0], vs[0]
    num_kv_heads = k0.shape[2]
    for name, t in named[:-1]:
        ref = k0 if name.startswith("k") else v0
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)} like the other branches")
        if t.shape[2] != num_kv_heads:
            raise ValueError(f"{name} has {t.shape[2]} heads but k has {num_kv_heads}; k and v must share H_kv")
    if k0.shape[3] != head_dim_qk:
        raise ValueError(f"k has head dim {k0.shape[3]} but q has {head_dim_qk}; they must be equal (d_k)")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"q has H_q={num_q_heads} heads and k has H_kv={num_kv_heads}: H_q must be a positive multiple of H_kv"
        )
    if gates.shape[2:] != (num_q_heads, 3):
        raise ValueError(f"gates must be [B, T, H_q, 3] = {(batch, seq_len, num_q_heads, 3)}, got {tuple(gates.shape)}")
    check_gates_on_host(gates)
    if cu_seqlens is None:
        return None
    return check_cu_seqlens(cu_seqlens, batch, seq_len, q.device)


def check_gates_on_host(gates: torch.Tensor) -> None:
    """Gates must lie in [0, 1]; checked for CPU tensors only: on a GPU the check would make the host wait
    for the device at every call, so gates there are taken as they come."""
    if gates.device.type != "cpu":
        return
    low, high = gates.min().item(), gates.max().item()
    if not (0.0 <= low and high <= 1.0):  # NaN fails too
        raise ValueError(f"gates must lie in [0, 1] (e.g. a sigmoid's output), got values in [{low:.4g}, {high:.4g}]")


def check_cu_seqlens(cu_seqlens, batch: int, seq_len: int, device) -> tuple:
    """Checks document boundaries and returns them on the host. They are copied from the device once
    per tensor: every layer of a step passes the same cu_seqlens, so only the first one waits."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            "cu_seqlens must be a 1-D tensor of document boundaries [0, ..., T] with at least 2 entries, "
            f"got {getattr(cu_seqlens, 'shape', type(cu_seqlens).__name__)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens has dtype {cu_seqlens.dtype}; allowed: torch.int32, torch.int64")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if batch != 1:
        raise ValueError(f"packed documents (cu_seqlens) need batch size 1, got B={batch}")
    cached = getattr(cu_seqlens, "_nsa_host_bounds", None)
    if cached is not None and cached[0] == cu_seqlens._version and cached[1][-1] == seq_len:
        return cached[1]
    bounds = tuple(cu_seqlens.tolist())
    if bounds[0] != 0 or bounds[-1] != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={seq_len}, got {bounds[0]} .. {bounds[-1]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {list(bounds)}")
    cu_seqlens._nsa_host_bounds = (cu_seqlens._version, bounds)  # read again after an in-place change
    return bounds


def nsa_attention(
    q: torch.Tensor,
    k: KV,
    v: KV,
    gates: torch.Tensor,
    config: NSAConfig,
    cu_seqlens: Optional[torch.Tensor] = None,
    compressor=None,
    backend: Optional[str] = None,
    compressed_rope: Optional[RopeFn] = None,
) -> torch.Tensor:
    """Native Sparse Attention.

    q      [B, T, H_q, d_k]
    k, v   [B, T, H_kv, d_k] / [B, T, H_kv, d_v], shared by the branches; or (cmp, slc, win)
           triples of such tensors when config.separate_kv
    gates  [B, T, H_q, 3] in [0, 1], order (cmp, slc, win) (the range is checked on CPU tensors)
    cu_seqlens  optional [N+1] document boundaries of packed sequences (B must be 1)
    compressor  a KVCompressor (required for compression 'linear' / 'mlp')
    backend     'torch' | 'triton' | None (triton on CUDA, torch elsewhere)
    compressed_rope  optional fn(compressed_k [N, H_kv, d_k], positions [N]) rotating each
           compressed key at its block's last token position (within its document)
    returns [B, T, H_q, d_v]

    Inside `with recorded_selections()` the call also records the blocks its queries selected (with
    recorded_block_scores(), torch backend, the scores that ranked them); inside
    `with silenced_branches(...)` the named branches' gates are 0.
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an NSAConfig, got {type(config).__name__}")
    if config.compression != "mean" and compressor is None:
        raise ValueError(f"config.compression={config.compression!r} needs a compressor (a KVCompressor); got None")
    if compressor is not None and getattr(compressor, "kind", None) != config.compression:
        raise ValueError(
            f"compressor.kind={getattr(compressor, 'kind', None)!r} does not match "
            f"config.compression={config.compression!r}"
        )
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {BACKENDS} or None")
    ks = branch_tensors("k", k, config.separate_kv)
    vs = branch_tensors("v", v, config.separate_kv)
    bounds = check_inputs(q, ks, vs, gates, cu_seqlens, config)
    gates = silenced_gates(gates)
    backend = backend or default_backend(q.device)
    records, score_records, target_records = _selection_records.get(), _score_records.get(), _target_records.get()
    if target_records is not None:
        target_list, positions = target_records
        target_list.append(ranked_target_scores(q.detach(), ks[1].detach(), config, cu_seqlens, positions).to("cpu"))
    if backend == "triton":
        if score_records is not None:
            raise RuntimeError("recorded_block_scores() needs backend='torch'; this call has backend='triton', whose "
                               "kernels rank the blocks without forming their scores")
        if not triton_backend_available():
            raise RuntimeError("backend='triton' needs the nsa_kernels package and triton; install them or use 'torch'")
        return _nsa_triton(q, ks, vs, gates, config, cu_seqlens, bounds, compressor, compressed_rope, records)
    kv = [(kb, vb) for kb, vb in zip(ks, vs)]
    if records is None and score_records is None:
        return nsa_reference(q, *kv, gates, config, cu_seqlens, compressor, compressed_rope)
    out, intermediates = nsa_reference(q, *kv, gates, config, cu_seqlens, compressor, compressed_rope,
                                       return_intermediates=True)
    if records is not None:
        records.append(intermediates.selected_block_idx.detach().to("cpu", torch.int64))
    if score_records is not None:
        score_records.append(intermediates.ranked_block_scores.detach().to("cpu", torch.float32))
    return out
