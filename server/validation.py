"""Checks on every incoming training reply before it reaches aggregation.

Flower's strategies average whatever arrives: one NaN reply turns the global model into
NaN, a negative ``num-examples`` flips the sign of an update. These pure functions say
what is wrong with a reply (or None), so the strategy wrapper can drop it and go on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

# An aggregation weight larger than this is not a real example count (guards against a
# client that claims 1e12 examples to dominate the average).
MAX_NUM_EXAMPLES = 10**9

ArraySpec = tuple[tuple[int, ...], np.dtype]


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
