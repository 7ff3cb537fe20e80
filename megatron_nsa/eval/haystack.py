"""Needle-in-a-haystack samples: a key/value fact hidden at a chosen depth of filler, asked for at the end.

A sample is exactly `length` tokens:

    filler[:at]  needle  filler[at:]  question  answer

`at` is the requested depth (0 = the first token, 1 = just before the question) times the filler length,
moved to the nearest allowed boundary (line starts for the retrieval format, any token for text).
The model reads the whole sample; it answers correctly when every answer token is the argmax of its
prediction (teacher forcing: one forward pass scores all of them).

Two formats:
  retrieval  the synthetic task's records: filler = a task sequence without the needle's key,
             needle `kbfo:4821\\n`, question `kbfo?`, answer `4821`
  text       filler = validation text of the model's corpus, needle `\\nThe secret code of kbfo is 4821.\\n`,
             question `\\nThe secret code of kbfo is `, answer `4821`
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy

from .retrieval_task import DEFINE, DIGITS, NEEDLE_STREAM, QUERY, RetrievalFormat, generate_lines, key_text

FORMATS = ("retrieval", "text")
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


def random_fact(rng: numpy.random.Generator, fmt: RetrievalFormat):
    """(key number, key text, value text) in the retrieval task's alphabet."""
    key_id = int(rng.integers(fmt.key_space))
    value = bytes(DIGITS[rng.integers(0, 10, size=fmt.value_length)]).decode()
    return key_id, key_text(key_id, fmt), value


def retrieval_sample(length: int, depth: float, rng: numpy.random.Generator, fmt: RetrievalFormat) -> NeedleSample:
    """The synthetic task's own records as the haystack; the needle is one more definition."""
    key_id, key, value = random_fact(rng, fmt)
    needle = _encode(key + chr(DEFINE) + value + "\n")
    question, answer = _encode(key + chr(QUERY)), _encode(value)
    filler_length = length - len(needle) - len(question) - len(answer)
    lines, _ = generate_lines(-(-filler_length // fmt.line_length), rng, fmt, exclude_key=key_id)
    filler = lines.reshape(-1)[-filler_length:].astype(numpy.int64)  # the first line may start cut
    cut = (-filler_length) % fmt.line_length  # tokens of the first line left out
    starts = numpy.arange((fmt.line_length - cut) % fmt.line_length, filler_length + 1, fmt.line_length)
    boundaries = numpy.unique(numpy.concatenate([[0, filler_length], starts]))
    return place_needle(filler, needle, question, answer, depth, boundaries)


def text_sample(length: int, depth: float, rng: numpy.random.Generator, fmt: RetrievalFormat,
                filler_source: FillerSource) -> NeedleSample:
    """Corpus text as the haystack, the fact as an English sentence."""
    _, key, value = random_fact(rng, fmt)
    needle = _encode(f"\nThe secret code of {key} is {value}.\n")
    question, answer = _encode(f"\nThe secret code of {key} is "), _encode(value)
    filler_length = length - len(needle) - len(question) - len(answer)
    filler = numpy.asarray(filler_source(filler_length, rng), dtype=numpy.int64)
    if filler.shape != (filler_length,):
        raise ValueError(f"the filler source returned {filler.shape} tokens, {filler_length} were asked for")
    return place_needle(filler, needle, question, answer, depth)


def minimum_length(fmt: RetrievalFormat, text_format: str) -> int:
    """The shortest sample with at least one line (or 16 tokens) of filler."""
    if text_format == "retrieval":
        return 2 * fmt.line_length + fmt.key_length + 1 + fmt.value_length
    sentence = len(f"\nThe secret code of {'k' * fmt.key_length} is {'1' * fmt.value_length}.\n")
    question = len(f"\nThe secret code of {'k' * fmt.key_length} is ")
    return sentence + question + fmt.value_length + 16


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
            samples.append(text_sample(length, depth, rng, fmt, filler_source))
    return samples
