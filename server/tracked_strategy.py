"""Wrap a Flower strategy: validate replies, survive faults, measure each round.

Composition, not inheritance: ``TrackedStrategy`` holds any Flower Message-API strategy
and forwards the four round hooks to it, adding around each

- a round offset, so a resumed run continues its numbering (and its seeds);
- a sampler seeded per (seed, round, phase): Flower samples with the module-level
  ``random``, so seeding it right before delegating is the only way to make client
  sampling reproducible without re-implementing Flower's sampling;
- decoding of compressed updates (common/encoding.py) back to full float32 values;
- failure accounting: error replies, replies missing at the round timeout, and
  invalid updates (undecodable, or rejected by server/validation.py) are counted
  and dropped; fewer than ``min_replies`` valid replies skips the round (the global
  model stays). A non-finite informational metric (server/validation.py says which
  metrics are checked) drops only itself from the round's averaged metrics;
- a deterministic aggregation order (by content digest), so the floating-point sum
  does not depend on reply arrival order — resumed runs end bit-identical;
- the exchanged state keeps its names, shapes and dtypes: Flower's FedOpt family
  returns float64 arrays, which are cast back to the model's dtype so that replies
  (float32) and the global state keep matching;
- bytes and seconds per round.

Flower's ``Strategy.start`` runs the loop; nothing here copies it.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, Strategy

from common.encoding import UpdateEncoding, decode_update
from common.training import derive_seed
from server.secure_aggregation import SecAggAbort, SecureAggregator
from server.validation import (
    ArraySpec,
    is_finite_number,
    metrics_problem,
    unreadable_metrics,
    update_problem,
)

log = logging.getLogger(__name__)
FP32 = UpdateEncoding()  # exact values: the default uplink encoding


@dataclass
class RoundStats:
    """What happened in one round, beyond the metrics (one per round)."""

    round: int
    sampled: int = 0
    replies: int = 0
    failures: int = 0  # replies carrying an error (the client raised)
    timeouts: int = 0  # no reply within `round-timeout` (or dropped in secure set-up)
    invalid: int = 0  # replies dropped by validation
    aggregated: int = 0
    skipped: bool = False  # too few valid replies: global model unchanged
    bytes_down: int = 0  # serialized array bytes sent to clients (train + evaluate)
    bytes_up: int = 0  # serialized array bytes received from clients
    started: float = field(default_factory=time.monotonic)
    wait_seconds: float = 0.0  # messages out until replies in: client compute + comms
    aggregate_seconds: float = 0.0
    client_train_seconds: list[float] = field(default_factory=list)
    client_peak_rss_mb: float = 0.0  # largest peak memory reported by a client process
    dp_sgd_epsilon: float | None = None  # largest sample-level epsilon a client reported
    # Per site (client key): its epsilon so far and the noise multiplier it used.
    dp_sgd_sites: dict[str, dict[str, float]] = field(default_factory=dict)
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    client_eval_accuracy: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def payload_bytes(message: Message) -> int:
    """Serialized size of the arrays a message carries (Flower's ``Array.data``)."""
    if message.has_error():
        return 0
    return sum(
        len(array.data)
        for record in message.content.array_records.values()
        for array in record.values()
    )


def _digest(message: Message) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for record in message.content.array_records.values():
        for name, array in record.items():
            h.update(name.encode())
            h.update(array.data)
    return h.digest()


class TrackedStrategy(Strategy):
    """Forward to ``inner`` with validation, fault tolerance and measurements."""

    def __init__(
        self,
        inner: Strategy,
        *,
        exchanged_spec: Mapping[str, ArraySpec],
        seed: int,
        encoding: UpdateEncoding = FP32,
        min_replies: int,
        round_offset: int = 0,
        uniform_weights: bool = False,
        secure: SecureAggregator | None = None,
        max_update_norm: float = 0.0,
    ) -> None:
        self.inner = inner
        self.seed = seed
        self.min_replies = min_replies
        self.round_offset = round_offset
        # DP-FedAvg's sensitivity bound (clipping norm / sampled clients) holds only for
        # an unweighted mean, so with DP every valid reply counts as one example.
        self.uniform_weights = uniform_weights
        self.secure = secure
        self.max_update_norm = max_update_norm
        self._grid: Grid | None = None  # secure aggregation talks to clients after replies
        self.stats: dict[int, RoundStats] = {}
        self.exchanged_spec = dict(exchanged_spec)
        self.encoding = encoding
        self._global: dict[str, np.ndarray] = {}  # the state sent this round
        self._sent_at = 0.0
        self._site_key: Callable[[int], str] | None = None

    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def summary(self) -> None:
        self.inner.summary()

    # --- training ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        stats = self.stats.setdefault(rnd, RoundStats(round=rnd))
        self._global = {name: array.numpy() for name, array in arrays.items()}
        self._site_key = getattr(grid, "client_key", None)  # NodeWaitingGrid's stable keys
        # Listing the nodes first lets the grid finish any messaging (it asks new nodes
        # for their keys), which may itself draw from `random`, before seeding it.
        grid.get_node_ids()
        random.seed(derive_seed(self.seed, rnd, "train-sampling"))
        messages = list(self.inner.configure_train(rnd, arrays, ConfigRecord(dict(config)), grid))
        stats.sampled = len(messages)
        if self.secure is not None:
            messages = self._secure_setup(rnd, messages, grid, stats)
        stats.bytes_down += sum(payload_bytes(m) for m in messages)
        self._sent_at = time.monotonic()
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self._round(server_round)
        stats = self.stats.setdefault(rnd, RoundStats(round=rnd))
        replies = list(replies)
        stats.wait_seconds = time.monotonic() - self._sent_at
        stats.replies = len(replies)
        stats.timeouts = max(stats.sampled - len(replies), 0)
        valid = []
        for reply in replies:
            stats.bytes_up += payload_bytes(reply)
            node = reply.metadata.src_node_id
            if reply.has_error():
                stats.failures += 1
                stats.problems.append(f"node {node}: error: {reply.error.reason}")
                continue
            for metrics in reply.content.metric_records.values():
                if (seconds := _finite(metrics.get("train-seconds"))) is not None:
                    stats.client_train_seconds.append(seconds)
                if (rss := _finite(metrics.get("peak-rss-mb"))) is not None:
                    stats.client_peak_rss_mb = max(stats.client_peak_rss_mb, rss)
                if (eps := _finite(metrics.get("dp-sgd-epsilon"))) is not None:
                    stats.dp_sgd_epsilon = max(stats.dp_sgd_epsilon or 0.0, eps)
                    site = self._site_key(node) if self._site_key else f"node-{node}"
                    stats.dp_sgd_sites[site] = {"epsilon": eps}
                    if (z := _finite(metrics.get("dp-sgd-noise-multiplier"))) is not None:
                        stats.dp_sgd_sites[site]["noise_multiplier"] = z
            if self.secure is not None:
                continue  # masked: only the protocol can check (and open) the sum
            decoded, problem = self._decoded(reply)
            if problem:
                stats.invalid += 1
                stats.problems.append(f"node {node}: invalid update: {problem}")
                continue
            valid.append(decoded)
            for name in unreadable_metrics(next(iter(decoded.content.metric_records.values()))):
                stats.problems.append(f"node {node}: metric {name!r} is not a finite number; "
                                      "left out of the round's metrics")
        if self.secure is not None:
            return self._secure_aggregate(rnd, replies, stats)
        for problem in stats.problems:
            log.warning("round %d: %s", rnd, problem)
        if len(valid) < self.min_replies:
            stats.skipped = True
            log.warning(
                "round %d skipped: %d valid training replies, `min-replies` is %d "
                "(%d failed, %d timed out, %d invalid)",
                rnd, len(valid), self.min_replies,
                stats.failures, stats.timeouts, stats.invalid,
            )
            return None, None
        valid = _with_common_metrics(valid)
        valid.sort(key=_digest)  # arrival order must not change the float sum
        started = time.monotonic()
        try:
            arrays, metrics = self.inner.aggregate_train(rnd, valid)
        except Exception as exc:  # a failing aggregation skips the round, not the run
            log.exception("round %d: aggregation failed", rnd)
            stats.skipped = True
            stats.problems.append(f"aggregation failed: {type(exc).__name__}: {exc}")
            return None, None
        stats.aggregate_seconds = time.monotonic() - started
        stats.aggregated = len(valid)
        stats.train_metrics = dict(metrics) if metrics else {}
        if arrays is None:
            stats.skipped = True
            stats.problems.append(_why_no_aggregate(self.inner, len(valid)))
            log.warning("round %d: %s", rnd, stats.problems[-1])
            return None, metrics
        return self._in_exchanged_dtypes(arrays), metrics

    # --- secure aggregation ------------------------------------------------------
    def _secure_setup(
        self, rnd: int, messages: list[Message], grid: Grid, stats: RoundStats
    ) -> list[Message]:
        """Run the key stages; train messages only to nodes that completed them."""
        assert self.secure is not None
        self._grid = grid
        try:
            entries = self.secure.setup(grid, [m.metadata.dst_node_id for m in messages], rnd)
        except SecAggAbort as exc:
            stats.problems.append(f"secure aggregation set-up failed: {exc}")
            entries = {}
        finally:
            info = self.secure.last_round_info
            stats.bytes_down += int(info.get("setup-bytes-down", 0))
            stats.bytes_up += int(info.get("setup-bytes-up", 0))
            stats.problems.extend(info.get("problems", []))
        out = []
        for message in messages:
            extra = entries.get(message.metadata.dst_node_id)
            if extra is None:
                continue
            content = message.content
            merged = RecordDict({
                "arrays": content["arrays"],
                "config": ConfigRecord({**dict(content["config"]), **dict(extra)}),
            })
            out.append(Message(content=merged, dst_node_id=message.metadata.dst_node_id,
                               message_type=message.metadata.message_type))
        return out

    def _secure_aggregate(
        self, rnd: int, replies: list[Message], stats: RoundStats
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies and hand its mean to the inner strategy."""
        assert self.secure is not None and self._grid is not None
        masked = [r for r in replies if not r.has_error()]
        known = len(self.secure.last_round_info.get("problems", []))
        try:
            if len(masked) < self.min_replies:
                raise SecAggAbort(f"{len(masked)} masked replies, `min-replies` is "
                                  f"{self.min_replies}")
            started = time.monotonic()
            mean_delta, _ = self.secure.aggregate(self._grid, masked, spec=self.exchanged_spec)
        except SecAggAbort as exc:
            stats.skipped = True
            stats.problems.append(f"secure aggregation failed, round skipped: {exc}")
            log.warning("round %d skipped: %s", rnd, exc)
            return None, None
        finally:
            info = self.secure.last_round_info
            stats.bytes_down += int(info.get("unmask-bytes-down", 0))
            stats.bytes_up += int(info.get("unmask-bytes-up", 0))
            stats.problems.extend(info.get("problems", [])[known:])
        new_state = {
            name: (self._global[name] + mean_delta[name]).astype(self.exchanged_spec[name][1])
            for name in self.exchanged_spec
        }
        # The inner strategy sees one reply holding the securely averaged state.
        summed = make_message(metadata=masked[0].metadata, content=RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in new_state.items()}),
            "metrics": MetricRecord({"num-examples": 1}),
        }))
        arrays, _ = self.inner.aggregate_train(rnd, [summed])
        stats.aggregate_seconds = time.monotonic() - started
        stats.aggregated = int(self.secure.last_round_info.get("unmasked", len(masked)))
        stats.train_metrics = _mean_scalar_metrics(masked)
        if arrays is None:
            stats.skipped = True
            return None, None
        return self._in_exchanged_dtypes(arrays), None

    def _in_exchanged_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        if all(np.dtype(a.dtype) == self.exchanged_spec[n][1] for n, a in arrays.items()):
            return arrays
        return ArrayRecord({
            name: Array(array.numpy().astype(self.exchanged_spec[name][1]))
            for name, array in arrays.items()
        })

    def _decoded(self, reply: Message) -> tuple[Message, str | None]:
        """The reply with its update decoded to full values, or why it is invalid."""
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            return reply, "expected exactly one ArrayRecord and one MetricRecord"
        key, record = next(iter(content.array_records.items()))
        metrics_key, metrics = next(iter(content.metric_records.items()))
        try:
            payload = {name: array.numpy() for name, array in record.items()}
            update = decode_update(payload, self._global, self.encoding)
        except Exception as exc:  # undecodable bytes, or not what the encoding produces
            return reply, f"cannot decode the {self.encoding.scheme} update: {exc}"
        problem = update_problem(
            update, expected=self.exchanged_spec, num_examples=metrics.get("num-examples"),
            base=self._global, max_norm=self.max_update_norm,
        ) or metrics_problem(metrics)
        if problem or not (self.encoding.sends_delta or self.uniform_weights):
            return reply, problem
        if self.uniform_weights:
            metrics = MetricRecord({**dict(metrics), "num-examples": 1})
        decoded = RecordDict({
            key: ArrayRecord({name: Array(value) for name, value in update.items()}),
            metrics_key: metrics,
        })
        return make_message(metadata=reply.metadata, content=decoded), None

    # --- federated evaluation ---------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self._round(server_round)
        grid.get_node_ids()  # see configure_train
        random.seed(derive_seed(self.seed, rnd, "evaluate-sampling"))
        messages = list(
            self.inner.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid)
        )
        stats = self.stats.setdefault(rnd, RoundStats(round=rnd))
        stats.bytes_down += sum(payload_bytes(m) for m in messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self._round(server_round)
        stats = self.stats.setdefault(rnd, RoundStats(round=rnd))
        ok = []
        for reply in replies:
            if reply.has_error() or len(reply.content.metric_records) != 1:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            weight = metrics.get("num-examples")
            if (update_problem({}, expected={}, num_examples=weight) or
                    metrics_problem(metrics)) is None:
                ok.append(reply)
                if (accuracy := _finite(metrics.get("eval-accuracy"))) is not None:
                    stats.client_eval_accuracy.append(accuracy)
        if not ok:
            return None
        try:
            metrics = self.inner.aggregate_evaluate(rnd, _with_common_metrics(ok))
        except Exception as exc:  # federated evaluation must never stop the run
            log.exception("round %d: aggregating the evaluation failed", rnd)
            stats.problems.append(f"evaluation aggregation failed: {exc}")
            return None
        stats.eval_metrics = dict(metrics) if metrics else {}
        stats.client_eval_accuracy.sort()
        return metrics


def _with_common_metrics(replies: list[Message]) -> list[Message]:
    """Replies whose MetricRecords keep only the keys all of them share as finite numbers.

    Flower refuses to average metrics when the replies' keys differ; one client sending
    an extra metric must not make the whole round fail, and one informational NaN (kept
    by validation) must not turn the round's average into NaN.
    """
    records = [next(iter(r.content.metric_records.items())) for r in replies]
    common = set.intersection(*(
        {k for k, v in m.items() if is_finite_number(v)} for _, m in records
    ))
    if all(set(m.keys()) == common for _, m in records):
        return replies
    out = []
    for reply, (key, metrics) in zip(replies, records, strict=True):
        content = RecordDict({
            **{k: v for k, v in reply.content.array_records.items()},
            key: MetricRecord({k: v for k, v in metrics.items() if k in common}),
        })
        out.append(make_message(metadata=reply.metadata, content=content))
    return out


def _finite(value: object) -> float | None:
    """A reported number, or None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if np.isfinite(value) else None


def _mean_scalar_metrics(replies: list[Message]) -> dict[str, float]:
    """Unweighted mean of each scalar metric over the replies (weights stay masked)."""
    sums: dict[str, list[float]] = {}
    for reply in replies:
        for metrics in reply.content.metric_records.values():
            for name, value in metrics.items():
                if is_finite_number(value):
                    sums.setdefault(name, []).append(float(value))
    return {name: float(np.mean(values)) for name, values in sums.items()}


def summarize_accuracy_spread(values: list[float]) -> dict[str, float]:
    """Min, 10th percentile and median of per-client accuracies (fairness under skew)."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {
        "min": float(array.min()),
        "p10": float(np.percentile(array, 10)),
        "median": float(np.median(array)),
    }


def _why_no_aggregate(strategy: Strategy, replies: int) -> str:
    """Why the inner strategy returned no model, for the results (Flower only logs it)."""
    if isinstance(strategy, Bulyan):
        needed = 4 * strategy.num_malicious_nodes + 3
        return (f"round skipped: bulyan needs at least 4 * num-malicious + 3 = {needed} "
                f"valid replies, got {replies} (sample more clients or lower num-malicious)")
    return f"round skipped: {type(strategy).__name__} returned no model from {replies} replies"
