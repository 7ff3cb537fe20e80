"""megatron_nsa.functional.silenced_branches: inside the block nsa_attention's output is the gated sum of
the branches left on (the reference's per-branch outputs), on both backends, with the selection unchanged;
outside it nothing changes; unknown branch names are refused."""
from __future__ import annotations

import pytest
import torch

from megatron_nsa import NSAConfig, nsa_attention
from megatron_nsa import reference as R
from megatron_nsa.functional import BRANCHES, recorded_selections, silenced_branches

CONFIG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, select_count=3, window_size=16)


@pytest.mark.parametrize("backend, silenced", [
    ("torch", ("cmp",)), ("torch", ("slc", "win")), ("torch", ("cmp", "win")), ("torch", ("cmp", "slc", "win")),
    ("triton", ("cmp",)), ("triton", ("slc", "win")),
])
def test_output_is_the_gated_sum_of_the_branches_left_on(nsa_inputs, backend, silenced):
    if backend == "triton":
        pytest.importorskip("nsa_kernels")
    seed = int(torch.randint(1 << 30, ()))
    q, ks, vs, gates = nsa_inputs(2, 96, 4, 2, 16, 16, False, seed, dtype=torch.float32)
    kv = (ks[0], vs[0])
    _, parts = R.nsa_reference(q, kv, kv, kv, gates, CONFIG, return_intermediates=True)
    branch_out = {"cmp": parts.cmp_out, "slc": parts.slc_out, "win": parts.win_out}  # [B*T, H_q, d_v]
    flat_gates = gates.reshape(-1, *gates.shape[2:])  # [B*T, H_q, 3]
    expected = sum((flat_gates[..., i, None] * branch_out[name] for i, name in enumerate(BRANCHES)
                    if name not in silenced), torch.zeros_like(parts.win_out)).view(*q.shape[:3], -1)
    with silenced_branches(*silenced), recorded_selections() as records:
        out = nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend=backend)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    assert torch.equal(records[0], parts.selected_block_idx.long())  # the selection runs as before
    full = nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend=backend)  # outside the block: every branch
    assert (full - out).abs().max() > 1e-3
    torch.testing.assert_close(full, sum(flat_gates[..., i, None] * branch_out[name] for i, name in
                                         enumerate(BRANCHES)).view_as(full), rtol=2e-5, atol=2e-5)


def test_nested_block_replaces_the_outer_set_and_unknown_names_are_refused(nsa_inputs):
    q, ks, vs, gates = nsa_inputs(1, 64, 2, 1, 16, 16, False, 3, dtype=torch.float32)
    with silenced_branches("cmp"):
        with silenced_branches("win"):
            inner = nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
        outer = nsa_attention(q, ks[0], vs[0], gates, CONFIG, backend="torch")
    win_only_off = gates.clone()
    win_only_off[..., 2] = 0
    cmp_only_off = gates.clone()
    cmp_only_off[..., 0] = 0
    assert torch.equal(inner, nsa_attention(q, ks[0], vs[0], win_only_off, CONFIG, backend="torch"))
    assert torch.equal(outer, nsa_attention(q, ks[0], vs[0], cmp_only_off, CONFIG, backend="torch"))
    with pytest.raises(ValueError, match=r"names \['window'\]: a branch must be one of \('cmp', 'slc', 'win'\)"):
        with silenced_branches("cmp", "window"):
            pass
