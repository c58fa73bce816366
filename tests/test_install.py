"""Every dependency the install promises imports: pyproject.toml's dependencies, plus the extras `make setup`
installs (the Makefile's `pip install -e '.[...]'`). The tests of those libraries import them plainly, so a
broken install fails the suite; this test says which distribution is missing."""
from __future__ import annotations

import importlib
import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Distributions whose import name is not their name with dashes as underscores.
IMPORT_NAMES = {"llama-cpp-python": "llama_cpp", "pyyaml": "yaml", "protobuf": "google.protobuf", "pytest-xdist": "xdist"}


def installed_extras() -> list[str]:
    """The extras `make setup` installs, read from its pip line."""
    found = re.findall(r"pip install -e '\.\[([^\]]*)\]'", (ROOT / "Makefile").read_text())
    assert len(found) == 1, "the Makefile should install the project once, as -e '.[extras]'"
    return [extra.strip() for extra in found[0].split(",")]


def required() -> list[str]:
    """Distribution names (no extras, no versions, no markers), in pyproject.toml's order."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in installed_extras():
        requirements += project["optional-dependencies"][extra]
    return [re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r).group(0) for r in requirements]


def import_name(distribution: str) -> str:
    name = re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503 normalized
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def test_the_required_list_is_read_from_pyproject():
    assert {"torch", "llama-cpp-python", "bitsandbytes", "psycopg", "pyyaml", "optuna-dashboard", "pytest"} \
        <= set(required())  # the extras' too, and psycopg[binary] read as psycopg
    names = ("llama-cpp-python", "psycopg", "PyYAML", "optuna-dashboard", "compressed-tensors", "protobuf")
    assert [import_name(n) for n in names] \
        == ["llama_cpp", "psycopg", "yaml", "optuna_dashboard", "compressed_tensors", "google.protobuf"]


@pytest.mark.parametrize("distribution", required())
def test_a_required_dependency_is_installed_and_imports(distribution):
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"required dependency {distribution} is not installed (run `make setup`)", pytrace=False)
    try:
        importlib.import_module(import_name(distribution))
    except Exception as exc:  # an install that is there but broken (a missing shared library, a bad build)
        pytest.fail(f"required dependency {distribution} is installed but `import {import_name(distribution)}` "
                    f"fails: {type(exc).__name__}: {exc} (another import name? add it to IMPORT_NAMES)", pytrace=False)
