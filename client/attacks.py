"""Simulation-only malicious clients, to see what each aggregation strategy withstands.

A virtual client is an attacker when its partition is among the seeded
``attack-fraction`` of partitions; it then poisons what it sends:

- ``sign-flip``: sends global - scale * (its honest delta);
- ``scale``: sends global + scale * (its honest delta);
- ``gaussian``: sends global + noise with std ``scale`` (no training signal);
- ``label-flip``: trains honestly on flipped labels (class k -> num_classes - 1 - k;
  the task's ``flip_labels``, see ``common.tasks.base.ClassTask``);
- ``nan``: sends NaN values.

Only virtual clients (with a ``partition-id``) can attack; a deployed SuperNode never
runs this code path (the client refuses an attack setting outside simulation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from common.config import ATTACKS, ConfigError

__all__ = [
    "ATTACKS", "attacker_count", "attacker_partition", "is_attacker", "poison_update",
]


def attacker_count(num_partitions: int, fraction: float) -> int:
    """How many of ``num_partitions`` attack: the nearest whole number, halves up.

    At least one when ``fraction`` > 0, so a small federation never runs an attack
    scenario without attackers (``round`` would give 0 for 10 % of 5 clients).
    """
    count = math.floor(fraction * num_partitions + 0.5)
    return max(count, 1) if fraction > 0 else 0


def is_attacker(
    partition_id: int, *, num_partitions: int, fraction: float, seed: int
) -> bool:
    """Whether this partition is one of the seeded ``fraction`` of attackers."""
    count = attacker_count(num_partitions, fraction)
    attackers = np.random.default_rng(seed).permutation(num_partitions)[:count]
    return partition_id in set(attackers.tolist())


def poison_update(
    new: Mapping[str, np.ndarray],
    base: Mapping[str, np.ndarray],
    *,
    attack: str,
    scale: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """The state an attacker sends instead of ``new`` (the honest result)."""
    rng = np.random.default_rng(seed)
    poisoned: dict[str, np.ndarray] = {}
    for name, value in new.items():
        delta = value - base[name]
        if attack == "sign-flip":
            poisoned[name] = base[name] - scale * delta
        elif attack == "scale":
            poisoned[name] = base[name] + scale * delta
        elif attack == "gaussian":
            poisoned[name] = base[name] + rng.normal(0.0, scale, size=value.shape)
        elif attack == "nan":
            poisoned[name] = np.full_like(value, np.nan)
        else:  # "none" and "label-flip" (already poisoned through the data)
            poisoned[name] = value
        poisoned[name] = poisoned[name].astype(value.dtype)
    return poisoned


def attacker_partition(node_config: Mapping[str, object]) -> tuple[int, int]:
    """(partition id, number of partitions) of a virtual client; attacks need them."""
    if "partition-id" not in node_config:
        raise ConfigError("`attack` is simulation-only: this SuperNode has no partition-id")
    return int(node_config["partition-id"]), int(node_config["num-partitions"])  # type: ignore[call-overload]
