"""The import contract of the layers, export -> tokdrop -> kernels, read from the source with ast, so
imports inside functions count too:

- a module imports tokdrop only from its own layer or the layers below it: kernels/ (tokdrop.kernels)
  nothing else of tokdrop, tokdrop/ never tokdrop.export;
- no library module imports the benchmarks (perf/) or the tests;
- no module takes another module's private names (`from x import _name`).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# Bottom to top: a layer may import itself and the layers before it.
LAYERS = ["tokdrop.kernels", "tokdrop", "tokdrop.export"]
# The import names that the scripts and the tests have on sys.path: their folders and their modules.
SCRIPTS_AND_TESTS = {"perf", "tests"} | {
    path.stem for folder in ("perf", "tests") for path in (REPO / folder).rglob("*.py")
}


def library_modules() -> dict[str, Path]:
    """{module name: file} of every module the install maps from the checkout (pyproject package-dir)."""
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert sorted(package_dirs) == sorted(LAYERS), "a package was added or renamed: place it in LAYERS"
    modules = {}
    for package, folder in package_dirs.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


MODULES = library_modules()


# Violations still in the tree, each to be fixed; one that no longer occurs fails the test, so this
# list only shrinks.
def layer(module: str) -> str:
    """The layer of a tokdrop module: the longest layer name that prefixes it."""
    return max((name for name in LAYERS if module == name or module.startswith(name + ".")), key=len)


def imports(module: str, source: str, is_package: bool = False):
    """(line, imported module, imported name or None) for every import in the source, including
    importlib.import_module("...") of a constant name; `from package import name` where the name is
    a module counts as importing that module."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (node.lineno, submodule, None) if submodule in MODULES else (node.lineno, base, alias.name)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value, None


def violations(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, what is wrong) for every import that breaks the contract."""
    found = []
    for line, target, name in imports(module, source, is_package):
        if target == "tokdrop" or target.startswith("tokdrop."):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
                found.append((line, f"imports {target}, but {layer(module)} must not import {layer(target)}"))
            if name is not None and name.startswith("_") and not name.endswith("__") and target != module:
                found.append((line, f"imports the private name {name} of {target}"))
        if target.partition(".")[0] in SCRIPTS_AND_TESTS:
            found.append((line, f"imports {target}, but library code must not import perf/ or tests/"))
    return found


def test_every_module_imports_downwards_only_and_no_private_names():
    assert {"tokdrop", "tokdrop.kernels", "tokdrop.export", "tokdrop.layers"} <= MODULES.keys()
    found = {
        (str(path.relative_to(REPO)), line, what)
        for module, path in sorted(MODULES.items())
        for line, what in violations(module, path.read_text(), path.name == "__init__.py")
    }
    wrong = sorted(f"{where}:{line}: {what}" for where, line, what in found)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "module, source",
    [
        ("tokdrop.kernels.op", "import tokdrop.layers"),
        ("tokdrop.kernels.op", "from .. import model"),
        ("tokdrop.kernels.op", "def late():\n    from tokdrop import BertConfig"),
        ("tokdrop.kernels.op", "from tests.interpreter_bounds import checked_memory"),
        ("tokdrop.cli", "def late():\n    from tokdrop.export import common"),
        ("tokdrop.cli", "from .export import to_onnx"),
        ("tokdrop.cli", "import importlib\nimportlib.import_module('tokdrop.export.cli')"),
        ("tokdrop.demo", "from provenance import git_commit"),
        ("tokdrop.export.cli", "from tokdrop.config import _private"),
    ],
)
def test_a_wrong_import_is_reported(module, source):
    assert len(violations(module, source)) == 1


@pytest.mark.parametrize(
    "module, source",
    [
        ("tokdrop.kernels.op", "from .validate import check_lengths"),
        ("tokdrop.kernels.op", "import tokdrop.kernels.rows"),
        ("tokdrop.layers", "from .kernels import attention"),
        ("tokdrop.export.cli", "from tokdrop.config import BertConfig\nfrom tokdrop import __version__"),
    ],
)
def test_a_right_import_is_accepted(module, source):
    assert violations(module, source) == []
