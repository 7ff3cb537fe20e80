"""data.paths: dataset prefixes or a weighted blend (megatron_nsa.data.build_dataset.parse_blend), and the
recipe's pre-launch check that refuses a malformed one with a RecipeError naming data.paths."""
from __future__ import annotations

import os

import pytest

from megatron_nsa.data.build_dataset import dataset_exists, parse_blend
from megatron_nsa.training.config import RecipeError, check_data_paths, load_recipe


def test_prefixes_and_weighted_pairs(tmp_path):
    assert parse_blend(["a/b", "~/c"]) == (["a/b", os.path.expanduser("~/c")], None)
    assert parse_blend([0.7, "web", 3, "code"]) == (["web", "code"], [0.7, 3.0])
    prefix = str(tmp_path / "corpus")
    assert not dataset_exists(prefix)
    (tmp_path / "corpus.bin").write_bytes(b"")
    assert not dataset_exists(prefix)  # both files are needed
    (tmp_path / "corpus.idx").write_bytes(b"")
    assert dataset_exists(prefix)


@pytest.mark.parametrize("paths, message", [
    ([0.7, "web", 0.3], r"data.paths=\[0.7, 'web', 0.3\] must be a list of dataset prefixes or of weight, prefix"),
    (["web", 0.3], r"must be a list of dataset prefixes or of weight, prefix pairs"),
    ([0.0, "web"], r"data.paths=\[0.0, 'web'\]: blend weights must be > 0"),
])
def test_malformed_blends_name_data_paths(paths, message):
    with pytest.raises(ValueError, match=message):
        parse_blend(paths)


def test_recipe_check_refuses_a_malformed_blend_as_bad_input():
    recipe = load_recipe(None, ["data.source=indexed", "data.paths=[0.5, a, -1, b]"])
    with pytest.raises(RecipeError, match=r"blend weights must be > 0"):
        check_data_paths(recipe)
