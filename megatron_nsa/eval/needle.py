"""Needle in a haystack: accuracy of a checkpoint over needle depths x context lengths.

    python -m megatron_nsa.eval.needle --checkpoint CKPT_DIR [--lengths 8192 16384 32768]
        [--depths 0 10 20 ... 100] [--samples 20] [--format retrieval|text] [--json OUT.json]
        [--table OUT.md] [--png OUT.png] [--selections] [--ranks] [--silence BRANCH ...] [--recipe CONFIG.yaml]
        [section.key=value ...]

Each sample hides one key/value fact at a depth of its filler and asks for it at the end
(megatron_nsa.eval.haystack). Scoring is teacher-forced: one forward pass per sample, and a sample counts
as correct when every value token is the model's argmax prediction (what greedy decoding would produce,
token for token). Formats: `retrieval` (the synthetic task's records; the default for models trained on
data.source=retrieval) and `text` (an English sentence in validation text of the model's own corpus; the
default otherwise). Prints a markdown table (depth rows, length columns); --png draws a heat map when
matplotlib is installed. --selections (NSA models) adds how often the selected blocks at the question hold
the needle (megatron_nsa.eval.selections): a needle never selected can only be seen through the window and
the compressed branch. --ranks (NSA models, torch backend: on CPU, or with nsa.backend=torch) adds the needle
block's median rank among the blocks by selection score at the question (1 = the highest; the selection keeps
ranks <= n), which grades a miss: a rank just past n is a near miss, about half the candidate blocks is
chance; beside it the same rank by the block score loss's target (megatron_nsa/block_score_loss.py: the
selected branch's own attention per block, without selection), which says whether the selected branch's
queries and keys would find the needle's block if the block scores followed them. --silence cmp win (NSA
models) scores the model with those branches' gates set to 0 (megatron_nsa.functional.silenced_branches):
which branch carries the answer.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

import numpy

from megatron_nsa.training.config import BadInputError

from .checkpoints import EvalInputError, check_length, checkpoint_recipe, read_meta, resolve_checkpoint, \
    trained_positions
from .haystack import FORMATS, check_depths, check_grid_lengths, needle_samples
from .report import accuracy_table, grid_key, rank_table, write_json
from megatron_nsa.data.retrieval import RetrievalFormat
from megatron_nsa.functional import BRANCHES, silenced_branches

DEFAULT_DEPTHS = [float(d) for d in range(0, 101, 10)]
SCORING = "teacher-forced: correct when every answer token is the argmax prediction"
SELECTED_TITLE = "needle block selected at the question (share of layers x KV heads)"
RANK_TITLE = "needle block's median rank at the question (1 = highest score; selected when <= n)"
TARGET_RANK_TITLE = ("the same rank by the block score loss's target (the selected branch's own attention per block, "
                     "without selection)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-nsa-needle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoint.dir or one step_XXXXXXXX directory")
    parser.add_argument("--lengths", type=int, nargs="+", help="context lengths in tokens (default: the trained one)")
    parser.add_argument("--depths", type=float, nargs="+", default=DEFAULT_DEPTHS,
                        help="needle depths in percent, 0 = start, 100 = just before the question (default 0..100 "
                             "by 10)")
    parser.add_argument("--samples", type=int, nargs="+", default=[20],
                        help="samples per (length, depth) cell: one number, or one per length (default 20)")
    parser.add_argument("--format", choices=FORMATS, help="default: retrieval for retrieval-trained models, else text")
    parser.add_argument("--seed", type=int, default=0, help="samples are a function of seed, length, depth, index")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per forward pass (default 4)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--table", help="write the markdown table here")
    parser.add_argument("--png", help="draw the heat map here (needs matplotlib)")
    parser.add_argument("--selections", action="store_true",
                        help="NSA models: also report how often the selection at the question holds the needle's "
                             "block (share of layers x KV heads), per cell and per layer")
    parser.add_argument("--ranks", action="store_true",
                        help="NSA models on the torch backend (CPU, or nsa.backend=torch): also report the needle "
                             "block's median rank by selection score at the question, per cell and per layer, and "
                             "by the block score loss's target")
    parser.add_argument("--silence", nargs="+", choices=BRANCHES, default=[], metavar="BRANCH",
                        help="NSA models: turn these branches off (their gates set to 0: cmp, slc, win), to see "
                             "which branch finds the needle; the selection still runs")
    parser.add_argument("--recipe", help="the training recipe, for checkpoints that do not store theirs")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides")
    return parser.parse_args(argv)


def samples_per_length(samples: Sequence[int], lengths: Sequence[int]) -> List[int]:
    if len(samples) not in (1, len(lengths)):
        raise EvalInputError(f"--samples {' '.join(map(str, samples))} is not allowed: give one count, or one per "
                             f"length ({len(lengths)} for --lengths {' '.join(map(str, lengths))})")
    for count in samples:
        if count < 1:
            raise EvalInputError(f"--samples {count} is not allowed: it must be >= 1")
    return list(samples) * len(lengths) if len(samples) == 1 else list(samples)


def check_grid(recipe, trained_recipe, positions: int, text_format: str, lengths: Sequence[int],
               depths: Sequence[float]) -> None:
    """Lengths and depths against the format and the model (`recipe` with the overrides, `trained_recipe`
    as the checkpoint stored it), as EvalInputError."""
    fmt, trained = RetrievalFormat.of(recipe.retrieval), RetrievalFormat.of(trained_recipe.retrieval)
    if text_format == "retrieval" and (fmt.num_keys, fmt.num_values) != (trained.num_keys, trained.num_values):
        raise EvalInputError(
            f"retrieval.num_keys={fmt.num_keys} and num_values={fmt.num_values} need token ids up to "
            f"{fmt.vocab_size - 1}, but the checkpoint's vocabulary was built for num_keys={trained.num_keys} and "
            f"num_values={trained.num_values} (ids up to {trained.vocab_size - 1}); the key and value ranges are "
            "part of the model and cannot change after training")
    try:
        check_depths(depths)
        check_grid_lengths(lengths, text_format, fmt)
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    for length in lengths:
        check_length(recipe, positions, length, "--lengths")


def corpus_filler(loaded, longest: int, pool: int = 64):
    """Filler from validation text of the model's own data: a random one of `pool` validation samples of
    `longest` tokens (so the model never trained on it), cut to the length asked for."""
    from megatron_nsa.data.datasets import build_datasets

    loaded.recipe.data.seq_length = longest
    _, valid = build_datasets(loaded.recipe, loaded.tokenizer, 1, pool)
    if valid is None:
        raise EvalInputError(f"data.split={loaded.recipe.data.split!r} leaves no validation text for the filler; "
                             "use an override such as data.split=98,2,0")
    texts = [numpy.asarray(valid[i]["tokens"], dtype=numpy.int64) for i in range(min(pool, len(valid)))]

    def filler(num_tokens: int, rng: numpy.random.Generator) -> numpy.ndarray:
        return texts[int(rng.integers(len(texts)))][:num_tokens]

    return filler


def needle_grid(loaded, text_format: str, lengths: Sequence[int], depths: Sequence[float], samples: Sequence[int],
                seed: int, batch_size: int, selections: bool = False, ranks: bool = False) -> dict:
    """Accuracy of `loaded` (a model_loader.LoadedModel) on every (length, depth) cell. With `selections`
    (NSA models only) also the share of layers x KV heads whose selection at the question holds a block of
    the needle ("needle_block_selected", and per layer "needle_block_selected_by_layer"); with `ranks`
    (torch backend) the median over samples x layers x KV heads of the needle block's rank by selection score
    ("needle_block_rank", per layer "needle_block_rank_by_layer"; "candidate_blocks": the blocks a query
    at the question can select, per length), and the same by the block score loss's target
    ("needle_block_target_rank", "needle_block_target_rank_by_layer"): where the needle's block would rank if
    the block scores had learned where the selected branch's queries and keys attend."""
    from .scoring import score_cell
    from .selections import QuestionSelections

    require_nsa(loaded.attention, {"--selections": selections, "--ranks": ranks})
    tracked = (QuestionSelections(loaded.logits, loaded.recipe.model.num_layers, scores=ranks)
               if selections or ranks else None)
    select_block_size = loaded.recipe.nsa.select_block_size
    fmt = RetrievalFormat.of(loaded.recipe.retrieval)
    filler = corpus_filler(loaded, max(lengths)) if text_format == "text" else None
    accuracy, token_accuracy, seconds, selected, selected_by_layer = {}, {}, {}, {}, {}
    rank, rank_by_layer, target_rank, target_rank_by_layer, candidate_blocks = {}, {}, {}, {}, {}
    for length, count in zip(lengths, samples):
        started = time.perf_counter()
        for grid in (accuracy, token_accuracy, selected, selected_by_layer, rank, rank_by_layer, target_rank,
                     target_rank_by_layer):
            grid[grid_key(length)] = {}
        for depth in depths:
            cell = needle_samples(text_format, length, depth / 100.0, count, seed, fmt, filler)
            if tracked:
                tracked.start_cell(cell)
            score = score_cell(tracked or loaded.logits, cell, loaded.tokenizer.vocab_size, loaded.device,
                               batch_size)
            accuracy[grid_key(length)][grid_key(depth)] = score.accuracy
            token_accuracy[grid_key(length)][grid_key(depth)] = score.token_accuracy
            if tracked:
                hits = tracked.needle_hits(cell, select_block_size).float()  # [count, L, H_kv]
                selected[grid_key(length)][grid_key(depth)] = hits.mean().item()
                selected_by_layer[grid_key(length)][grid_key(depth)] = hits.mean((0, 2)).tolist()
            if ranks:
                for medians, by_layer, ranked in (
                        (rank, rank_by_layer, tracked.needle_ranks(cell, select_block_size)),
                        (target_rank, target_rank_by_layer, tracked.needle_target_ranks(cell, select_block_size))):
                    ranked = ranked.float()  # [count, L, H_kv]
                    medians[grid_key(length)][grid_key(depth)] = ranked.median().item()
                    by_layer[grid_key(length)][grid_key(depth)] = ranked.transpose(0, 1).flatten(1).median(1) \
                        .values.tolist()
                question = length - 1 - len(cell[0].answer_positions)
                candidate_blocks[grid_key(length)] = question // select_block_size + 1
        seconds[grid_key(length)] = time.perf_counter() - started
        mean = sum(accuracy[grid_key(length)].values()) / len(depths)
        found = (f" | needle block selected {100 * sum(selected[grid_key(length)].values()) / len(depths):.1f}%"
                 if tracked else "")
        if ranks:
            found += (f" | needle block rank {sum(rank[grid_key(length)].values()) / len(depths):.1f} of "
                      f"{candidate_blocks[grid_key(length)]} (mean of the depths' medians), by the block score "
                      f"loss's target {sum(target_rank[grid_key(length)].values()) / len(depths):.1f}")
        print(f"{loaded.attention} | length {length:,} | {count} samples x {len(depths)} depths | mean accuracy "
              f"{100 * mean:.1f}%{found} | {seconds[grid_key(length)]:.1f} s", flush=True)
    result = {"checkpoint": loaded.step_dir, "step": loaded.step, "attention": loaded.attention,
              "format": text_format, "scoring": SCORING,
              "position_embedding_type": loaded.recipe.model.position_embedding_type,
              "trained_seq_length": loaded.max_positions, "lengths": list(lengths), "depths": list(depths),
              "samples": list(samples), "seed": seed, "accuracy": accuracy, "token_accuracy": token_accuracy,
              "seconds": seconds}
    if tracked:
        result.update(needle_block_selected=selected, needle_block_selected_by_layer=selected_by_layer)
    if ranks:
        result.update(needle_block_rank=rank, needle_block_rank_by_layer=rank_by_layer,
                      needle_block_target_rank=target_rank, needle_block_target_rank_by_layer=target_rank_by_layer,
                      candidate_blocks=candidate_blocks, select_count=loaded.recipe.nsa.select_count)
    return result


