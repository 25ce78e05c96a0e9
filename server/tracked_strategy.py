"""Wire Flower's round hooks onto the reply pipeline (server/reply_pipeline.py).

Composition, not inheritance: ``TrackedStrategy`` holds any Flower Message-API strategy
(``inner``) and forwards the four round hooks to it. What it adds is wiring:

- a round offset, so a resumed run continues its numbering (and its seeds);
- a sampler seeded per (seed, round, phase): Flower samples with the module-level
  ``random``, so seeding it right before delegating is the only way to make client
  sampling reproducible without re-implementing Flower's sampling;
- the state sent each round, kept by round and handed explicitly to the aggregation
  step, which decodes, validates, orders and aggregates the replies as plain data
  (``ValidatedAggregation``, or ``SecureAggregationStep`` with secure aggregation);
  fewer than ``min_replies`` valid replies skips the round (the global model stays);
- one frozen :class:`RoundStats` per round (counts, bytes, seconds, problems), taken
  by the recorder with ``take_round_stats``;
- with a task's ``round_feedback`` (``common/tasks/base.py`` ``RoundFeedback``, e.g.
  the federation's label counts of ``class-weighting-source`` global): the metrics
  of every training reply that is not an error go to it, by site (``collect``), and
  its ``config_entries()`` go into every later round's config; with secure
  aggregation, the statistics it names (``summed_keys``) are summed inside the masked
  vector instead and only their round total reaches it (``collect_sum``); what it
  collects and sends is the task's business (this module knows no metric names of a
  task);
- the per-client federated evaluation of the task's headline metric
  (``headline_metric``: ``eval-<name>`` reply metrics), kept sorted per round.

Flower's ``Strategy.start`` runs the loop; nothing here copies it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Bulyan, Strategy

from common.encoding import UpdateEncoding
from common.records import config_record
from common.training import derive_seed
from server.grid import NodesUnavailableError
from server.reply_pipeline import (
    AggregationStep,
    Reply,
    Update,
    ValidatedAggregation,
    client_measurements,
    common_metric_names,
    finite,
    silent_problems,
)
from server.results import SiteCompute, SiteData
from server.secure_aggregation import SecureAggregationStep, SecureAggregator
from server.strategies import strategy_state
from server.validation import ArraySpec, metrics_problem, update_problem

if TYPE_CHECKING:
    from common.tasks.base import RoundFeedback

log = logging.getLogger(__name__)
FP32 = UpdateEncoding()  # exact values: the default uplink encoding


@dataclass(frozen=True)
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
    client_train_seconds: tuple[float, ...] = ()
    client_peak_rss_mb: float = 0.0  # largest peak memory reported by a client process
    dp_sgd_epsilon: float | None = None  # largest sample-level epsilon a client reported
    # Per site (client key): its epsilon so far and the noise multiplier it used.
    dp_sgd_sites: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    site_examples: Mapping[str, int] = field(default_factory=dict)  # reported, per site
    site_data: Mapping[str, SiteData] = field(default_factory=dict)  # shared data stats
    site_compute: Mapping[str, SiteCompute] = field(default_factory=dict)  # training cost
    train_metrics: Mapping[str, Any] = field(default_factory=dict)
    eval_metrics: Mapping[str, Any] = field(default_factory=dict)
    # Each client's federated evaluation of the task's headline metric, sorted.
    client_eval_headline: tuple[float, ...] = ()
    problems: tuple[str, ...] = ()


def payload_bytes(message: Message) -> int:
    """Serialized size of the arrays a message carries (Flower's ``Array.data``)."""
    if message.has_error():
        return 0
    return sum(
        len(array.data)
        for record in message.content.array_records.values()
        for array in record.values()
    )


def reply_from_message(
    message: Message, *, load_arrays: bool = True,
    sent_to: Mapping[str, int] | None = None, site_key: Callable[[int], str] | None = None,
) -> Reply:
    """A Flower training reply as a plain :class:`Reply` (the message kept as ``source``).

    ``arrays`` is set only for a reply with exactly one ArrayRecord and one MetricRecord
    whose bytes load; otherwise ``problem`` says what is wrong.

    The sender is the node the answered instruction went to (``sent_to``: message id ->
    destination node), because an error the SuperLink makes for a node that died comes
    from Flower's own node id (``SUPERLINK_NODE_ID`` = 1), not from the site;
    ``site_key`` names that node's site.
    """
    src = message.metadata.src_node_id
    answered = message.metadata.reply_to_message_id
    node = (sent_to or {}).get(answered, src) if answered else src
    site = site_key(node) if site_key else ""
    if message.has_error():
        return Reply(node=node, error=str(message.error.reason), source=message, site=site)
    content = message.content
    metrics: dict[str, Any] = {}
    for record in content.metric_records.values():
        metrics.update(record)
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return Reply(node=node, metrics=metrics, source=message, site=site,
                     problem="expected exactly one ArrayRecord and one MetricRecord")
    if not load_arrays:
        return Reply(node=node, metrics=metrics, source=message, site=site)
    array_record = next(iter(content.array_records.values()))
    try:
        arrays = {name: array.numpy() for name, array in array_record.items()}
    except Exception as exc:  # bytes that are not a numpy array
        return Reply(node=node, metrics=metrics, source=message, site=site,
                     problem=f"cannot load the arrays: {exc}")
    return Reply(node=node, arrays=arrays, metrics=metrics, source=message, site=site)


class InnerRule:
    """A Flower strategy's ``aggregate_train`` as an aggregation rule over plain updates."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy

    def __call__(self, rnd: int, updates: Sequence[Update]
                 ) -> tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]:
        messages = [_as_message(u) for u in updates]
        arrays, metrics = self.strategy.aggregate_train(rnd, messages)
        state = None if arrays is None else {n: a.numpy() for n, a in arrays.items()}
        return state, None if metrics is None else dict(metrics)

    def why_no_model(self, replies: int) -> str:
        """Why the strategy returned no model, for the results (Flower only logs it)."""
        return _why_no_aggregate(self.strategy, replies)


def _as_message(update: Update) -> Message:
    """An update as the reply message the inner strategy expects (same metadata)."""
    source = update.source
    assert isinstance(source, Message), "updates reach the inner strategy from messages"
    array_key = next(iter(source.content.array_records), "arrays")
    metric_key = next(iter(source.content.metric_records), "metrics")
    content = RecordDict({
        array_key: ArrayRecord({k: Array(np.asarray(v)) for k, v in update.arrays.items()}),
        metric_key: MetricRecord(dict(update.metrics)),
    })
    return make_message(metadata=source.metadata, content=content)


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
        round_feedback: RoundFeedback | None = None,
        headline_metric: str = "accuracy",
    ) -> None:
        self.inner = inner
        self.seed = seed
        self.min_replies = min_replies
        self.round_offset = round_offset
        self.exchanged_spec = dict(exchanged_spec)
        self.encoding = encoding
        rule = InnerRule(inner)
        # The one aggregation step; the hooks below never ask which it is.
        self.aggregation: AggregationStep
        if secure is not None:
            self.aggregation = SecureAggregationStep(
                secure, rule=rule, spec=self.exchanged_spec, min_replies=min_replies,
                feedback=round_feedback)
        else:
            # DP-FedAvg's sensitivity bound (clipping norm / sampled clients) holds only
            # for an unweighted mean, so with DP every valid reply counts as one example.
            self.aggregation = ValidatedAggregation(
                rule=rule, spec=self.exchanged_spec, encoding=encoding,
                min_replies=min_replies, max_update_norm=max_update_norm,
                uniform_weights=uniform_weights, why_no_model=rule.why_no_model,
                feedback=round_feedback)
        self._stats: dict[int, RoundStats] = {}
        self._sent: dict[int, dict[str, np.ndarray]] = {}  # the state sent, by round
        self._sent_at: dict[int, float] = {}
        # The train messages of a round: the grid gives them their ids when it pushes them.
        self._messages: dict[int, list[Message]] = {}
        self._site_key: Callable[[int], str] | None = None
        self.round_feedback = round_feedback
        # The reply metric of the headline: the client dashes the task's metric names.
        self._headline_key = f"eval-{headline_metric.replace('_', '-')}"

    def to_round(self, server_round: int) -> int:
        """The run's round number of Flower's ``server_round`` (after the offset)."""
        return server_round + self.round_offset

    def take_round_stats(self, rnd: int) -> RoundStats | None:
        """The statistics of round ``rnd`` (the run's numbering), handed over once."""
        self._sent.pop(rnd, None)
        self._sent_at.pop(rnd, None)
        self._messages.pop(rnd, None)
        return self._stats.pop(rnd, None)

    def inner_state(self) -> dict[str, Any]:
        """The inner strategy's state for a checkpoint (server/strategies.py)."""
        return strategy_state(self.inner)

    def summary(self) -> None:
        self.inner.summary()

    def _update(self, rnd: int, **changes: Any) -> RoundStats:
        stats = replace(self._stats.get(rnd) or RoundStats(round=rnd), **changes)
        self._stats[rnd] = stats
        return stats

    def _stats_of(self, rnd: int) -> RoundStats:
        return self._stats.get(rnd) or self._update(rnd)

    # --- training ---------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.to_round(server_round)
        stats = self._stats_of(rnd)
        self._sent[rnd] = {name: array.numpy() for name, array in arrays.items()}
        self._site_key = getattr(grid, "client_key", None)  # NodeWaitingGrid's stable keys
        # Listing the nodes first lets the grid finish any messaging (it asks new nodes
        # for their keys), which may itself draw from `random`, before seeding it.
        grid.get_node_ids()
        random.seed(derive_seed(self.seed, rnd, "train-sampling"))
        round_config = dict(config)
        if self.round_feedback is not None:
            entries = self.round_feedback.config_entries()
            if entries:  # the federation's aggregates (e.g. summed label counts), in the log
                print(f"[fedsft] round {rnd} config: " + ", ".join(
                    f"{k}={v}" for k, v in sorted(entries.items())), flush=True)
            round_config.update(entries)
        messages = list(self.inner.configure_train(rnd, arrays, ConfigRecord(round_config),
                                                   grid))
        stats = self._update(rnd, sampled=len(messages))
        setup = self.aggregation.setup(rnd, [m.metadata.dst_node_id for m in messages],
                                       grid, round_config)
        if setup.entries is not None:
            messages = _with_entries(messages, setup.entries)
        stats = self._update(rnd, bytes_down=stats.bytes_down + setup.bytes_down,
                             bytes_up=stats.bytes_up + setup.bytes_up,
                             problems=(*stats.problems, *setup.problems))
        self._update(rnd, bytes_down=stats.bytes_down + sum(payload_bytes(m) for m in messages))
        self._sent_at[rnd] = time.monotonic()
        self._messages[rnd] = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = self.to_round(server_round)
        stats = self._stats_of(rnd)
        messages = list(replies)
        wait = time.monotonic() - self._sent_at.get(rnd, stats.started)
        sent = self._messages.pop(rnd, [])
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in sent if m.metadata.message_id}
        plain = [reply_from_message(m, load_arrays=self.aggregation.reads_arrays,
                                    sent_to=sent_to, site_key=self._site_key)
                 for m in messages]
        measured = client_measurements(plain, site_key=self._site_key)
        # Named, not only counted: the sites this round waited for in vain (a reply the
        # SuperLink sent for a dead node is that node's: ``reply_from_message``).
        silent = silent_problems([m.metadata.dst_node_id for m in sent],
                                 [reply.node for reply in plain], site_key=self._site_key)
        result = self.aggregation(rnd, plain, self._sent.get(rnd, {}))
        self.aggregation.collect_feedback(rnd, plain, self._site_key or (lambda n: f"node-{n}"))
        self._update(
            rnd, wait_seconds=wait, replies=len(messages),
            timeouts=max(stats.sampled - len(messages), 0),
            bytes_up=stats.bytes_up + sum(payload_bytes(m) for m in messages) + result.bytes_up,
            bytes_down=stats.bytes_down + result.bytes_down,
            failures=result.failures, invalid=result.invalid, aggregated=result.aggregated,
            skipped=result.arrays is None, aggregate_seconds=result.seconds,
            train_metrics=dict(result.train_metrics),
            problems=(*stats.problems, *silent, *result.problems, *measured.problems),
            client_train_seconds=measured.train_seconds,
            client_peak_rss_mb=measured.peak_rss_mb, dp_sgd_epsilon=measured.dp_sgd_epsilon,
            dp_sgd_sites=measured.dp_sgd_sites, site_examples=measured.examples,
            site_data=measured.site_data, site_compute=measured.site_compute,
        )
        metrics = None if result.metrics is None else MetricRecord(result.metrics)
        if result.arrays is None:
            return None, metrics
        return ArrayRecord({n: Array(a) for n, a in result.arrays.items()}), metrics

    # --- federated evaluation ---------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        rnd = self.to_round(server_round)
        if _evaluates_nobody(self.inner):
            return []  # no node to wait for (fraction-evaluate = 0)
        try:
            grid.get_node_ids()  # see configure_train
            random.seed(derive_seed(self.seed, rnd, "evaluate-sampling"))
            messages = list(
                self.inner.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid)
            )
        except NodesUnavailableError as exc:
            # The round's training is aggregated: the recorder (Flower's evaluate_fn,
            # next) must still write its results line and checkpoint. If the sites stay
            # away, the next round's sampling stops the run with the same error.
            log.warning("round %d: federated evaluation skipped: %s", rnd, exc)
            stats = self._stats_of(rnd)
            self._update(rnd, problems=(*stats.problems,
                                        f"federated evaluation skipped: {exc}"))
            return []
        stats = self._stats_of(rnd)
        self._update(rnd, bytes_down=stats.bytes_down + sum(payload_bytes(m) for m in messages))
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        rnd = self.to_round(server_round)
        ok = []
        headlines: list[float] = []
        for reply in replies:
            if reply.has_error() or len(reply.content.metric_records) != 1:
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            weight = metrics.get("num-examples")
            if (update_problem({}, expected={}, num_examples=weight) or
                    metrics_problem(metrics)) is None:
                ok.append(reply)
                if (value := finite(metrics.get(self._headline_key))) is not None:
                    headlines.append(value)
        stats = self._update(rnd, client_eval_headline=(
            *self._stats_of(rnd).client_eval_headline, *headlines))
        if not ok:
            return None
        try:
            aggregated = self.inner.aggregate_evaluate(rnd, _with_common_metrics(ok))
        except Exception as exc:  # federated evaluation must never stop the run
            log.exception("round %d: aggregating the evaluation failed", rnd)
            self._update(rnd, problems=(*stats.problems,
                                        f"evaluation aggregation failed: {exc}"))
            return None
        self._update(rnd, eval_metrics=dict(aggregated) if aggregated else {},
                     client_eval_headline=tuple(sorted(stats.client_eval_headline)))
        return aggregated


