"""The per-process cache of a site's data: keyed by the file it read, not only by specs."""

from __future__ import annotations

import logging
import os

import pytest
from flwr.app import RecordDict

from client.local_data import (
    clear_local_data_cache,
    data_stats_metrics,
    load_local_data,
    log_partition_warnings,
    site_file_version,
)
from common.config import ConfigError, RunConfig
from common.model import build_model
from common.specs import ModelSpec
from common.tasks.classification_config import ClassificationOptions

LABELS = ["negative", "positive"]


def _write(path, word: str, rows: int) -> None:
    path.write_text("text,label\n" + "".join(
        f"{word} text number {i},{LABELS[i % 2]}\n" for i in range(rows)))


def _texts(data, tokenizer) -> list[str]:
    return sorted(tokenizer.decode(ids, skip_special_tokens=True)
                  for ids in [*data.train.input_ids, *data.eval.input_ids])


def test_two_files_and_a_rewritten_file_give_their_own_data(tmp_path, tiny_model_dir):
    clear_local_data_cache()
    cfg = RunConfig(model=str(tiny_model_dir), max_length=24, labels=",".join(LABELS))
    _, tokenizer = build_model(ModelSpec.of(cfg, LABELS))
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    _write(first, "alpha", 10)
    _write(second, "beta", 12)

    a = load_local_data(cfg, {"data-path": str(first)}, LABELS, tokenizer)
    b = load_local_data(cfg, {"data-path": str(second)}, LABELS, tokenizer)
    assert all("alpha" in text for text in _texts(a, tokenizer))
    assert all("beta" in text for text in _texts(b, tokenizer))

    # The same path, rewritten between two runs served by one worker process.
    stamp = site_file_version(("site", str(first)))
    _write(first, "gamma", 14)
    os.utime(first, ns=(1, 1))  # a different version even on a coarse-mtime file system
    assert site_file_version(("site", str(first))) != stamp
    again = load_local_data(cfg, {"data-path": str(first)}, LABELS, tokenizer)
    assert len(again.train) + len(again.eval) == 14
    assert all("gamma" in text for text in _texts(again, tokenizer))
    clear_local_data_cache()


def test_a_partitions_data_warnings_are_logged_once_per_node(tmp_path, tiny_model_dir, caplog):
    clear_local_data_cache()
    source = tmp_path / "short.csv"  # every text two words long: a short-texts warning
    source.write_text("text,label\n" + "".join(
        f"text{i} here,{LABELS[i % 2]}\n" for i in range(60)))
    cfg = RunConfig(model=str(tiny_model_dir), max_length=24, dataset=str(source))
    _, tokenizer = build_model(ModelSpec.of(cfg, LABELS))
    node = {"partition-id": 1, "num-partitions": 2}
    data = load_local_data(cfg, node, LABELS, tokenizer)
    state = RecordDict()

    with caplog.at_level(logging.WARNING, logger="client.local_data"):
        log_partition_warnings(data, node, state)
        log_partition_warnings(data, node, state)  # the node's next round: not again
        log_partition_warnings(data, {"data-path": "x"}, RecordDict())  # a site: its check

    messages = [r.getMessage() for r in caplog.records if r.name == "client.local_data"]
    assert len(messages) == 1
    assert messages[0].startswith("site data partition 1: 100.0% of the texts have fewer "
                                  "than 3 words")
    # What the node sends is unchanged: its statistics still go out, once.
    assert data_stats_metrics(data, node, state) == data.report.aggregate_stats() != {}
    assert data_stats_metrics(data, node, state) == {}
    clear_local_data_cache()


def test_a_partition_has_no_site_file_version():
    assert site_file_version(("partition", 0, 2)) is None


def test_a_sft_site_names_its_chat_columns_in_its_node_config():
    from client.local_data import site_columns

    cfg = site_columns(RunConfig(task="sft"), {"data-path": "x", "prompt-column": "question",
                                               "response-column": "answer"})
    options = cfg.task_options
    assert (options.prompt_column, options.response_column) == ("question", "answer")
    plain = site_columns(RunConfig(), {"data-path": "x", "text-column": "body",
                                       "prompt-column": "prompt"})  # sft's, at its default
    assert (plain.text_column, plain.task_options) == ("body", ClassificationOptions())


def test_a_site_key_of_another_task_is_refused_naming_its_task():
    from client.local_data import site_columns

    with pytest.raises(ConfigError, match="`text-column`: only for task classification"):
        site_columns(RunConfig(task="sft"), {"data-path": "x", "text-column": "body"})
    with pytest.raises(ConfigError, match="`messages-column`: only for task sft"):
        site_columns(RunConfig(), {"data-path": "x", "messages-column": "turns"})
    # The other task's key at its default value changes nothing and is accepted.
    assert site_columns(RunConfig(), {"chat-format": "auto"}) == RunConfig()
