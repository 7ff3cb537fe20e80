"""The retrieval task's bursty form (facts_per_sequence): few facts from small key and value vocabularies,
each restated by many queries; and the task's earlier settings still give the samples they always gave."""
from __future__ import annotations

import dataclasses
import hashlib

import numpy
import pytest

from megatron_nsa.data.retrieval import (FIRST_KEY_ID, RECORD_LENGTH, RetrievalDataset, RetrievalFormat, TRAIN_STREAM,
                                         VALID_STREAM, check_key_space, check_settings, generate_records,
                                         generate_sequence, lay_out, sample_rng)
from megatron_nsa.eval.haystack import retrieval_sample
from megatron_nsa.training.config import RecipeError, load_recipe

BURSTY = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8)


def test_settings_without_facts_per_sequence_give_the_same_samples_as_before():
    """sha256 of tokens and answer masks of four formats, recorded with the task before facts_per_sequence."""
    digest = hashlib.sha256()
    for settings in ({}, {"num_keys": 600, "num_values": 37, "query_fraction": 0.4},
                     {"num_keys": 900, "mean_gap": 5, "query_fraction": 0.3, "query_once": True},
                     {"num_keys": 900, "mean_gap": 3, "queries_last": True, "query_fraction": 0.3}):
        for index in range(4):
            tokens, answer_mask = generate_sequence(257, sample_rng(11, TRAIN_STREAM, index), RetrievalFormat(**settings))
            digest.update(tokens.astype(numpy.int64).tobytes())
            digest.update(answer_mask.astype(numpy.uint8).tobytes())
    assert digest.hexdigest() == "b1b63b6fefb3cf22393f493ea12a11be7e16b47f1dbb2c581dc9b2f7f8f852e7"


@pytest.mark.parametrize("facts, num_records, query_fraction", [(8, 64, 0.5), (3, 200, 0.1), (20, 40, 0.9), (1, 10, 0.5)])
def test_a_few_facts_each_restated_many_times(facts, num_records, query_fraction):
    fmt = RetrievalFormat(num_keys=facts + 40, num_values=5, query_fraction=query_fraction, facts_per_sequence=facts)
    for seed in range(5):
        tokens, answer_mask = generate_records(num_records, numpy.random.default_rng(seed), fmt)
        keys, values = tokens[:, 0], tokens[:, 1]
        assert ((FIRST_KEY_ID <= keys) & (keys < fmt.first_value_id)).all()
        assert ((fmt.first_value_id <= values) & (values < fmt.vocab_size)).all()
        assert not answer_mask[:, 0].any() and not answer_mask[0, 1]
        fact_of, occurrences = {}, {}
        for index, (key, value) in enumerate(zip(keys.tolist(), values.tolist())):
            if answer_mask[index, 1]:  # a restatement: of a fact stated before, with its value
                assert fact_of[key] == value
            else:
                assert key not in fact_of, f"record {index} defines key {key} a second time"
                fact_of[key] = value
            occurrences[key] = occurrences.get(key, 0) + 1
        assert 1 <= len(fact_of) <= facts
        assert int(answer_mask[:, 1].sum()) == num_records - len(fact_of)
        assert sum(occurrences.values()) == num_records
        if num_records >= 10 * facts:  # enough records: all facts defined, then every record asks
            assert len(fact_of) == facts
            last_definition = max(numpy.flatnonzero(~answer_mask[:, 1]))
            assert answer_mask[last_definition + 1:, 1].all()
            assert max(occurrences.values()) >= 5  # bursty: facts come back many times


def test_bursty_sequences_with_gaps_keep_the_facts_and_the_filler():
    fmt = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.3, facts_per_sequence=6, mean_gap=4)
    tokens, answer_mask, record_starts = lay_out(400, sample_rng(3, TRAIN_STREAM, 0), fmt)
    keys = tokens[record_starts]
    assert ((FIRST_KEY_ID <= keys) & (keys < fmt.first_value_id)).all()
    assert len(set(keys.tolist())) == 6 and answer_mask.sum() == len(record_starts) - 6
    assert set(numpy.flatnonzero(answer_mask).tolist()) <= set((record_starts + 1).tolist())
    outside = numpy.ones(400, dtype=bool)
    outside[record_starts], outside[record_starts + 1] = False, False
    assert (tokens[outside] < 256).all()  # everything else is filler bytes


