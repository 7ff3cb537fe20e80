"""Packaging: plain and editable installs import both megatron_nsa and nsa_kernels (kernels/ under its mapped name);
the README's test command is the one CI runs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("megatron_nsa", "kernels")
IMPORT_CHECK = "import megatron_nsa, nsa_kernels; print(megatron_nsa.__file__); print(nsa_kernels.__file__)"


def copy_sources(destination: Path) -> Path:
    """The files a build needs (top-level files and the package directories), away from the checkout,
    so that building leaves no build/ or *.egg-info behind in it."""
    source = destination / "src"
    source.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file():
            shutil.copy2(entry, source / entry.name)
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def pip_install(*args, python=sys.executable):
    command = [sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-build-isolation",
               "--no-index", "--quiet", *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)


def imported_files(python, cwd, env_extra=None):
    """Where `python` (run outside the checkout) imports megatron_nsa and nsa_kernels from."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(env_extra or {})
    result = subprocess.run([python, "-c", IMPORT_CHECK], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.mark.slow
def test_plain_install_imports_both_packages(tmp_path):
    source = copy_sources(tmp_path)
    target = tmp_path / "site"
    pip_install("--target", str(target), str(source))
    megatron_nsa_file, nsa_kernels_file = imported_files(sys.executable, tmp_path, {"PYTHONPATH": str(target)})
    assert megatron_nsa_file == target / "megatron_nsa" / "__init__.py"
    assert nsa_kernels_file == target / "nsa_kernels" / "__init__.py"
    assert not (target / "kernels").exists()  # the bare name `kernels` belongs to another PyPI package
    for package, directory in (("megatron_nsa", "megatron_nsa"), ("nsa_kernels", "kernels")):
        assert python_files(target / package) == python_files(source / directory), f"{package} is incomplete"


def python_files(root: Path):
    """Every .py file under root (subpackages included), relative to it."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*.py") if "__pycache__" not in path.parts)


@pytest.mark.slow
def test_editable_install_imports_both_packages(tmp_path):
    source = copy_sources(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    pip_install("-e", str(source), python=python)
    megatron_nsa_file, nsa_kernels_file = imported_files(python, tmp_path)
    assert megatron_nsa_file == source / "megatron_nsa" / "__init__.py"
    assert nsa_kernels_file == source / "kernels" / "__init__.py"


def readme_block(section_title: str, language: str) -> str:
    """The first fenced code block of a README section ("## <title>")."""
    readme = (REPO / "README.md").read_text()
    section = re.search(rf"^## {section_title}\n(.*?)(?=^## |\Z)", readme, flags=re.S | re.M)
    assert section, f"README.md has no '## {section_title}' section"
    block = re.search(rf"```{language}\n(.*?)```", section.group(1), flags=re.S)
    assert block, f"the README's {section_title} section has no {language} code block"
    return block.group(1)


def readme_test_command() -> str:
    """The command in the README's "Tests" section."""
    lines = readme_block("Tests", "bash").splitlines()
    commands = [line for line in lines if line.strip() and not line.startswith("#")]
    assert len(commands) == 1, f"expected one test command, found {commands}"
    return commands[0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = readme_test_command()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"{command!r} (README) is not a line of .ci/run"
    assert command.split()[:3] == ["python", "-m", "pytest"]


def test_readme_setup_commands_are_the_ones_ci_runs():
    """The two set-up commands: the first installs torch and the package as .ci/run does, then trains the tiny
    recipe with a launcher that exists; the second is the test command."""
    lines = [line.strip() for line in readme_block("Set up and run \\(two commands\\)", "bash").splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 2, f"expected two set-up commands, found {lines}"
    install_torch, install_package, train = [part.strip() for part in lines[0].split("&&")]
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install_torch in ci_lines, f"{install_torch!r} (README) is not a line of .ci/run"
    assert f"python -m {install_package}" in ci_lines, f"{install_package!r} (README) differs from .ci/run's install"
    launcher, recipe = train.split()
    assert os.access(REPO / launcher, os.X_OK), f"{launcher} is missing or not executable"
    assert (REPO / recipe).is_file(), f"{recipe} does not exist"
    assert lines[1] == readme_test_command()


@pytest.mark.usefixtures("single_thread")
def test_readme_quick_start_runs():
    exec(compile(readme_block("Quick start", "python"), "README.md (Quick start)", "exec"), {})
