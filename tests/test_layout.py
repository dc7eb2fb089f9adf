"""The import rule of the package, as a contract: imports point one way, down the floors below.

A module of `recurrent_depth` imports only from its own subpackage or from a subpackage on a lower floor (packages
on one floor are independent of each other); the imports form no cycle; no underscore name is imported from
another module; a function-local import is only for an optional dependency (`OPTIONAL`), never for a module of
this package (that would hide an upward dependency).  The top-level `__init__` is the public face and may
re-export from any floor; nothing inside the package imports it.
"""

import ast
import graphlib
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "recurrent_depth"
# Bottom to top.  training sits above evaluation: a run validates its `eval` section against the task kinds.
FLOORS = (("errors",), ("runtime",), ("model", "data"), ("checkpoint", "decoding"),
          ("evaluation", "inspect", "serving"), ("training",), ("cli",))
# Imported inside functions on purpose: extras that may be missing (eval, tpu), TPU-only kernels, and
# matplotlib, whose backend is chosen before pyplot loads.
OPTIONAL = ("reasoning_gym", "lm_eval", "matplotlib", "jax.experimental.pallas", "jax.experimental.topologies")


def _modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the package at `root`."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _imports(path: Path):
    """(target modules, imported names, line, function-local) of each import statement in `path`."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield [alias.name], [], node.lineno, id(node) in local
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [a.name for a in node.names]
            yield [node.module, *(f"{node.module}.{n}" for n in names)], names, node.lineno, id(node) in local


def violations(root: Path = PACKAGE, floors=FLOORS, optional=OPTIONAL) -> list[str]:
    """Every breach of the import rule in the package at `root`, as 'file:line: what'."""
    package = root.name
    floor = {name: i for i, group in enumerate(floors) for name in group}
    modules = _modules(root)
    found, graph = [], {name: set() for name in modules}
    for name, path in modules.items():
        parts = name.split(".")
        own = parts[1] if len(parts) > 1 else None  # None: the top-level face
        where = f"{path.relative_to(root.parent)}"
        if own is not None and own not in floor:
            found.append(f"{where}: subpackage {own!r} is on no floor")
            continue
        for candidates, names, line, is_local in _imports(path):
            targets = [c for c in candidates if c in modules]
            if not targets:  # outside the package
                if is_local and not any(c == o or c.startswith(o + ".") for c in candidates for o in optional):
                    found.append(f"{where}:{line}: function-local import of {candidates[0]} (not an optional "
                                 "dependency)")
                continue
            target = targets[-1] if len(targets) > 1 else targets[0]  # a submodule named in the import, else it
            if own is None:
                continue  # the face re-exports from any floor
            graph[name].add(target)
            if is_local:
                found.append(f"{where}:{line}: function-local import of {target} (import it at the top)")
            private = [n for n in names if n.startswith("_") and f"{candidates[0]}.{n}" not in modules]
            if private and candidates[0] != name:
                found.append(f"{where}:{line}: imports private name(s) {private} from {candidates[0]}")
            theirs = target.split(".")[1] if "." in target else None
            if theirs is None:
                found.append(f"{where}:{line}: imports the top-level face {package} (import the module)")
            elif theirs != own and floor.get(theirs, -1) >= floor[own]:
                how = "a sibling on its floor" if floor.get(theirs) == floor[own] else "a higher floor"
                found.append(f"{where}:{line}: {own} imports {target}, {how}")
    # Package faces are lazy (they import nothing when loaded), so only module-to-module edges can cycle.
    graph = {m: {t for t in ts if not modules[t].name == "__init__.py"} for m, ts in graph.items()
             if modules[m].name != "__init__.py"}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        found.append(f"import cycle: {' -> '.join(err.args[1])}")
    return found


def test_the_package_follows_the_import_rule():
    assert violations() == []


def test_every_subpackage_has_a_floor_and_a_face():
    subpackages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert subpackages <= {name for group in FLOORS for name in group}
    assert all((PACKAGE / name / "__init__.py").exists() for name in subpackages)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def clean(tmp_path):
    """A small package that follows the rule: low <- high, each with a face."""
    return _write(tmp_path / "pkg", {
        "__init__.py": "from pkg.high.b import B\n",
        "low/__init__.py": "", "low/a.py": "import json\n\nA = 1\n_HIDDEN = 2\n",
        "high/__init__.py": "", "high/b.py": "from pkg.low.a import A\n\nB = A\n",
    })


FLOORS_AB = (("low",), ("high",))


@pytest.mark.parametrize("path, text, message", [
    ("low/a.py", "from pkg.high.b import B\n", "low imports pkg.high.b, a higher floor"),
    ("low/c.py", "from pkg.low.d import D\nC = 1\n", "import cycle"),
    ("high/c.py", "from pkg.low.a import _HIDDEN\n", "imports private name(s) ['_HIDDEN']"),
    ("high/c.py", "def f():\n    from pkg.low.a import A\n", "function-local import of pkg.low.a"),
    ("high/c.py", "def f():\n    import yaml\n", "function-local import of yaml (not an optional dependency)"),
    ("high/c.py", "from pkg import B\n", "imports the top-level face"),
    ("side/c.py", "X = 1\n", "subpackage 'side' is on no floor"),
])
def test_the_checker_catches_each_breach(clean, path, text, message):
    assert violations(clean, FLOORS_AB, ()) == []
    _write(clean, {path: text, "low/d.py": "from pkg.low.c import C\nD = 1\n"} if "cycle" in message else
           {path: text})
    found = violations(clean, FLOORS_AB, ())
    assert any(message in v for v in found), found


def test_siblings_on_one_floor_are_independent(tmp_path):
    root = _write(tmp_path / "pkg", {"__init__.py": "", "a/__init__.py": "", "a/x.py": "from pkg.b.y import Y\n",
                                     "b/__init__.py": "", "b/y.py": "Y = 1\n"})
    assert any("a sibling on its floor" in v for v in violations(root, (("a", "b"),), ()))
