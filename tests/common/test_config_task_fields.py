"""The config's task-specific rules read the task's registry entry (``TaskInfo``).

Each test registers a made-up third task for its own length (``task_registered``) and
shows that a field of its entry, not its name, decides what ``RunConfig`` refuses.
"""

from __future__ import annotations

import dataclasses

import pytest

from common.config import ConfigError, RunConfig
from common.tasks import (
    MetricInfo,
    TaskInfo,
    auto_selection_metric,
    get_config_check,
    get_task,
    task_info,
    task_names,
    task_registered,
)

# A task with neither classes nor a head, no own keys and no config check.
BARE = TaskInfo(
    module=__name__,
    metrics=(MetricInfo("bleu", "BLEU", higher_is_better=True),
             MetricInfo("loss", "loss", higher_is_better=False, bounded=False)),
    default_model="bare-model",
)


def check_config(cfg: RunConfig) -> None:
    """The made-up task's own check (``config_check`` = this module): max-length <= 32."""
    if cfg.max_length > 32:
        raise ConfigError(f"`max-length` must be <= 32 for task {cfg.task}, got "
                          f"{cfg.max_length}")


def test_a_task_without_classes_refuses_what_shares_out_or_flips_labels():
    with task_registered("bare", BARE):
        assert RunConfig(task="bare", partitioner="column:site").partitioner == "column:site"
        with pytest.raises(ConfigError, match=(
                r"`partitioner` 'dirichlet' shares out class labels, which task bare has "
                r"none of: use iid or column:<name>$")):
            RunConfig(task="bare", partitioner="dirichlet")
        with pytest.raises(ConfigError, match="label-flip needs class labels; task bare"):
            RunConfig(task="bare", attack="label-flip", attack_fraction=0.5)
        # Without classes the server needs no `labels` to read no data.
        assert not RunConfig(task="bare", dataset="none").server_reads_dataset
    hinted = dataclasses.replace(BARE, partition_hint="e.g. column:speaker")
    with task_registered("bare", hinted), pytest.raises(
            ConfigError, match=r"use iid or column:<name> \(e.g. column:speaker\)"):
        RunConfig(task="bare", partitioner="pathological")


def test_a_task_with_classes_needs_labels_when_the_server_reads_no_data():
    with task_registered("tagging", dataclasses.replace(BARE, has_classes=True)):
        assert RunConfig(task="tagging", partitioner="dirichlet").partitioner == "dirichlet"
        with pytest.raises(ConfigError, match="needs `labels` for task tagging"):
            RunConfig(task="tagging", dataset="none")


def test_a_task_without_a_head_refuses_method_head_and_fedsa_naming_why():
    headless = dataclasses.replace(BARE, no_head_reason="its decoder ties the output layer")
    with task_registered("bare", headless):
        with pytest.raises(ConfigError, match=(
                r"`method` head trains a classification head, which task bare has none of "
                r"\(its decoder ties the output layer\): use lora, full or freeze")):
            RunConfig(task="bare", method="head")
        # The tasks with a head are listed from the registry.
        with pytest.raises(ConfigError, match=(
                r"fedsa needs a task with a shared head \(classification\), got task "
                r"'bare'")):
            RunConfig(task="bare", lora_aggregation="fedsa")
    with task_registered("headed", dataclasses.replace(BARE, has_head=True)):
        assert RunConfig(task="headed", method="head").method == "head"
        assert RunConfig(task="headed", lora_aggregation="fedsa").lora_aggregation == "fedsa"
        with pytest.raises(ConfigError, match=r"shared head \(classification, headed\)"):
            RunConfig(task="sft", lora_aggregation="fedsa")


def test_the_tasks_own_config_check_runs_for_that_task_only():
    with task_registered("bare", dataclasses.replace(BARE, config_check=__name__)):
        assert get_config_check("bare") is check_config
        assert RunConfig(task="bare", max_length=32).max_length == 32
        with pytest.raises(ConfigError, match="`max-length` must be <= 32 for task bare"):
            RunConfig(task="bare", max_length=64)
        assert RunConfig(max_length=64).max_length == 64  # classification: not its check
    with task_registered("bare", BARE):
        assert get_config_check("bare") is None
        assert RunConfig(task="bare", max_length=64).max_length == 64


def test_auto_selects_by_the_entrys_selection_metric_else_the_headline():
    with task_registered("bare", BARE):
        assert RunConfig(task="bare").selection_metric_name == "bleu"
    with task_registered("bare", dataclasses.replace(BARE, selection_metric="loss")):
        assert RunConfig(task="bare").selection_metric_name == auto_selection_metric(
            "bare") == "loss"
    with pytest.raises(ValueError, match="selection_metric 'accuracy' is not one of its"), \
            task_registered("bare", dataclasses.replace(BARE, selection_metric="accuracy")):
        pass


def test_the_shipped_entries_are_consistent():
    # Each selection metric is one of the task's metrics, each config check loads, a
    # headless task says why, and no task with classes has its deployments drop `dataset`
    # (`dataset` = none without `labels` is refused for it).
    for name in task_names():
        info = task_info(name)
        assert auto_selection_metric(name) in {m.name for m in info.metrics}
        if info.config_check:
            assert callable(get_config_check(name))
        assert info.has_head or info.no_head_reason, name
        assert not (info.deploy_without_dataset and info.has_classes), name
        # A task with classes can be label-flipped (ClassTask), which the client calls.
        assert callable(getattr(get_task(name), "flip_labels", None)) or not info.has_classes
    # check-data has one flag per key: a key two tasks check must be the same flag.
    flags: dict[str, object] = {}
    for name in task_names():
        for flag in task_info(name).check_flags:
            assert flags.setdefault(flag.key, flag) == flag, (name, flag.key)
