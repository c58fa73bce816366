"""No import circles: the project's import graph, read from its source (imports run when a module loads: at
its top level, outside `if TYPE_CHECKING:`; an import inside a function runs later and is not an edge), has no
strongly connected component of more than one module. A circle works only by import-order luck (a module
imported half-initialised); isort's order, or a user importing one module first, breaks it."""
from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "search_spaces", "targets", "evaluators")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    found = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    found["cli"] = ROOT / "cli.py"
    return found


def load_time_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports when it loads: `import a.b` and `from a.b import c` tie it to a.b, to
    a.b.c where c is a module, and to every package above a.b that is not also above the importing module
    (Python runs those packages' __init__ first; the importer's own packages are already being initialised)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known)
            if isinstance(node, (ast.ClassDef, ast.If, ast.Try, ast.With)):
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    edges = set()
    for target in out:
        parts = target.split(".")
        edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in known and p not in own)
    edges.discard(name)
    return edges


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: load_time_imports(path, name, known) for name, path in modules.items()}


def test_the_project_has_no_import_circle():
    assert circles(import_graph()) == []


def test_the_check_finds_a_circle_and_ignores_type_checking_and_function_imports(tmp_path):
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nimport planner.errors\nif TYPE_CHECKING:\n"
                      "    import planner.study\ndef f():\n    import planner.trial\n")
    assert load_time_imports(source, "m", {"planner", "planner.errors", "planner.study", "planner.trial"}) == \
        {"planner", "planner.errors"}


@pytest.mark.parametrize("method", [point.name for point in entry_points(group="planner.quantization_methods")])
def test_a_method_a_target_brings_is_in_the_space_whatever_was_imported_first(method):
    """The quantization space's methods do not depend on whether `targets` was imported: a fresh interpreter
    that imports only search_spaces knows every method an entry point brings (llama-quant, a plug-in's)."""
    import subprocess
    import sys

    probe = "from search_spaces.quantization import QUANT_METHODS; print(sorted(QUANT_METHODS))"
    alone = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    with_targets = subprocess.run([sys.executable, "-c", "import targets; " + probe], cwd=ROOT, capture_output=True,
                                  text=True, check=True)
    assert alone.stdout == with_targets.stdout and method in alone.stdout


FRESH_IMPORTS = """
import importlib, sys
sys.path.insert(0, ".")
import torch, transformers, numpy, optuna  # third-party modules stay loaded between the project's imports
from tests.test_import_graph import project_modules
failed = []
for name in sorted(project_modules()):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("planner", "search_spaces", "targets", "evaluators", "cli")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print("\\n".join(failed))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each of the project's modules imported before any other of them (the project's modules dropped between
    imports, third-party ones kept for speed): the order a user or a tool may choose."""
    import subprocess
    import sys

    found = subprocess.run([sys.executable, "-c", FRESH_IMPORTS], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=600)
    assert found.stdout.strip() == ""
