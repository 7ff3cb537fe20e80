"""The synthetic retrieval task: deterministic, answerable, loss mask on the queried values only."""
from __future__ import annotations

import numpy
import pytest

from megatron_nsa.eval.retrieval_task import (RetrievalDataset, RetrievalFormat, TRAIN_STREAM, VALID_STREAM,
                                              check_settings, generate_lines, generate_sequence)
from megatron_nsa.training.config import RecipeError, load_recipe

FMT = RetrievalFormat(key_length=3, key_alphabet_size=8, value_length=5, query_fraction=0.4)


def parse(lines: numpy.ndarray, fmt: RetrievalFormat):
    """[n, line_length] bytes -> [(key, separator, value)]."""
    k = fmt.key_length
    return [(bytes(line[:k]).decode(), chr(line[k]), bytes(line[k + 1:-1]).decode()) for line in lines]


def test_queries_ask_earlier_keys_and_definitions_are_fresh():
    lines, answer_mask = generate_lines(400, numpy.random.default_rng(7), FMT)
    records = parse(lines, FMT)
    defined = {}
    queries = 0
    for index, (key, separator, value) in enumerate(records):
        assert len(key) == FMT.key_length and set(key) <= set("abcdefgh")
        assert len(value) == FMT.value_length and value.isdigit()
        assert lines[index, -1] == ord("\n")
        if separator == ":":
            assert key not in defined, f"line {index} redefines {key}"
            defined[key] = value
            assert not answer_mask[index].any()
        else:
            assert separator == "?" and defined[key] == value  # the answer is the value defined earlier
            queries += 1
            assert answer_mask[index].tolist() == [False] * (FMT.key_length + 1) + [True] * FMT.value_length + [False]
    assert records[0][1] == ":"
    assert 0.3 < queries / len(records) < 0.5  # query_fraction 0.4


def test_queries_reach_back_across_the_whole_context():
    lines, _ = generate_lines(800, numpy.random.default_rng(3), RetrievalFormat())
    where = {}
    distances = []
    for index, (key, separator, _) in enumerate(parse(lines, RetrievalFormat())):
        if separator == ":":
            where[key] = index
        else:
            distances.append(index - where[key])
    assert min(distances) >= 1 and max(distances) > 500


def test_sequences_are_deterministic_per_seed_stream_and_index():
    dataset = RetrievalDataset(RetrievalFormat(), seq_length=300, num_samples=10, seed=5, stream=TRAIN_STREAM)
    again = RetrievalDataset(RetrievalFormat(), seq_length=300, num_samples=10, seed=5, stream=TRAIN_STREAM)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        numpy.testing.assert_array_equal(dataset[4][key], again[4][key])
    assert not numpy.array_equal(dataset[4]["tokens"], dataset[5]["tokens"])
    validation = RetrievalDataset(RetrievalFormat(), seq_length=300, num_samples=10, seed=5, stream=VALID_STREAM)
    assert not numpy.array_equal(dataset[4]["tokens"], validation[4]["tokens"])
    other_seed = RetrievalDataset(RetrievalFormat(), seq_length=300, num_samples=10, seed=6, stream=TRAIN_STREAM)
    assert not numpy.array_equal(dataset[4]["tokens"], other_seed[4]["tokens"])


def test_items_are_shifted_and_masked_on_answer_labels():
    fmt = RetrievalFormat()
    item = RetrievalDataset(fmt, seq_length=257, num_samples=3, seed=1, stream=TRAIN_STREAM)[2]
    assert all(item[k].shape == (257,) for k in ("tokens", "labels", "loss_mask", "position_ids"))
    numpy.testing.assert_array_equal(item["tokens"][1:], item["labels"][:-1])
    numpy.testing.assert_array_equal(item["position_ids"], numpy.arange(257))
    text = numpy.concatenate([item["tokens"], item["labels"][-1:]])
    _, answer_mask = generate_sequence(258, numpy.random.default_rng([1, TRAIN_STREAM, 2]), fmt)
    numpy.testing.assert_array_equal(item["loss_mask"], answer_mask[1:].astype(numpy.float32))
    assert item["loss_mask"].sum() > 0
    # every masked label is a digit right after '?' + digits: the value of a query line
    for position in numpy.flatnonzero(item["loss_mask"]):
        target = position + 1  # index of the label in `text`
        line_start = target - (target % fmt.line_length)
        assert text[line_start + fmt.key_length] == ord("?") and chr(text[target]).isdigit()


def test_excluded_key_never_appears():
    fmt = RetrievalFormat(key_length=3, key_alphabet_size=4, query_fraction=0.75)  # 64 keys, most of them defined
    for seed in range(5):
        lines, _ = generate_lines(200, numpy.random.default_rng(seed), fmt, exclude_key=21)  # key 21 = "bbb"
        keys = {key for key, _, _ in parse(lines, fmt)}
        assert "bbb" not in keys and len(keys) > 32


def test_too_few_keys_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs \d+ distinct keys but retrieval.key_length=1 .* gives only 3"):
        RetrievalDataset(RetrievalFormat(key_length=1, key_alphabet_size=3), seq_length=400, num_samples=1, seed=0,
                         stream=TRAIN_STREAM)


@pytest.mark.parametrize("field, value, allowed", [
    ("key_alphabet_size", 27, r"\[2, 26\]"), ("key_length", 0, r"\[1, 16\]"), ("value_length", 2.5, r"\[1, 32\]"),
    ("query_fraction", 1.0, r"\(0, 1\)"), ("query_fraction", 0, r"\(0, 1\)"),
])
def test_bad_settings_name_field_value_and_range(field, value, allowed):
    settings = RetrievalFormat(**{field: value})
    with pytest.raises(ValueError, match=rf"retrieval.{field}={value!r} is not allowed: .*{allowed}"):
        check_settings(settings)


def test_recipe_selects_the_task_and_checks_it():
    recipe = load_recipe(None, ["data.source=retrieval", "retrieval.value_length=6", "retrieval.query_fraction=0.5"])
    assert recipe.data.source == "retrieval"
    assert RetrievalFormat.of(recipe.retrieval) == RetrievalFormat(value_length=6, query_fraction=0.5)
    with pytest.raises(RecipeError, match="retrieval.query_fraction=2.0 is not allowed"):
        load_recipe(None, ["data.source=retrieval", "retrieval.query_fraction=2"])
    with pytest.raises(RecipeError, match="data.source=retrieval needs data.tokenizer=bytes"):
        load_recipe(None, ["data.source=retrieval", "data.tokenizer=/some/hf/tokenizer"])
