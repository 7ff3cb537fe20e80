"""row_dot (the backward's delta = rowsum(dO * O)) against its float32 oracle, with a poisoned output."""
import pytest
import torch

pytest.importorskip("nsa_kernels")
from nsa_kernels import delta as D  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 3, 24), (5, 4, 128), (600, 2, 8)])
def test_row_dot_matches_reference(shape, dtype, monkeypatch):
    gen = torch.Generator().manual_seed(sum(shape))
    a, b = (torch.randn(*shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    poison = torch.full(shape[:-1], float("nan"), device=DEVICE)
    monkeypatch.setattr(D.torch, "empty", lambda *s, **kw: poison)
    got = D.row_dot(a, b)
    assert got.dtype == torch.float32 and got.shape == shape[:-1]
    torch.testing.assert_close(got, D.row_dot_reference(a, b), rtol=1e-5, atol=1e-5)


def test_row_dot_reads_non_contiguous_inputs():
    a = torch.randn(6, 10, 16, device=DEVICE).transpose(0, 1)
    b = torch.randn(10, 6, 16, device=DEVICE)
    torch.testing.assert_close(D.row_dot(a, b), D.row_dot_reference(a, b), rtol=1e-5, atol=1e-5)


def test_row_dot_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\) and \(2, 3, 5\)"):
        D.row_dot(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
