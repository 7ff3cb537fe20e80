"""The Triton path of nsa_attention never makes the host wait for the GPU on a [B, T] batch, and on packed
documents only once per cu_seqlens tensor (its check): table sizes come from host-known shapes, not from
device values. A wait per layer would stop the host from queueing kernels ahead of the GPU.

On a GPU this counts the warnings of torch.cuda.set_sync_debug_mode("warn"), one per synchronizing
call (after a first call that compiles the kernels). On CPU, where nothing synchronizes, it records the
calls that would (reads of device values, copies to the host, and ops whose output size depends on
device values) made from this project's code.
"""
import collections
import contextlib
import os
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_nsa import NSAConfig, functional, nsa_attention

pytest.importorskip("nsa_kernels")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
CONFIG = NSAConfig() if CUDA else NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16,
                                            select_count=4, window_size=20)
PROJECT = tuple(os.path.dirname(__import__(name).__file__) for name in ("megatron_nsa", "nsa_kernels"))

# ops that wait for the GPU: a scalar read, or an output whose size depends on device values
WAITING_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.bincount.default",
               "aten.masked_select.default", "aten.is_nonzero.default", "aten.equal.default",
               "aten._unique2.default", "aten.unique_consecutive.default", "aten.unique_dim.default"}


def _project_caller():
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(PROJECT):
            return f"{os.path.relpath(frame.filename, os.path.dirname(PROJECT[0]))}:{frame.lineno}: {frame.line}"
    return None


