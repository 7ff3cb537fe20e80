"""megatron_nsa.rope.Rotary: a table rotary checks its positions against the table; `covering(n)` does that
check once on the host, so that its calls never read a device value (which would wait for the GPU)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_nsa.rope import Rotary, rotary_angles


class _ScalarReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _table_rotary(rows=40, rot_dim=8):
    return Rotary.from_table(rotary_angles(torch.arange(rows), rot_dim, 10000.0)[:, None, None, :])


def test_covering_rotates_alike_without_reading_positions():
    rotary = _table_rotary()
    x = torch.randn(30, 2, 16)
    positions = torch.randperm(40)[:30]
    reads = _ScalarReads()
    with reads:
        checked = rotary(x, positions)
    assert reads.count >= 1  # the per-call range check reads max(positions)
    reads = _ScalarReads()
    with reads:
        covered = rotary.covering(40)(x, positions)
    assert reads.count == 0
    assert torch.equal(checked, covered)
    assert not torch.equal(covered, x)


def test_covering_more_positions_than_the_table_names_both():
    with pytest.raises(ValueError, match=r"0\.\.40 need a rotary table of at least 41 rows; it has 40"):
        _table_rotary().covering(41)


def test_uncovered_position_beyond_the_table_is_an_error():
    with pytest.raises(ValueError, match="position 40 is beyond the rotary table of 40 positions"):
        _table_rotary()(torch.randn(1, 1, 8), torch.tensor([40]))
