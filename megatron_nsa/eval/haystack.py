"""Needle-in-a-haystack samples: a key/value fact hidden at a chosen depth of filler, asked for at the end.

A sample is exactly `length` tokens:

    filler[:at]  needle  filler[at:]  question  answer

`at` is the requested depth (0 = the first token, 1 = just before the question) times the filler length,
moved to the nearest allowed boundary (record starts for the retrieval format, any token for text).
The model reads the whole sample; it answers correctly when every answer token is the argmax of its
prediction (teacher forcing: one forward pass scores all of them).

Two formats:
  retrieval  the synthetic task's records (megatron_nsa.data.retrieval): filler = a task sequence
             whose keys all differ from the needle's (with the recipe's mean_gap filler after definitions,
             or after every record with gap_after=records, and with queries_last its query block at the
             end of the filler, before the needle's question),
             needle = one definition `key value`, question `key`, answer `value` (one token each)
  text       filler = validation text of the model's corpus, needle `\\nThe secret code of kbfo is 4821.\\n`,
             question `\\nThe secret code of kbfo is `, answer `4821`
"""
from __future__ import annotations

import dataclasses
import string
from typing import Callable, Optional, Sequence

import numpy

from megatron_nsa.data.retrieval import (FIRST_KEY_ID, NEEDLE_STREAM, RECORD_LENGTH, RetrievalFormat, check_key_space,
                             filler_tokens, generate_records, lay_out)

FORMATS = ("retrieval", "text")
TEXT_KEY_LETTERS, TEXT_VALUE_DIGITS = 4, 4  # the text fact: "The secret code of kbfo is 4821."
FillerSource = Callable[[int, numpy.random.Generator], numpy.ndarray]  # (num_tokens, rng) -> tokens [num_tokens]


@dataclasses.dataclass
class NeedleSample:
    tokens: numpy.ndarray  # [length] int64: the model's input
    answer_positions: numpy.ndarray  # [answer length] indices of the answer tokens in `tokens`
    needle_start: int  # index of the needle's first token
    needle_length: int
    filler_length: int
    depth: float  # requested, in [0, 1]

    @property
    def achieved_depth(self) -> float:
        """Where the needle landed: the share of the filler before it."""
        return self.needle_start / self.filler_length


def _encode(text: str) -> numpy.ndarray:
    return numpy.frombuffer(text.encode(), dtype=numpy.uint8).astype(numpy.int64)


def check_depths(depths_percent: Sequence[float]) -> None:
    if not depths_percent:
        raise ValueError("--depths is empty: give one or more depths in percent, from 0 to 100")
    for depth in depths_percent:
        if not 0 <= depth <= 100:
            raise ValueError(f"--depths {depth:g} is not allowed: depths are percentages from 0 to 100")


def check_lengths(lengths: Sequence[int], minimum: int) -> None:
    if not lengths:
        raise ValueError("--lengths is empty: give one or more context lengths in tokens")
    for length in lengths:
        if length < minimum:
            raise ValueError(f"--lengths {length} is not allowed: a sample needs at least {minimum} tokens "
                             "(needle, question, answer and some filler)")