def test_bursty_dataset_is_deterministic_and_masks_only_answers():
    def item(seed, stream, index):
        return RetrievalDataset(BURSTY, seq_length=128, num_samples=8, seed=seed, stream=stream)[index]

    first = item(2, TRAIN_STREAM, 3)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        numpy.testing.assert_array_equal(first[key], item(2, TRAIN_STREAM, 3)[key])
    for other in (item(2, TRAIN_STREAM, 4), item(2, VALID_STREAM, 3), item(3, TRAIN_STREAM, 3)):
        assert not numpy.array_equal(first["tokens"], other["tokens"])
    answers = numpy.flatnonzero(first["loss_mask"])
    assert (first["labels"][answers] >= BURSTY.first_value_id).all()  # the loss is on values only
    assert (first["tokens"][answers] < BURSTY.first_value_id).all()  # each asked right after its key
    assert len(answers) >= 64 - 1 - 8 - 1  # 64 records (the last cut by the shift), 8 facts: many queries


def test_small_key_vocabulary_serves_long_sequences_of_few_facts():
    check_key_space(BURSTY, 8193, "length")  # 8 facts: 64 keys are plenty at any length
    with pytest.raises(ValueError, match="retrieval.num_keys=64 is too small for length=8193"):
        check_key_space(RetrievalFormat(num_keys=64), 8193, "length")
    recipe = load_recipe(None, ["data.source=retrieval", "data.seq_length=8192", "retrieval.num_keys=64",
                                "retrieval.num_values=16", "retrieval.query_fraction=0.5",
                                "retrieval.facts_per_sequence=8"])
    assert RetrievalFormat.of(recipe.retrieval) == BURSTY


@pytest.mark.parametrize("settings, message", [
    ({"facts_per_sequence": -1}, r"retrieval.facts_per_sequence=-1 is not allowed: it must be an integer in \[0, "),
    ({"facts_per_sequence": True}, r"retrieval.facts_per_sequence=True is not allowed"),
    ({"facts_per_sequence": 2.0}, r"retrieval.facts_per_sequence=2.0 is not allowed"),
    ({"facts_per_sequence": 64}, r"retrieval.facts_per_sequence=64 is not allowed: .*\[0, retrieval.num_keys - 1 = 63\]"),
    ({"facts_per_sequence": 8, "query_once": True, "query_fraction": 0.3},
     r"retrieval.facts_per_sequence=8 is not allowed with retrieval.query_once=true"),
    ({"facts_per_sequence": 8, "queries_last": True, "query_fraction": 0.3},
     r"retrieval.facts_per_sequence=8 is not allowed with retrieval.queries_last=true"),
])
def test_bad_bursty_settings_are_named(settings, message):
    _assert_refused_by_name(settings, message)


def _assert_refused_by_name(settings, message):
    """Both the task's own check and the recipe loader refuse `settings` (64 keys) with `message`."""
    with pytest.raises(ValueError, match=message):
        check_settings(RetrievalFormat(num_keys=64, **settings))
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, ["data.source=retrieval", "data.seq_length=64", "retrieval.num_keys=64",
                           *(f"retrieval.{key}={str(value).lower()}" for key, value in settings.items())])


def test_needle_in_a_bursty_haystack_is_stated_once():
    for index in range(10):
        sample = retrieval_sample(128, index / 9, sample_rng(0, 2, index), BURSTY)
        key = sample.tokens[-2]
        assert (sample.tokens[:-2] == key).sum() == 1  # the needle: its key stated once before the question
        haystack_keys = {int(t) for t in sample.tokens if FIRST_KEY_ID <= t < BURSTY.first_value_id} - {int(key)}
        assert 1 <= len(haystack_keys) <= BURSTY.facts_per_sequence


SINGLE = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8, single_facts=6)


