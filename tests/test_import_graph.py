"""The import graph of the library, the benchmarks and the experiments: floors that import only downwards,
no circle, no private name taken from another module, no sys.path edits.

Every import statement is read from the source (ast), those inside functions included, so that a lazy
import counts like any other.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

REPO = Path(__file__).resolve().parents[1]

# The floors, lowest first: a module may import its own floor and the floors below it, never one above.
# A module belongs to the floor of the longest prefix that names it.
FLOORS: List[Tuple[str, Tuple[str, ...]]] = [
    ("kernels", ("nsa_kernels",)),
    ("core", ("megatron_nsa", "megatron_nsa.config", "megatron_nsa.reference", "megatron_nsa.compression",
              "megatron_nsa.functional", "megatron_nsa.rope", "megatron_nsa.block_score_loss")),
    ("context parallelism", ("megatron_nsa.context_parallel",)),
    ("Megatron layer", ("megatron_nsa.attention", "megatron_nsa.spec", "megatron_nsa.transformer_config",
                        "megatron_nsa.compat")),
    ("data", ("megatron_nsa.data",)),
    ("training and the Megatron-LM entry point", ("megatron_nsa.training", "megatron_nsa.megatron_lm")),
    ("evaluation", ("megatron_nsa.eval",)),
    ("benchmarks and experiments", ("benchmarks", "experiments")),
]
# Floors that must work without megatron-core installed (the functional API and context parallelism).
WITHOUT_MEGATRON = ("kernels", "core", "context parallelism")
SOURCE_ROOTS = {"nsa_kernels": REPO / "kernels", "megatron_nsa": REPO / "megatron_nsa",
                "benchmarks": REPO / "benchmarks", "experiments": REPO / "experiments"}


def module_files() -> Dict[str, Path]:
    """Every module of the project: dotted name -> file."""
    modules = {}
    for package, root in SOURCE_ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            if "results" in path.relative_to(root).parts:
                continue
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def floor_of(module: str) -> Optional[int]:
    """Index into FLOORS of the floor holding `module`, None for a module outside the project."""
    best = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def imports(module: str) -> Iterator[Tuple[str, Optional[str], int]]:
    """(imported module, imported name or None, line) of every import in `module`'s file. `from X import y`
    names the module X.y when that is a module of the project, else X (with the name y)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield (submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno)


def project_edges() -> Dict[str, Set[str]]:
    """module -> the project modules it imports."""
    return {module: {target for target, _, _ in imports(module) if target in MODULES and target != module}
            for module in MODULES}


def test_every_module_has_a_floor():
    assert MODULES, "no modules found"
    assert [m for m in MODULES if floor_of(m) is None] == []


def test_no_module_imports_a_higher_floor():
    upward = []
    for module in MODULES:
        for target, _, line in imports(module):
            if target in MODULES and floor_of(target) > floor_of(module):
                upward.append(f"{MODULES[module].relative_to(REPO)}:{line} ({FLOORS[floor_of(module)][0]}) imports "
                              f"{target} ({FLOORS[floor_of(target)][0]})")
    assert upward == []


def test_no_circle():
    edges = project_edges()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(module: str, path: List[str]) -> None:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_lower_floors_work_without_megatron_core():
    found = [f"{MODULES[m].relative_to(REPO)}:{line} imports {target}" for m in MODULES
             if FLOORS[floor_of(m)][0] in WITHOUT_MEGATRON
             for target, _, line in imports(m) if target == "megatron" or target.startswith("megatron.")]
    assert found == []


def test_no_private_name_from_another_module():
    found = [f"{MODULES[m].relative_to(REPO)}:{line} imports {name} from {target}" for m in MODULES
             for target, name, line in imports(m)
             if name and name.startswith("_") and not name.startswith("__") and target in MODULES]
    assert found == []


def test_no_sys_path_edits():
    found = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("source, module, expected", [
    ("from .base import KVExchange\n", "megatron_nsa.context_parallel.exchange.ring",
     ("megatron_nsa.context_parallel.exchange.base", "KVExchange")),
    ("from ..comm import Communicator\n", "megatron_nsa.context_parallel.exchange.ring",
     ("megatron_nsa.context_parallel.comm", "Communicator")),
    ("from .exchange import build_exchange\n", "megatron_nsa.context_parallel",
     ("megatron_nsa.context_parallel.exchange", "build_exchange")),
    ("from megatron_nsa import reference\n", "megatron_nsa.eval.selections", ("megatron_nsa.reference", None)),
])
def test_imports_resolve_relative_and_submodule_names(source, module, expected, tmp_path, monkeypatch):
    """The checks above see what Python imports: relative levels, a package's __init__, submodules."""
    is_package = module == "megatron_nsa.context_parallel"
    path = tmp_path / ("__init__.py" if is_package else "module.py")
    path.write_text(source)
    monkeypatch.setitem(MODULES, module, path)
    (target, name, _), = imports(module)
    assert (target, name) == expected
