"""SIGTERM asks a run to save a checkpoint and stop at the end of the current step.

launch/train.sh starts torchrun with SIGTERM and SIGINT ignored and not handled by torchrun, so that a stop
is the workers' own: each worker records its process id in $MEGATRON_NSA_STOP_DIR, and on SIGTERM or
Ctrl-C the script creates the file `stop` there and sends SIGTERM to the recorded workers (SLURM and
`timeout` signal every process of the job themselves). The workers save, exit normally, and torchrun ends
without a report of its own.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_DIR_ENV = "MEGATRON_NSA_STOP_DIR"


class StopSignal:
    """The stop request: SIGTERM to this process, or the launcher's stop file."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)
        directory = os.environ.get(STOP_DIR_ENV)
        if directory and os.path.isdir(directory):
            open(os.path.join(directory, str(os.getpid())), "w").close()
            # A stop that came before this process was recorded: the launcher wrote the file first.
            self.received = os.path.exists(os.path.join(directory, "stop"))

    def _handle(self, signum, frame):
        self.received = True

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank got the request (a collective)."""
        flag = torch.tensor([int(self.received)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
