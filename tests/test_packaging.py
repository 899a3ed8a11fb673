"""The package declares what it imports: a plain `pip install kvdist` (no extras) must be
enough to import and run every module of `kvdist/`. A dependency that arrives only
through a dev extra (numpy came with transformers) passes every test here and fails for
users, so the imports are checked against `pyproject.toml` itself."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
# Import name -> distribution name, where they differ.
DISTRIBUTION_OF: dict[str, str] = {}


def _third_party_imports(package: Path) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in `package` (also inside
    functions), with the files that import each."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root != "kvdist" and root not in sys.stdlib_module_names:
                    found.setdefault(root, set()).add(str(path.relative_to(REPO)))
    return found


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_every_import_of_the_package_is_a_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"])
    imports = _third_party_imports(REPO / "kvdist")
    assert {"torch", "msgpack", "mpi4py"} <= set(imports)  # the scan finds imports at all
    missing = {
        name: sorted(files)
        for name, files in imports.items()
        if DISTRIBUTION_OF.get(name, name).lower() not in declared
    }
    assert not missing, f"imported by kvdist but not in [project].dependencies: {missing}"


def test_torch_requirement_admits_the_ci_wheel() -> None:
    """CI installs torch 2.13.0 (the CPU wheel) first: the package's own range must admit
    it, or pip would fetch another (multi-GB CUDA) build."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (torch_req,) = [r for r in project["dependencies"] if re.match(r"torch\b", r)]
    bounds = re.findall(r"(>=|<=|<|>|==)\s*([0-9.]+)", torch_req)
    assert bounds, torch_req

    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    ops = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}
    ops |= {">": lambda a, b: a > b, "==": lambda a, b: a == b}
    assert all(ops[op](key("2.13.0"), key(v)) for op, v in bounds), torch_req