class _WaitRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def record(self, what):
        caller = _project_caller()
        if caller is not None:
            self.calls[f"{what} at {caller}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        waits = name in WAITING_OPS
        waits |= name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None
        waits |= name == "aten.index.Tensor" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if waits:
            self.record(name)
        return func(*args, **kwargs)


@pytest.fixture
def watch_waits(monkeypatch):
    """watch_waits() is a context that yields the list of calls that waited for the GPU inside it:
    on a GPU, the sync warnings of torch.cuda's debug mode; on CPU, what the recorder saw."""
    @contextlib.contextmanager
    def watch():
        calls = []
        if CUDA:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    yield calls
            finally:
                torch.cuda.set_sync_debug_mode("default")
            calls += [str(w.message) for w in caught if "synchroniz" in str(w.message)]
            return
        recorder = _WaitRecorder()
        with monkeypatch.context() as patches:
            # The gate range check runs for CPU tensors only (it is skipped on a GPU, where it would wait):
            # standing in for the GPU path, the recorder leaves it out.
            patches.setattr(functional, "check_gates_on_host", lambda gates: None)
            for name in ("tolist", "item", "numpy", "cpu"):
                _record_tensor_method(patches, recorder, name)
            _record_tensor_method(patches, recorder, "to", _copies_to_host)
            with recorder:
                yield calls
        calls += [call for call, count in recorder.calls.items() for _ in range(count)]
    return watch


def _copies_to_host(*args, **kwargs):
    """Whether Tensor.to(*args, **kwargs) is a blocking copy to the host (a non_blocking upload is fine)."""
    targets = list(args[:1]) + [kwargs.get("device")]
    to_cpu = any(str(t) == "cpu" for t in targets if isinstance(t, (str, torch.device)))
    return to_cpu and not kwargs.get("non_blocking", False)


def _record_tensor_method(patches, recorder, name, reads_host=lambda *a, **kw: True):
    original = getattr(torch.Tensor, name)

    def wrapper(self, *args, **kwargs):
        if reads_host(*args, **kwargs):
            recorder.record(f"Tensor.{name}")
        return original(self, *args, **kwargs)
    patches.setattr(torch.Tensor, name, wrapper)


def _inputs(batch, seq_len, num_q_heads=4, num_kv_heads=2, head_dim=16):
    gen = torch.Generator().manual_seed(batch * seq_len)
    mk = lambda *s: torch.randn(*s, generator=gen).to(DEVICE, DTYPE).requires_grad_()  # noqa: E731
    q, k, v = mk(batch, seq_len, num_q_heads, head_dim), mk(batch, seq_len, num_kv_heads, head_dim), \
        mk(batch, seq_len, num_kv_heads, head_dim)
    gates = torch.rand(batch, seq_len, num_q_heads, 3, generator=gen).to(DEVICE, DTYPE).requires_grad_()
    return q, k, v, gates


def _forward_backward(q, k, v, gates, cu_seqlens=None):
    out = nsa_attention(q, k, v, gates, CONFIG, cu_seqlens=cu_seqlens, backend="triton")
    torch.autograd.grad(out, (q, k, v, gates), torch.ones_like(out))


def test_batch_never_waits_for_the_gpu(watch_waits):
    seq_len = 4000 if CUDA else 70  # not a multiple of the tiles: padding tiles and pieces are exercised
    inputs = _inputs(2, seq_len)
    if CUDA:
        _forward_backward(*inputs)  # compile the kernels first
    with watch_waits() as calls:
        _forward_backward(*inputs)
    assert not calls, "\n".join(calls)


def test_packed_documents_wait_once_per_cu_seqlens_tensor(watch_waits):
    """The boundary check reads cu_seqlens once; later layers passing the same tensor do not wait, a new
    tensor or an in-place change is read again."""
    lens = [3001, 95, 1000] if CUDA else [37, 5, 30]
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    make_cu = lambda: torch.tensor(bounds, dtype=torch.int32).to(DEVICE)  # noqa: E731
    inputs = _inputs(1, sum(lens))
    if CUDA:
        _forward_backward(*inputs, cu_seqlens=make_cu())
    cu = make_cu()
    with watch_waits() as calls:
        for _layer in range(3):
            _forward_backward(*inputs, cu_seqlens=cu)
    assert len(calls) == 1, calls
    if not CUDA:
        assert calls[0].startswith("Tensor.tolist at megatron_nsa/functional.py"), calls
    fresh = make_cu()
    with watch_waits() as calls:
        _forward_backward(*inputs, cu_seqlens=fresh)
        cu[1:-1] += 1  # documents of 38, 5, 29 tokens: read again
        _forward_backward(*inputs, cu_seqlens=cu)
    assert len(calls) == 2, calls


def test_cu_seqlens_changed_in_place_is_checked_again():
    from megatron_nsa.functional import check_cu_seqlens
    cu = torch.tensor([0, 30, 72], dtype=torch.int32)
    assert check_cu_seqlens(cu, 1, 72, cu.device) == (0, 30, 72)
    cu[1] = 80
    with pytest.raises(ValueError, match="non-decreasing"):
        check_cu_seqlens(cu, 1, 72, cu.device)
    checked = torch.tensor([0, 30, 72], dtype=torch.int32)
    check_cu_seqlens(checked, 1, 72, checked.device)
    with pytest.raises(ValueError, match="end at T=60"):  # read before: still checked against this T
        check_cu_seqlens(checked, 1, 60, checked.device)


def test_the_recorder_sees_waits_in_project_code(monkeypatch):
    """The CPU recorder is not blind: the reference's window branch reads positions on the host
    (int(pos.min())), and compress_documents without host bounds copies cu_seqlens to the host."""
    from megatron_nsa import reference as R
    from megatron_nsa.compression import compress_documents

    q, k, v, _ = (t[0].detach().cpu().float() for t in _inputs(1, 40))
    recorder = _WaitRecorder()
    with recorder:
        R.window_attention(q, k, v, torch.arange(40), 0, CONFIG, 0.25)
    assert any("_local_scalar_dense" in call and "reference.py" in call for call in recorder.calls), recorder.calls
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        recorder.record("Tensor.to")
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to)
    compress_documents(k, v, torch.tensor([0, 40], dtype=torch.int32), CONFIG)
    assert any("Tensor.to at megatron_nsa/compression.py" in call for call in recorder.calls), recorder.calls
