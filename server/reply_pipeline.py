"""The training-reply pipeline as pure steps over plain data (no Flower messages inside).

One round's replies go through

1. ``prepare_updates``: each reply is decoded against the global state that was sent
   for the round (passed in, not remembered), validated (server/validation.py), and
   either kept as an :class:`Update` or dropped with its reason; errors are counted;
2. ``with_common_metrics`` and ``in_digest_order``: the kept updates share one set of
   finite metrics and are sorted by content digest, so the floating-point sum does not
   depend on arrival order;
3. an aggregation *step*: anything with the shape of :class:`AggregationStep` (a
   round set-up, the aggregation itself returning an :class:`Aggregate`, and the
   hand-over of site statistics): ``ValidatedAggregation`` here (steps 1-2, then an
   aggregation rule), the secure protocol in server/secure_aggregation.py another; the
   strategy holds one and never asks which;
4. ``restore_dtypes``: the new global state in the exchanged dtypes (Flower's FedOpt
   family returns float64).

server/tracked_strategy.py turns Flower messages into :class:`Reply` records and back;
everything here can be tested with hand-made arrays.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from common.encoding import UpdateEncoding, decode_update

if TYPE_CHECKING:  # the protocol only: the pipeline imports no task code (torch)
    from common.tasks.base import RoundFeedback
from server.results import SiteCompute, SiteData
from server.validation import (
    ArraySpec,
    is_finite_number,
    metrics_problem,
    unreadable_metrics,
    update_problem,
)

log = logging.getLogger(__name__)

State = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Reply:
    """One training reply as plain data.

    ``arrays`` is the reply's single array record as numpy (None when the reply is an
    error, is malformed, or its bytes do not load: ``problem`` says why). ``source`` is
    the transport's own message, opaque here: only the adapter that built the reply
    reads it back (to hand the inner Flower strategy its metadata).
    """

    node: int
    arrays: State | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None  # the client's error reason: the client raised
    problem: str | None = None  # why the content cannot be read as an update
    source: object = None
    site: str = ""  # the node's site name (client key) when known: what problems name


def who(reply: Reply | Update) -> str:
    """How results and logs name a reply's sender: ``site (node N)``, else ``node N``
    (also for ``node-N``, the key a site without a ``site-name`` has: no name to show)."""
    site = getattr(reply, "site", "")
    return f"{site} (node {reply.node})" if site and site != f"node-{reply.node}" \
        else f"node {reply.node}"


@dataclass(frozen=True)
class Update:
    """A decoded, validated update: full new values in the exchanged names and dtypes."""

    node: int
    arrays: State
    metrics: Mapping[str, Any]
    source: object = None
    site: str = ""


@dataclass(frozen=True)
class Prepared:
    """What ``prepare_updates`` kept and dropped, with the reasons in arrival order."""

    updates: tuple[Update, ...]
    failures: int  # error replies
    invalid: int  # dropped by decoding or validation
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Aggregate:
    """What an aggregation step made of one round's replies.

    ``arrays`` is the new global state (None: the round is skipped and the global model
    stays); ``metrics`` go back to Flower; ``train_metrics`` go into the results row.
    ``bytes_down`` / ``bytes_up`` are the step's own traffic (the secure protocol's).
    """

    arrays: dict[str, np.ndarray] | None
    metrics: dict[str, Any] | None = None
    aggregated: int = 0
    failures: int = 0
    invalid: int = 0
    problems: tuple[str, ...] = ()
    train_metrics: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0


@dataclass(frozen=True)
class RoundSetup:
    """What an aggregation step's set-up adds to a round before its train messages go.

    ``entries``: train-config entries per node id, and only the nodes listed get a
    message (the secure protocol's keys; ``{}`` when its set-up aborted); None leaves
    the round's messages as sampled. The rest is the set-up's own traffic and problems.
    """

    entries: Mapping[int, Mapping[str, Any]] | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    problems: tuple[str, ...] = ()


class AggregationStep(Protocol):
    """How one round's updates become the new global state, as the strategy's one step.

    The strategy calls ``setup`` (with the round's config) before the train messages go
    out, then the step itself with the round's replies and the state sent (-> the
    round's :class:`Aggregate`), then ``collect_feedback``, which hands the round's site
    statistics to the task's ``RoundFeedback`` the step was built with, if any.
    ``reads_arrays`` says whether a reply's arrays are loaded into its :class:`Reply`
    (masked replies are only ever summed).
    """

    @property
    def reads_arrays(self) -> bool: ...

    def setup(self, rnd: int, node_ids: list[int], grid: Any,
              round_config: Mapping[str, Any]) -> RoundSetup: ...

    def __call__(self, rnd: int, replies: Sequence[Reply], sent: State) -> Aggregate: ...

    def collect_feedback(self, rnd: int, replies: Sequence[Reply],
                         site_key: Callable[[int], str]) -> None: ...


# An aggregation rule over validated updates: (round, updates) -> (arrays, metrics).
# Arrays None means the rule produced no model (e.g. too few replies for Bulyan).
AggregationRule = Callable[[int, Sequence[Update]],
                           tuple[dict[str, np.ndarray] | None, dict[str, Any] | None]]


# --- decode and validate ---------------------------------------------------------------
def decode_reply(
    reply: Reply, *, sent: State, spec: Mapping[str, ArraySpec], encoding: UpdateEncoding,
    max_update_norm: float = 0.0, uniform_weights: bool = False,
) -> tuple[Update | None, str | None]:
    """The reply as a validated :class:`Update`, or (None, why it is invalid).

    Decodes the wire payload against ``sent`` (common/encoding.py), then checks names,
    shapes, dtypes, finite values, the norm bound and the checked metrics
    (server/validation.py). With ``uniform_weights`` every update weighs one example
    (DP-FedAvg's sensitivity bound holds only for an unweighted mean).
    """
    if reply.arrays is None:
        return None, reply.problem or "the reply carries no update"
    try:
        update = decode_update(dict(reply.arrays), dict(sent), encoding)
    except Exception as exc:  # undecodable bytes, or not what the encoding produces
        return None, f"cannot decode the {encoding.scheme} update: {exc}"
    problem = update_problem(
        update, expected=spec, num_examples=reply.metrics.get("num-examples"),
        base=sent, max_norm=max_update_norm,
    ) or metrics_problem(reply.metrics)
    if problem:
        return None, problem
    if not encoding.sends_delta:
        update = {name: update[name] for name in reply.arrays}  # the order the client sent
    metrics = dict(reply.metrics)
    if uniform_weights:
        metrics["num-examples"] = 1
    return Update(node=reply.node, arrays=update, metrics=metrics, source=reply.source,
                  site=reply.site), None


def prepare_updates(
    replies: Sequence[Reply], *, sent: State, spec: Mapping[str, ArraySpec],
    encoding: UpdateEncoding, max_update_norm: float = 0.0, uniform_weights: bool = False,
) -> Prepared:
    """Decode and validate every reply; count errors and invalid ones, with reasons."""
    updates: list[Update] = []
    problems: list[str] = []
    failures = invalid = 0
    for reply in replies:
        if reply.error is not None:
            failures += 1
            problems.append(f"{who(reply)}: error: {reply.error}")
            continue
        update, problem = decode_reply(
            reply, sent=sent, spec=spec, encoding=encoding,
            max_update_norm=max_update_norm, uniform_weights=uniform_weights)
        if update is None:
            invalid += 1
            problems.append(f"{who(reply)}: invalid update: {problem}")
            continue
        updates.append(update)
        problems.extend(f"{who(reply)}: metric {name!r} is not a finite number; "
                        "left out of the round's metrics"
                        for name in unreadable_metrics(update.metrics))
    return Prepared(updates=tuple(updates), failures=failures, invalid=invalid,
                    problems=tuple(problems))


def error_problems(replies: Sequence[Reply]) -> list[str]:
    """The reason of every error reply, as ``prepare_updates`` words it."""
    return [f"{who(r)}: error: {r.error}" for r in replies if r.error is not None]


def silent_problems(sent: Iterable[int], replied: Iterable[int], *,
                    site_key: Callable[[int], str] | None = None) -> list[str]:
    """One problem per node that was sent a message and sent no reply (it left, or it
    was slower than `round-timeout`), named as ``who`` names a sender, in node order."""
    def name(node: int) -> str:
        return who(Reply(node=node, site=site_key(node) if site_key else ""))
    return [f"{name(node)}: no reply within round-timeout (the node left or was too slow)"
            for node in sorted(set(sent) - set(replied))]


# --- order -------------------------------------------------------------------------------
def common_metric_names(metrics: Sequence[Mapping[str, Any]]) -> set[str]:
    """The metric names all of ``metrics`` hold as finite numbers."""
    return set.intersection(*({k for k, v in m.items() if is_finite_number(v)}
                              for m in metrics))


def with_common_metrics(updates: Sequence[Update]) -> list[Update]:
    """Updates whose metrics keep only the names all of them share as finite numbers.

    Flower refuses to average metrics when the replies' keys differ; one client sending
    an extra metric must not make the whole round fail, and one informational NaN (kept
    by validation) must not turn the round's average into NaN.
    """
    if not updates:
        return []
    common = common_metric_names([u.metrics for u in updates])
    return [u if set(u.metrics) == common else
            replace(u, metrics={k: v for k, v in u.metrics.items() if k in common})
            for u in updates]


def array_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of an array: exactly what Flower's ``Array.data`` holds."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def content_digest(arrays: State) -> bytes:
    """A digest of the names and serialized values, in the arrays' order."""
    h = hashlib.blake2b(digest_size=16)
    for name, array in arrays.items():
        h.update(name.encode())
        h.update(array_bytes(array))
    return h.digest()


def in_digest_order(updates: Sequence[Update]) -> list[Update]:
    """``updates`` sorted by content digest: arrival order must not change the float sum."""
    return sorted(updates, key=lambda u: content_digest(u.arrays))


# --- after aggregation ---------------------------------------------------------------
def restore_dtypes(arrays: State, spec: Mapping[str, ArraySpec]) -> dict[str, np.ndarray]:
    """``arrays`` cast to the exchanged dtypes (replies and the global must keep matching)."""
    return {name: a if a.dtype == spec[name][1] else a.astype(spec[name][1])
            for name, a in arrays.items()}


def mean_scalar_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Unweighted mean of each finite scalar metric over the replies."""
    values: dict[str, list[float]] = {}
    for record in metrics:
        for name, value in record.items():
            if is_finite_number(value):
                values.setdefault(name, []).append(float(value))
    return {name: float(np.mean(v)) for name, v in values.items()}


def finite(value: object) -> float | None:
    """A reported number, or None when it is missing or not a finite number."""
    return float(value) if is_finite_number(value) else None  # type: ignore[arg-type]


# Reply metrics a site's data statistics may use (client/local_data.py sends them, with
# the site's consent): counts and shares only. Any other ``data-*`` key refuses the set.
_DATA_COUNTS = {"data-rows": "rows", "data-rows-read": "rows_read",
                "data-dropped": "dropped", "data-truncated": "truncated"}
_DATA_SHARES = {"data-duplicate-share": "duplicate_share", "data-short-share": "short_share",
                "data-truncated-share": "truncated_share"}
_DATA_LABEL = re.compile(r"data-label-(count|share)-(0|[1-9][0-9]{0,5})")
DATA_PREFIX = "data-"


def _count(value: object) -> int | None:
    """A non-negative integer count (an int, or a float holding one), else None."""
    number = finite(value)
    return int(number) if number is not None and number >= 0 and number.is_integer() else None


def _fraction(value: object) -> float | None:
    """A share in [0, 1], else None."""
    number = finite(value)
    return number if number is not None and 0 <= number <= 1 else None


def site_data_stats(metrics: Mapping[str, Any]) -> tuple[SiteData | None, str | None]:
    """A reply's ``data-*`` metrics as a :class:`SiteData`, or (None, why refused).

    (None, None) when the reply has no ``data-*`` metric (the site does not share, or
    sent them in an earlier round). Refused as a whole: a key outside the allowed names,
    a count that is not a non-negative integer, a share outside [0, 1], label indices
    not 0..k-1, or counts that do not add up (labels or rows kept above rows read).
    """
    sent = {k: v for k, v in metrics.items() if k.startswith(DATA_PREFIX)}
    if not sent:
        return None, None
    values: dict[str, Any] = {}
    labels: dict[int, int] = {}
    for key, value in sorted(sent.items()):
        label = _DATA_LABEL.fullmatch(key)
        if key in _DATA_COUNTS or (label and label.group(1) == "count"):
            number: float | int | None = _count(value)
            kind = "a non-negative integer"
        elif key in _DATA_SHARES or label:
            number, kind = _fraction(value), "a share in [0, 1]"
        elif key == "data-median-tokens":
            number = finite(value)
            number = number if number is not None and number >= 0 else None
            kind = "a non-negative number"
        else:
            return None, f"{key!r} is not an aggregate statistic the server accepts"
        if number is None:
            return None, f"{key!r} must be {kind}, got {value!r:.40}"
        if label and label.group(1) == "count":
            labels[int(label.group(2))] = int(number)
        elif not label:
            values[_DATA_COUNTS.get(key) or _DATA_SHARES.get(key) or "median_tokens"] = number
    if "rows" not in values:
        return None, "'data-rows' is missing"
    if sorted(labels) != list(range(len(labels))):
        return None, f"label counts must be for classes 0..k-1, got {sorted(labels)}"
    counts = tuple(labels[i] for i in range(len(labels)))
    if sum(counts) > values["rows"]:
        return None, f"label counts add up to {sum(counts)}, above 'data-rows' {values['rows']}"
    if values.get("rows_read") is not None:
        if values["rows"] > values["rows_read"]:
            return None, (f"'data-rows' {values['rows']} is above 'data-rows-read' "
                          f"{values['rows_read']}")
        values.setdefault("dropped", values["rows_read"] - values["rows"])
    return SiteData(label_counts=counts, **values), None


def site_compute(metrics: Mapping[str, Any]) -> SiteCompute | None:
    """A reply's training-cost metrics as a :class:`SiteCompute`; None without a finite,
    non-negative ``train-seconds``. An unreadable optional metric reads as None."""
    seconds = finite(metrics.get("train-seconds"))
    if seconds is None or seconds < 0:
        return None

    def positive(name: str) -> float | None:
        value = finite(metrics.get(name))
        return value if value is not None and value >= 0 else None

    utilization = positive("gpu-utilization")
    return SiteCompute(
        train_seconds=seconds, examples=_count(metrics.get("train-examples-seen")),
        tokens=_count(metrics.get("train-tokens")), peak_rss_mb=positive("peak-rss-mb"),
        gpu_peak_mb=positive("gpu-peak-memory-mb"),
        gpu_utilization=utilization if utilization is None or utilization <= 100 else None)


@dataclass(frozen=True)
class ClientMeasurements:
    """What the clients reported about their own cost, from the non-error replies."""

    train_seconds: tuple[float, ...] = ()
    peak_rss_mb: float = 0.0  # the largest peak memory of a client process
    dp_sgd_epsilon: float | None = None  # the largest sample-level epsilon reported
    # Per site: its epsilon so far and the noise multiplier it used (DP-SGD).
    dp_sgd_sites: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    # Per site: the training examples it reported (`num-examples`), an aggregate count.
    examples: Mapping[str, int] = field(default_factory=dict)
    # Per site: its data statistics (sites that share them, in the reply that has them).
    site_data: Mapping[str, SiteData] = field(default_factory=dict)
    # Per site: its training time, throughput and memory this round.
    site_compute: Mapping[str, SiteCompute] = field(default_factory=dict)
    problems: tuple[str, ...] = ()  # data statistics refused, and why


def client_measurements(
    replies: Sequence[Reply], *, site_key: Callable[[int], str] | None = None
) -> ClientMeasurements:
    """Train seconds, peak memory, DP-SGD epsilon (overall and per site), training
    examples, data statistics and training cost per site reported by the replies; a
    site is named by ``site_key`` of the node id, else ``node-<id>``."""
    seconds: list[float] = []
    rss, eps = 0.0, None
    sites: dict[str, dict[str, float]] = {}
    examples: dict[str, int] = {}
    data: dict[str, SiteData] = {}
    compute: dict[str, SiteCompute] = {}
    problems: list[str] = []
    for reply in replies:
        if reply.error is not None:
            continue
        site = site_key(reply.node) if site_key else f"node-{reply.node}"
        if reply.problem is None and (n := finite(reply.metrics.get("num-examples"))):
            examples[site] = int(n)
        if (value := finite(reply.metrics.get("train-seconds"))) is not None:
            seconds.append(value)
        if (value := finite(reply.metrics.get("peak-rss-mb"))) is not None:
            rss = max(rss, value)
        if (value := finite(reply.metrics.get("dp-sgd-epsilon"))) is not None:
            eps = max(eps or 0.0, value)
            sites[site] = {"epsilon": value}
            if (z := finite(reply.metrics.get("dp-sgd-noise-multiplier"))) is not None:
                sites[site]["noise_multiplier"] = z
        stats, why = site_data_stats(reply.metrics)
        if stats is not None:
            data[site] = stats
        elif why is not None:
            problems.append(f"{who(reply)}: data statistics left out: {why}")
        if (cost := site_compute(reply.metrics)) is not None:
            compute[site] = cost
    return ClientMeasurements(train_seconds=tuple(seconds), peak_rss_mb=rss,
                              dp_sgd_epsilon=eps, dp_sgd_sites=sites,
                              examples=dict(sorted(examples.items())),
                              site_data=dict(sorted(data.items())),
                              site_compute=dict(sorted(compute.items())),
                              problems=tuple(problems))


# --- the default step --------------------------------------------------------------------
@dataclass(frozen=True)
class ValidatedAggregation:
    """Decode, validate, order, then ``rule``: the step for plain (unmasked) replies.

    Fewer than ``min_replies`` valid updates skip the round; so does a rule that raises
    (the run goes on) or returns no model (``why_no_model`` says why, for the results).
    """

    rule: AggregationRule
    spec: Mapping[str, ArraySpec]
    encoding: UpdateEncoding
    min_replies: int
    max_update_norm: float = 0.0
    uniform_weights: bool = False
    why_no_model: Callable[[int], str] = lambda n: f"round skipped: no model from {n} replies"
    feedback: RoundFeedback | None = None  # the task's, when the run needs one

    @property
    def reads_arrays(self) -> bool:
        return True

    def setup(self, rnd: int, node_ids: list[int], grid: Any,
              round_config: Mapping[str, Any]) -> RoundSetup:
        """Nothing to set up: the round's messages go as sampled."""
        return RoundSetup()

    def collect_feedback(self, rnd: int, replies: Sequence[Reply],
                         site_key: Callable[[int], str]) -> None:
        """Each site's own statistics, from every reply that is not an error."""
        if self.feedback is None:
            return
        for reply in replies:
            if reply.error is None:
                self.feedback.collect(site_key(reply.node), reply.metrics)

    def __call__(self, rnd: int, replies: Sequence[Reply], sent: State) -> Aggregate:
        prepared = prepare_updates(
            replies, sent=sent, spec=self.spec, encoding=self.encoding,
            max_update_norm=self.max_update_norm, uniform_weights=self.uniform_weights)
        problems = list(prepared.problems)
        for problem in problems:
            log.warning("round %d: %s", rnd, problem)
        valid = prepared.updates
        if len(valid) < self.min_replies:
            log.warning(
                "round %d skipped: %d valid training replies, `min-replies` is %d "
                "(%d failed, %d invalid)",
                rnd, len(valid), self.min_replies, prepared.failures, prepared.invalid)
            return Aggregate(arrays=None, problems=tuple(problems),
                             failures=prepared.failures, invalid=prepared.invalid)
        ordered = in_digest_order(with_common_metrics(valid))
        started = time.monotonic()
        try:
            arrays, metrics = self.rule(rnd, ordered)
        except Exception as exc:  # a failing aggregation skips the round, not the run
            log.exception("round %d: aggregation failed", rnd)
            problems.append(f"aggregation failed: {type(exc).__name__}: {exc}")
            return Aggregate(arrays=None, problems=tuple(problems),
                             failures=prepared.failures, invalid=prepared.invalid)
        seconds = time.monotonic() - started
        train_metrics = dict(metrics) if metrics else {}
        if arrays is None:
            problems.append(self.why_no_model(len(ordered)))
            log.warning("round %d: %s", rnd, problems[-1])
        return Aggregate(
            arrays=None if arrays is None else restore_dtypes(arrays, self.spec),
            metrics=metrics, aggregated=len(ordered), problems=tuple(problems),
            train_metrics=train_metrics, seconds=seconds, failures=prepared.failures,
            invalid=prepared.invalid)
