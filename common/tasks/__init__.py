"""The task layer: one module per task (see ``common/tasks/base.py`` for the interface).

This package's ``__init__`` is light (no torch import): it is the registry of the tasks,
with what the config validation, the preflight, the recorder and the reports need to know
of a task without importing its module (``TaskInfo``: metrics and what ``auto`` selects by,
default model, own config keys and their value check, site keys, whether it has classes
and a trainable head, the reply metric names the egress audit lets through). The federated
machinery reads these fields, never a task's name: ``get_task`` imports the task module
only when a run needs it.

Adding a task: its module in this package (a ``TASK`` object satisfying ``Task``) and one
``TaskInfo`` entry in ``_TASKS`` below. ``task_registered`` adds one for the length of a
``with`` block, for tests: a registration lives in one process only (the ServerApp and
each ClientApp worker import this module afresh), so a real task is an entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.tasks.base import SiteReport, Task

# The task of a run config without a `task` key (RunConfig's default), and of the outputs
# of runs from before the key existed (config.json, an export's settings, a bundle).
DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class MetricInfo:
    """One evaluation metric of a task, as results, selection and reports show it."""

    name: str  # key in the task's evaluation dict and in results.jsonl
    label: str  # for tables and plot axes
    higher_is_better: bool
    bounded: bool = True  # in [0, 1]: plotted on a 0-1 axis
    short: str = ""  # the server's progress line ("acc 0.8833"); empty: ``name``


@dataclass(frozen=True)
class CheckFlag:
    """A run-config key that shapes ``fedsft check-data`` for a task: a flag of it."""

    key: str  # dashed, as in the run config; the flag is ``--<key>``
    help: str = ""  # the flag's help; empty: "<task>: the run's `<key>`" and its default
    switch: bool = False  # a boolean key: the flag takes no value and sets it true


@dataclass(frozen=True)
class TaskInfo:
    """What the machinery knows of a task without importing its module."""

    module: str  # the module whose ``TASK`` is the task object
    metrics: tuple[MetricInfo, ...]  # headline first; `loss` is always there
    default_model: str  # the packaged, offline model for an empty `model` (model_source.py)
    # What `selection-metric` = auto selects by: one of ``metrics``; empty: the headline.
    selection_metric: str = ""
    # The task's own run-config keys as one record: "module:Class" of a frozen dataclass
    # in a light module (no torch), a field per key (``train_on`` is `train-on`) with its
    # default, which ``pyproject.toml`` repeats (Flower refuses an override of a key the
    # app's config lacks; a test checks they agree). ``RunConfig`` builds it from the run
    # config as ``task_options`` (``options_class``); set for another task, its keys are
    # refused, naming this task. Empty: the task has no keys of its own.
    options: str = ""
    # Whether ``options`` change what the cached objects hold (the model, the rows, their
    # encoding): then the record is a field of ``ModelSpec`` / ``DataSpec`` /
    # ``EncodeSpec`` and keys their caches (sft: its columns and template); False for a
    # record of loss keys only (classification), which its ``loss_spec`` reads instead.
    options_shape_data: bool = True
    # RunConfig fields only this task reads (classification's, which the data layer and
    # the generic checks read too): set (changed from the default) for another task they
    # are refused, naming this task, rather than ignored. A field may be owned by several
    # tasks; one no task owns is common to all.
    own_keys: tuple[str, ...] = ()
    # Node-config keys (dashed) a site sets for its own file (its column names, ...),
    # read over the run's values (client/local_data.py ``site_columns``).
    site_keys: tuple[str, ...] = ()
    # Run-config keys that shape ``fedsft check-data`` for this task besides `model` and
    # `max-length`: each is a flag of the command (``check_keys`` lists their names); the
    # check reads the flag's value, else (a site key) the node config's, else the
    # default (deployment/cli.py ``site_check_config``).
    check_flags: tuple[CheckFlag, ...] = ()
    # Its rows have classes: an int ``label`` column and class names (the label map, the
    # stratified partitioners, the reports' class-distribution figures).
    # Without them the config refuses what shares out or flips class labels (partitioner
    # dirichlet and pathological, attack label-flip); with them a run whose server reads
    # no data (`dataset` = none) needs `labels` to know the class names.
    has_classes: bool = False
    # Its model has a trainable head of its own over the pretrained body (a classifier's):
    # `method` head trains only it, and FedSA-LoRA needs it shared (the server's model,
    # with no site's B, is otherwise the pretrained one). Without one the config refuses
    # both; ``no_head_reason`` says why the task has none, for that message.
    has_head: bool = False
    no_head_reason: str = ""
    # What to partition by instead of the class labels, for the message refusing
    # dirichlet and pathological (a task without classes); empty: no hint beyond the
    # partitioners that need no labels.
    partition_hint: str = ""
    # A light module (no torch) with ``check_config(cfg: RunConfig) -> None``, raising
    # ``ConfigError`` for a bad value of the task's own keys or a combination only it
    # refuses (``RunConfig`` calls it after its key-ownership and capability checks, on the run's
    # task only); empty: the generic checks are all.
    config_check: str = ""
    # A deployment's run (``fedsft submit``, through ``submit_run_config``, and ``fedsft
    # rehearse``) sets `dataset` = none unless given: the coordinator holds no site's
    # data, and the default (builtin) would have its server evaluate on generated
    # examples instead. Not for a task with classes: its
    # deployments name the classes with `labels`, which keeps the server off `dataset`.
    deploy_without_dataset: bool = False
    # A module of the task's package with a ``check_site`` function (``Task.check_site``'s
    # arguments and report, which the task object's ``check_site`` delegates to) that
    # imports no training stack (torch, transformers): ``fedsft check-data`` runs at every
    # SuperNode start. Empty: the task object's ``check_site`` (``get_site_check``).
    site_check: str = ""
    # The task's own reply metric names, regular expressions (full match) that the
    # site's egress audit lets through besides the machinery's (client/egress_audit.py;
    # a name no pattern matches is refused): in training replies its ``site_metrics``
    # and its ``SiteReport.aggregate_stats`` (all but ``data-rows``, which every report
    # has; a ``data-*`` name must also be one the server's ``site_data_stats`` takes), in
    # evaluation replies what its ``evaluate`` returns beyond ``metrics`` (those pass as
    # ``eval-<name, dashed>`` for every task).
    train_reply_metrics: tuple[str, ...] = ()
    eval_reply_metrics: tuple[str, ...] = ()

    @property
    def check_keys(self) -> tuple[str, ...]:
        """The dashed run-config keys of ``check_flags``."""
        return tuple(flag.key for flag in self.check_flags)


_TASKS: dict[str, TaskInfo] = {
    "classification": TaskInfo(
        module="common.tasks.classification",
        metrics=(
            MetricInfo("accuracy", "accuracy", higher_is_better=True, short="acc"),
            MetricInfo("f1_macro", "macro-F1", higher_is_better=True, short="f1"),
            MetricInfo("loss", "loss", higher_is_better=False, bounded=False),
        ),
        default_model="minilm",
        selection_metric="accuracy",
        options="common.tasks.classification_config:ClassificationOptions",
        options_shape_data=False,  # loss keys only: they must not split the caches
        own_keys=("labels", "text_column", "label_column", "label_case_fold",
                  "classes_per_client"),
        site_keys=("text-column", "label-column"),
        check_flags=(
            CheckFlag("text-column", "default: the node config's, else 'text'"),
            CheckFlag("label-column", "default: the node config's, else 'label'"),
            CheckFlag("labels", "the federation's classes, a,b,c (the run's `labels`)"),
            CheckFlag("label-case-fold", "case-fold string labels (the run's "
                      "`label-case-fold`)", switch=True),
        ),
        has_classes=True,
        has_head=True,
        site_check="common.tasks.classification_check",
        config_check="common.tasks.classification_config",
        train_reply_metrics=(
            r"label-count-\d{1,4}",  # class-weighting-source global
            r"data-rows-read", r"data-label-(count|share)-\d{1,4}", r"data-duplicate-share",
            r"data-short-share", r"data-truncated-share",
        ),
        eval_reply_metrics=(r"eval-recall-(min|\d{1,4})",),  # per-class recall
    ),
    "sft": TaskInfo(
        module="common.tasks.sft",
        metrics=(
            MetricInfo("exact_match", "exact match", higher_is_better=True, short="em"),
            MetricInfo("token_f1", "token F1", higher_is_better=True, short="f1"),
            MetricInfo("loss", "assistant-token loss", higher_is_better=False, bounded=False),
            MetricInfo("perplexity", "perplexity", higher_is_better=False, bounded=False,
                       short="ppl"),
        ),
        default_model="smollm2",
        # Loss, measured every round; exact match only in the rounds that generate
        # (`generate-every`).
        selection_metric="loss",
        options="common.tasks.sft_config:SftOptions",
        site_keys=("chat-format", "messages-column", "instruction-column", "input-column",
                   "output-column", "prompt-column", "response-column"),
        check_flags=tuple(CheckFlag(key) for key in (
            "chat-format", "messages-column", "instruction-column", "input-column",
            "output-column", "prompt-column", "response-column", "system-prompt",
            "chat-template", "train-on", "overflow")),
        no_head_reason="a causal LM's output layer is tied to its frozen embeddings",
        partition_hint="e.g. column:task for the built-in data's task types",
        config_check="common.tasks.sft_config",
        deploy_without_dataset=True,
        train_reply_metrics=(r"data-truncated", r"data-dropped", r"data-median-tokens"),
    ),
}

_V = TypeVar("_V")


class _Column(Mapping[str, _V], Generic[_V]):
    """A read-only, live view of one ``TaskInfo`` field of every registered task."""

    def __init__(self, pick: Callable[[TaskInfo], _V]) -> None:
        self._pick = pick

    def __getitem__(self, task: str) -> _V:
        return self._pick(_TASKS[task])

    def __iter__(self) -> Iterator[str]:
        return iter(_TASKS)

    def __len__(self) -> int:
        return len(_TASKS)


# Every task's metrics, headline first; `loss` is always there.
TASK_METRICS: Mapping[str, tuple[MetricInfo, ...]] = _Column(lambda info: info.metrics)
# The packaged, offline model a task uses when `model` is empty (common/model_source.py).
DEFAULT_MODELS: Mapping[str, str] = _Column(lambda info: info.default_model)


def task_names() -> tuple[str, ...]:
    """The registered tasks, in registry order."""
    return tuple(_TASKS)


def task_info(name: str) -> TaskInfo:
    """The registry entry of task ``name`` (``ValueError`` for an unknown task)."""
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(_TASKS)}")
    return _TASKS[name]


def _options_record(info: TaskInfo) -> type | None:
    if not info.options:
        return None
    module, _, cls = info.options.partition(":")
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def options_class(name: str) -> type | None:
    """The frozen dataclass of task ``name``'s own keys (``TaskInfo.options``, its light
    module imported), or None when it has none (``ValueError`` for an unknown task)."""
    return _options_record(task_info(name))


def task_keys(info: TaskInfo) -> tuple[str, ...]:
    """The keys (snake_case) only the task of ``info`` reads: its ``own_keys`` (RunConfig
    fields), then the fields of its ``options`` record."""
    record = _options_record(info)
    options = tuple(f.name for f in dataclasses.fields(record)) if record else ()
    return (*info.own_keys, *options)


def key_owners(
    keys: Callable[[TaskInfo], tuple[str, ...]] = task_keys,
) -> dict[str, tuple[str, ...]]:
    """Each key of ``keys`` (default: the task-specific keys, ``task_keys``; e.g.
    ``site_keys`` or ``check_keys``) -> the tasks that have it, in registry order (keys of
    the first task first, each task's in its own order)."""
    owners: dict[str, tuple[str, ...]] = {}
    for name, info in _TASKS.items():
        for key in keys(info):
            owners[key] = (*owners.get(key, ()), name)
    return owners


def get_task(name: str) -> Task:
    """The task object for a ``task`` config value (its module imported on first use)."""
    return importlib.import_module(task_info(name).module).TASK  # type: ignore[no-any-return]


def get_site_check(name: str) -> Callable[..., SiteReport]:
    """Task ``name``'s site check, called as ``Task.check_site``: its ``site_check``
    module's ``check_site`` when it has one (the task module and its imports stay
    unloaded), else the task object's (``ValueError`` for an unknown task)."""
    info = task_info(name)
    if info.site_check:
        return importlib.import_module(info.site_check).check_site  # type: ignore[no-any-return]
    return get_task(name).check_site


def get_config_check(name: str) -> Callable[[RunConfig], None] | None:
    """Task ``name``'s check of its own config values (its ``config_check`` module's
    ``check_config``), or None when it has none (``ValueError`` for an unknown task)."""
    info = task_info(name)
    if not info.config_check:
        return None
    return importlib.import_module(info.config_check).check_config  # type: ignore[no-any-return]


def auto_selection_metric(name: str) -> str:
    """What `selection-metric` = auto selects by for task ``name``: its
    ``selection_metric``, else its headline metric."""
    info = task_info(name)
    return info.selection_metric or info.metrics[0].name


def metric_info(task: str, metric: str) -> MetricInfo:
    """The ``MetricInfo`` of ``metric`` in ``task`` (``ValueError`` for an unknown task
    or a metric it does not have)."""
    for info in task_info(task).metrics:
        if info.name == metric:
            return info
    raise ValueError(f"task {task!r} has no metric {metric!r}")


@contextmanager
def task_registered(name: str, info: TaskInfo) -> Iterator[None]:
    """Task ``name`` is registered (``info``) inside the ``with`` block, in this process.

    For tests of the task-agnostic machinery on a task of their own; the registry is as
    before on exit. Refuses a name already registered, metrics without ``loss`` and a
    ``selection_metric`` not among them.
    """
    if name in _TASKS:
        raise ValueError(f"task {name!r} is already registered")
    metrics = {m.name for m in info.metrics}
    if "loss" not in metrics:
        raise ValueError(f"task {name!r}: its metrics must include loss")
    if info.selection_metric and info.selection_metric not in metrics:
        raise ValueError(f"task {name!r}: its selection_metric {info.selection_metric!r} "
                         f"is not one of its metrics ({', '.join(sorted(metrics))})")
    _TASKS[name] = info
    try:
        yield
    finally:
        del _TASKS[name]
