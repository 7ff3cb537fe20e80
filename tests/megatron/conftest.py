"""Fixtures of the Megatron-Core tests."""

import pytest
import torch

from mcore_harness import init_single_process


@pytest.fixture(scope="module")
def megatron_world():
    """Megatron's parallel state on a one-process gloo world (TP = PP = CP = 1)."""
    from megatron.core import parallel_state

    owns_world = not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny shapes: one thread is fastest
    init_single_process()
    yield
    parallel_state.destroy_model_parallel()
    if owns_world:
        torch.distributed.destroy_process_group()
    torch.set_num_threads(threads)