@pytest.mark.parametrize("single, num_records", [(6, 64), (1, 64), (40, 20), (3, 400)])
def test_single_facts_are_stated_once_and_asked_once_later(single, num_records):
    fmt = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8, single_facts=single)
    without = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8)
    for seed in range(6):
        tokens, answer_mask = generate_records(num_records, numpy.random.default_rng(seed), fmt, FIRST_KEY_ID + 5)
        base, base_mask = generate_records(num_records, numpy.random.default_rng(seed), without, FIRST_KEY_ID + 5)
        changed = numpy.flatnonzero((tokens != base).any(axis=1))  # the single facts' records, nothing else
        assert changed.size == 2 * min(single, int(base_mask[:, 1].sum()) // 2)
        assert base_mask[changed[changed > 0], 1].all()  # written over record 0 and queries of the bursty facts
        single_keys = tokens[changed, 0]
        assert not set(single_keys.tolist()) & set(base[:, 0].tolist()) and FIRST_KEY_ID + 5 not in single_keys
        for key in set(single_keys.tolist()):
            statement, question = numpy.flatnonzero(tokens[:, 0] == key)  # exactly two records
            assert not answer_mask[statement, 1] and answer_mask[question, 1]
            assert tokens[statement, 1] == tokens[question, 1]
        restated = []  # with record 0 taken: the first fact's first remaining query now states it
        if changed[0] == 0:
            displaced = numpy.flatnonzero(tokens[:, 0] == base[0, 0])
            restated = displaced[:1].tolist()
        unchanged = numpy.setdiff1d(numpy.arange(num_records), numpy.concatenate([changed, restated]))
        assert (answer_mask[unchanged] == base_mask[unchanged]).all()
        assert not answer_mask[restated, 1].any()
        _assert_each_fact_stated_once_before_it_is_asked(tokens, answer_mask)


def _assert_each_fact_stated_once_before_it_is_asked(tokens, answer_mask):
    """Records [N, 2] and their answer mask: every asked value was stated earlier, each key stated once."""
    fact_of = {}
    for index, (key, value) in enumerate(tokens.tolist()):
        if answer_mask[index, 1]:
            assert fact_of[key] == value, f"record {index} asks key {key} with a value never stated"
        else:
            assert key not in fact_of
            fact_of[key] = value


def test_single_facts_reach_across_the_sequence_and_keep_samples_deterministic():
    distances, statements_at_start = [], 0
    for index in range(50):
        tokens, answer_mask = generate_records(128, sample_rng(3, TRAIN_STREAM, index), SINGLE)
        again, again_mask = generate_records(128, sample_rng(3, TRAIN_STREAM, index), SINGLE)
        assert (tokens == again).all() and (answer_mask == again_mask).all()
        for key in set(tokens[:, 0].tolist()):
            where = numpy.flatnonzero(tokens[:, 0] == key)
            if where.size == 2 and answer_mask[where[1], 1] and not answer_mask[where[0], 1]:
                distances.append(int(where[1] - where[0]))
                statements_at_start += int(where[0] == 0)
    assert len(distances) >= 50 * SINGLE.single_facts
    assert min(distances) <= 3 and max(distances) >= 100  # near and far, up to the whole sequence (128 records)
    assert numpy.mean(distances) > 25
    assert statements_at_start > 0  # record 0 holds a single fact in some sequences, as a needle at depth 0%


def test_single_fact_at_start_states_a_single_fact_at_record_0_in_that_share_of_sequences():
    at_start = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8, single_facts=2,
                               single_fact_at_start=0.5)
    plain = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8, single_facts=2)
    bursty = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=8)
    moved = 0
    for index in range(200):
        tokens, answer_mask = generate_records(400, sample_rng(5, TRAIN_STREAM, index), at_start)
        base, base_mask = generate_records(400, sample_rng(5, TRAIN_STREAM, index), plain)
        bursty_tokens, _ = generate_records(400, sample_rng(5, TRAIN_STREAM, index), bursty)
        singles = [key for key in set(base[:, 0].tolist()) if (base[:, 0] == key).sum() == 2
                   and not set(numpy.flatnonzero(base[:, 0] == key).tolist()) & {0}]
        if (tokens == base).all() and (answer_mask == base_mask).all():
            continue  # not drawn for this sequence: the sample is the plain one
        moved += 1
        key = tokens[0, 0]
        statement, question = numpy.flatnonzero(tokens[:, 0] == key)  # the moved fact: stated at 0, asked later
        assert statement == 0 and not answer_mask[0, 1] and answer_mask[question, 1]
        assert tokens[0, 1] == tokens[question, 1] and key in singles  # one of the plain sample's single facts
        former = numpy.flatnonzero(base[:, 0] == key)[0]  # where the plain sample stated it: the bursty record again
        assert (tokens[former] == bursty_tokens[former]).all()
        _assert_each_fact_stated_once_before_it_is_asked(tokens, answer_mask)
    assert 70 <= moved <= 130  # about half of 200 (binomial: 100 +- 7)


@pytest.mark.parametrize("settings, message", [
    ({"single_facts": -1, "facts_per_sequence": 8}, r"retrieval.single_facts=-1 is not allowed: it must be an integer"),
    ({"single_facts": 2, "facts_per_sequence": 8, "single_fact_at_start": 1.5},
     r"retrieval.single_fact_at_start=1.5 is not allowed: it must be a number in \[0, 1\]"),
    ({"single_fact_at_start": 0.2, "facts_per_sequence": 8},
     r"retrieval.single_fact_at_start=0.2 is not allowed with retrieval.single_facts=0"),
    ({"single_facts": 4}, r"retrieval.single_facts=4 is not allowed with retrieval.facts_per_sequence=0"),
    ({"single_facts": 56, "facts_per_sequence": 8},
     r"retrieval.single_facts=56 is not allowed with retrieval.facts_per_sequence=8 and retrieval.num_keys=64: .* at most 55"),
])
def test_bad_single_fact_settings_are_named(settings, message):
    _assert_refused_by_name(settings, message)


