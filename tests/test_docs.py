"""The documentation stays true: every file, link, `python -m` module and named object that README.md,
CHANGELOG.md, docs/*.md and the result reports cite exists, and no file speaks of how the project was developed."""
from __future__ import annotations

import fnmatch
import glob
import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_LEVEL_DIRS = ("megatron_nsa", "kernels", "benchmarks", "experiments", "configs", "launch", "tests", "docs", ".ci")
SOURCE_DIRS = ("megatron_nsa", "kernels", "benchmarks", "experiments", "configs", "launch", "tests", "docs", ".ci")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".sbatch", ".txt", ".cfg", ".toml", ""}

# Repository paths as the docs write them: from the repository root, e.g. `kernels/band.py` or
# `benchmarks/results/tune_kernels_h100*.md`; templates with <placeholders> or [optional] parts are skipped.
REPO_PATH = re.compile(r"(?<![\w./<-])((?:%s)/[\w./*-]*)" % "|".join(re.escape(d) for d in TOP_LEVEL_DIRS))
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
MODULE_RUN = re.compile(r"python -m ((?:megatron_nsa|nsa_kernels|benchmarks|experiments)(?:\.\w+)+)")
HISTORY = re.compile(r"(first|second|third|[a-z]+teenth|twentieth|[0-9]+(st|nd|rd|th))[ -]session|session [0-9]+|"
                     r"sessions? [0-9]|device (job|budget)|\(issue [0-9]+\)|\.\./shared/|throw" r"away|eleven" r"th|twelf" r"th",
                     re.IGNORECASE)


def doc_files():
    files = [REPO / "README.md", REPO / "CHANGELOG.md"]
    return files + sorted((REPO / "docs").glob("*.md")) + sorted((REPO / "benchmarks" / "results").glob("*.md"))


def cited_paths(text: str):
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        tail = text[match.end():match.end() + 1]
        if tail in ("<", "[", "{") or not path.split("/")[-1]:
            continue  # a template such as bench_layer_<gpu>.md, or a directory written with a trailing slash
        yield path


def module_exists(module: str) -> bool:
    parts = module.split(".")
    if parts[0] == "nsa_kernels":
        parts[0] = "kernels"
    base = REPO.joinpath(*parts)
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or (base / "__main__.py").is_file()


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_cited_files_exist(doc):
    assert doc.is_file(), f"{doc.relative_to(REPO)} is missing"
    text = doc.read_text()
    missing = sorted({path for path in cited_paths(text) if not glob.glob(str(REPO / path))})
    assert not missing, f"{doc.relative_to(REPO)} cites files that do not exist: {missing}"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    text = doc.read_text()
    broken = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path) if path else doc
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)} has broken links: {broken}"


def heading_anchors(markdown: str):
    """GitHub's anchors: headings lower-cased, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_module_commands_exist(doc):
    missing = sorted({m for m in MODULE_RUN.findall(doc.read_text()) if not module_exists(m)})
    assert not missing, f"{doc.relative_to(REPO)} runs modules that do not exist: {missing}"


DOTTED_NAME = re.compile(r"`((?:megatron_nsa|nsa_kernels)(?:\.\w+)+)`")


def resolve(dotted: str):
    """Import the longest importable module prefix of `dotted`, then look the rest up as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            target = getattr(target, name)
        return target
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_named_objects_exist(doc):
    """`megatron_nsa.x.y` and `nsa_kernels.x.y` in the docs name modules, classes and functions that exist."""
    missing = []
    for dotted in sorted(set(DOTTED_NAME.findall(doc.read_text()))):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            missing.append(f"{dotted} ({error})")
    assert not missing, f"{doc.relative_to(REPO)} names objects that do not exist: {missing}"


def listed(name: str, line: str) -> bool:
    """Whether an index line lists the file `name`: by its name, by a glob, or as a report followed by the
    suffixes of its other files (`[bench_layer_h100](bench_layer_h100.md) `.json``)."""
    for token in re.findall(r"[\w.*-]+", line):
        if name == token or ("*" in token and fnmatch.fnmatch(name, token)):
            return True
        stem = token[:-3] if token.endswith(".md") else token
        if name.startswith(stem) and f"`{name[len(stem):]}`" in line:
            return True
    return False


def test_results_index_lists_every_file():
    results = REPO / "benchmarks" / "results"
    lines = (results / "README.md").read_text().splitlines()
    unlisted = [path.name for path in sorted(results.iterdir())
                if path.name != "README.md" and not any(listed(path.name, line) for line in lines)]
    assert not unlisted, f"benchmarks/results/README.md does not list {unlisted}"


def test_results_index_entry_forms():
    line = "| [bench_layer_h100](bench_layer_h100.md) `.json` `_loss.png` | x |"
    assert listed("bench_layer_h100.json", line) and listed("bench_layer_h100_loss.png", line)
    assert not listed("bench_layer_h100_other.json", line)
    assert listed("tune_x_8k.json", "| `tune_x_*.json` | y |")


def test_heading_anchors_follow_github():
    assert heading_anchors("## Megatron-LM\n### One Megatron layer\n# Shapes and names") == {
        "megatron-lm", "one-megatron-layer", "shapes-and-names"}


def test_path_finder_skips_templates_and_finds_paths():
    text = "see `kernels/band.py`, benchmarks/results/bench_layer_<gpu>.md and python benchmarks/bench_cp.py."
    assert list(cited_paths(text)) == ["kernels/band.py", "benchmarks/bench_cp.py"]


def repository_text_files():
    files = [path for path in REPO.iterdir() if path.is_file() and path.suffix in TEXT_SUFFIXES]
    for directory in SOURCE_DIRS:
        files += [path for path in (REPO / directory).rglob("*")
                  if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts]
    return files


# A document cited in code by a bare upper-case file name, followed by a comma or a parenthesis as citations are
# written; output names in usage lines are not citations.
CITED_DOCUMENT = re.compile(r"(?<![\w./-])([A-Z][A-Z_]{2,}\.md)(?=[,):;'])")


def test_files_cited_in_code_exist():
    """Comments, docstrings and messages cite files by their path from the repository root (docs/semantics.md,
    kernels/layout.py); each must exist."""
    missing = []
    for path in repository_text_files():
        if path.suffix == ".md":
            continue  # the documents are checked above
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for cited in [*cited_paths(line), *CITED_DOCUMENT.findall(line)]:
                if not glob.glob(str(REPO / cited)):
                    missing.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    assert not missing, "\n".join(missing)


def test_no_file_speaks_of_development_history():
    """JSON result files are exempt: they record the runs as they were written."""
    offenders = []
    for path in repository_text_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if HISTORY.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
