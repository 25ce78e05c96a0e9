"""SecureAggregator against an in-process fake Grid routing to client/secagg.py.

Every message crosses the fake grid as Flower's protobuf (serialized and parsed back),
so the config values used are ones Flower can carry (uint64 node ids, bytes lists).
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common import Metadata
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

from client.secagg import STATE_KEY, SUMS_KEY, WEIGHT_KEY, handle_stage, mask_update
from common.secagg import frac_bits_for, mean_error_bound
from server.secure_aggregation import SecAggAbort, SecureAggregator, content_bytes

CLIP = 0.5
MAX_WEIGHT = 1000
_ids = itertools.count()


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Flower's ``Message(...)`` reads the run, node and task ids the runtime sets."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class FakeGrid:
    """Delivers query messages to ``handle_stage`` and train messages to a fake train.

    ``drop[stage]`` (stage: a ``secagg-stage`` value or "train") lists nodes whose reply
    is lost; ``tamper(node, arrays) -> arrays`` rewrites train replies.
    """

    def __init__(self, deltas, weights, *, drop=None, tamper=None, statistics=None):
        self.deltas, self.weights = deltas, weights
        self.statistics = statistics or {}  # node -> its site metrics (secure sums)
        self.contexts = {
            n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
            for n in deltas
        }
        self.drop = drop or {}
        self.tamper = tamper
        self.errors: list[str] = []
        self.train_bytes_up = 0

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            kind = message.metadata.message_type
            delivered = make_message(
                metadata=Metadata(
                    run_id=1, message_id=f"m{next(_ids)}", src_node_id=1, dst_node_id=node,
                    reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                    message_type=kind),
                content=_wire(message.content),
            )
            stage = delivered.content["config"].get("secagg-stage", kind)
            try:
                reply = (handle_stage if kind == "query" else self.train)(
                    delivered, self.contexts[node])
            except Exception as exc:  # what Flower does with a raising ClientApp
                self.errors.append(str(exc))
                reply = Message(Error(code=0, reason=str(exc)), reply_to=delivered)
            # Flower hands the context to the ClientApp process and back as protobuf.
            context = self.contexts[node]
            context.state = _wire(context.state)
            if node in self.drop.get(stage, ()):
                continue
            if not reply.has_error():
                reply = make_message(metadata=reply.metadata, content=_wire(reply.content))
            replies.append(reply)
        return replies

    def train(self, msg, context):
        node = msg.metadata.dst_node_id
        masked = mask_update(self.deltas[node], self.weights[node], msg.content["config"],
                             context, self.statistics.get(node))
        if self.tamper:
            masked = self.tamper(node, masked)
        reply = Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in masked.items()}),
            "metrics": MetricRecord({"num-examples": self.weights[node]}),
        }), reply_to=msg)
        self.train_bytes_up += sum(len(a.data) for a in reply.content["arrays"].values())
        return reply


def run_round(grid, aggregator, server_round=1, spec=None, summed_keys=()):
    """setup -> train messages with the merged config -> aggregate."""
    entries = aggregator.setup(grid, sorted(grid.deltas), server_round,
                               summed_keys=summed_keys)
    train = [
        Message(RecordDict({"config": ConfigRecord({"server-round": server_round,
                                                    **dict(extra)})}),
                dst_node_id=node, message_type="train")
        for node, extra in entries.items()
    ]
    replies = [r for r in grid.send_and_receive(train) if not r.has_error()]
    return aggregator.aggregate(grid, replies, spec=spec), entries


def population(n, shapes=None, seed=0):
    rng = np.random.default_rng(seed)
    shapes = shapes or {"layer.a": (3, 4), "layer.b": (5,), "head": (2, 2)}
    nodes = [2**64 - 1] + [int(x) for x in rng.integers(1, 2**62, size=n - 1)]
    deltas = {node: {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in shapes.items()}
              for node in nodes}
    weights = {node: int(rng.integers(1, MAX_WEIGHT + 1)) for node in nodes}
    return deltas, weights


def plain_mean(deltas, weights, nodes):
    total = sum(weights[n] for n in nodes)
    names = deltas[nodes[0]]
    return {k: sum(weights[n] * np.clip(deltas[n][k].astype(np.float64), -CLIP, CLIP)
                   for n in nodes) / total for k in names}, total


def aggregator(fraction=0.6):
    return SecureAggregator(threshold_fraction=fraction, clip_range=CLIP,
                            max_weight=MAX_WEIGHT, timeout=10.0)


def assert_close(mean, expected, bound):
    assert set(mean) == set(expected)
    for name in expected:
        assert mean[name].dtype == np.float32 and mean[name].shape == expected[name].shape
        assert np.abs(mean[name] - expected[name]).max() <= bound + 1e-7  # + float32


def test_round_returns_the_weighted_mean_of_deltas_and_the_total_weight():
    deltas, weights = population(5)
    grid, agg = FakeGrid(deltas, weights), aggregator()

    (mean, total), entries = run_round(grid, agg)

    expected, expected_total = plain_mean(deltas, weights, sorted(deltas))
    assert total == expected_total
    bound = mean_error_bound(num_clients=5, frac_bits=agg.round_info().frac_bits,
                             total_weight=total)
    assert_close(mean, expected, bound)
    assert sorted(entries) == sorted(deltas)
    info = agg.round_info()
    assert (info.sampled, info.advertised, info.shared, info.masked,
            info.unmasked) == (5, 5, 5, 5, 5)
    assert info.frac_bits == frac_bits_for(num_clients=5, max_weight=MAX_WEIGHT,
                                              clip_range=CLIP)
    assert grid.errors == []


@pytest.mark.parametrize("stage", ["advertise-keys", "share-keys", "train", "unmask"])
def test_dropouts_up_to_the_threshold_at_every_stage(stage):
    deltas, weights = population(10)
    gone = sorted(deltas)[1:5]  # 4 of 10; the threshold is 6
    grid, agg = FakeGrid(deltas, weights, drop={stage: gone}), aggregator()

    (mean, total), entries = run_round(grid, agg)

    kept = sorted(deltas) if stage == "unmask" else [n for n in sorted(deltas) if n not in gone]
    expected, expected_total = plain_mean(deltas, weights, kept)
    assert total == expected_total
    assert_close(mean, expected, 1e-5)
    if stage in ("advertise-keys", "share-keys"):  # excluded before train messages
        assert sorted(entries) == kept


@pytest.mark.parametrize("stage", ["advertise-keys", "share-keys", "train", "unmask"])
def test_one_dropout_beyond_the_threshold_aborts_the_round(stage):
    deltas, weights = population(10)
    grid, agg = FakeGrid(deltas, weights, drop={stage: sorted(deltas)[:5]}), aggregator()

    with pytest.raises(SecAggAbort, match="threshold is 6"):
        run_round(grid, agg)


def test_malformed_masked_input_counts_as_dropped():
    deltas, weights = population(6)
    bad = sorted(deltas)[2]

    def tamper(node, arrays):
        if node != bad:
            return arrays
        return {**arrays, "head": arrays["head"].astype(np.int64)}  # wrong dtype

    grid, agg = FakeGrid(deltas, weights, tamper=tamper), aggregator()
    names = {k: (v.shape, np.dtype(np.float32)) for k, v in deltas[bad].items()}

    (mean, total), _ = run_round(grid, agg, spec=names)

    kept = [n for n in sorted(deltas) if n != bad]
    expected, expected_total = plain_mean(deltas, weights, kept)
    assert total == expected_total
    assert_close(mean, expected, 1e-5)
    assert agg.round_info().dropped_masked_input == 1


class LyingAggregator(SecureAggregator):
    """Asks survivors to unmask with `target` listed both as survivor and as dropped."""

    target: int = 0

    def _exchange(self, grid, configs, phase):
        if phase == "unmask":
            configs = {n: {**c, "secagg-dropped": [self.target]} for n, c in configs.items()}
        return super()._exchange(grid, configs, phase)


def test_clients_refuse_the_both_lists_attack_over_flower():
    deltas, weights = population(5)
    grid = FakeGrid(deltas, weights)
    agg = LyingAggregator(threshold_fraction=0.6, clip_range=CLIP, max_weight=MAX_WEIGHT,
                          timeout=10.0)
    agg.target = sorted(deltas)[0]

    with pytest.raises(SecAggAbort, match="unmask stage"):
        run_round(grid, agg)

    assert len(grid.errors) == 5
    assert all("both surviving and dropped" in e for e in grid.errors)
    assert agg.round_info().unmasked == 0


def test_keys_are_fresh_every_round_and_stale_requests_are_refused():
    deltas, weights = population(3)
    grid, agg = FakeGrid(deltas, weights), aggregator(1.0)
    node = sorted(deltas)[0]
    context = grid.contexts[node]

    run_round(grid, agg, server_round=1)
    keys_1 = dict(context.state[STATE_KEY])
    run_round(grid, agg, server_round=2)
    keys_2 = dict(context.state[STATE_KEY])

    assert keys_1["round"] == 1 and keys_2["round"] == 2
    assert keys_1["s-sk"] == b"" and keys_2["s-sk"] == b""  # wiped after unmasking
    stale = make_message(
        metadata=Metadata(run_id=1, message_id="x", src_node_id=1, dst_node_id=node,
                          reply_to_message_id="", group_id="1", created_at=time.time(),
                          ttl=60.0, message_type="query"),
        content=RecordDict({"config": ConfigRecord({"secagg-stage": "advertise-keys",
                                                    "secagg-round": 1})}),
    )
    with pytest.raises(ValueError, match="not after round 2"):
        handle_stage(stale, context)


def test_public_keys_differ_between_rounds_over_flower():
    deltas, weights = population(3)
    grid, agg = FakeGrid(deltas, weights), aggregator(1.0)
    seen = []
    original = grid.send_and_receive

    def spy(messages, *, timeout=None):
        replies = original(messages, timeout=timeout)
        for reply in replies:
            config = None if reply.has_error() else reply.content.config_records.get("config")
            if config is not None and "secagg-s-pk" in config:
                seen.append((reply.metadata.src_node_id, config["secagg-s-pk"]))
        return replies

    grid.send_and_receive = spy
    run_round(grid, agg, server_round=1)
    run_round(grid, agg, server_round=2)

    by_node = {}
    for node, key in seen:
        by_node.setdefault(node, []).append(key)
    assert all(len(keys) == 2 and keys[0] != keys[1] for keys in by_node.values())


def lora_shapes():
    """MiniLM-L6 LoRA r=8 on query/value plus the 2-class head: 74,498 values, 26 arrays."""
    shapes = {}
    for layer in range(6):
        for module in ("query", "value"):
            shapes[f"layer.{layer}.{module}.lora_A"] = (8, 384)
            shapes[f"layer.{layer}.{module}.lora_B"] = (384, 8)
    shapes["classifier.weight"], shapes["classifier.bias"] = (2, 384), (2,)
    return shapes


def test_uplink_bytes_of_a_lora_payload_within_1_1x_int32():
    deltas, weights = population(10, shapes=lora_shapes())
    grid, agg = FakeGrid(deltas, weights), aggregator()
    assert sum(a.size for a in deltas[next(iter(deltas))].values()) == 74_498

    (mean, _), _ = run_round(grid, agg)

    int32_bytes = 10 * sum(len(Array(a.astype(np.int32)).data)
                           for a in deltas[next(iter(deltas))].values())
    info = agg.round_info()
    uplink = grid.train_bytes_up + info.setup_bytes_up + info.unmask_bytes_up
    assert grid.train_bytes_up / int32_bytes < 1.01
    assert uplink / int32_bytes < 1.1
    assert len(mean) == 26


def test_message_sizes_are_measured():
    deltas, weights = population(4)
    grid, agg = FakeGrid(deltas, weights), aggregator()

    run_round(grid, agg)

    info = agg.round_info()
    assert info.setup_bytes_down > 0 and info.setup_bytes_up > 0
    assert info.unmask_bytes_down > 0 and info.unmask_bytes_up > 0
    probe = Message(RecordDict({"config": ConfigRecord({"a": b"1234"})}), dst_node_id=3,
                    message_type="query")
    assert content_bytes(probe) > 4


def test_weight_entry_is_two_uint32_words():
    deltas, weights = population(3)
    grid, agg = FakeGrid(deltas, weights), aggregator(1.0)
    captured = {}

    def keep(node, arrays):
        captured[node] = arrays
        return arrays

    grid.tamper = keep
    run_round(grid, agg)

    arrays = next(iter(captured.values()))
    assert arrays[WEIGHT_KEY].dtype == np.uint32 and arrays[WEIGHT_KEY].shape == (2,)
    assert all(a.dtype == np.uint32 for a in arrays.values())


def test_summed_statistics_travel_masked_and_come_out_as_the_survivors_total():
    deltas, weights = population(4)
    nodes = sorted(deltas)
    counts = {nodes[0]: (3, 1), nodes[1]: (0, 4), nodes[2]: (2, 2), nodes[3]: (5, 0)}
    statistics = {n: {"label-count-0": a, "label-count-1": b, "train-steps": 9}
                  for n, (a, b) in counts.items()}
    del statistics[nodes[3]]["label-count-1"]  # this site refuses: a key it lacks
    keys = ("label-count-0", "label-count-1")
    sent = []

    def tamper(node, arrays):
        sent.append(arrays)
        return arrays

    grid = FakeGrid(deltas, weights, statistics=statistics, tamper=tamper)
    agg = aggregator()

    (mean, total), entries = run_round(grid, agg, summed_keys=keys)

    assert all(list(e["secagg-sum-keys"]) == list(keys) for e in entries.values())
    assert agg.round_info().sums == {"label-count-0": 5, "label-count-1": 7}
    assert agg.round_info().dropped_masked_input == 1
    assert any("which this site's statistics do not have" in e for e in grid.errors)
    # the statistics leave each site as 2 masked words of their own entry, nothing else
    assert all(a[SUMS_KEY].dtype == np.uint32 and a[SUMS_KEY].shape == (2,) for a in sent)
    expected, expected_total = plain_mean(deltas, weights, nodes[:3])
    assert total == expected_total
    assert_close(mean, expected, 1e-5)


def test_without_summed_keys_the_reply_has_no_sums_entry_and_info_no_sums():
    deltas, weights = population(3)
    sent = []
    grid = FakeGrid(deltas, weights, statistics={n: {"label-count-0": 1} for n in deltas},
                    tamper=lambda node, arrays: sent.append(arrays) or arrays)
    agg = aggregator()

    _, entries = run_round(grid, agg)

    assert all("secagg-sum-keys" not in e for e in entries.values())
    assert all(SUMS_KEY not in a for a in sent) and agg.round_info().sums == {}
