"""The package's shape, read from its source (AST, nothing imported): imports run one way between
the layer folders with no cycle (TYPE_CHECKING and function-local imports included), no module
imports another's private name, each command-line flag is spelled once, and modules, classes and
functions stay small. The checks are functions of a folder, so they are also run on copies with a
planted fault, which they must report."""

import ast
import collections
import os
import re
import shutil

import pytest

import nti_jax

PACKAGE = os.path.dirname(nti_jax.__file__)

# Lowest first. A module may import its own folder and any lower layer; leaf utilities anywhere.
LAYERS = (
    ("nti_jax.errors", "nti_jax.io", "nti_jax.records"),
    ("nti_jax.models",),
    ("nti_jax.loading",),
    ("nti_jax.core",),
    ("nti_jax.pie", "nti_jax.report"),
    ("nti_jax.toy",),
    ("nti_jax.run",),
    ("nti_jax", "nti_jax.testing"),
)
LIMITS = {"module_lines": 450, "function_lines": 65, "class_lines": 250, "positional_params": 8}


def modules(root: str) -> dict:
    """Module name -> parsed source, for every .py file under `root` (the package folder)."""
    out = {}
    base = os.path.dirname(root)
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                name = name[: -len(".__init__")] if name.endswith(".__init__") else name
                with open(path, encoding="utf-8") as fh:
                    out[name] = (path, ast.parse(fh.read()))
    return out


def _resolve(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = name.split(".") if is_pkg else name.split(".")[:-1]
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def imports(mods: dict) -> dict:
    """Module -> the package modules it imports (anywhere in its body), as (target, line)."""
    graph = {}
    for name, (path, tree) in mods.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {(a.name, node.lineno) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.endswith("__init__.py"), node)
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.add((full if full in mods else base, node.lineno))
        graph[name] = {(t, line) for t, line in found if t in mods and t != name}
    return graph


def layer_of(module: str) -> tuple[int, str]:
    """(rank, the layer entry that holds `module`): the longest matching entry."""
    best = None
    for rank, entries in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (rank, entry)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def upward_imports(root: str) -> list[str]:
    """Imports of a higher layer, or of a sibling folder of the same layer (the leaf utilities
    may import each other, as may the package root and `testing`)."""
    bad = []
    for src, targets in imports(modules(root)).items():
        rank, entry = layer_of(src)
        for dst, line in sorted(targets):
            r, e = layer_of(dst)
            if r > rank or (r == rank and e != entry and rank not in (0, len(LAYERS) - 1)):
                bad.append(f"{src}:{line} imports {dst}")
    return bad


def cycles(root: str) -> list[list[str]]:
    """Cycles of the module import graph (each found once, from its smallest module)."""
    graph = {k: sorted({t for t, _ in v}) for k, v in imports(modules(root)).items()}
    found = []

    def walk(path):
        for nxt in graph[path[-1]]:
            if nxt == path[0]:
                found.append(path)
            elif nxt not in path and nxt > path[0]:
                walk(path + [nxt])

    for start in sorted(graph):
        walk([start])
    # The package root imports what it re-exports; its submodules import it implicitly, so an
    # edge to "nti_jax" itself is not a cycle.
    return [c for c in found if "nti_jax" not in c]


def private_imports(root: str) -> list[str]:
    """`from x import _name` where x is another module of the package."""
    bad = []
    for name, (path, tree) in modules(root).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(name, path.endswith("__init__.py"), node).startswith("nti_jax"):
                bad += [f"{name}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
    return bad


def flag_spellings(root: str) -> dict:
    """Each '--flag' string literal -> the places it is written, where written more than once."""
    seen = collections.defaultdict(list)
    for name, (_, tree) in modules(root).items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"--[a-z][a-z0-9-]*", node.value):
                seen[node.value].append(f"{name}:{node.lineno}")
    return {k: v for k, v in seen.items() if len(v) > 1}


def oversized(root: str) -> list[str]:
    """Modules, classes and functions over LIMITS (the toy's training code aside)."""
    bad = []
    for name, (path, tree) in modules(root).items():
        if name.startswith("nti_jax.toy"):
            continue
        with open(path, encoding="utf-8") as fh:
            n = len(fh.read().splitlines())
        if n > LIMITS["module_lines"]:
            bad.append(f"{name}: {n} lines")
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > LIMITS["class_lines"]:
                bad.append(f"{name}.{node.name}: class of {size} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args
                positional = len(args) - (1 if args and args[0].arg in ("self", "cls") else 0)
                if size > LIMITS["function_lines"]:
                    bad.append(f"{name}.{node.name}: function of {size} lines")
                if positional > LIMITS["positional_params"]:
                    bad.append(f"{name}.{node.name}: {positional} positional parameters")
    return bad


def test_imports_run_down_the_layers():
    assert upward_imports(PACKAGE) == []


def test_no_import_cycle():
    assert cycles(PACKAGE) == []


def test_no_private_name_imported_across_modules():
    assert private_imports(PACKAGE) == []


def test_each_flag_is_spelled_once():
    assert flag_spellings(PACKAGE) == {}


def test_modules_classes_and_functions_stay_small():
    assert oversized(PACKAGE) == []


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "nti_jax"
    shutil.copytree(PACKAGE, dst, ignore=shutil.ignore_patterns("__pycache__", "model", "samples"))
    return dst


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def test_the_checks_report_planted_faults(copy):
    _append(copy / "core" / "schedule.py", "\n\ndef _late():\n    from nti_jax.run import driver  # noqa: F401\n")
    assert upward_imports(str(copy)) == [f"nti_jax.core.schedule:{_lines(copy / 'core' / 'schedule.py')} imports nti_jax.run.driver"]
    _append(copy / "core" / "settings.py", "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nti_jax.core import api  # noqa: F401\n")
    assert ["nti_jax.core.api", "nti_jax.core.settings"] in [sorted(set(c) & {"nti_jax.core.api", "nti_jax.core.settings"})
                                                             for c in cycles(str(copy))]
    _append(copy / "run" / "cli.py", "\nfrom nti_jax.core.p2p import _Static  # noqa: F401\n")
    assert any("imports _Static" in b for b in private_imports(str(copy)))
    _append(copy / "run" / "driver.py", "\nEXTRA = '--steps'\n")
    assert "--steps" in flag_spellings(str(copy))
    _append(copy / "core" / "schedule.py", "\n\ndef wide(a, b, c, d, e, f, g, h, i):\n    return a\n")
    assert "nti_jax.core.schedule.wide: 9 positional parameters" in oversized(str(copy))


def _lines(path) -> int:
    """The line of the last `from` import in `path` (the planted one)."""
    with open(path, encoding="utf-8") as f:
        return max(i for i, line in enumerate(f.read().splitlines(), 1) if line.strip().startswith("from "))
