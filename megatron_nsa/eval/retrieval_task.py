"""A retrieval-heavy synthetic task: many key/value definitions in a long context, queried later.

Byte tokens, one record per line, every line the same length:

    definition   kbfo:4821\\n     a fresh key (never defined before in the sequence) and its value
    query        kbfo?4821\\n     a key defined earlier in the sequence; the model must produce its value

Keys are `key_length` letters from the first `key_alphabet_size` lowercase letters, values `value_length`
decimal digits. After the first line each line is a query with probability `query_fraction`, asking for a
key drawn uniformly from all the keys defined so far, so that every distance from 1 line to the whole
context is trained. The loss mask covers only the value tokens of queries: everything else is random and
unpredictable, and leaving it out makes a small model learn retrieval far sooner.

Sequences are a pure function of (seed, stream, index): training and validation use separate streams,
so both models of a comparison see the same samples in the same order. numpy only (no megatron), so
recipe checks can import this module before megatron-core is loaded.
"""
from __future__ import annotations

import dataclasses
import math
import string
from typing import Dict, Optional, Tuple

import numpy

TRAIN_STREAM, VALID_STREAM, NEEDLE_STREAM = 0, 1, 2
DEFINE, QUERY, END = ord(":"), ord("?"), ord("\n")
DIGITS = numpy.frombuffer(string.digits.encode(), dtype=numpy.uint8)
LETTERS = numpy.frombuffer(string.ascii_lowercase.encode(), dtype=numpy.uint8)


@dataclasses.dataclass(frozen=True)
class RetrievalFormat:
    key_length: int = 4
    key_alphabet_size: int = 16
    value_length: int = 4
    query_fraction: float = 0.25

    @property
    def line_length(self) -> int:
        return self.key_length + 1 + self.value_length + 1

    @property
    def key_space(self) -> int:
        return self.key_alphabet_size ** self.key_length

    @classmethod
    def of(cls, settings) -> "RetrievalFormat":
        """From any object with the four fields (e.g. the recipe's `retrieval` section)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def check_settings(settings) -> None:
    """ValueError naming the field, its value and what is allowed."""
    for name, low, high in (("key_length", 1, 16), ("key_alphabet_size", 2, 26), ("value_length", 1, 32)):
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"retrieval.{name}={value!r} is not allowed: it must be an integer in [{low}, {high}]")
    fraction = settings.query_fraction
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise ValueError(f"retrieval.query_fraction={fraction!r} is not allowed: it must be a number in (0, 1)")


def key_text(key_id: int, fmt: RetrievalFormat) -> str:
    """Key number -> its letters (base key_alphabet_size, most significant letter first)."""
    return bytes(_key_letters(numpy.asarray([key_id]), fmt)[0]).decode()


def _key_letters(key_ids: numpy.ndarray, fmt: RetrievalFormat) -> numpy.ndarray:
    """[n] key numbers -> [n, key_length] letter bytes."""
    powers = fmt.key_alphabet_size ** numpy.arange(fmt.key_length - 1, -1, -1, dtype=numpy.int64)
    return LETTERS[(key_ids[:, None] // powers[None, :]) % fmt.key_alphabet_size]


def _distinct_keys(rng: numpy.random.Generator, count: int, fmt: RetrievalFormat,
                   exclude: Optional[int]) -> numpy.ndarray:
    available = fmt.key_space - (exclude is not None)
    if count > available:
        raise ValueError(
            f"a retrieval sequence needs {count} distinct keys but retrieval.key_length={fmt.key_length} with "
            f"key_alphabet_size={fmt.key_alphabet_size} gives only {available}; raise key_length or "
            "key_alphabet_size, or shorten the sequence"
        )
    keys = rng.choice(fmt.key_space, size=min(count + 1, fmt.key_space), replace=False)
    if exclude is not None:
        keys = keys[keys != exclude]
    return keys[:count]


def generate_lines(num_lines: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                   exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """`num_lines` records -> (bytes [num_lines, line_length] uint8, answer mask of the same shape).

    Line 0 is always a definition; `exclude_key` (a key number) is never defined nor queried.
    """
    is_query = rng.random(num_lines) < fmt.query_fraction
    is_query[0] = False
    defined_so_far = numpy.cumsum(~is_query)  # [num_lines] definitions up to and including each line
    num_definitions = int(defined_so_far[-1])
    keys = _distinct_keys(rng, num_definitions, fmt, exclude_key)
    values = rng.integers(0, 10, size=(num_definitions, fmt.value_length))
    # Definition j (the j-th definition line) defines keys[j]; a query asks one of the definitions before it.
    record = numpy.where(is_query, (rng.random(num_lines) * defined_so_far).astype(numpy.int64), defined_so_far - 1)
    lines = numpy.empty((num_lines, fmt.line_length), dtype=numpy.uint8)
    k, v = fmt.key_length, fmt.value_length
    lines[:, :k] = _key_letters(keys[record], fmt)
    lines[:, k] = numpy.where(is_query, QUERY, DEFINE)
    lines[:, k + 1:k + 1 + v] = DIGITS[values[record]]
    lines[:, -1] = END
    answer_mask = numpy.zeros_like(lines, dtype=bool)
    answer_mask[:, k + 1:k + 1 + v] = is_query[:, None]
    return lines, answer_mask


def generate_sequence(num_tokens: int, rng: numpy.random.Generator, fmt: RetrievalFormat,
                      exclude_key: Optional[int] = None) -> Tuple[numpy.ndarray, numpy.ndarray]:
    """Exactly `num_tokens` tokens starting at a line start (the last line may be cut):
    (tokens [num_tokens] int64, answer mask [num_tokens] bool)."""
    num_lines = math.ceil(num_tokens / fmt.line_length)
    lines, answer_mask = generate_lines(num_lines, rng, fmt, exclude_key)
    return lines.reshape(-1)[:num_tokens].astype(numpy.int64), answer_mask.reshape(-1)[:num_tokens]


def sample_rng(seed: int, stream: int, index: int) -> numpy.random.Generator:
    return numpy.random.default_rng([seed, stream, index])


class RetrievalDataset:
    """`num_samples` sequences in the layout of megatron's GPTDataset items: tokens / labels (the next
    token) / loss_mask (1 on the value tokens of queries) / position_ids, each [seq_length]."""

    def __init__(self, fmt: RetrievalFormat, seq_length: int, num_samples: int, seed: int, stream: int):
        self.fmt = fmt
        self.seq_length = seq_length
        self.num_samples = max(num_samples, 1)
        self.seed = seed
        self.stream = stream
        # Fail at construction (before training starts) when the key space is too small for a sequence.
        _distinct_keys(sample_rng(seed, stream, 0), math.ceil((seq_length + 1) / fmt.line_length), fmt, None)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, numpy.ndarray]:
        text, answer_mask = generate_sequence(self.seq_length + 1, sample_rng(self.seed, self.stream, index), self.fmt)
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": answer_mask[1:].astype(numpy.float32),
            "position_ids": numpy.arange(self.seq_length, dtype=numpy.int64),
        }


def retrieval_datasets(recipe, num_train_samples: int, num_valid_samples: int):
    """(train, validation) datasets of data.source=retrieval."""
    fmt = RetrievalFormat.of(recipe.retrieval)
    seq_length, seed = recipe.data.seq_length, recipe.training.seed
    return (RetrievalDataset(fmt, seq_length, num_train_samples, seed, TRAIN_STREAM),
            RetrievalDataset(fmt, seq_length, num_valid_samples, seed, VALID_STREAM))
