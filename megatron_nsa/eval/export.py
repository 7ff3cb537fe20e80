"""The weights of a checkpoint alone, small enough to copy between machines:

    python -m megatron_nsa.eval.export --checkpoint CKPT_DIR --out WEIGHTS_DIR [--dtype bf16|fp32]

Writes WEIGHTS_DIR/step_XXXXXXXX/ (the step of the checkpoint) with model.pt, the model's state dict with
floating-point tensors in --dtype, and the checkpoint's meta.json with format "weights". No optimizer,
scheduler or RNG state: the 4-layer retrieval model (configs/retrieval_curriculum_8k.yaml, about 5.5M
parameters) takes about 10 MiB in bf16 where its training checkpoint on CPU takes about 62 MiB. Every
evaluation command (megatron_nsa.eval.loss, .needle, experiments.recall_breakdown) loads WEIGHTS_DIR like
a training checkpoint, on CPU or GPU, whatever format the training run wrote; a training run cannot
resume from it. The files are written under a temporary name and renamed when complete; an
existing WEIGHTS_DIR/step_XXXXXXXX is never replaced.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import List, Optional, Tuple

from megatron_nsa.training.config import BadInputError

from .checkpoints import META, STEP_PREFIX, WEIGHTS_FILE, WEIGHTS_FORMAT, EvalInputError, read_meta, \
    resolve_checkpoint

DTYPES = ("bf16", "fp32")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-nsa-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint.dir or one step_XXXXXXXX directory")
    parser.add_argument("--out", required=True, help="the directory to write step_XXXXXXXX/ into")
    parser.add_argument("--dtype", default="bf16", help=f"floating-point tensors as one of {', '.join(DTYPES)}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where to load the checkpoint (CUDA-written checkpoints need cuda)")
    return parser.parse_args(argv)


def export(checkpoint: str, out: str, dtype: str = "bf16", device: str = "auto") -> Tuple[str, str]:
    """Write the weights of `checkpoint` into `out`/step_XXXXXXXX; returns (the step directory read, the one
    written)."""
    if dtype not in DTYPES:
        raise EvalInputError(f"--dtype {dtype!r} is not allowed: use one of {', '.join(DTYPES)}")
    step_dir = resolve_checkpoint(checkpoint)
    meta = read_meta(step_dir)
    final = os.path.join(out, f"{STEP_PREFIX}{int(meta.get('step', 0)):08d}")
    if os.path.exists(final):
        raise EvalInputError(f"--out {out!r} already holds {final}: it is not replaced; give another --out or move "
                             "it away")

    import torch  # after the checks: a wrong path fails before the imports

    from .model_loader import load_model, release

    loaded = load_model(step_dir, device=device)
    core = getattr(loaded.model, "module", loaded.model)  # bf16 models are wrapped in Float16Module
    target = torch.bfloat16 if dtype == "bf16" else torch.float32
    state = {name: value.detach().to("cpu", target) if torch.is_tensor(value) and value.is_floating_point()
             else value for name, value in core.state_dict().items()}
    release(loaded)

    os.makedirs(out, exist_ok=True)
    partial = os.path.join(out, f".partial-export-{os.path.basename(final)}-{os.getpid()}")
    os.makedirs(partial)
    try:
        torch.save(state, os.path.join(partial, WEIGHTS_FILE))
        exported = dict(meta, format=WEIGHTS_FORMAT, dtype=dtype, exported_from=step_dir)
        with open(os.path.join(partial, META), "w") as f:
            json.dump(exported, f, indent=1)
        os.rename(partial, final)  # refuses a non-empty existing target: nothing is overwritten
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return step_dir, final


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        step_dir, final = export(args.checkpoint, args.out, args.dtype, args.device)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    size_mib = os.path.getsize(os.path.join(final, WEIGHTS_FILE)) / 2**20
    print(f"weights of {step_dir} ({args.dtype}, {size_mib:.1f} MiB) -> {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
