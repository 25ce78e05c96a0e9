"""A ClientApp mod that checks every outgoing message before it leaves the site.

With ``audit-egress=true`` each reply must hold only what fedsft is meant to send:

- train replies: one ArrayRecord whose names are exactly the wire names of the
  exchanged trainable tensors (for the configured encoding, or the masked vectors and
  the masked weight under secure aggregation) with numeric dtypes, and one
  MetricRecord of scalars;
- evaluate replies: one MetricRecord of scalars, no arrays;
- query replies: ConfigRecords whose values are the small scalars/bytes of the
  protocol (the client key, public keys, encrypted shares), no arrays.

No text, token ids, labels or per-example values can pass: strings are refused in
metrics, lists are refused in metrics, and arrays are limited to the exchanged names.
A violation turns the reply into an error (Flower reports it to the server as a failed
reply), so a leak is loud, never silent. The number of audited replies is added to
the train metrics (``egress-audited``) so a test can see the audit ran.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from client.outgoing import SECAGG_ROUND_KEY
from client.secagg import WEIGHT_KEY
from common.config import RunConfig
from common.encoding import expected_keys

NUMERIC_DTYPES = {np.dtype(t) for t in
                  (np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint32)}
_AUDITED_KEY = "egress-audited"


class EgressViolation(RuntimeError):
    """An outgoing message carries something other than updates and scalar metrics."""


def egress_problems(
    sent: Message, reply: Message, *, allowed_array_names: set[str] | None
) -> list[str]:
    """What in ``reply`` (to ``sent``) must not leave the site; empty when clean."""
    problems: list[str] = []
    content = reply.content
    for key, metrics in content.metric_records.items():
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
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
        for name, value in config.items():
            if isinstance(value, str) and len(value) > 256:
                problems.append(f"config {key}/{name} carries a long string")
    return problems


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Check the reply of every message when ``audit-egress`` is on (see module doc)."""
    reply = call_next(msg, context)
    if reply.has_error() or not context.run_config.get("audit-egress", False):
        return reply
    allowed = None
    if msg.metadata.message_type == "train":
        cfg = RunConfig.from_flower(context.run_config)
        received = {name: a.numpy() for name, a in msg.content["arrays"].items()}
        allowed = expected_keys(received, cfg.encoding) | set(received)
        if SECAGG_ROUND_KEY in msg.content["config"]:  # masked update + masked weight
            allowed = set(received) | {WEIGHT_KEY}
    problems = egress_problems(msg, reply, allowed_array_names=allowed)
    if problems:
        raise EgressViolation("egress audit refused the reply: " + "; ".join(problems))
    if msg.metadata.message_type == "train":
        for metrics in reply.content.metric_records.values():
            metrics[_AUDITED_KEY] = 1
    return reply
