"""The product packages must not import the test suite, which is not installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("simulations", "server", "client", "common", "deployment")


def _imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names, wherever it sits (inside
    functions and ``if TYPE_CHECKING:`` too); ``from a import b`` names ``a`` and
    ``a.b``, which may be a module."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_scan_sees_imports_inside_functions():
    source = ("def main():\n    from tests.helpers import x\n    import tests\n"
              "if TYPE_CHECKING:\n    from common.tasks import sft\n")
    assert _imported_modules(source) == {"tests.helpers", "tests.helpers.x", "tests",
                                         "common.tasks", "common.tasks.sft"}


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
    # Classification's table rules, site check, built-in data and losses are task
    # modules too, as sft's chat data and built-in data are.
    assert {"common.tasks.classification", "common.tasks.classification_data",
            "common.tasks.classification_check", "common.tasks.classification_builtin_data",
            "common.tasks.classification_losses", "common.tasks.sft",
            "common.tasks.sft_chat_data", "common.tasks.sft_builtin_data"} <= tasks
    files = [path for package in PRODUCT for path in sorted((ROOT / package).rglob("*.py"))
             if (ROOT / "common" / "tasks") not in path.parents]
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in files
        for name in sorted(_imported_modules(path.read_text(encoding="utf-8")) & tasks)
    ]
    assert offenders == []


def test_the_task_interface_imports_no_task_and_no_data_module():
    # common/data.py and every task module import the task layer; the interface
    # (get_task, the Task protocol) importing them back, even for types only, is the
    # knot that had common.config -> common.tasks -> base -> common.data_check ->
    # common.data -> common.tasks.
    tasks = _task_modules()
    for interface in ("__init__.py", "base.py"):
        source = (ROOT / "common" / "tasks" / interface).read_text(encoding="utf-8")
        imported = _imported_modules(source)
        assert imported & tasks == set(), interface
        assert {name for name in imported if name.startswith("common.data")} == set(), \
            interface


def test_the_config_data_and_interface_load_no_task_module():
    # In a fresh interpreter: what the config validation, the data layer and the
    # interface load is the machinery only; a task module loads on get_task.
    code = ("import sys, common.config, common.data, common.tasks.base; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('common.'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    loaded = set(result.stdout.split())
    assert {"common.config", "common.data", "common.tasks.base"} <= loaded
    assert loaded & (_task_modules() | {"common.data_check"}) == set()


def test_check_data_loads_no_training_stack(tmp_path):
    # Every generated start-supernode.sh runs `fedsft check-data` (deployment/consortium.py)
    # before its SuperNode starts: the classification check reads and cleans a table,
    # and torch, transformers, sklearn and datasets are seconds of imports it does not use.
    data = tmp_path / "site.csv"
    data.write_text("text,label\n" + "".join(f"review number {i} here,{'ab'[i % 2]}\n"
                                             for i in range(6)), encoding="utf-8")
    heavy = ("torch", "transformers", "sklearn", "datasets")
    code = ("import sys; from deployment.cli import main; "
            f"code = main(['check-data', '--task', 'classification', '--site-config', "
            f"'data-path={data}']); "
            f"print('exit', code, 'loaded', *sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    assert "rows read: 6" in result.stdout  # the check ran on the file
    assert result.stdout.splitlines()[-1] == "exit 0 loaded"
