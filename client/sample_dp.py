"""A client's DP-SGD across rounds: train with ``common.dp_sgd`` and keep its accountant.

The accountant's history (noise multiplier, sample rate, steps per round) lives in the
node's ``context.state``, which Flower keeps between rounds, so the epsilon a client
reports covers every DP-SGD step it has taken in the run, not just this round's.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, RecordDict

from common.config import RunConfig
from common.dp_sgd import planned_entry, sample_level_epsilon, train_local_dp_sgd
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
    return [(float(z), float(q), int(n)) for z, q, n in
            zip(record["noise"], record["rate"], record["steps"], strict=True)]


def store_history(state: RecordDict, history: list[tuple[float, float, int]]) -> None:
    """Write the accountant entries back into the node's state."""
    state[STATE_KEY] = ConfigRecord({
        "noise": [z for z, _, _ in history],
        "rate": [q for _, q, _ in history],
        "steps": [n for _, _, n in history],
    })


def train_with_dp_sgd(
    model: torch.nn.Module, data: Examples, cfg: RunConfig, *, task: Task, seed: int,
    device: torch.device, pad_token_id: int, state: RecordDict,
) -> tuple[TrainResult, dict[str, float]]:
    """One round of DP-SGD; returns the result and the metrics to report (epsilon, steps).

    Raises
    ------
    BudgetExhausted
        Before training, when this round would exceed ``dp-sgd-target-epsilon``: the
        site then sends a failed reply with that reason, and every later round too.
    """
    planned = sample_level_epsilon([*load_history(state), planned_entry(cfg, len(data))],
                                   delta=cfg.dp_sgd_delta)
    if planned > cfg.dp_sgd_target_epsilon:
        raise BudgetExhausted(
            f"DP-SGD budget: this round would take the site's epsilon to {planned:.4g} > "
            f"`dp-sgd-target-epsilon` {cfg.dp_sgd_target_epsilon:g} (delta "
            f"{cfg.dp_sgd_delta:g}); the site trains no more in this run"
        )
    result, entry = train_local_dp_sgd(model, data, cfg, task=task, seed=seed, device=device,
                                       pad_token_id=pad_token_id)
    history = [*load_history(state), entry]
    store_history(state, history)
    epsilon = sample_level_epsilon(history, delta=cfg.dp_sgd_delta)
    return result, {"dp-sgd-epsilon": epsilon, "dp-sgd-steps": sum(n for _, _, n in history)}
