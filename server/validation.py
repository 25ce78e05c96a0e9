"""Checks on every incoming training reply before it reaches aggregation.

Flower's strategies average whatever arrives: one NaN reply turns the global model into
NaN, a negative ``num-examples`` flips the sign of an update. These pure functions say
what is wrong with a reply (or None), so the strategy wrapper can drop it and go on.

Metrics come in two kinds. Those in ``CHECKED_METRICS`` steer the aggregation or a
reported guarantee: a reply whose value there is not a finite number is dropped. Every
other metric (losses, step counts, seconds, memory) is informational: a non-finite one
says nothing about the update (a DP-SGD round whose Poisson batches were all empty
computed no loss), so it is only left out of the round's averaged metrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# An aggregation weight larger than this is not a real example count (guards against a
# client that claims 1e12 examples to dominate the average).
MAX_NUM_EXAMPLES = 10**9

ArraySpec = tuple[tuple[int, ...], np.dtype]

# Metric keys a reply is dropped for when present and not a finite number, and why.
CHECKED_METRICS = {
    # Weights the average (its range is checked by ``update_problem``).
    "num-examples": "the aggregation weight",
    # Flower's client-side adaptive clipping counts the clipped updates with
    # ``int(bool(value))`` to set the next clipping norm: NaN would count as clipped.
    "norm_bit": "sets the next adaptive clipping norm",
    # The run reports the largest value as the sample-level privacy spent; an unreadable
    # one would make that report too low.
    "dp-sgd-epsilon": "reported as the privacy spent",
}


def array_specs(arrays: Mapping[str, np.ndarray]) -> dict[str, ArraySpec]:
    """Name -> (shape, dtype) of the exchanged state a reply must match."""
    return {name: (tuple(a.shape), a.dtype) for name, a in arrays.items()}


def update_problem(
    update: Mapping[str, np.ndarray],
    *,
    expected: Mapping[str, ArraySpec],
    num_examples: object,
    base: Mapping[str, np.ndarray] | None = None,
    max_norm: float = 0.0,
) -> str | None:
    """Why ``update`` must not be aggregated, or None when it is fine.

    Checks, in order: the weight ``num_examples`` is a positive integer of at most
    ``MAX_NUM_EXAMPLES``; the array names equal the expected ones; each array has the
    expected shape and dtype; all values are finite; and, when ``max_norm`` > 0, the
    L2 norm of ``update - base`` over all arrays is at most ``max_norm``.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, float)):
        return f"num-examples must be a number, got {num_examples!r}"
    if not math.isfinite(num_examples) or num_examples != int(num_examples):
        return f"num-examples must be a whole number, got {num_examples!r}"
    if not 0 < num_examples <= MAX_NUM_EXAMPLES:
        return f"num-examples must be in [1, {MAX_NUM_EXAMPLES}], got {int(num_examples)}"
    missing = sorted(set(expected) - set(update))
    unexpected = sorted(set(update) - set(expected))
    if missing or unexpected:
        return f"array names differ: missing {missing[:3]}, unexpected {unexpected[:3]}"
    for name, (shape, dtype) in expected.items():
        array = update[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return (
                f"array {name!r} is {array.dtype}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        if not np.isfinite(array).all():
            return f"array {name!r} holds non-finite values"
    if max_norm > 0 and base is not None:
        norm = math.sqrt(sum(
            float(np.sum((update[n].astype(np.float64) - base[n]) ** 2)) for n in expected
        ))
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds `max-update-norm` {max_norm:g}"
    return None


def is_finite_number(value: object) -> bool:
    """True for an int or float (not a bool) that is neither NaN nor infinite."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def metrics_problem(metrics: Mapping[str, object]) -> str | None:
    """Why a reply's metrics make it unusable, or None when they are fine.

    Only ``CHECKED_METRICS`` keys count, and only when present: each must be a finite
    number. Other metrics never drop a reply (see ``unreadable_metrics``).
    """
    for name, role in CHECKED_METRICS.items():
        if name in metrics and not is_finite_number(metrics[name]):
            return f"metric {name!r} ({role}) is not a finite number: {metrics[name]!r}"
    return None


def unreadable_metrics(metrics: Mapping[str, object]) -> list[str]:
    """Names of the informational metrics that are not finite numbers, sorted.

    These are not in ``CHECKED_METRICS``: the reply is kept and they are left out of
    the round's averaged metrics.
    """
    return sorted(name for name, value in metrics.items()
                  if name not in CHECKED_METRICS and not is_finite_number(value))
