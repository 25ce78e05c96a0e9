"""The ClientApp handlers called in-process with hand-made messages and contexts."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app.message.message import make_message
from flwr.common import Metadata

from client.app import evaluate_global, query, train
from client.local_data import client_key, load_local_data
from common.config import ConfigError, RunConfig
from common.data import DataError
from common.model import build_model, get_exchanged_state
from common.specs import DataSpec, ModelSpec, PartitionSpec

LABELS = ["negative", "neutral", "positive"]


def _run_config(model_dir) -> dict:
    return RunConfig(
        model=str(model_dir), builtin_examples=120, max_length=24, batch_size=4,
        local_steps=3,
    ).to_flower()


def _message(message_type: str, state: dict | None, round_: int = 1):
    content = {"config": ConfigRecord({"label-names": LABELS, "server-round": round_})}
    if state is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in state.items()})
    metadata = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type,
    )
    return make_message(metadata=metadata, content=RecordDict(content))


def _context(model_dir, node_config=None) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config or {"partition-id": 1, "num-partitions": 3},
        state=RecordDict(), run_config=_run_config(model_dir),
    )


@pytest.fixture
def global_state(tiny_model_dir):
    model, _ = build_model(ModelSpec.of(RunConfig.from_flower(_run_config(tiny_model_dir)), LABELS))
    return get_exchanged_state(model)


def test_train_reply_holds_only_the_exchanged_tensors_and_scalar_metrics(
    tiny_model_dir, global_state
):
    reply = train(_message("train", global_state), _context(tiny_model_dir))
    content = reply.content
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert not content.config_records
    arrays = {k: v.numpy() for k, v in content["arrays"].items()}
    assert arrays.keys() == global_state.keys()
    assert any(not np.array_equal(arrays[k], global_state[k]) for k in arrays)  # it trained
    metrics = content["metrics"]
    # 3 steps of 4 examples from a partition larger than 12: 12 distinct examples.
    assert metrics["num-examples"] == 12 and metrics["train-steps"] == 3
    assert all(isinstance(v, (int, float)) for v in metrics.values())
    # Compute monitoring: 3 batches of 4 rows; tokens are at most rows x max-length 24.
    assert metrics["train-examples-seen"] == 12 and 12 <= metrics["train-tokens"] <= 12 * 24
    assert metrics["train-seconds"] > 0 and metrics["peak-rss-mb"] > 0


def test_train_is_seeded_per_round_and_client(tiny_model_dir, global_state):
    first = train(_message("train", global_state, round_=2), _context(tiny_model_dir))
    again = train(_message("train", global_state, round_=2), _context(tiny_model_dir))
    other = train(_message("train", global_state, round_=3), _context(tiny_model_dir))
    key = next(iter(global_state))

    def weights(reply):
        return reply.content["arrays"][key].numpy()

    assert np.array_equal(weights(first), weights(again))
    assert not np.array_equal(weights(first), weights(other))


def test_a_label_flip_attacker_trains_on_the_flipped_labels(tiny_model_dir, global_state):
    honest = train(_message("train", global_state), _context(tiny_model_dir))
    context = _context(tiny_model_dir)
    context.run_config.update(attack="label-flip", **{"attack-fraction": 1.0})
    flipped = train(_message("train", global_state), context)
    key = next(k for k in global_state if "classifier" in k or "score" in k)
    # Same seed, same batches: only the labels differ, so the head moves elsewhere.
    assert not np.allclose(honest.content["arrays"][key].numpy(),
                           flipped.content["arrays"][key].numpy())
    assert flipped.content["metrics"]["num-examples"] == 12


def test_evaluate_reply_carries_metrics_only(tiny_model_dir, global_state):
    reply = evaluate_global(_message("evaluate", global_state), _context(tiny_model_dir))
    assert not reply.content.array_records
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and 0.0 <= metrics["eval-accuracy"] <= 1.0


def test_query_reports_the_stable_client_key(tiny_model_dir):
    reply = query(_message("query", None), _context(tiny_model_dir))
    assert reply.content["config"]["client-key"] == "partition-000001"
    assert client_key({"site-name": "hospital-a"}, 9) == "hospital-a"
    assert client_key({}, 9) == "node-9"


def test_deployment_site_reads_its_own_file(tmp_path, tiny_model_dir):
    path = tmp_path / "site.csv"
    path.write_text("body,y\n" + "".join(
        f"text number {i},{LABELS[i % 3]}\n" for i in range(20)))
    cfg = RunConfig.from_flower(_run_config(tiny_model_dir))
    _, tokenizer = build_model(ModelSpec.of(cfg, LABELS))
    data = load_local_data(
        cfg, {"data-path": str(path), "text-column": "body", "label-column": "y"},
        LABELS, tokenizer,
    )
    assert len(data.train) + len(data.eval) == 20
    # The check before the first round counts tokens with the run's tokenizer, not words.
    assert data.report.length_measure == "counted by the tokenizer"


def test_deployment_site_with_a_bad_file_fails_with_the_reason(tmp_path, tiny_model_dir,
                                                               global_state):
    context = _context(tiny_model_dir, {"data-path": str(tmp_path / "missing.csv")})
    with pytest.raises(DataError, match="missing.csv"):
        train(_message("train", global_state), context)
    with pytest.raises(ConfigError, match="data-path"):
        train(_message("train", global_state), _context(tiny_model_dir, {"site-name": "x"}))


def test_compressed_reply_and_top_k_residual_kept_on_the_site(tiny_model_dir, global_state):
    from common.encoding import decode_update

    context = _context(tiny_model_dir)
    context.run_config.update({"update-encoding": "int8", "topk-fraction": 0.1})
    reply = train(_message("train", global_state), context)
    payload = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert {v.dtype for k, v in payload.items() if "::" not in k} == {np.dtype(np.int8)}
    cfg = RunConfig.from_flower(context.run_config)
    decoded = decode_update(payload, global_state, cfg.encoding)
    assert decoded.keys() == global_state.keys()
    residual = context.state["topk-residual"]
    assert set(residual.keys()) == set(global_state)
    assert any(np.abs(residual[k].numpy()).sum() > 0 for k in residual)


def test_dp_sgd_round_without_a_nonempty_batch_sends_a_valid_reply(
    monkeypatch, tiny_model_dir, global_state
):
    # Poisson sampling can leave every batch of a round empty (likely with a tiny local
    # set and batch-size 1): DP-SGD then takes noise-only steps and computes no loss.
    import common.dp_sgd
    from server.validation import array_specs, metrics_problem, unreadable_metrics, update_problem

    monkeypatch.setattr(common.dp_sgd, "poisson_batches",
                        lambda num_examples, *, sample_rate, generator: iter(lambda: [], None))
    context = _context(tiny_model_dir)
    context.run_config.update({"dp-sgd-noise-multiplier": 1.0})

    reply = train(_message("train", global_state), context)

    metrics = dict(reply.content["metrics"])
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert "train-loss" not in metrics and "train-first-loss" not in metrics
    assert metrics["train-steps"] == 3 and metrics["num-examples"] == 1
    assert metrics["dp-sgd-steps"] == 3 and metrics["dp-sgd-epsilon"] > 0
    assert any(not np.array_equal(arrays[k], global_state[k]) for k in arrays)  # noise
    assert update_problem(arrays, expected=array_specs(global_state),
                          num_examples=metrics["num-examples"]) is None
    assert metrics_problem(metrics) is None and unreadable_metrics(metrics) == []


def _site_file(path, labels=LABELS, rows=20):
    path.write_text("text,label\n" + "".join(
        f"text number {i},{labels[i % len(labels)]}\n" for i in range(rows)))
    return path


@pytest.mark.parametrize("labels, fragment", [
    (["negative", "neutral", "positive", "angry"], "label(s) 'angry' not in the federation"),
], ids=["unknown label"])
def test_deployment_site_refuses_a_blocking_file_with_the_reason(
    tmp_path, tiny_model_dir, global_state, labels, fragment
):
    path = _site_file(tmp_path / "site.csv", labels)
    context = _context(tiny_model_dir, {"data-path": str(path)})

    with pytest.raises(DataError) as raised:
        train(_message("train", global_state), context)

    message = str(raised.value)
    assert message.startswith(f"site data {path} cannot be used: ")
    assert fragment in message and f"fedsft check-data {path}" in message


def _stats(reply) -> dict:
    return {k: v for k, v in reply.content["metrics"].items() if k.startswith("data-")}


@pytest.mark.parametrize("share", [True, False])
def test_data_stats_go_out_once_and_only_when_the_site_allows(
    tmp_path, tiny_model_dir, global_state, share
):
    from client.egress_audit import egress_audit_mod

    path = _site_file(tmp_path / "site.csv", rows=21)  # 7 rows of each class
    context = _context(tiny_model_dir, {"data-path": str(path), "share-data-stats": share})
    context.run_config["audit-egress"] = True

    first = egress_audit_mod(_message("train", global_state), context, train)
    second = egress_audit_mod(_message("train", global_state, round_=2), context, train)

    assert first.content["metrics"]["egress-audited"] == 1  # the audit let them through
    expected = {"data-rows-read": 21, "data-rows": 21, "data-duplicate-share": 0.0,
                "data-short-share": 0.0, "data-truncated-share": 0.0}
    for index in range(3):
        expected |= {f"data-label-count-{index}": 7, f"data-label-share-{index}": 1 / 3}
    assert _stats(first) == (expected if share else {})
    assert _stats(second) == {}


def test_share_data_stats_must_be_a_boolean(tmp_path, tiny_model_dir, global_state):
    path = _site_file(tmp_path / "site.csv")
    context = _context(tiny_model_dir, {"data-path": str(path), "share-data-stats": "yes"})

    with pytest.raises(ConfigError, match="`share-data-stats` must be true or false"):
        train(_message("train", global_state), context)


def test_simulated_clients_share_their_partition_counts_unless_told_not_to(
    tiny_model_dir, global_state
):
    from common.data import load_splits, partition_dataset

    cfg = RunConfig.from_flower(_run_config(tiny_model_dir))
    part = partition_dataset(load_splits(DataSpec.of(cfg)).train, PartitionSpec.of(cfg),
                             source=cfg.dataset, num_partitions=3, partition_id=1)
    counts = np.bincount(np.asarray(part["label"]), minlength=3)
    shared = _context(tiny_model_dir)
    refused = _context(tiny_model_dir, {"partition-id": 1, "num-partitions": 3,
                                        "share-data-stats": False})

    first = _stats(train(_message("train", global_state), shared))
    second = _stats(train(_message("train", global_state, round_=2), shared))

    assert first["data-rows"] == first["data-rows-read"] == len(part)
    assert [first[f"data-label-count-{k}"] for k in range(3)] == counts.tolist()
    assert second == {}  # once per node and run
    assert _stats(train(_message("train", global_state), refused)) == {}
