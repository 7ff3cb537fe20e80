"""When the kernels read through tensor descriptors (kernels/tma.py) and when they fall back to pointers."""
import pytest
import torch

pytest.importorskip("nsa_kernels")
from nsa_kernels.tma import _engine_present, streamed, tma_descriptors  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ENGINE = _engine_present(torch.device(DEVICE))  # the interpreter runs descriptors too


def _packed(rows, heads, dim, dtype=torch.float16):
    return torch.randn(rows, heads, dim, device=DEVICE).to(dtype)


@pytest.mark.skipif(not ENGINE, reason="a GPU without the copy engine takes pointers everywhere")
def test_descriptors_where_every_tensor_allows_them():
    k, v = _packed(40, 2, 64), _packed(40, 2, 32)
    descriptors = tma_descriptors([k, v], 16, True)
    assert descriptors is not None
    for x, desc in zip((k, v), descriptors):
        assert list(desc.shape) == [40, 2 * x.shape[2]] and list(desc.block_shape) == [16, x.shape[2]]
    args, on = streamed([k, v], 16, True)
    assert on and args[0] is not k


@pytest.mark.parametrize("why,tensors,enabled", [
    ("switched off", lambda: [_packed(40, 2, 64)], False),
    ("d not a power of two", lambda: [_packed(40, 2, 48)], True),
    ("d below 16", lambda: [_packed(40, 2, 8)], True),
    ("heads not adjacent", lambda: [_packed(40, 4, 64)[:, ::2]], True),
    ("base not 16-byte aligned", lambda: [_packed(41, 1, 64).view(-1)[3:3 + 40 * 64].view(40, 1, 64)], True),
    ("no rows", lambda: [_packed(0, 2, 64)], True),
    ("one tensor of two unfit", lambda: [_packed(40, 2, 64), _packed(40, 2, 48)], True),
])
def test_pointers_otherwise(why, tensors, enabled):
    xs = tensors()
    assert tma_descriptors(xs, 16, enabled) is None, why
    args, on = streamed(xs, 16, enabled)
    assert not on and all(a is x for a, x in zip(args, xs))