def _with_entries(messages: list[Message],
                  entries: Mapping[int, Mapping[str, Any]]) -> list[Message]:
    """Train messages only to the nodes with set-up entries, which they get."""
    out = []
    for message in messages:
        extra = entries.get(message.metadata.dst_node_id)
        if extra is None:
            continue
        content = message.content
        merged = RecordDict({
            "arrays": content["arrays"],
            "config": ConfigRecord({**dict(config_record(content, "config")), **dict(extra)}),
        })
        out.append(Message(content=merged, dst_node_id=message.metadata.dst_node_id,
                           message_type=message.metadata.message_type))
    return out


def _with_common_metrics(replies: list[Message]) -> list[Message]:
    """Evaluation replies whose MetricRecords keep only the names all share as finite
    numbers (see server/reply_pipeline.py ``with_common_metrics``)."""
    records = [next(iter(r.content.metric_records.items())) for r in replies]
    common = common_metric_names([m for _, m in records])
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


def _evaluates_nobody(strategy: Strategy) -> bool:
    """Whether federated evaluation is off (``fraction_evaluate`` 0), also behind the DP
    wrappers, which hold the strategy they wrap as ``strategy``."""
    while not hasattr(strategy, "fraction_evaluate") and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return getattr(strategy, "fraction_evaluate", None) == 0.0


def _why_no_aggregate(strategy: Strategy, replies: int) -> str:
    """Why the inner strategy returned no model, for the results (Flower only logs it)."""
    if isinstance(strategy, Bulyan):
        needed = 4 * strategy.num_malicious_nodes + 3
        return (f"round skipped: bulyan needs at least 4 * num-malicious + 3 = {needed} "
                f"valid replies, got {replies} (sample more clients or lower num-malicious)")
    return f"round skipped: {type(strategy).__name__} returned no model from {replies} replies"
