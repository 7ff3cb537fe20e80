"""Needle samples: exact lengths, the fact where the depth puts it, the question and answer at the end."""
from __future__ import annotations

import numpy
import pytest

from megatron_nsa.eval.haystack import (TEXT_VALUE_DIGITS, check_depths, check_grid_lengths, check_lengths,
                                        minimum_length, needle_samples, place_needle)
from megatron_nsa.data.retrieval import FIRST_KEY_ID, RetrievalFormat

FMT = RetrievalFormat(num_keys=3000, num_values=100)


def text_of(tokens) -> str:
    return bytes(numpy.asarray(tokens, dtype=numpy.uint8)).decode()


def random_filler(num_tokens, rng):
    return rng.integers(ord("a"), ord("z") + 1, size=num_tokens)


@pytest.mark.parametrize("length", [97, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.35, 0.5, 0.9, 1.0])
def test_text_needle_sits_at_the_exact_depth(length, depth):
    (sample,) = needle_samples("text", length, depth, 1, seed=3, fmt=FMT, filler_source=random_filler)
    assert sample.tokens.shape == (length,)
    assert sample.needle_start == round(depth * sample.filler_length)
    needle = text_of(sample.tokens[sample.needle_start:sample.needle_start + sample.needle_length])
    assert needle.startswith("\nThe secret code of ") and needle.endswith(".\n")
    key, value = needle.split(" of ")[1].split(".")[0].split(" is ")
    tail = text_of(sample.tokens[-(sample.needle_length - 2):])
    assert tail == f"\nThe secret code of {key} is {value}"  # question, then the answer tokens
    assert text_of(sample.tokens[sample.answer_positions]) == value
    assert sample.answer_positions.tolist() == list(range(length - TEXT_VALUE_DIGITS, length))


@pytest.mark.parametrize("length", [64, 251, 4097])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.77, 1.0])
def test_retrieval_needle_is_a_definition_at_the_nearest_record_start(length, depth):
    (sample,) = needle_samples("retrieval", length, depth, 1, seed=0, fmt=FMT)
    tokens = sample.tokens
    assert tokens.shape == (length,) and sample.filler_length == length - 4 and sample.needle_length == 2
    assert abs(sample.needle_start - depth * sample.filler_length) <= 1.5  # records are 2 tokens
    key, value = tokens[sample.needle_start:sample.needle_start + 2]
    assert FIRST_KEY_ID <= key < FMT.first_value_id <= value < FMT.vocab_size
    assert tokens[-2:].tolist() == [key, value] and sample.answer_positions.tolist() == [length - 1]
    assert numpy.flatnonzero(tokens == key).tolist() == [sample.needle_start, length - 2]  # no other mention
    # the needle starts a record: the filler keeps its key, value alternation around it
    keys = (tokens >= FIRST_KEY_ID) & (tokens < FMT.first_value_id)
    filler = numpy.delete(keys[:-2], [sample.needle_start, sample.needle_start + 1])
    assert (filler[1:] != filler[:-1]).all()
    assert sample.needle_start == 0 or not keys[sample.needle_start - 1]


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_retrieval_needle_with_gaps_sits_before_a_record(depth):
    fmt = RetrievalFormat(num_keys=3000, num_values=100, mean_gap=12)
    length = 2000
    (sample,) = needle_samples("retrieval", length, depth, 1, seed=4, fmt=fmt)
    tokens = sample.tokens
    assert tokens.shape == (length,) and sample.answer_positions.tolist() == [length - 1]
    key, value = tokens[sample.needle_start:sample.needle_start + 2]
    assert FIRST_KEY_ID <= key < fmt.first_value_id <= value < fmt.vocab_size
    assert numpy.flatnonzero(tokens == key).tolist() == [sample.needle_start, length - 2]
    assert abs(sample.needle_start - depth * sample.filler_length) <= 2 * 12 + 2  # the nearest record start
    filler = numpy.delete(tokens[:-2], [sample.needle_start, sample.needle_start + 1])
    is_key = (filler >= FIRST_KEY_ID) & (filler < fmt.first_value_id)
    assert length / (2 + 2 * 12) < is_key.sum() < length / (2 + 12 / 2)  # records spaced by filler
    following = filler[numpy.flatnonzero(is_key) + 1]
    assert (following >= fmt.first_value_id).all()  # every filler record is whole
    at_needle = sample.needle_start
    assert at_needle == 0 or at_needle == sample.filler_length or is_key[at_needle]  # a record follows it


