"""The kernels' interface: nsa_kernels stands below megatron_nsa (importing it loads neither megatron_nsa nor
Megatron), and KernelParams reads each NSA setting from its NSAConfig field."""
import dataclasses
import os
import subprocess
import sys

import pytest

from megatron_nsa import NSAConfig

pytest.importorskip("nsa_kernels")
from nsa_kernels import KernelParams  # noqa: E402


def test_importing_the_kernels_loads_no_megatron():
    check = ("import sys, nsa_kernels; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('megatron', 'megatron_nsa')))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]"


def test_kernel_params_read_each_setting_from_its_config_field():
    config = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=32, select_count=5,
                       select_init_blocks=2, select_local_blocks=3, window_size=48)
    params = KernelParams.from_config(config, 0.125)
    assert params == KernelParams(compress_block=16, compress_stride=8, select_block=32, select_count=5,
                                  init_blocks=2, local_blocks=3, window=48, scale=0.125)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.window = 1
