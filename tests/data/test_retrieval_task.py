"""The synthetic retrieval task: one-token keys and values in reserved ids, fresh definitions, queries whose
targets are the defined values, loss mask on them only, determinism, vocabulary and key-space checks."""
from __future__ import annotations

import dataclasses

import numpy
import pytest

from megatron_nsa.data.datasets import recipe_tokenizer
from megatron_nsa.data.retrieval import (BYTE_RANGE, FIRST_KEY_ID, RECORD_LENGTH, RetrievalDataset, RetrievalFormat,
                                         TRAIN_STREAM, VALID_STREAM, check_key_space, check_settings, generate_records,
                                         generate_sequence, lay_out, sample_rng)
from megatron_nsa.data.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer
from megatron_nsa.training.config import RecipeError, load_recipe

FMT = RetrievalFormat(num_keys=600, num_values=37, query_fraction=0.4)


def test_definitions_are_fresh_and_queries_answer_the_defined_value():
    tokens, answer_mask = generate_records(500, numpy.random.default_rng(7), FMT)
    keys, values = tokens[:, 0], tokens[:, 1]
    assert ((FIRST_KEY_ID <= keys) & (keys < FMT.first_value_id)).all()
    assert ((FMT.first_value_id <= values) & (values < FMT.vocab_size)).all()
    defined, queries = {}, 0
    for index, (key, value) in enumerate(zip(keys.tolist(), values.tolist())):
        assert not answer_mask[index, 0]
        if answer_mask[index, 1]:  # a query: its key was defined earlier, its target is that value
            assert defined[key] == value
            queries += 1
        else:
            assert key not in defined, f"record {index} redefines key {key}"
            defined[key] = value
    assert not answer_mask[0, 1]
    assert 0.3 < queries / len(keys) < 0.5  # query_fraction 0.4
    assert len(set(defined.values())) > FMT.num_values // 2  # values are drawn, not constant


def test_queries_reach_back_across_the_whole_context():
    tokens, answer_mask = generate_records(2000, numpy.random.default_rng(3), RetrievalFormat())
    where, distances = {}, []
    for index, key in enumerate(tokens[:, 0].tolist()):
        if answer_mask[index, 1]:
            distances.append(index - where[key])
        else:
            where[key] = index
    assert min(distances) == 1 and max(distances) > 1500


def test_sequences_are_deterministic_per_seed_stream_and_index():
    def item(seed, stream, index):
        return RetrievalDataset(FMT, seq_length=301, num_samples=10, seed=seed, stream=stream)[index]

    first = item(5, TRAIN_STREAM, 4)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        numpy.testing.assert_array_equal(first[key], item(5, TRAIN_STREAM, 4)[key])
    for other in (item(5, TRAIN_STREAM, 5), item(5, VALID_STREAM, 4), item(6, TRAIN_STREAM, 4)):
        assert not numpy.array_equal(first["tokens"], other["tokens"])


