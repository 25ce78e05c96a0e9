"""The frozen specs: every config field is in one (or declared in none), and a spec
changes exactly with its own fields."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import RunConfig
from common.specs import (
    DataSpec,
    DPSGDSpec,
    EncodeSpec,
    ModelSpec,
    PartitionSpec,
    TrainSpec,
    spec_from_config,
)
from common.tasks import get_task, task_names

SPECS = (ModelSpec, DataSpec, PartitionSpec, EncodeSpec, TrainSpec, DPSGDSpec)
# Fields in no spec: read by the server, the strategy or the client's glue directly.
# `model` enters ModelSpec resolved, as `model_path`; `labels` as the class names the
# server derives. A new RunConfig field must go into a spec (a task's own loss key: its
# `loss_spec`) or here.
NOT_CACHED = {
    "model", "labels",
    "fraction_train", "fraction_evaluate", "min_nodes", "min_replies",
    "round_timeout", "node_wait_timeout", "max_update_norm", "strategy", "proximal_mu",
    "server_learning_rate", "server_momentum", "trim_fraction", "num_malicious", "krum_keep",
    "update_encoding",
    "int8_block_size", "topk_fraction", "dp_noise_multiplier", "dp_clipping_norm",
    "dp_clipping", "dp_side", "dp_delta", "dp_target_epsilon", "attack",
    "attack_fraction", "attack_scale", "secure_aggregation", "secagg_threshold",
    "secagg_clip_range", "secagg_max_weight", "audit_egress", "device",
    "output_dir", "run_name", "resume_from", "keep_checkpoints", "log_to", "select_model",
    "selection_metric", "early_stopping_patience", "early_stopping_min_delta",
    "retention_dataset",
}


def _loss_spec_fields() -> set[str]:
    """The fields of every registered task's loss spec (``Task.loss_spec``)."""
    return {f.name for name in task_names()
            for f in dataclasses.fields(get_task(name).loss_spec(RunConfig(task=name)))}


def _spec_fields() -> set[str]:
    return {f.name for spec in SPECS for f in dataclasses.fields(spec)} | _loss_spec_fields()


def test_every_config_field_is_in_a_spec_or_declared_uncached():
    config_fields = {f.name for f in dataclasses.fields(RunConfig)}
    unaccounted = config_fields - _spec_fields() - NOT_CACHED
    assert unaccounted == set(), (
        f"RunConfig fields {sorted(unaccounted)} are in no spec: add each to the spec of "
        "what it changes (common/specs.py) or to NOT_CACHED")
    assert config_fields >= NOT_CACHED  # no stale names
    assert not NOT_CACHED & _spec_fields()


@pytest.mark.parametrize("spec", [
    lambda cfg: ModelSpec.of(cfg, []), DataSpec.of, lambda cfg: EncodeSpec.of(cfg, "/t")])
def test_a_tasks_own_key_changes_every_cache_key(spec):
    sft = RunConfig(task="sft")
    assert spec(sft) == spec(RunConfig(task="sft"))
    assert spec(sft.replace(messages_column="chat")) != spec(sft)
    assert spec(sft.replace(generation_samples=3)) != spec(sft)


def test_spec_fields_copy_the_config_by_name(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    cfg = RunConfig(dataset=str(data), seed=7, eval_fraction=0.3, label_column="label")
    spec = DataSpec.of(cfg)
    assert (spec.dataset, spec.seed, spec.eval_fraction) == (str(data), 7, 0.3)
    assert spec.dataset_stamp is not None and spec.eval_dataset_stamp is None


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"eval_fraction": 0.2}, {"validation_fraction": 0.1}, {"text_column": "t"},
    {"builtin_examples": 100}, {"label_case_fold": True},
])
def test_any_data_field_changes_the_data_key(change):
    assert DataSpec.of(RunConfig()) != DataSpec.of(RunConfig(**change))
    assert hash(DataSpec.of(RunConfig())) == hash(DataSpec.of(RunConfig()))


