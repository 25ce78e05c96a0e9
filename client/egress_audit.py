"""A ClientApp mod that checks every outgoing message before it leaves the site.

The audit is on when the run config (the coordinator's side) or the site's own node
config (``flower-supernode --node-config 'audit-egress=true'``) asks for it: the
stricter of the two wins, so a coordinator cannot switch off what a site requires.
When on, each reply must hold only what fedsft is meant to send:

- train replies: one ArrayRecord whose names are exactly the wire names of the
  exchanged trainable tensors (for the configured encoding, or the masked vectors, the
  masked weight and the masked summed statistics under secure aggregation) with
  numeric dtypes, and one MetricRecord of scalars, none of them a statistic the round
  sums securely (``secagg-sum-keys``: those leave only masked);
- evaluate replies: one MetricRecord of scalars, no arrays;
- query replies: ConfigRecords whose values are the small scalars/bytes of the
  protocol (the client key, public keys, encrypted shares), no arrays.

No text, token ids, labels or per-example values can pass: metric names must be in
the allow-list (``allowed_metric_names``: the machinery's names below plus the run's
task's own, from its registry entry, ``TaskInfo.train_reply_metrics`` /
``eval_reply_metrics``; a metric name is a string too, and could carry a row), metric
values must be ``int`` or ``float``, arrays are limited to the exchanged names, query
replies carry only the protocol's keys, with no string but this site's own
``client-key``. Error replies are checked too: an exception's message can quote a data
row (a tokenizer or parser error), so only fedsft's own error types
(:data:`SAFE_ERRORS`, messages that name files, keys and settings) keep their message,
cut to ``MAX_ERROR_CHARS``; any other error reaches the server as its type name only,
the full message staying in the site's log.
A violation turns the reply into an error (Flower reports it to the server as a failed
reply), so a leak is loud, never silent. The number of audited replies is added to
the train metrics (``egress-audited``) so a test can see the audit ran.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from client.local_data import client_key
from client.outgoing import SECAGG_ROUND_KEY
from client.secagg import SUMS_KEY, WEIGHT_KEY, summed_keys_of
from common.config import ConfigError, RunConfig
from common.encoding import expected_keys
from common.records import array_record, numpy_arrays
from common.tasks import task_info, task_names

log = logging.getLogger(__name__)

NUMERIC_DTYPES = {np.dtype(t) for t in
                  (np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint32)}
_AUDITED_KEY = "egress-audited"
NODE_CONFIG_KEY = "audit-egress"  # the site's switch, in its node config

# The metric names the machinery of a fedsft ClientApp sends, for any task
# (client/app.py, client/outgoing.py, client/compute.py, client/sample_dp.py,
# client/dp_clipping.py, and ``data-rows``, which every task's data stats have); a
# task's own names are in its registry entry. A name outside these patterns is refused,
# whatever its value.
_TRAIN_METRICS = (
    "num-examples", "train-loss", "train-first-loss", "train-steps", "train-seconds",
    "peak-rss-mb", "train-examples-seen", "train-tokens", "gpu-peak-memory-mb",
    "gpu-utilization", "norm_bit", "dp-sgd-epsilon", "dp-sgd-steps",
    "dp-sgd-noise-multiplier", "data-rows", _AUDITED_KEY)
_EVALUATE_METRICS = ("num-examples", "eval-seconds")
QUERY_KEYS = re.compile(r"client-key|secagg-[a-z-]{1,32}")
# fedsft's own errors, whose messages name files, keys and settings, not data rows.
SAFE_ERRORS = ("DataError", "ConfigError", "EgressViolation", "SecAggRefusal")
MAX_ERROR_CHARS = 500


class EgressViolation(RuntimeError):
    """An outgoing message carries something other than updates and scalar metrics."""


def allowed_metric_names(kind: str, task: str | None = None) -> re.Pattern[str]:
    """The metric names a ``kind`` reply ("train"; any other: "evaluate") may carry in a
    run of ``task``: the machinery's, plus the task's ``TaskInfo.train_reply_metrics``
    (train) or ``eval-<metric, dashed>`` of its metrics and its ``eval_reply_metrics``
    (evaluate). ``task`` None: those of every registered task.

    Raises ``ValueError`` for an unknown ``task``.
    """
    infos = [task_info(name) for name in (task_names() if task is None else (task,))]
    if kind == "train":
        patterns = [*_TRAIN_METRICS, *(p for info in infos for p in info.train_reply_metrics)]
    else:
        patterns = [*_EVALUATE_METRICS,
                    *sorted({f"eval-{m.name.replace('_', '-')}"
                             for info in infos for m in info.metrics}),
                    *(p for info in infos for p in info.eval_reply_metrics)]
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def egress_problems(
    sent: Message, reply: Message, *, allowed_array_names: set[str] | None,
    own_key: str | None = None, masked_metrics: frozenset[str] = frozenset(),
    task: str | None = None,
) -> list[str]:
    """What in ``reply`` (to ``sent``) must not leave the site; empty when clean.

    ``own_key``: this site's ``client-key`` (the one string a query reply may carry);
    ``masked_metrics``: metric names that may leave only inside the masked sum;
    ``task``: the run's task, whose own metric names pass (None: every registered
    task's, see ``allowed_metric_names``).
    """
    problems: list[str] = []
    content = reply.content
    kind = sent.metadata.message_type
    names = allowed_metric_names(kind, task)
    for key, metrics in content.metric_records.items():
        if kind not in ("train", "evaluate"):
            problems.append(f"metrics {key!r} in a {kind} reply")
            continue
        for name, value in metrics.items():
            if name in masked_metrics:
                problems.append(f"metric {key}/{name} is summed securely this round and "
                                "must not travel in plaintext")
            elif not names.fullmatch(name):
                # The name itself is withheld: it is what could carry a row.
                problems.append(f"metric {key}/<{len(name)} characters> is not an "
                                f"allowed {kind} metric name")
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"metric {key}/{name} is not a scalar number")
    for key, record in content.array_records.items():
        if allowed_array_names is None:
            problems.append(f"arrays {key!r} in a {sent.metadata.message_type} reply")
            continue
        unexpected = sorted(set(record.keys()) - allowed_array_names)
        if unexpected:
            problems.append(f"arrays not in the exchanged state: {unexpected[:3]}")
        for name, array in record.items():
            if np.dtype(array.dtype) not in NUMERIC_DTYPES:
                problems.append(f"array {name!r} has dtype {array.dtype}")
    for key, config in content.config_records.items():
        if sent.metadata.message_type != "query":
            problems.append(f"config record {key!r} in a {sent.metadata.message_type} reply")
            continue
        for name, entry in config.items():
            if not QUERY_KEYS.fullmatch(name):
                problems.append(f"config {key}/<{len(name)} characters> is not a "
                                "protocol key")
            elif isinstance(entry, str) and (name != "client-key" or entry != own_key):
                problems.append(f"config {key}/{name} carries a string")
            elif isinstance(entry, list) and any(isinstance(v, str) for v in entry):
                problems.append(f"config {key}/{name} carries strings")
    return problems


def egress_required(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> bool:
    """Whether replies are audited: the run's ``audit-egress`` or the site's, if either.

    Raises
    ------
    ConfigError
        If the node config's ``audit-egress`` is not a boolean.
    """
    site = node_config.get(NODE_CONFIG_KEY, False)
    if not isinstance(site, bool):
        raise ConfigError(f"node config `{NODE_CONFIG_KEY}` must be true or false, "
                          f"got {site!r}")
    return site or bool(run_config.get("audit-egress", False))


def audited_error_reason(error_type: str, message: str) -> str:
    """The reason an error reply may carry out of the site (see module doc)."""
    if error_type in SAFE_ERRORS:
        return f"{error_type}: {message[:MAX_ERROR_CHARS]}"
    return (f"{error_type} (its message is withheld by the site's egress audit; it is in "
            "the site's SuperNode log)")


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check the reply of every message when the run or the site asks (see module doc)."""
    required = egress_required(context.run_config, context.node_config)
    try:
        reply = call_next(msg, context)
    except Exception as error:
        if not required:
            raise
        log.exception("fedsft ClientApp failed; the reply says only what the audit allows")
        raise EgressViolation(audited_error_reason(type(error).__name__, str(error))) \
            from None
    if not required:
        return reply
    if reply.has_error():  # an error made below us: its reason is checked the same way
        reason = reply.error.reason or ""  # Flower's Error may carry no reason at all
        if len(reason) > MAX_ERROR_CHARS or not reason.isprintable():
            return Message(Error(code=reply.error.code,
                                 reason=audited_error_reason("ClientAppError", reason)),
                           reply_to=msg)
        return reply
    allowed = None
    masked: frozenset[str] = frozenset()
    task: str | None = None  # a query reply may carry no metrics at all
    if msg.metadata.message_type in ("train", "evaluate"):
        cfg = RunConfig.from_flower(context.run_config)
        task = cfg.task
    if msg.metadata.message_type == "train":
        received = numpy_arrays(array_record(msg.content, "arrays"))
        allowed = expected_keys(received, cfg.encoding) | set(received)
        config = msg.content["config"]
        if SECAGG_ROUND_KEY in config:  # masked update, weight and summed statistics
            allowed = set(received) | {WEIGHT_KEY, SUMS_KEY}
            masked = frozenset(summed_keys_of(config))
    problems = egress_problems(msg, reply, allowed_array_names=allowed,
                               own_key=client_key(context.node_config, context.node_id),
                               masked_metrics=masked, task=task)
    if problems:
        raise EgressViolation("egress audit refused the reply: " + "; ".join(problems))
    if msg.metadata.message_type == "train":
        for metrics in reply.content.metric_records.values():
            metrics[_AUDITED_KEY] = 1
    return reply
