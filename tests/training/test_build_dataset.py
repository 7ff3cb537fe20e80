"""The indexed-dataset builder: text files in, Megatron .bin/.idx out, read back by megatron.core."""
from __future__ import annotations

import random

import numpy
import pytest

from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_nsa.data.build_dataset import build_indexed_dataset, collect_files, main, stdlib_source_files
from megatron_nsa.data.tokenizer import ByteTokenizer


def random_text(rng: random.Random, length: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz ()[]{}:=\n\tÅßé漢字🙂"
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_round_trip(tmp_path):
    rng = random.Random()
    texts = [random_text(rng, rng.randint(0, 300)) for _ in range(rng.randint(3, 7))]
    files = []
    for i, text in enumerate(texts):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    tokenizer = ByteTokenizer()
    num_tokens = build_indexed_dataset(files, tmp_path / "out" / "corpus", tokenizer)

    dataset = IndexedDataset(str(tmp_path / "out" / "corpus"))
    assert len(dataset) == len(texts)
    assert num_tokens == sum(len(t.encode("utf-8")) + 1 for t in texts)
    for i, text in enumerate(texts):
        tokens = dataset[i]
        assert tokens[-1] == tokenizer.eod
        assert tokenizer.detokenize(tokens.tolist()) == text
        numpy.testing.assert_array_equal(tokens[:-1], numpy.frombuffer(text.encode("utf-8"), dtype=numpy.uint8))
    assert not list((tmp_path / "out").glob("*partial*")), "staging files must be renamed away"


def test_cli_collects_directories(tmp_path, capsys):
    rng = random.Random()
    (tmp_path / "src" / "sub").mkdir(parents=True)
    names = ["src/a.txt", "src/sub/b.md", "src/sub/c.py"]
    for name in names:
        (tmp_path / name).write_text(random_text(rng, 50))
    (tmp_path / "src" / "skip.bin").write_bytes(bytes(rng.randrange(256) for _ in range(20)))
    main(["--output", str(tmp_path / "ds"), str(tmp_path / "src")])
    assert "3 documents" in capsys.readouterr().out
    dataset = IndexedDataset(str(tmp_path / "ds"))
    assert [ByteTokenizer().detokenize(dataset[i].tolist()) for i in range(3)] == \
        [p.read_text() for p in sorted(tmp_path / n for n in names)]


def test_missing_inputs_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        collect_files([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no input files found"):
        collect_files([str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="neither a file nor a directory"):
        main(["--output", str(tmp_path / "ds"), str(tmp_path / "nope")])


def test_stdlib_corpus_has_sources_and_no_tests():
    files = stdlib_source_files()
    names = {f.name for f in files}
    assert "os.py" in names and "random.py" in names
    assert files == sorted(files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-3:-1])
