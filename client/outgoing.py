"""Turn a client's trained state into what it sends: the last steps before the wire.

In order: a simulated attacker poisons its update (simulation only); Flower's
client-side DP wrappers ask for clipping; then the update is either masked for secure
aggregation or encoded (fp32 / fp16 / int8 / top-k with the residual kept on the site).
Under secure aggregation the task's site metrics the round sums (``secagg-sum-keys``)
are masked with the update and none of them travels in plaintext
(:func:`plaintext_site_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.attacks import poison_update
from client.dp_clipping import clip_update
from client.secagg import mask_update
from common.config import RunConfig
from common.encoding import encode_update
from common.records import array_record, config_float, numpy_arrays

RESIDUAL_KEY = "topk-residual"  # in context.state: what top-k has not sent yet
SECAGG_ROUND_KEY = "secagg-round"  # present in a train config under secure aggregation

State = dict[str, np.ndarray]


def outgoing_update(
    new: State,
    received: State,
    *,
    cfg: RunConfig,
    config: ConfigRecord,
    context: Context,
    num_examples: int,
    attack_seed: int | None,
    statistics: Mapping[str, Any] | None = None,
) -> tuple[State, dict[str, Any]]:
    """The wire payload for ``new`` (trained from ``received``) and extra metrics.

    ``attack_seed`` is set only for a simulated attacker; ``statistics`` are the task's
    site metrics, of which secure aggregation masks the ones the round sums.
    """
    extra: dict[str, Any] = {"num-examples": num_examples}
    if attack_seed is not None and cfg.attack != "label-flip":
        new = poison_update(new, received, attack=cfg.attack, scale=cfg.attack_scale,
                            seed=attack_seed)
    if KEY_CLIPPING_NORM in config:  # Flower's client-side DP wrappers: clip here
        new, dp_metrics = clip_update(
            new, received, clipping_norm=config_float(config, KEY_CLIPPING_NORM),
            adaptive=cfg.dp_clipping == "adaptive",
        )
        extra.update(dp_metrics)
    if SECAGG_ROUND_KEY in config:
        # The weight travels masked with the update; DP-FedAvg needs equal weights.
        weight = 1 if cfg.dp_enabled else num_examples
        delta = {k: new[k] - received[k] for k in new}
        del extra["num-examples"]
        return mask_update(delta, weight, config, context, statistics), extra
    stored = (numpy_arrays(array_record(context.state, RESIDUAL_KEY))
              if RESIDUAL_KEY in context.state else None)
    payload, residual = encode_update(new, received, cfg.encoding, residual=stored)
    if residual:  # top-k error feedback: kept on the site for the next round
        context.state[RESIDUAL_KEY] = ArrayRecord({k: Array(v) for k, v in residual.items()})
    return payload, extra


def plaintext_site_metrics(statistics: Mapping[str, Any], config: ConfigRecord) -> dict[str, Any]:
    """The task's site metrics that go into the reply's plaintext metrics: all of them,
    but none under secure aggregation (the server learns only the masked sum of those
    its round names; the others stay at the site)."""
    return {} if SECAGG_ROUND_KEY in config else dict(statistics)
