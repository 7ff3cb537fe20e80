"""Build a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) from text files: one file, one document.

    python -m megatron_nsa.data.build_dataset --output data/mycorpus [--tokenizer bytes] FILE_OR_DIR ...
    python -m megatron_nsa.data.build_dataset --output data/stdlib --stdlib

Directories are searched for files matching --pattern (default *.txt, *.py, *.md). `--stdlib` takes the
Python standard library's own .py sources (tests left out) from this interpreter: a corpus every machine has.
megatron-core is imported only to write a dataset, so that recipe checks can use dataset_exists and parse_blend.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import sysconfig
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy

from .tokenizer import build_tokenizer, token_dtype

DEFAULT_PATTERNS = ("*.txt", "*.py", "*.md")
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_source_files() -> List[pathlib.Path]:
    """The .py files of this interpreter's standard library, sorted, without test suites and site-packages."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _TEST_DIRS.isdisjoint(parts) and "site-packages" not in parts and "dist-packages" not in parts:
            files.append(path)
    return sorted(files)


def dataset_exists(prefix: str) -> bool:
    """An indexed dataset is the pair PREFIX.bin (tokens) + PREFIX.idx (document index)."""
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def parse_blend(paths: List) -> Tuple[List[str], Optional[List[float]]]:
    """data.paths, [prefix, ...] or [weight, prefix, weight, prefix, ...] -> (prefixes, weights or None).
    ValueError naming data.paths and the allowed forms."""
    if all(isinstance(p, str) for p in paths):
        return [os.path.expanduser(p) for p in paths], None
    pairs = list(zip(paths[0::2], paths[1::2]))
    if len(paths) % 2 or not all(isinstance(w, (int, float)) and isinstance(p, str) for w, p in pairs):
        raise ValueError(
            f"data.paths={paths!r} must be a list of dataset prefixes or of weight, prefix pairs "
            "(e.g. [0.7, data/web, 0.3, data/code])"
        )
    if any(w <= 0 for w, _ in pairs):
        raise ValueError(f"data.paths={paths!r}: blend weights must be > 0")
    return [os.path.expanduser(p) for _, p in pairs], [float(w) for w, _ in pairs]


def collect_files(inputs: Sequence[str], patterns: Sequence[str] = DEFAULT_PATTERNS) -> List[pathlib.Path]:
    """Files named directly, plus files under named directories matching `patterns`, sorted per directory."""
    files = []
    for item in inputs:
        path = pathlib.Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted({p for pattern in patterns for p in path.rglob(pattern) if p.is_file()}))
        else:
            raise FileNotFoundError(f"input '{item}' is neither a file nor a directory")
    if not files:
        raise FileNotFoundError(f"no input files found in {list(inputs)} (patterns {list(patterns)})")
    return files


def build_indexed_dataset(files: Iterable[pathlib.Path], prefix: str, tokenizer) -> int:
    """Tokenize each file into one document ending with the eod token; write PREFIX.bin/.idx atomically.

    Returns the number of tokens written. The files appear under their final names only when complete.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    prefix = str(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    staging = f"{prefix}.partial-{os.getpid()}"
    builder = IndexedDatasetBuilder(get_bin_path(staging), dtype=token_dtype(tokenizer.vocab_size))
    num_tokens = 0
    for path in files:
        text = pathlib.Path(path).read_text(encoding="utf-8", errors="replace")
        tokens = numpy.append(tokenizer.tokenize(text), tokenizer.eod)
        builder.add_document(tokens, [len(tokens)])
        num_tokens += len(tokens)
    builder.finalize(get_idx_path(staging))
    os.replace(get_bin_path(staging), get_bin_path(prefix))
    os.replace(get_idx_path(staging), get_idx_path(prefix))
    return num_tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", help="text files or directories")
    parser.add_argument("--output", required=True, help="dataset prefix: writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default="bytes", help="'bytes' or a local Hugging Face tokenizer directory")
    parser.add_argument("--pattern", action="append", help=f"file pattern inside directories (default {DEFAULT_PATTERNS})")
    parser.add_argument("--stdlib", action="store_true", help="use the Python standard library's sources as input")
    args = parser.parse_args(argv)
    if args.stdlib == bool(args.inputs):
        parser.error("give input files/directories or --stdlib (exactly one of them)")
    try:
        files = stdlib_source_files() if args.stdlib else collect_files(args.inputs, args.pattern or DEFAULT_PATTERNS)
        tokenizer = build_tokenizer(args.tokenizer)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    num_tokens = build_indexed_dataset(files, args.output, tokenizer)
    print(f"wrote {args.output}.bin/.idx: {len(files)} documents, {num_tokens} tokens")


if __name__ == "__main__":
    main()