def place_needle(filler: numpy.ndarray, needle: numpy.ndarray, question: numpy.ndarray, answer: numpy.ndarray,
                 depth: float, boundaries: Optional[numpy.ndarray] = None) -> NeedleSample:
    """Insert `needle` into `filler` at `depth` (in [0, 1]), snapped to the nearest of `boundaries`
    (sorted filler offsets; None: any offset), then append question and answer."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is not allowed: it must be in [0, 1]")
    wanted = round(depth * len(filler))
    if boundaries is None:
        at = wanted
    else:
        at = int(boundaries[numpy.argmin(numpy.abs(boundaries - wanted))])
    tokens = numpy.concatenate([filler[:at], needle, filler[at:], question, answer]).astype(numpy.int64)
    answer_start = len(tokens) - len(answer)
    return NeedleSample(tokens, numpy.arange(answer_start, len(tokens)), at, len(needle), len(filler), depth)


def retrieval_sample(length: int, depth: float, rng: numpy.random.Generator, fmt: RetrievalFormat) -> NeedleSample:
    """The synthetic task's own records as the haystack; the needle is one more definition."""
    key = FIRST_KEY_ID + int(rng.integers(fmt.num_keys))
    value = fmt.first_value_id + int(rng.integers(fmt.num_values))
    needle, question, answer = numpy.array([key, value]), numpy.array([key]), numpy.array([value])
    # with filler after every record the needle has its own gap, drawn as the haystack's are
    gap = filler_tokens(int(rng.integers(0, 2 * fmt.mean_gap + 1)), rng) if fmt.gap_after == "records" else needle[:0]
    filler_length = length - len(needle) - len(gap) - len(question) - len(answer)
    if fmt.mean_gap or fmt.queries_last:  # records all whole: the needle goes before one, or at the end
        filler, _, record_starts = lay_out(filler_length, rng, fmt, exclude_key=key)
        sample = place_needle(filler, numpy.concatenate([needle, gap]), question, answer, depth,
                              numpy.append(record_starts, filler_length))
        return dataclasses.replace(sample, needle_length=len(needle))
    records, _ = generate_records(-(-filler_length // RECORD_LENGTH), rng, fmt, exclude_key=key)
    filler = records.reshape(-1)[-filler_length:]  # the first record may start cut
    first_start = filler_length % RECORD_LENGTH  # offset of the first whole record
    boundaries = numpy.unique(numpy.concatenate([[0], numpy.arange(first_start, filler_length + 1, RECORD_LENGTH)]))
    return place_needle(filler, needle, question, answer, depth, boundaries)


def text_sample(length: int, depth: float, rng: numpy.random.Generator, filler_source: FillerSource) -> NeedleSample:
    """Corpus text as the haystack, the fact as an English sentence."""
    key = "".join(rng.choice(list(string.ascii_lowercase), size=TEXT_KEY_LETTERS))
    value = "".join(rng.choice(list(string.digits), size=TEXT_VALUE_DIGITS))
    needle = _encode(f"\nThe secret code of {key} is {value}.\n")
    question, answer = _encode(f"\nThe secret code of {key} is "), _encode(value)
    filler_length = length - len(needle) - len(question) - len(answer)
    filler = numpy.asarray(filler_source(filler_length, rng), dtype=numpy.int64)
    if filler.shape != (filler_length,):
        raise ValueError(f"the filler source returned {filler.shape} tokens, {filler_length} were asked for")
    return place_needle(filler, needle, question, answer, depth)


def minimum_length(text_format: str) -> int:
    """The shortest sample with at least two records (or 16 tokens) of filler."""
    if text_format == "retrieval":
        return 3 * RECORD_LENGTH + 2  # two filler records, needle, question, answer
    sentence = len(f"\nThe secret code of {'k' * TEXT_KEY_LETTERS} is {'1' * TEXT_VALUE_DIGITS}.\n")
    question = len(f"\nThe secret code of {'k' * TEXT_KEY_LETTERS} is ")
    return sentence + question + TEXT_VALUE_DIGITS + 16


def check_grid_lengths(lengths: Sequence[int], text_format: str, fmt: RetrievalFormat) -> None:
    """Every length long enough for a sample, and (retrieval) the key range big enough for the longest:
    call it before training a model that will be tested at these lengths."""
    check_lengths(lengths, minimum_length(text_format))
    if text_format == "retrieval":
        check_key_space(fmt, max(lengths), "the needle length (--lengths)")


def needle_samples(text_format: str, length: int, depth: float, count: int, seed: int, fmt: RetrievalFormat,
                   filler_source: Optional[FillerSource] = None):
    """`count` samples of one (length, depth) cell; sample i is the same for every model (seeded by
    seed, length, depth and i)."""
    if text_format not in FORMATS:
        raise ValueError(f"format={text_format!r} is not allowed; choose one of {list(FORMATS)}")
    samples = []
    for index in range(count):
        rng = numpy.random.default_rng([seed, NEEDLE_STREAM, length, round(depth * 1e4), index])
        if text_format == "retrieval":
            samples.append(retrieval_sample(length, depth, rng, fmt))
        else:
            samples.append(text_sample(length, depth, rng, filler_source))
    return samples