def test_an_edited_file_changes_the_data_key(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    before = DataSpec.of(RunConfig(dataset=str(data)))
    data.write_text("text,label\na,x\nb,y\nc,y\n", encoding="utf-8")
    assert DataSpec.of(RunConfig(dataset=str(data))) != before


def test_the_model_key_holds_the_resolved_path_and_the_labels(tiny_model_dir):
    cfg = RunConfig(model=str(tiny_model_dir))
    spec = ModelSpec.of(cfg, ["a", "b"])
    assert spec.model_path == str(tiny_model_dir.resolve())
    assert spec != ModelSpec.of(cfg, ["a", "c"])
    assert spec != ModelSpec.of(cfg.replace(lora_r=4), ["a", "b"])
    assert ModelSpec.of(cfg.replace(lora_target_modules="query, value"), []).target_modules == [
        "query", "value"]


def test_spec_from_config_takes_extra_fields_only_for_names_outside_the_config():
    spec = spec_from_config(EncodeSpec, RunConfig(max_length=32), tokenizer_path="/t")
    assert spec == EncodeSpec(task="classification", max_length=32, tokenizer_path="/t",
                              task_options=None)  # its options are loss keys: no cache key


@pytest.mark.parametrize("change", [
    {"batch_size": 8}, {"local_steps": 3}, {"local_epochs": 2}, {"learning_rate": 1e-3},
    {"weight_decay": 0.1}, {"warmup_ratio": 0.2}, {"grad_clip": 0.5}, {"precision": "bf16"},
])
def test_a_train_field_changes_the_train_spec_and_nothing_else_does(change):
    assert TrainSpec.of(RunConfig(**change)) != TrainSpec.of(RunConfig())
    others = RunConfig(seed=3, proximal_mu=0.1, dp_sgd_noise_multiplier=1.0
                       ).replace(focal_gamma=2.0)
    assert TrainSpec.of(others) == TrainSpec.of(RunConfig())


def test_train_spec_steps_are_local_steps_else_whole_epochs():
    assert TrainSpec.of(RunConfig(local_steps=7)).steps(1000) == 7
    assert TrainSpec.of(RunConfig(local_steps=0, local_epochs=2, batch_size=4)).steps(10) == 6


def test_the_dp_sgd_spec_holds_the_rounds_its_budget_is_planned_over():
    cfg = RunConfig(dp_sgd_target_epsilon=8.0, num_server_rounds=7)
    assert DPSGDSpec.of(cfg).num_server_rounds == 7
    assert DPSGDSpec.of(cfg) != DPSGDSpec.of(cfg.replace(dp_sgd_delta=1e-6))
    assert DPSGDSpec.of(cfg) == DPSGDSpec.of(cfg.replace(learning_rate=1e-3))


def test_classifications_loss_keys_key_no_cache_and_sfts_keys_do(tiny_model_dir):
    # A loss key changes the loss spec only: a sweep over it shares the cached splits,
    # model and encoded data. sft's keys change the rows and their encoding.
    cfg = RunConfig(model=str(tiny_model_dir))
    for changed in (cfg.replace(focal_gamma=2.0), cfg.replace(class_weighting="inverse-frequency")):
        assert DataSpec.of(changed) == DataSpec.of(cfg)
        assert ModelSpec.of(changed, ["a", "b"]) == ModelSpec.of(cfg, ["a", "b"])
        assert EncodeSpec.of(changed, "/t") == EncodeSpec.of(cfg, "/t")
    sft = RunConfig(task="sft")
    assert DataSpec.of(sft.replace(messages_column="chat")) != DataSpec.of(sft)
    assert EncodeSpec.of(sft.replace(train_on="all"), "/t") != EncodeSpec.of(sft, "/t")


def test_a_tasks_loss_spec_holds_its_own_loss_keys_only():
    task = get_task("classification")
    plain = task.loss_spec(RunConfig())
    assert task.loss_spec(RunConfig().replace(focal_gamma=2.0)) != plain
    assert task.loss_spec(RunConfig().replace(class_weighting="inverse-frequency")) != plain
    # keys it does not own (training, data, server, sft's) leave it equal
    assert task.loss_spec(RunConfig(learning_rate=1e-3, seed=5, max_length=32,
                                    num_server_rounds=9)) == plain
    sft = get_task("sft")
    assert sft.loss_spec(RunConfig(task="sft").replace(train_on="all")) == sft.loss_spec(
        RunConfig(task="sft"))