def test_samples_are_reproducible_and_differ_across_cells():
    first = needle_samples("retrieval", 300, 0.5, 3, seed=11, fmt=FMT)
    again = needle_samples("retrieval", 300, 0.5, 3, seed=11, fmt=FMT)
    other_depth = needle_samples("retrieval", 300, 0.6, 3, seed=11, fmt=FMT)
    for a, b, c in zip(first, again, other_depth):
        numpy.testing.assert_array_equal(a.tokens, b.tokens)
        assert not numpy.array_equal(a.tokens, c.tokens)
    assert not numpy.array_equal(first[0].tokens, first[1].tokens)


def test_place_needle_snaps_to_boundaries():
    filler = numpy.arange(100)
    sample = place_needle(filler, numpy.array([-1, -1]), numpy.array([-2]), numpy.array([-3]), 0.33,
                          boundaries=numpy.array([0, 20, 40, 100]))
    assert sample.needle_start == 40 and sample.tokens[40:42].tolist() == [-1, -1]
    assert sample.tokens[:40].tolist() == list(range(40)) and sample.tokens[-2:].tolist() == [-2, -3]
    assert sample.achieved_depth == 0.4


@pytest.mark.parametrize("depths, message", [
    ([0, 101], r"--depths 101 is not allowed: depths are percentages from 0 to 100"),
    ([-5], r"--depths -5 is not allowed"), ([], r"--depths is empty"),
])
def test_bad_depths(depths, message):
    with pytest.raises(ValueError, match=message):
        check_depths(depths)


def test_bad_lengths():
    shortest = minimum_length("retrieval")
    check_lengths([shortest], shortest)
    needle_samples("retrieval", shortest, 0.5, 1, seed=0, fmt=FMT)
    check_grid_lengths([shortest, 6000], "retrieval", FMT)
    with pytest.raises(ValueError, match=r"retrieval.num_keys=3000 is too small for the needle length \(--lengths\)="
                                         r"6002: .* raise retrieval.num_keys to at least 3001"):
        check_grid_lengths([500, 6002], "retrieval", FMT)
    check_grid_lengths([6002], "text", FMT)  # text needles use no keys
    with pytest.raises(ValueError, match=rf"--lengths {shortest - 1} is not allowed: a sample needs at least "
                                         rf"{shortest} tokens"):
        check_lengths([100, shortest - 1], shortest)
    with pytest.raises(ValueError, match="format='html' is not allowed; choose one of"):
        needle_samples("html", 100, 0.5, 1, seed=0, fmt=FMT)


@pytest.mark.parametrize("depth", [0.0, 0.5, 0.9, 1.0])
def test_retrieval_needle_with_queries_last_hides_among_definitions_and_is_asked_after_the_query_block(depth):
    fmt = RetrievalFormat(num_keys=3000, num_values=100, mean_gap=10, query_fraction=0.3, queries_last=True)
    length = 2000
    (sample,) = needle_samples("retrieval", length, depth, 1, seed=5, fmt=fmt)
    tokens = sample.tokens
    key, value = tokens[sample.needle_start:sample.needle_start + 2]
    assert FIRST_KEY_ID <= key < fmt.first_value_id <= value < fmt.vocab_size
    assert numpy.flatnonzero(tokens == key).tolist() == [sample.needle_start, length - 2]
    assert tokens[-1] == value and sample.answer_positions.tolist() == [length - 1]
    assert abs(sample.needle_start - depth * sample.filler_length) <= 2 * 10 + 2
    filler = numpy.delete(tokens[:-2], [sample.needle_start, sample.needle_start + 1])
    is_key = (filler >= FIRST_KEY_ID) & (filler < fmt.first_value_id)
    key_positions = numpy.flatnonzero(is_key)
    # the filler's own query block (keys asked a second time) sits right before the needle's question
    seen, repeated = set(), []
    for position in key_positions.tolist():
        (repeated if filler[position] in seen else seen.add(filler[position]) or []).append(position)
    assert len(repeated) > 10 and repeated[-1] == len(filler) - 2
    assert repeated == list(range(repeated[0], len(filler), 2))
