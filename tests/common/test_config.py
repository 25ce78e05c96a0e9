import math
import re
import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from common.tasks import task_names

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _declared() -> dict:
    """The run-config keys and defaults pyproject.toml declares."""
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_equal_the_dataclass_defaults():
    # Flower refuses an override of a key the app's config lacks: every task's own keys
    # (its options record) are there too, at the record's defaults.
    declared = _declared()
    every_task = {key: value for name in task_names()
                  for key, value in RunConfig(task=name).to_flower().items()}
    assert declared == {**every_task, "task": RunConfig().task}
    assert RunConfig.from_flower(declared) == RunConfig()
    assert RunConfig.from_flower({**declared, "task": "sft"}) == RunConfig(task="sft")


def _readme_key_table() -> list[tuple[str, str]]:
    """(key, default) of every row of the README's run-config key table."""
    readme = (PYPROJECT.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Run-config keys", 1)[1].split("| key | default | meaning |", 1)[1]
    pairs = []
    for line in table.lstrip("\n").split("\n\n", 1)[0].splitlines()[1:]:  # to a blank line
        keys_cell, default_cell = (c.strip() for c in line.strip("| ").split(" | ")[:2])
        keys = re.findall(r"`([a-z0-9-]+)`", keys_cell)
        # A row of several keys lists their defaults in the same order, comma separated.
        defaults = default_cell.split(", ") if len(keys) > 1 else [default_cell]
        assert len(defaults) == len(keys), line
        pairs += zip(keys, (d.strip("`") for d in defaults), strict=True)
    return pairs


def test_the_readme_key_table_lists_every_key_with_its_default():
    # The table is what users read: a default changed in the code must change there too.
    declared = _declared()
    table = _readme_key_table()
    assert sorted(k for k, _ in table) == sorted(declared)
    for key, shown in table:
        value = declared[key]
        if isinstance(value, bool):
            assert shown == str(value).lower(), key
        elif isinstance(value, int | float):
            assert float(shown) == value, (key, shown, value)
        else:
            assert shown == (value or '""'), (key, shown, value)


def test_dashed_keys_map_to_fields_and_ints_become_floats():
    cfg = RunConfig.from_flower({"learning-rate": 1, "num-server-rounds": 3, "method": "full"})
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert (cfg.num_server_rounds, cfg.method) == (3, "full")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning-rate": -1}, "`learning-rate` must be > 0, got -1.0"),
        ({"learning-rate": math.nan}, "`learning-rate` must be a finite number"),
        ({"learning-rate": "fast"}, "`learning-rate` must be a number, got 'fast'"),
        ({"batch-size": 1.5}, "`batch-size` must be an integer, got 1.5"),
        ({"batch-size": 0}, "`batch-size` must be >= 1, got 0"),
        ({"method": "prefix"}, "`method` must be one of lora, full, head, freeze, got 'prefix'"),
        ({"strategy": "fedsgd"}, "`strategy` must be one of"),
        ({"partitioner": "random"}, "column:<name>, got 'random'"),
        ({"fraction-train": 0}, "`fraction-train` must be > 0"),
        ({"fraction-evaluate": 1.5}, "`fraction-evaluate` must be <= 1"),
        ({"trim-fraction": 0.5}, "`trim-fraction` must be < 0.5"),
        ({"device": "tpu"}, "`device` must be one of auto, cpu, cuda"),
        ({"text-column": "x", "label-column": "x"}, "must differ"),
        ({"task": "regression"}, "`task` must be one of classification, sft, got 'regression'"),
        ({"task": "sft", "skew-loss": "logit-adjusted"},
         "`skew-loss`: only for task classification"),
        ({"task": "sft", "label-column": "y"}, "`label-column`: only for task classification"),
        ({"train-on": "all"}, "`train-on`: only for task sft"),
        ({"gradient-checkpointing": True, "dp-sgd-noise-multiplier": 1.0},
         "`gradient-checkpointing` and DP-SGD do not combine"),
        ({"task": "sft", "partitioner": "dirichlet"}, "shares out class labels"),
        ({"task": "sft", "train-on": "prompt"}, "`train-on` must be one of assistant, all"),
        ({"task": "sft", "overflow": "wrap"}, "`overflow` must be one of truncate, drop"),
        ({"task": "sft", "chat-format": "chatml"}, "`chat-format` must be one of auto"),
        ({"eval-fraction": 0}, "`eval-fraction` must be > 0 when no `eval-dataset`"),
        ({"min-nodes": 0}, "`min-nodes` must be >= 1"),
        ({"lerning-rate": 0.1}, "unknown run-config key(s) 'lerning-rate'"),
        ({"dataset": 3}, "`dataset` must be a string, got 3"),
        ({"secure-aggregation": True, "strategy": "krum"},
         "`strategy` 'krum' needs them (robust aggregation)"),
        ({"secure-aggregation": True, "update-encoding": "int8"}, "quantizes updates itself"),
        ({"secure-aggregation": True, "dp-noise-multiplier": 1.0},
         "DP needs `dp-side`=client and `dp-clipping`=fixed"),
        ({"secure-aggregation": True, "max-update-norm": 5.0},
         "`max-update-norm` needs each client's update"),
        ({"secure-aggregation": "yes"}, "`secure-aggregation` must be true or false"),
        ({"secagg-threshold": 0}, "`secagg-threshold` must be > 0"),
        ({"class-weighting": "balanced"}, "`class-weighting` must be one of none, "
         "inverse-frequency, effective-number, got 'balanced'"),
        ({"class-weighting-source": "server"}, "`class-weighting-source` must be one of"),
        ({"class-weighting-beta": 1.0}, "`class-weighting-beta` must be < 1"),
        ({"focal-gamma": -1}, "`focal-gamma` must be >= 0"),
        ({"augment": "synonyms"}, "`augment` must be one of none, token-dropout"),
        ({"augment-rate": 0}, "`augment-rate` must be > 0"),
        ({"class-weighting": "inverse-frequency", "skew-loss": "logit-adjusted"},
         "together they correct twice"),
        ({"class-weighting": "effective-number", "dp-sgd-noise-multiplier": 1.0},
         "outside the privacy accounting; set class-weighting=none"),
        ({"task": "sft", "class-weighting": "inverse-frequency"},
         "`class-weighting`: only for task classification"),
        ({"task": "sft", "augment": "both"}, "`augment`: only for task classification"),
        ({"task": "sft", "focal-gamma": 2.0}, "`focal-gamma`: only for task classification"),
        ({"label-case-fold": "yes"}, "`label-case-fold` must be true or false, got 'yes'"),
        ({"labels": "Pos, pos", "label-case-fold": True},
         "`labels` must name at least 2 distinct classes, got 'Pos, pos'"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_flower(overrides)
    assert message in str(excinfo.value)


def test_config_is_frozen_and_replace_validates():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(ConfigError):
        cfg.replace(batch_size=0)


def test_derived_views():
    cfg = RunConfig(partitioner="column:site", lora_target_modules=" query, value ,")
    assert cfg.partition_column == "site"
    assert cfg.target_modules == ["query", "value"]
    assert RunConfig().target_modules is None and RunConfig().partition_column is None


def test_labels_are_stripped_and_case_folded_only_when_asked():
    assert RunConfig(labels=" Neg ,POS,").label_list == ["Neg", "POS"]
    assert RunConfig(labels=" Neg ,POS,", label_case_fold=True).label_list == ["neg", "pos"]
    with pytest.raises(ConfigError, match="`label-case-fold` must be true or false, got 1"):
        RunConfig(label_case_fold=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"select-model": "first"}, "`select-model` must be one of best, last, got 'first'"),
        ({"selection-metric": "f1-macro"},
         "`selection-metric` must be auto or a metric of task 'classification' (accuracy, "
         "f1_macro, loss), got 'f1-macro'"),
        ({"task": "sft", "selection-metric": "accuracy"},
         "`selection-metric` must be auto or a metric of task 'sft' (exact_match, token_f1, "
         "loss, perplexity), got 'accuracy'"),
        ({"early-stopping-patience": -1}, "`early-stopping-patience` must be >= 0, got -1"),
        ({"early-stopping-patience": 1.5}, "`early-stopping-patience` must be an integer"),
        ({"early-stopping-min-delta": -0.1}, "`early-stopping-min-delta` must be >= 0"),
        ({"validation-fraction": 0.5}, "`validation-fraction` must be < 0.5, got 0.5"),
        ({"validation-fraction": -0.1}, "`validation-fraction` must be >= 0"),
        ({"validation-fraction": 0.1, "labels": "neg,pos"},
         "with `labels` set the server never reads `dataset`"),
        ({"early-stopping-patience": 2, "labels": "neg,pos"},
         "`early-stopping-patience` > 0 needs evaluation data on the server"),
        # `dataset` none (the data is only at the sites), either task.
        ({"task": "sft", "dataset": "none", "validation-fraction": 0.1},
         'with `dataset` = "none" the server never reads `dataset`'),
        ({"task": "sft", "dataset": "none", "early-stopping-patience": 2},
         '`early-stopping-patience` > 0 needs evaluation data on the server, but with '
         '`dataset` = "none" and no `eval-dataset` it has none'),
        ({"task": "sft", "dataset": "none", "selection-metric": "exact_match"},
         "`selection-metric` 'exact_match' is measured on the server's evaluation data, "
         'but with `dataset` = "none" and no `eval-dataset` it has none'),
        ({"labels": "neg,pos", "selection-metric": "loss"},
         "but with `labels` set and no `eval-dataset` it has none"),
        ({"dataset": "none"}, '`dataset` = "none" (the data is only at the sites) needs '
                              "`labels` for task classification"),
    ],
)
def test_model_selection_keys_are_validated(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_flower(overrides)
    assert message in str(excinfo.value)


def test_model_selection_defaults_select_the_best_round_without_stopping_early():
    cfg = RunConfig()
    assert (cfg.select_model, cfg.selection_metric) == ("best", "auto")
    assert (cfg.early_stopping_patience, cfg.validation_fraction) == (0, 0.0)
    cfg = RunConfig.from_flower({"early-stopping-patience": 2, "labels": "neg,pos",
                                 "eval-dataset": "eval.csv"})
    assert cfg.early_stopping_patience == 2


def test_dataset_none_keeps_the_server_off_the_training_data():
    assert RunConfig().server_reads_dataset
    assert RunConfig(task="sft", dataset="/data/site.jsonl").server_reads_dataset
    assert not RunConfig(task="sft", dataset="none").server_reads_dataset
    assert not RunConfig(labels="neg,pos").server_reads_dataset
    assert not RunConfig(labels="neg,pos", dataset="none").server_reads_dataset
    # With an eval file the server evaluates, so it can select and stop on it.
    cfg = RunConfig.from_flower({"task": "sft", "dataset": "none", "eval-dataset": "e.jsonl",
                                 "early-stopping-patience": 2, "selection-metric": "loss"})
    assert cfg.early_stopping_patience == 2
    # Without one a named metric is fine when the last round is delivered anyway.
    assert RunConfig(task="sft", dataset="none", select_model="last",
                     selection_metric="loss").select_model == "last"


def test_auto_selects_by_accuracy_for_classification_and_by_loss_for_sft():
    # sft: loss is measured every round, exact match only in the generation rounds.
    assert RunConfig().selection_metric_name == "accuracy"
    assert RunConfig(task="sft").selection_metric_name == "loss"
    named = RunConfig(task="sft", selection_metric="exact_match")
    assert named.selection_metric_name == "exact_match"


def test_an_empty_model_is_the_tasks_packaged_default():
    assert RunConfig().model_name == "minilm"
    assert RunConfig(task="sft").model_name == "smollm2"
    assert RunConfig(model=" ").model_name == "minilm"
    assert RunConfig(task="sft", model="/m").model_name == "/m"


def test_skew_loss_auto_is_logit_adjusted_unless_dp_sgd_or_class_weighting_is_on():
    from common.tasks.classification_config import resolved_skew_loss

    assert resolved_skew_loss(RunConfig().replace(skew_loss="auto")) == "logit-adjusted"
    assert resolved_skew_loss(RunConfig().replace(skew_loss="none")) == "none"
    dp_sgd = RunConfig.from_flower({"skew-loss": "auto", "dp-sgd-noise-multiplier": 1.0})
    assert resolved_skew_loss(dp_sgd) == "none"
    weighted = RunConfig.from_flower({"skew-loss": "auto",
                                      "class-weighting": "inverse-frequency"})
    assert resolved_skew_loss(weighted) == "none"
    # set by hand, logit-adjusted is still refused with either
    with pytest.raises(ConfigError, match="outside the privacy accounting"):
        RunConfig.from_flower({"skew-loss": "logit-adjusted", "dp-sgd-noise-multiplier": 1.0})
    # the classification loss reads the resolved value
    from common.tasks.classification import ClassificationTask
    assert ClassificationTask().loss_spec(dp_sgd).skew_loss == "none"
    assert ClassificationTask().loss_spec(RunConfig().replace(skew_loss="auto")).skew_loss == \
        "logit-adjusted"


def test_imbalance_and_augmentation_keys_that_combine():
    # focal loss needs no counts: with DP-SGD, skew-loss and class weights it is allowed
    RunConfig.from_flower({"focal-gamma": 2.0, "dp-sgd-noise-multiplier": 1.0})
    RunConfig.from_flower({"focal-gamma": 2.0, "skew-loss": "logit-adjusted"})
    RunConfig.from_flower({"focal-gamma": 2.0, "class-weighting": "inverse-frequency"})
    # site counts never leave the site: fine with secure aggregation; so is augmentation
    # with DP-SGD (each example is augmented on its own)
    RunConfig.from_flower({"class-weighting": "inverse-frequency", "secure-aggregation": True})
    RunConfig.from_flower({"augment": "both", "dp-sgd-noise-multiplier": 1.0})
    # the federation's counts travel through the secure sum (no site's counts in clear)
    cfg = RunConfig.from_flower({"class-weighting": "inverse-frequency",
                                 "class-weighting-source": "global",
                                 "secure-aggregation": True})
    assert cfg.task_options.class_weighting_source == "global" and cfg.secure_aggregation


def test_every_builtin_tasks_own_and_site_keys_are_run_config_fields():
    # `_check_task_keys` skips an own key that is no RunConfig field, so a misspelt key of
    # a built-in task would silently never be refused.
    import dataclasses

    from common.tasks import task_info, task_keys, task_names

    names = {f.name for f in dataclasses.fields(RunConfig)}
    for task in task_names():
        info = task_info(task)
        assert set(info.own_keys) <= names, (task, set(info.own_keys) - names)
        # client/local_data.py `site_columns` reads a site key into the field (or option)
        # of its underscored name; another task refuses it only as one of this task's keys.
        site_fields = {key.replace("-", "_") for key in info.site_keys}
        assert all("_" not in key for key in info.site_keys), (task, info.site_keys)
        assert site_fields <= set(task_keys(info)), (task, site_fields - set(task_keys(info)))
