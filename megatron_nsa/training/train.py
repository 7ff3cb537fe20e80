"""Entry point: `python -m megatron_nsa.training.train CONFIG [key=value ...]` (usually through launch/train.sh).

`--list-keys` lists every recipe key with its default, allowed values and meaning.

Bad input (unknown keys, missing data, a layout the world size or the sequence length cannot take, an
unreadable checkpoint) stops the run before the first step with a message that says what to change.
"""
from __future__ import annotations

import os
import sys
import warnings

# megatron-core warns at import time that the optional Transformer Engine / Apex are absent, and 0.16
# warns about its own default cuda_graph_scope.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

import torch  # noqa: E402

from .config import BadInputError, check_before_launch, defaults_note, describe_keys, load_recipe  # noqa: E402
from .stop import StopSignal  # noqa: E402

USAGE = "usage: python -m megatron_nsa.training.train CONFIG.yaml [section.key=value ...] | --list-keys"


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if args else 2
    if args[0] == "--list-keys":
        print(describe_keys())
        return 0
    path, overrides = args[0], args[1:]
    if "=" in path and not os.path.exists(path):
        print(f"error: the first argument must be a recipe file, got '{path}'\n{USAGE}", file=sys.stderr)
        return 2
    stop = StopSignal()  # first: a SIGTERM during set-up still stops the run after its first step
    is_first_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        recipe = load_recipe(path, overrides)
        note = defaults_note(recipe)
        if note and is_first_rank:
            print(note, flush=True)
        check_before_launch(recipe)
        from .loop import train  # megatron-core takes seconds to import: only once the recipe is sound

        summary = train(recipe, stop)
    except BadInputError as err:
        if is_first_rank:
            print(f"error: {err}", file=sys.stderr, flush=True)
            _leave_note(f"error: {err}")
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if summary.stopped_by_signal and is_first_rank:
        saved = (f"; checkpoint {summary.checkpoint}: {summary.resume_hint(recipe.checkpoint.new_run_subdir)}"
                 if summary.checkpoint else "")
        _leave_note(f"stopped by SIGTERM at step {summary.final_step}{saved}")
    return 0


def _leave_note(text: str) -> None:
    """launch/train.sh prints this note after torchrun's own report, so that it is the last thing shown."""
    if os.environ.get("MEGATRON_NSA_NOTE_FILE"):
        with open(os.environ["MEGATRON_NSA_NOTE_FILE"], "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