@pytest.mark.parametrize("seq_length", [256, 257])
def test_items_are_shifted_and_masked_on_query_values(seq_length):
    item = RetrievalDataset(FMT, seq_length=seq_length, num_samples=3, seed=1, stream=TRAIN_STREAM)[2]
    assert all(item[k].shape == (seq_length,) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    numpy.testing.assert_array_equal(item["tokens"][1:], item["labels"][:-1])
    numpy.testing.assert_array_equal(item["position_ids"], numpy.arange(seq_length))
    tokens, answer_mask = generate_sequence(seq_length + 1, sample_rng(1, TRAIN_STREAM, 2), FMT)
    numpy.testing.assert_array_equal(item["loss_mask"], answer_mask[1:].astype(numpy.float32))
    assert item["loss_mask"].sum() > 0
    for position in numpy.flatnonzero(item["loss_mask"]):  # input: a key seen before; label: its value
        key, label = item["tokens"][position], item["labels"][position]
        assert FIRST_KEY_ID <= key < FMT.first_value_id and label >= FMT.first_value_id
        earlier = numpy.flatnonzero(tokens[:position] == key)
        assert len(earlier) and tokens[earlier[0] + 1] == label


def test_excluded_key_never_appears():
    fmt = RetrievalFormat(num_keys=80, num_values=5, query_fraction=0.5)
    for seed in range(5):
        tokens, _ = generate_records(120, numpy.random.default_rng(seed), fmt, exclude_key=FIRST_KEY_ID + 21)
        assert FIRST_KEY_ID + 21 not in tokens[:, 0] and len(set(tokens[:, 0].tolist())) > 40


def test_too_small_a_key_range_is_a_clear_error():
    with pytest.raises(ValueError, match=r"retrieval.num_keys=100 is too small for data.seq_length \(\+1 for the "
                                         r"labels\)=400: .* up to 200 definitions"):
        RetrievalDataset(RetrievalFormat(num_keys=100), seq_length=399, num_samples=1, seed=0, stream=TRAIN_STREAM)
    check_key_space(RetrievalFormat(num_keys=200), 400, "length")
    with pytest.raises(ValueError, match=r"needs \d+ distinct keys but retrieval.num_keys=20 gives only 19"):
        generate_records(40, numpy.random.default_rng(0), RetrievalFormat(num_keys=20, query_fraction=0.01),
                         exclude_key=FIRST_KEY_ID)


@pytest.mark.parametrize("field, value, allowed", [
    ("num_keys", 1, r"\[2, 1048576\]"), ("num_values", 2.5, r"\[2, 65536\]"), ("num_values", True, r"\[2, 65536\]"),
    ("query_fraction", 1.0, r"\(0, 1\)"), ("query_fraction", 0, r"\(0, 1\)"), ("mean_gap", -1, r"\[0, 65536\]"),
])
def test_bad_settings_name_field_value_and_range(field, value, allowed):
    with pytest.raises(ValueError, match=rf"retrieval.{field}={value!r} is not allowed: .*{allowed}"):
        check_settings(RetrievalFormat(**{field: value}))


def test_recipe_reserves_the_ids_in_the_model_vocabulary():
    recipe = load_recipe(None, ["data.source=retrieval", "retrieval.num_keys=1000", "retrieval.num_values=24",
                                "retrieval.query_fraction=0.5", "data.seq_length=512"])
    fmt = RetrievalFormat.of(recipe.retrieval)
    assert fmt == RetrievalFormat(num_keys=1000, num_values=24, query_fraction=0.5)
    tokenizer = recipe_tokenizer(recipe)
    assert tokenizer.vocab_size == fmt.vocab_size == BYTE_VOCAB_SIZE + 1024 and tokenizer.eod == 256
    assert recipe_tokenizer(load_recipe(None, ["data.source=mock"])).vocab_size == ByteTokenizer().vocab_size


def test_recipe_checks():
    with pytest.raises(RecipeError, match="retrieval.query_fraction=2.0 is not allowed"):
        load_recipe(None, ["data.source=retrieval", "retrieval.query_fraction=2"])
    with pytest.raises(RecipeError, match="data.source=retrieval needs data.tokenizer=bytes"):
        load_recipe(None, ["data.source=retrieval", "data.tokenizer=/some/hf/tokenizer"])
    with pytest.raises(RecipeError, match=r"retrieval.num_keys=4000 is too small for data.seq_length \(\+1 for the "
                                          r"labels\)=8193: .* raise retrieval.num_keys to at least 4097"):
        load_recipe(None, ["data.source=retrieval", "data.seq_length=8192", "retrieval.num_keys=4000"])


@pytest.mark.parametrize("mean_gap,query_fraction", [(1, 0.4), (6, 0.4), (40, 0.4), (40, 0.9)])
def test_gaps_put_whole_records_between_filler_bytes(mean_gap, query_fraction):
    fmt = RetrievalFormat(num_keys=2000, num_values=37, query_fraction=query_fraction, mean_gap=mean_gap)
    num_tokens = 3001
    tokens, answer_mask, record_starts = lay_out(num_tokens, sample_rng(2, TRAIN_STREAM, 0), fmt)
    assert tokens.shape == answer_mask.shape == (num_tokens,)
    is_key = (tokens >= FIRST_KEY_ID) & (tokens < fmt.first_value_id)
    assert numpy.flatnonzero(is_key).tolist() == record_starts.tolist()  # every key starts a record, no other
    assert (tokens[record_starts + 1] >= fmt.first_value_id).all() and record_starts[-1] + 2 <= num_tokens
    record_tokens = numpy.zeros(num_tokens, dtype=bool)
    record_tokens[numpy.concatenate([record_starts, record_starts + 1])] = True
    assert ((tokens[~record_tokens] >= 0) & (tokens[~record_tokens] < BYTE_RANGE)).all()  # filler: bytes only
    gaps = numpy.diff(numpy.append(record_starts, num_tokens)) - RECORD_LENGTH  # filler after each record
    is_query = answer_mask[record_starts + 1]
    assert (gaps[:-1][is_query[:-1]] == 0).all()  # queries follow one another
    definition_gaps = gaps[:-1][~is_query[:-1]]  # filler after each definition
    assert definition_gaps.min() >= 0 and definition_gaps.max() <= 2 * mean_gap
    assert abs(definition_gaps.mean() - mean_gap) < 0.25 * mean_gap + 0.5
    expected_records = num_tokens / (RECORD_LENGTH + (1 - query_fraction) * mean_gap)
    assert 0.7 * expected_records < len(record_starts) < 1.3 * expected_records
    assert abs(is_query.mean() - query_fraction) < 0.1
    # queries answer the value their key was defined with; the mask marks exactly those values
    defined = {}
    for start in record_starts.tolist():
        key, value = tokens[start], tokens[start + 1]
        if answer_mask[start + 1]:
            assert defined[key] == value
        else:
            assert key not in defined
            defined[key] = value
    assert answer_mask[record_starts + 1].sum() == answer_mask.sum() > 0
    again = lay_out(num_tokens, sample_rng(2, TRAIN_STREAM, 0), fmt)
    numpy.testing.assert_array_equal(tokens, again[0])


def test_recipe_takes_mean_gap_and_datasets_use_it():
    recipe = load_recipe(None, ["data.source=retrieval", "retrieval.num_keys=1000", "retrieval.mean_gap=9",
                                "data.seq_length=512"])
    fmt = RetrievalFormat.of(recipe.retrieval)
    assert fmt.mean_gap == 9
    item = RetrievalDataset(fmt, seq_length=512, num_samples=2, seed=1, stream=TRAIN_STREAM)[1]
    is_key = (item["tokens"] >= FIRST_KEY_ID) & (item["tokens"] < fmt.first_value_id)
    assert 512 / (RECORD_LENGTH + 2 * 9) < is_key.sum() < 512 / (RECORD_LENGTH + 9 / 2)
    with pytest.raises(RecipeError, match="retrieval.mean_gap=-3 is not allowed"):
        load_recipe(None, ["data.source=retrieval", "retrieval.mean_gap=-3"])


@pytest.mark.parametrize("mean_gap,query_fraction", [(0, 0.3), (0, 0.4), (12, 0.4)])
def test_query_once_asks_each_key_at_most_once(mean_gap, query_fraction):
    fmt = RetrievalFormat(num_keys=3000, num_values=37, query_fraction=query_fraction, mean_gap=mean_gap,
                          query_once=True)
    seed = numpy.random.default_rng().integers(1 << 30)
    tokens, answer_mask, record_starts = lay_out(4000, sample_rng(seed, TRAIN_STREAM, 0), fmt)
    defined, asked = {}, set()
    for start in record_starts.tolist():
        key, value = tokens[start], tokens[start + 1]
        if answer_mask[start + 1]:
            assert defined[key] == value and key not in asked, f"key {key} asked twice"
            asked.add(key)
        else:
            assert key not in defined
            defined[key] = value
    is_query = answer_mask[record_starts + 1]
    assert abs(is_query.mean() - query_fraction) < 0.1
    distances = [start - next(s for s in record_starts if tokens[s] == tokens[start])
                 for start in record_starts[is_query].tolist()]
    # some queries follow their definition closely and some reach far back (bounds hold for every one of
    # 3,000 seeds tried: the largest minimum was 6 / 35 tokens, the smallest maximum 1,063)
    assert min(distances) <= 4 * (RECORD_LENGTH + 2 * mean_gap) and max(distances) > 4000 // 8
    repeated = lay_out(4000, sample_rng(seed, TRAIN_STREAM, 0), dataclasses.replace(fmt, query_once=False))
    queried_keys = repeated[0][repeated[2]][repeated[1][repeated[2] + 1]]
    assert len(set(queried_keys.tolist())) < len(queried_keys)  # without query_once keys are asked again


def test_recipe_takes_query_once():
    recipe = load_recipe(None, ["data.source=retrieval", "retrieval.num_keys=1000", "retrieval.query_once=true",
                                "data.seq_length=512"])
    assert RetrievalFormat.of(recipe.retrieval).query_once is True
    with pytest.raises(RecipeError, match="retrieval.query_once='sometimes' is not allowed: expected true or false"):
        load_recipe(None, ["data.source=retrieval", "retrieval.query_once=sometimes"])
    with pytest.raises(ValueError, match="retrieval.query_once=1 is not allowed: it must be true or false"):
        check_settings(RetrievalFormat(query_once=1))
    with pytest.raises(RecipeError, match=r"retrieval.query_fraction=0.5 is not allowed with retrieval.query_once=true"
                                          r": it must be below 0.5"):
        load_recipe(None, ["data.source=retrieval", "retrieval.query_once=true", "retrieval.query_fraction=0.5"])


@pytest.mark.parametrize("num_tokens,mean_gap,query_fraction", [(3001, 0, 0.3), (3001, 12, 0.3), (8193, 40, 0.45),
                                                                (33, 2, 0.3), (4, 0, 0.2)])
def test_queries_last_defines_everything_then_asks_each_key_once_at_the_end(num_tokens, mean_gap, query_fraction):
    fmt = RetrievalFormat(num_keys=9000, num_values=37, query_fraction=query_fraction, mean_gap=mean_gap,
                          queries_last=True)
    seed = numpy.random.default_rng().integers(1 << 30)
    tokens, answer_mask, record_starts = lay_out(num_tokens, sample_rng(seed, TRAIN_STREAM, 0), fmt)
    assert tokens.shape == answer_mask.shape == (num_tokens,)
    is_key = (tokens >= FIRST_KEY_ID) & (tokens < fmt.first_value_id)
    assert numpy.flatnonzero(is_key).tolist() == sorted(record_starts.tolist())  # every key starts a record
    assert (tokens[record_starts + 1] >= fmt.first_value_id).all()
    is_query = answer_mask[record_starts + 1]
    num_queries = int(is_query.sum())
    assert num_queries >= 1 and answer_mask.sum() == num_queries
    # the queries form one block that ends the sequence, after every definition
    query_starts = record_starts[is_query]
    assert query_starts.tolist() == list(range(num_tokens - RECORD_LENGTH * num_queries, num_tokens, RECORD_LENGTH))
    assert record_starts[~is_query].max() < query_starts.min()
    num_definitions = int((~is_query).sum())
    expected_queries = max(1, int(num_definitions * query_fraction / (1 - query_fraction)))
    assert num_queries == min(expected_queries, num_definitions)
    defined = {}
    for start in record_starts[~is_query].tolist():
        assert tokens[start] not in defined
        defined[tokens[start]] = tokens[start + 1]
    asked = tokens[query_starts].tolist()
    assert len(set(asked)) == num_queries and all(tokens[s + 1] == defined[tokens[s]] for s in query_starts)
    if num_tokens > 1000:  # the definitions fill the sequence: the filler left before the queries is short
        leftover = query_starts.min() - (record_starts[~is_query].max() + RECORD_LENGTH)
        assert leftover <= 2 * (2 * mean_gap) + 2 * RECORD_LENGTH  # the last gap, less than one more definition
        gaps = numpy.diff(record_starts[~is_query]) - RECORD_LENGTH  # filler after each definition
        assert gaps.min() >= 0 and gaps.max() <= 2 * mean_gap and abs(gaps.mean() - mean_gap) < 0.25 * mean_gap + 0.5
        filler = numpy.ones(num_tokens, dtype=bool)
        filler[numpy.concatenate([record_starts, record_starts + 1])] = False
        assert ((tokens[filler] >= 0) & (tokens[filler] < BYTE_RANGE)).all()
        distances = [int(start - record_starts[tokens[record_starts] == tokens[start]][0]) for start in query_starts]
        assert min(distances) < 0.2 * num_tokens and max(distances) > 0.8 * num_tokens  # near and far alike
    again = lay_out(num_tokens, sample_rng(seed, TRAIN_STREAM, 0), fmt)
    numpy.testing.assert_array_equal(tokens, again[0])


def test_recipe_takes_queries_last_and_checks_it():
    recipe = load_recipe(None, ["data.source=retrieval", "retrieval.num_keys=1000", "retrieval.queries_last=true",
                                "retrieval.query_fraction=0.3", "retrieval.mean_gap=8", "data.seq_length=512"])
    fmt = RetrievalFormat.of(recipe.retrieval)
    assert fmt.queries_last is True
    item = RetrievalDataset(fmt, seq_length=512, num_samples=2, seed=1, stream=TRAIN_STREAM)[1]
    answers = numpy.flatnonzero(item["loss_mask"])
    assert answers.min() > 400 and answers.max() == 511  # the query block ends the sequence
    with pytest.raises(RecipeError, match=r"retrieval.query_fraction=0.5 is not allowed with "
                                          r"retrieval.queries_last=true: it must be below 0.5"):
        load_recipe(None, ["data.source=retrieval", "retrieval.queries_last=true", "retrieval.query_fraction=0.5"])
    with pytest.raises(ValueError, match="retrieval.queries_last='yes' is not allowed: it must be true or false"):
        check_settings(RetrievalFormat(queries_last="yes"))
    with pytest.raises(ValueError, match="queries_last=true needs at least 4 tokens .* got 3"):
        lay_out(3, sample_rng(0, TRAIN_STREAM, 0), fmt)


def test_filler_is_random_bytes_only():
    assert "filler" not in {field.name for field in dataclasses.fields(RetrievalFormat)}
    with pytest.raises(RecipeError, match="retrieval.filler"):
        load_recipe(None, ["data.source=retrieval", "retrieval.filler=random"])
