"""The task layer: one module per task (see ``common/tasks/base.py`` for the interface).

This package's ``__init__`` is light (no torch import): the config validation and the
preflight read ``TASK_METRICS`` to check names; ``get_task`` imports the task module
only when a run needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.tasks.base import Task


@dataclass(frozen=True)
class MetricInfo:
    """One evaluation metric of a task, as results, selection and reports show it."""

    name: str  # key in the task's evaluation dict and in results.jsonl
    label: str  # for tables and plot axes
    higher_is_better: bool
    bounded: bool = True  # in [0, 1]: plotted on a 0-1 axis


# Every task's metrics, headline first; `loss` is always there.
TASK_METRICS: dict[str, tuple[MetricInfo, ...]] = {
    "classification": (
        MetricInfo("accuracy", "accuracy", higher_is_better=True),
        MetricInfo("f1_macro", "macro-F1", higher_is_better=True),
        MetricInfo("loss", "loss", higher_is_better=False, bounded=False),
    ),
    "sft": (
        MetricInfo("exact_match", "exact match", higher_is_better=True),
        MetricInfo("token_f1", "token F1", higher_is_better=True),
        MetricInfo("loss", "assistant-token loss", higher_is_better=False, bounded=False),
        MetricInfo("perplexity", "perplexity", higher_is_better=False, bounded=False),
    ),
}
TASK_NAMES = tuple(TASK_METRICS)
# The packaged, offline model a task uses when `model` is empty (common/model_source.py).
DEFAULT_MODELS = {"classification": "minilm", "sft": "smollm2"}
_MODULES = {"classification": "common.tasks.classification", "sft": "common.tasks.sft"}


def get_task(name: str) -> Task:
    """The task object for a ``task`` config value (its module imported on first use)."""
    if name not in _MODULES:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}")
    return importlib.import_module(_MODULES[name]).TASK  # type: ignore[no-any-return]


def metric_info(task: str, metric: str) -> MetricInfo:
    """The ``MetricInfo`` of ``metric`` in ``task``."""
    for info in TASK_METRICS[task]:
        if info.name == metric:
            return info
    raise ValueError(f"task {task!r} has no metric {metric!r}")
