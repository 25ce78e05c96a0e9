"""The federated machinery never names a task: what differs by task is its registry entry.

Issue #11: config, exchanged state, strategies, encodings, secure aggregation, DP,
validation, resume and outputs must not know which task runs, so adding a task is a
``TaskInfo`` and a module in common/tasks/, not edits here. The scan below fails on a
string literal equal to a registered task name (``"sft"``, ``"classification"``) in those
modules; they read ``common.tasks.task_info(cfg.task)`` fields instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

from common.tasks import task_names

ROOT = Path(__file__).resolve().parents[1]
# The machinery, and the outputs' readers that fall back to the default task.
SCANNED = (
    "common/*.py", "server/*.py", "client/*.py", "deployment/export.py",
    "deployment/predict.py", "deployment/consortium.py", "simulations/report.py",
    "simulations/__main__.py",
)
# "path: literal" -> why it cannot go; empty: none needed today.
ALLOWED: dict[str, str] = {}


def _task_literals(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, value) of each string constant of ``source`` equal to one of ``names``
    (f-string parts too; comments are not constants)."""
    return [(node.lineno, node.value) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and node.value in names]


def test_the_scan_finds_a_task_name_in_code_not_in_comments_or_longer_text():
    source = ('# task "sft"\nx = "sft"\ny = f"task {t}: sft has none"\n'
              'if cfg.task == "classification":\n    pass\n')
    assert _task_literals(source, {"sft", "classification"}) == [
        (2, "sft"), (4, "classification")]


def test_the_machinery_names_no_task():
    names = set(task_names())
    files = sorted({path for pattern in SCANNED for path in ROOT.glob(pattern)})
    assert len(files) > 25  # the globs found the sources
    found = [f"{path.relative_to(ROOT)}:{line}: {value!r}"
             for path in files
             for line, value in _task_literals(path.read_text(encoding="utf-8"), names)
             if f"{path.relative_to(ROOT)}: {value}" not in ALLOWED]
    assert found == [], ("branch on a TaskInfo field (common/tasks/__init__.py), or use "
                         "DEFAULT_TASK, instead of naming a task")
