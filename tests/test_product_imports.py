"""The product packages must not import the test suite, which is not installed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("simulations", "server", "client", "common", "deployment")


def _imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, wherever it sits."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_scan_sees_imports_inside_functions():
    source = "def main():\n    from tests.helpers import x\n    import tests\n"
    assert _imported_modules(source) == {"tests.helpers", "tests"}


def test_no_product_module_imports_tests():
    files = [path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50  # the scan found the sources
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in sorted(_imported_modules(path.read_text(encoding="utf-8")))
        if name == "tests" or name.startswith("tests.")
    ]
    assert offenders == []


def _task_modules() -> set[str]:
    """The task implementations: every module of common/tasks/ but the interface."""
    folder = ROOT / "common" / "tasks"
    return {f"common.tasks.{path.stem}" for path in folder.glob("*.py")
            if path.stem not in ("__init__", "base")}


def test_no_module_outside_the_task_layer_imports_a_task():
    # The federated machinery reaches a task only through common.tasks.get_task and the
    # interface in common/tasks/base.py, so adding a task is one module in common/tasks/.
    tasks = _task_modules()
    assert "common.tasks.classification" in tasks
    files = [path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))
             if (ROOT / "common" / "tasks") not in path.parents]
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in sorted(_imported_modules(path.read_text(encoding="utf-8")) & tasks)
    ]
    assert offenders == []
