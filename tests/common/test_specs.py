"""The frozen specs key the per-process caches: every config field is accounted for."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import RunConfig
from common.specs import DataSpec, EncodeSpec, ModelSpec, PartitionSpec, spec_from_config

SPECS = (ModelSpec, DataSpec, PartitionSpec, EncodeSpec)
# Fields that change no cached object (the model, the splits, the partitions or the
# encoded examples). `model` enters ModelSpec resolved, as `model_path`; `labels` as the
# class names the server derives. A new RunConfig field must go into a spec or here.
NOT_CACHED = {
    "model", "labels",
    "num_server_rounds", "fraction_train", "fraction_evaluate", "min_nodes", "min_replies",
    "round_timeout", "node_wait_timeout", "max_update_norm", "strategy", "proximal_mu",
    "server_learning_rate", "server_momentum", "trim_fraction", "num_malicious", "krum_keep",
    "local_steps", "local_epochs", "batch_size", "learning_rate", "weight_decay",
    "warmup_ratio", "grad_clip", "skew_loss", "skew_loss_tau", "class_weighting",
    "class_weighting_source", "class_weighting_beta", "focal_gamma", "augment",
    "augment_rate", "update_encoding",
    "int8_block_size", "topk_fraction", "dp_noise_multiplier", "dp_clipping_norm",
    "dp_clipping", "dp_side", "dp_delta", "dp_target_epsilon", "dp_sgd_noise_multiplier",
    "dp_sgd_max_grad_norm", "dp_sgd_delta", "dp_sgd_target_epsilon", "attack",
    "attack_fraction", "attack_scale", "secure_aggregation", "secagg_threshold",
    "secagg_clip_range", "secagg_max_weight", "audit_egress", "device", "precision",
    "output_dir", "run_name", "resume_from", "keep_checkpoints", "log_to", "select_model",
    "selection_metric", "early_stopping_patience", "early_stopping_min_delta",
    "generate_every", "generation_samples", "max_new_tokens", "retention_dataset",
}


def _spec_fields() -> set[str]:
    return {f.name for spec in SPECS for f in dataclasses.fields(spec)}


def test_every_config_field_is_in_a_spec_or_declared_uncached():
    config_fields = {f.name for f in dataclasses.fields(RunConfig)}
    unaccounted = config_fields - _spec_fields() - NOT_CACHED
    assert unaccounted == set(), (
        f"RunConfig fields {sorted(unaccounted)} are in no spec: add each to the spec of "
        "what it changes (common/specs.py) or to NOT_CACHED")
    assert config_fields >= NOT_CACHED  # no stale names
    assert not NOT_CACHED & _spec_fields()


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
                              chat_template="", train_on="assistant", overflow="truncate")
