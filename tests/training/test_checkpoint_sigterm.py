"""SIGTERM to the whole process group (SLURM preemption, `timeout`) must not break the checkpoint writer:
megatron's dist_checkpointing sends write results through a multiprocessing server, which
start_writer_results_server makes deaf to SIGTERM while the trainer's own handler still runs."""
from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = r"""
import os, signal, sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
start = getattr(filesystem_async, "get_write_results_queue", None) or filesystem_async._get_write_results_queue
received = []
signal.signal(signal.SIGTERM, lambda *args: received.append(args[0]))
if sys.argv[1] == "protected":
    from megatron_nsa.training.checkpoint import start_writer_results_server
    start_writer_results_server()
results = start()  # the queue the writer would use: the server already runs when protected
os.killpg(os.getpgrp(), signal.SIGTERM)  # what preemption does: every process of the job
time.sleep(1.0)
try:
    results.put("written")
    print("queue", results.get(timeout=10), "handler calls", len(received))
except Exception as error:
    print("queue broken", type(error).__name__, "handler calls", len(received))
"""


def run(mode: str) -> str:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=240,
                          start_new_session=True, env=env)  # its own process group, so the test runner is spared
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_writer_results_server_survives_sigterm_to_the_process_group():
    assert run("protected") == "queue written handler calls 1"


def test_without_protection_the_server_dies():
    """The hazard that the protection removes (if megatron stops spawning a server, this fails: then
    start_writer_results_server can go)."""
    assert run("unprotected").startswith("queue broken")
