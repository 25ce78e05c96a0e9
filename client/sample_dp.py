"""A client's DP-SGD across rounds: train with ``common.dp_sgd`` and keep its accountant.

The accountant's history (noise multiplier, sample rate, steps per round) lives in the
node's ``context.state``, which Flower keeps between rounds, so the epsilon a client
reports covers every DP-SGD step it has taken in the run, not just this round's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict

from common.dp_sgd import planned_entry, sample_level_epsilon, train_local_dp_sgd
from common.records import config_floats, config_ints
from common.specs import DPSGDSpec, TrainSpec
from common.tasks.base import Examples, Task
from common.training import TrainResult

STATE_KEY = "dp-sgd-history"


class BudgetExhausted(RuntimeError):
    """This round's DP-SGD steps would take the site past ``dp-sgd-target-epsilon``."""


def load_history(state: RecordDict) -> list[tuple[float, float, int]]:
    """The accountant entries stored in a node's state (empty on its first round)."""
    if STATE_KEY not in state.config_records:
        return []
    record = state.config_records[STATE_KEY]
    return list(zip(config_floats(record, "noise"), config_floats(record, "rate"),
                    config_ints(record, "steps"), strict=True))


def store_history(state: RecordDict, history: list[tuple[float, float, int]]) -> None:
    """Write the accountant entries back into the node's state."""
    state[STATE_KEY] = ConfigRecord({
        "noise": [z for z, _, _ in history],
        "rate": [q for _, q, _ in history],
        "steps": [n for _, _, n in history],
    })


def train_with_dp_sgd(
    model: torch.nn.Module, data: Examples, spec: TrainSpec, *, dp: DPSGDSpec, task: Task,
    loss_spec: Hashable, seed: int, device: torch.device, pad_token_id: int,
    state: RecordDict, round_config: Mapping[str, Any] | None = None,
) -> tuple[TrainResult, dict[str, float]]:
    """One round of DP-SGD; returns the result and the metrics to report.

    The metrics are the site's epsilon so far (``dp-sgd-epsilon``), its DP-SGD steps
    so far and the noise multiplier it used (``dp-sgd-noise-multiplier``: the set one,
    or the one calibrated from ``dp-sgd-target-epsilon``, logged on the first round).

    Raises
    ------
    BudgetExhausted
        Before training, when this round would exceed ``dp-sgd-target-epsilon``: the
        site then sends a failed reply with that reason, and every later round too.
    """
    earlier = load_history(state)
    entry = planned_entry(dp, spec, len(data))
    if not earlier and dp.dp_sgd_noise_multiplier == 0:  # say once what was chosen
        noise, rate, steps = entry
        # Printed like the server's [fedsft] lines, so the site's operator sees it.
        print(
            f"[fedsft] DP-SGD: noise multiplier {noise:.4g} calibrated for this site's "
            f"dp-sgd-target-epsilon {dp.dp_sgd_target_epsilon:g} at delta "
            f"{dp.dp_sgd_delta:g} over {dp.num_server_rounds} planned rounds x {steps} "
            f"steps at sample rate {rate:.4g} ({len(data)} examples); rounds this site is "
            "not sampled for leave part of the budget unspent", flush=True,
        )
    planned = sample_level_epsilon([*earlier, entry], delta=dp.dp_sgd_delta)
    # With a calibrated noise multiplier this holds for every planned round; it stops a
    # site that would train more DP-SGD rounds than the calibration planned for.
    if planned > dp.dp_sgd_target_epsilon:
        raise BudgetExhausted(
            f"DP-SGD budget: this round would take the site's epsilon to {planned:.4g} > "
            f"`dp-sgd-target-epsilon` {dp.dp_sgd_target_epsilon:g} (delta "
            f"{dp.dp_sgd_delta:g}); the site trains no more in this run"
        )
    result, entry = train_local_dp_sgd(model, data, spec, dp=dp, task=task,
                                       loss_spec=loss_spec, seed=seed, device=device,
                                       pad_token_id=pad_token_id, round_config=round_config)
    history = [*earlier, entry]
    store_history(state, history)
    epsilon = sample_level_epsilon(history, delta=dp.dp_sgd_delta)
    return result, {"dp-sgd-epsilon": epsilon, "dp-sgd-steps": sum(n for _, _, n in history),
                    "dp-sgd-noise-multiplier": entry[0]}