@pytest.mark.parametrize("mean_gap", [3, 30])
def test_gap_after_records_puts_filler_after_every_record_of_a_bursty_sequence(mean_gap):
    fmt = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=6, single_facts=4,
                          mean_gap=mean_gap, gap_after="records")
    num_tokens = 6001
    tokens, answer_mask, record_starts = lay_out(num_tokens, sample_rng(5, TRAIN_STREAM, 1), fmt)
    assert tokens.shape == answer_mask.shape == (num_tokens,)
    is_key = (tokens >= FIRST_KEY_ID) & (tokens < fmt.first_value_id)
    assert numpy.flatnonzero(is_key).tolist() == record_starts.tolist()  # every key starts a record, no other
    assert (tokens[record_starts + 1] >= fmt.first_value_id).all() and record_starts[-1] + RECORD_LENGTH <= num_tokens
    gaps = numpy.diff(record_starts) - RECORD_LENGTH  # [records - 1] filler after each record but the last
    is_query = answer_mask[record_starts + 1]
    assert gaps.min() >= 0 and gaps.max() <= 2 * mean_gap
    for gaps_after in (gaps[is_query[:-1]], gaps[~is_query[:-1]]):  # queries are followed by filler as well
        assert abs(gaps_after.mean() - mean_gap) < 0.25 * mean_gap + 0.5
    expected_records = num_tokens / (RECORD_LENGTH + mean_gap)
    assert 0.8 * expected_records < len(record_starts) < 1.2 * expected_records
    outside = numpy.ones(num_tokens, dtype=bool)
    outside[record_starts], outside[record_starts + 1] = False, False
    assert (tokens[outside] < 256).all()  # everything else is filler bytes
    stated = {}  # each query answers the value its key was last stated with
    for start in record_starts.tolist():
        key, value = int(tokens[start]), int(tokens[start + 1])
        if answer_mask[start + 1]:
            assert stated[key] == value
        stated[key] = value
    assert len(stated) == 6 + 4  # the bursty facts and the single facts
    again = lay_out(num_tokens, sample_rng(5, TRAIN_STREAM, 1), fmt)
    numpy.testing.assert_array_equal(tokens, again[0])
    after_definitions = lay_out(num_tokens, sample_rng(5, TRAIN_STREAM, 1),
                                dataclasses.replace(fmt, gap_after="definitions"))
    assert (numpy.diff(after_definitions[2]) == RECORD_LENGTH).mean() > 0.9  # bursty: nearly all dense queries


def test_needle_in_a_haystack_with_filler_after_every_record():
    fmt = RetrievalFormat(num_keys=64, num_values=16, query_fraction=0.5, facts_per_sequence=6, mean_gap=20,
                          gap_after="records")
    gaps_after = []  # filler tokens between the needle and the next record
    for index in range(6):
        sample = retrieval_sample(2048, index / 5, sample_rng(0, 2, index), fmt)
        key = sample.tokens[-2]
        assert (sample.tokens[:-2] == key).sum() == 1 and sample.tokens[sample.needle_start] == key
        assert abs(sample.needle_start - index / 5 * sample.filler_length) <= 2 * 20 + RECORD_LENGTH
        records = numpy.flatnonzero((sample.tokens[:-2] >= FIRST_KEY_ID) & (sample.tokens[:-2] < fmt.first_value_id))
        assert 2048 / (RECORD_LENGTH + 2 * 20) < records.size < 2048 / (RECORD_LENGTH + 20 / 2)
        assert sample.needle_length == RECORD_LENGTH and len(sample.tokens) == 2048
        next_key = numpy.append(records, len(sample.tokens) - 2)[numpy.searchsorted(records, sample.needle_start) + 1]
        gaps_after.append(next_key - sample.needle_start - RECORD_LENGTH)  # the question's key counts at the end
    assert max(gaps_after) > 0  # the needle is followed by filler as every haystack record is


@pytest.mark.parametrize("settings, message", [
    ({"gap_after": "queries"}, r"retrieval.gap_after='queries' is not allowed"),
    ({"gap_after": "records", "queries_last": True, "query_fraction": 0.3},
     r"retrieval.gap_after='records' is not allowed with retrieval.queries_last=true"),
])
def test_bad_gap_after_is_named(settings, message):
    _assert_refused_by_name(settings, message)
