"""Save and resume: model, optimizer, schedule, RNG and data position.

Layout under checkpoint.dir:

    step_00000100/            a complete checkpoint (the newest one is what a restart resumes)
        meta.json             run id, step, consumed samples, scheduler state, format, parallel layout, the recipe
        ...                   megatron.core.dist_checkpointing files (CUDA), or rank_00000.pt ... (CPU)
    .partial-RUNID-step_00000200/   a checkpoint being written; renamed to step_00000200 when complete
    run_RUNID/                a run started with checkpoint.new_run_subdir=true (the same layout inside)

Every rank writes into the .partial directory, rank 0 adds meta.json last and renames the directory,
so a crash at any point leaves the previous checkpoint as the newest complete one.

A directory holds one run: every checkpoint records its run's id, a resumed run keeps it, and pruning
keeps this run's newest `keep_last` checkpoints, never touching another run's. Starting afresh
(checkpoint.resume=false) in a directory that holds checkpoints is refused; checkpoint.new_run_subdir=true
starts the new run in a subdirectory instead, leaving the old checkpoints as they are.

On CUDA the shards are megatron.core.dist_checkpointing (torch_dist) state, which can be reloaded under
another parallel layout; on CPU (where that writer needs CUDA) every rank saves its own state dicts
and the layout must match on resume. That writer reports results through a multiprocessing server that
SIGTERM must not kill (see start_writer_results_server).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import time
import uuid
from typing import List, Optional

import numpy
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from .config import BadInputError, CheckpointSection, Recipe

STEP_PREFIX = "step_"
PARTIAL_PREFIX = ".partial-"
REPLACED_PREFIX = ".replaced-"
RUN_PREFIX = "run_"
META = "meta.json"
WEIGHTS_FORMAT = "weights"  # a weights-only export (megatron_nsa.eval.export): evaluation only


class CheckpointError(BadInputError):
    """A checkpoint that cannot be resumed; the message names it and says what to do."""


@dataclasses.dataclass
class Progress:
    step: int = 0
    consumed_samples: int = 0


def rng_state(on_cuda: bool) -> dict:
    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state()}
    if on_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
        state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict, on_cuda: bool) -> None:
    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if on_cuda:
        torch.cuda.set_rng_state(state["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def layout_of(recipe: Recipe, world_size: int) -> dict:
    par = recipe.parallel
    return {"world_size": world_size, "tensor_model_parallel_size": par.tensor_model_parallel_size,
            "pipeline_model_parallel_size": par.pipeline_model_parallel_size,
            "context_parallel_size": par.context_parallel_size, "attention": recipe.model.attention}


def _step_of(name: str) -> Optional[int]:
    digits = name[len(STEP_PREFIX):]
    return int(digits) if name.startswith(STEP_PREFIX) and digits.isdigit() else None


def list_checkpoints(directory: str) -> List[str]:
    """Complete checkpoints (by name), oldest first."""
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if _step_of(n) is not None and os.path.isdir(os.path.join(directory, n))]
    return sorted(names, key=_step_of)


def new_run_id() -> str:
    """UTC start time plus 6 random hex digits, e.g. 20260101-120000-3fa2c1."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def run_id_of(path: str) -> Optional[str]:
    """The run id recorded in checkpoint `path` (None when it records none or cannot be read)."""
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


@dataclasses.dataclass
class RunPlan:
    """Where this run keeps its checkpoints and what it resumes from."""

    directory: str
    resume_from: Optional[str]  # the checkpoint to load; None: start afresh
    run_id: str  # a resumed run takes the id recorded in resume_from (when it records one)


def plan_run(section: CheckpointSection) -> RunPlan:
    """Decide from checkpoint.dir / resume / new_run_subdir; never deletes or overwrites anything.

    Raises CheckpointError when a fresh start would share a directory with an earlier run's checkpoints."""
    directory = os.path.abspath(section.dir)
    if section.new_run_subdir:
        run_id = new_run_id()
        return RunPlan(os.path.join(directory, RUN_PREFIX + run_id), None, run_id)
    existing = list_checkpoints(directory)
    if existing and section.resume:
        latest = os.path.join(directory, existing[-1])
        return RunPlan(directory, latest, run_id_of(latest) or new_run_id())
    if existing:
        raise CheckpointError(
            f"checkpoint.dir={section.dir} holds checkpoints of an earlier run ({', '.join(existing)}), and "
            "checkpoint.resume=false starts afresh; a new run never deletes or overwrites them. Start it in "
            "another directory (checkpoint.dir=NEW_DIR), or in a new subdirectory of this one "
            "(checkpoint.new_run_subdir=true), or continue the earlier run (checkpoint.resume=true)"
        )
    return RunPlan(directory, None, new_run_id())