def require_nsa(attention: str, flags: dict) -> None:
    """The NSA-only options among `flags` ({option: given}) refused for a model of another attention."""
    for flag, given in flags.items():
        if given and attention != "nsa":
            raise EvalInputError(f"{flag} needs an NSA model; this one has model.attention={attention!r}")


def check_ranks_backend(recipe, device: str) -> None:
    """--ranks reads the block scores, which only the torch backend forms: evaluate on CPU, or on CUDA with
    nsa.backend=torch. `device`: --device (auto: CUDA when visible)."""
    import torch

    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda and recipe.nsa.backend != "torch":
        backend = recipe.nsa.backend or "null (triton on CUDA)"
        raise EvalInputError(f"--ranks needs the torch NSA backend (the Triton kernels never form the block scores); "
                             f"this evaluation runs on CUDA with nsa.backend={backend}: add nsa.backend=torch or "
                             "--device cpu")


def run(args: argparse.Namespace) -> dict:
    step_dir = resolve_checkpoint(args.checkpoint)
    meta = read_meta(step_dir)
    trained_recipe = checkpoint_recipe(step_dir, meta, args.recipe, [])
    positions = trained_positions(trained_recipe)
    recipe = checkpoint_recipe(step_dir, meta, args.recipe, list(args.overrides))
    lengths = args.lengths or [recipe.data.seq_length]
    text_format = args.format or ("retrieval" if recipe.data.source == "retrieval" else "text")
    check_grid(recipe, trained_recipe, positions, text_format, lengths, args.depths)
    samples = samples_per_length(args.samples, lengths)
    if args.batch_size < 1:
        raise EvalInputError(f"--batch-size {args.batch_size} is not allowed: it must be >= 1")
    require_nsa(recipe.model.attention, {"--selections": args.selections, "--silence": bool(args.silence),
                                         "--ranks": args.ranks})
    if args.ranks:
        check_ranks_backend(recipe, args.device)

    from .model_loader import load_model
    from .plots import accuracy_heatmap

    loaded = load_model(args.checkpoint, args.recipe, args.overrides, args.device)
    with silenced_branches(*args.silence):
        result = needle_grid(loaded, text_format, lengths, args.depths, samples, args.seed, args.batch_size,
                             args.selections, args.ranks)
    result["silenced_branches"] = list(args.silence)
    silenced = f", branches off: {' '.join(args.silence)}" if args.silence else ""
    table = accuracy_table(result["accuracy"], lengths, args.depths)
    print(f"\nneedle accuracy, {loaded.attention} step {loaded.step}, format {text_format}{silenced} ({SCORING}):"
          f"\n{table}")
    if args.selections:
        print(f"\n{SELECTED_TITLE}:\n{accuracy_table(result['needle_block_selected'], lengths, args.depths)}")
    if args.ranks:
        candidates = ", ".join(f"{blocks} at {int(length):,}" for length, blocks in result["candidate_blocks"].items())
        print(f"\n{RANK_TITLE}, n = {result['select_count']}; candidate blocks {candidates}:\n"
              f"{rank_table(result['needle_block_rank'], lengths, args.depths)}")
        print(f"\n{TARGET_RANK_TITLE}:\n{rank_table(result['needle_block_target_rank'], lengths, args.depths)}")
    if args.json:
        write_json(args.json, result)
    if args.table:
        with open(args.table, "w") as f:
            f.write(table + "\n")
    if args.png:
        accuracy_heatmap(result["accuracy"], lengths, args.depths, args.png,
                         f"needle accuracy: {loaded.attention}, step {loaded.step}, {text_format}{silenced}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