def agreed_plan(section: CheckpointSection, launch) -> RunPlan:
    """plan_run on rank 0, the same plan (or the same CheckpointError) on every rank."""
    box = [None]
    if launch.rank == 0:
        try:
            box[0] = plan_run(section)
        except CheckpointError as err:
            box[0] = str(err)
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise CheckpointError(box[0])
    return box[0]


def start_writer_results_server() -> None:
    """Start dist_checkpointing's write-results server now, deaf to SIGTERM.

    megatron.core's torch_dist writer sends its results through a multiprocessing Manager that it spawns
    at the first save. SLURM preemption and `timeout` send SIGTERM to every process of the job, that
    server included: it dies, and the save that the SIGTERM asks for fails (EOFError), so the run stops
    without its last checkpoint. An ignored signal stays ignored across exec, so the server spawned here
    ignores SIGTERM; the trainer's own handler is back once it runs (a SIGTERM inside that instant is lost).
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    start = getattr(filesystem_async, "get_write_results_queue", None) or \
        getattr(filesystem_async, "_get_write_results_queue", None)  # megatron-core 0.19 / 0.16
    if start is None:
        return
    handler = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        start()
    finally:
        signal.signal(signal.SIGTERM, handler)


class Checkpointer:
    """Saves and restores one training run's state in recipe.checkpoint.dir."""

    def __init__(self, recipe: Recipe, launch, core_model: torch.nn.Module, optimizer, scheduler, plan: RunPlan):
        self.directory = plan.directory
        self.run_id = plan.run_id
        self.keep_last = recipe.checkpoint.keep_last
        self.layout = layout_of(recipe, launch.world_size)
        self.recipe = recipe.to_dict()
        self.launch = launch
        self.model = core_model
        self.optimizer = optimizer
        self.scheduler = scheduler
        if self.format == "dist_checkpointing":
            start_writer_results_server()

    @property
    def format(self) -> str:
        return "dist_checkpointing" if self.launch.on_cuda else "host"

    def _sharded_state(self, is_loading: bool) -> dict:
        model_state = self.model.sharded_state_dict()
        rank, world = self.launch.rank, self.launch.world_size
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading),
            "rng": ShardedObject("rng_state", rng_state(True), (world,), (rank,), replica_id=0),
        }

    def _host_file(self, path: str) -> str:
        return os.path.join(path, f"rank_{self.launch.rank:05d}.pt")

    def save(self, progress: Progress) -> str:
        name = f"{STEP_PREFIX}{progress.step:08d}"
        final = os.path.join(self.directory, name)
        partial = os.path.join(self.directory, f"{PARTIAL_PREFIX}{self.run_id}-{name}")
        is_writer = self.launch.rank == 0
        if is_writer:
            shutil.rmtree(partial, ignore_errors=True)  # this run's own leftover of a crash at the same step
            os.makedirs(partial)
        dist.barrier()
        if self.format == "dist_checkpointing":
            dist_checkpointing.save(self._sharded_state(is_loading=False), partial)
        else:
            torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "rng": rng_state(False)}, self._host_file(partial))
        dist.barrier()
        if is_writer:
            meta = {"run_id": self.run_id, "step": progress.step, "consumed_samples": progress.consumed_samples, "format": self.format,
                    "layout": self.layout, "scheduler": self.scheduler.state_dict(),
                    "recipe": self.recipe}
            with open(os.path.join(partial, META), "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            self._publish(partial, final)
            self._prune()
        dist.barrier()
        return final

    def _publish(self, partial: str, final: str) -> None:
        """Rename the complete checkpoint into place; an existing one of the same step is replaced only
        when it is this run's own (a step saved again after resuming from an older checkpoint)."""
        if os.path.exists(final):
            if run_id_of(final) != self.run_id:
                shutil.rmtree(partial, ignore_errors=True)
                raise CheckpointError(f"{final} belongs to another run; this run leaves it as it is and "
                                      "cannot save this step: use another checkpoint.dir")
            replaced = os.path.join(self.directory, f"{REPLACED_PREFIX}{self.run_id}-{os.path.basename(final)}")
            os.rename(final, replaced)
            os.rename(partial, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.rename(partial, final)

    def own_checkpoints(self) -> List[str]:
        """This run's complete checkpoints (names), oldest first."""
        return [n for n in list_checkpoints(self.directory) if run_id_of(os.path.join(self.directory, n)) == self.run_id]

    def _prune(self) -> None:
        """Delete this run's checkpoints older than its newest keep_last, and its own unfinished ones."""
        for name in self.own_checkpoints()[:-self.keep_last]:
            shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        for name in os.listdir(self.directory):
            if name.startswith((f"{PARTIAL_PREFIX}{self.run_id}-", f"{REPLACED_PREFIX}{self.run_id}-")):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _read_meta(self, path: str) -> dict:
        advice = self._advice(path)
        meta_path = os.path.join(path, META)
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            missing = {"step", "consumed_samples", "format", "layout", "scheduler"} - set(meta)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint {path} is corrupt: cannot read {META} ({err}); {advice}") from None
        if missing:
            raise CheckpointError(f"checkpoint {path} is corrupt: {META} lacks {sorted(missing)}; {advice}")
        if meta["format"] == WEIGHTS_FORMAT:
            raise CheckpointError(
                f"checkpoint {path} holds model weights alone (python -m megatron_nsa.eval.export), without "
                "optimizer, schedule or data position: a training run cannot resume from it; point checkpoint.dir "
                "at the training run's own directory")
        if meta["format"] != self.format:
            raise CheckpointError(
                f"checkpoint {path} was written in the '{meta['format']}' format but this run needs "
                f"'{self.format}' ({'CUDA' if self.launch.on_cuda else 'CPU'}); resume on the device that wrote it"
            )
        changed = {k: (meta["layout"].get(k), v) for k, v in self.layout.items() if meta["layout"].get(k) != v}
        if "attention" in changed:  # the clearest cause first: another model lives in this directory
            raise CheckpointError(
                f"checkpoint.dir={self.directory} holds a model.attention={meta['layout']['attention']} model "
                f"({path}); this recipe builds model.attention={self.layout['attention']}: use another "
                "checkpoint.dir (or checkpoint.new_run_subdir=true) for it")
        if self.format == "host" and changed:
            raise CheckpointError(
                f"checkpoint {path} was written with a different layout {changed} (saved, now); CPU checkpoints "
                "resume only with the same recipe parallel sizes and process count"
            )
        return meta

    def _advice(self, path: str) -> str:
        older = [n for n in list_checkpoints(self.directory) if os.path.join(self.directory, n) != path]
        fallback = f"move it away to resume from {older[-1]}" if older else "move it away"
        return (f"{fallback}, or start a new run elsewhere (checkpoint.dir=NEW_DIR, or checkpoint.new_run_subdir=true "
                "to start in a new subdirectory of this one)")

    def load(self, path: str) -> Progress:
        """Restore everything from `path`; every rank raises CheckpointError if any rank fails."""
        meta = self._read_meta(path)
        error = None
        try:
            if self.format == "dist_checkpointing":
                sharded = self._sharded_state(is_loading=True)
                if meta["layout"]["world_size"] != self.launch.world_size:
                    sharded.pop("rng")
                state = dist_checkpointing.load(sharded, path)
            else:
                state = torch.load(self._host_file(path), map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if "rng" in state:
                set_rng_state(state["rng"], self.launch.on_cuda)
            self.scheduler.load_state_dict(meta["scheduler"])
        except Exception as err:  # noqa: BLE001 - any failure to read back means the files are unusable
            error = f"{type(err).__name__}: {err}"
        failed = torch.tensor([0 if error is None else 1], device=self.launch.device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            detail = error or "another rank could not read its part"
            raise CheckpointError(f"checkpoint {path} cannot be loaded ({detail}); {self._advice(path)}")
        return Progress(step=meta["step"], consumed_samples=meta["consumed_samples"])
