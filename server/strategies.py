"""Build a Flower Message-API strategy by name from the run config.

Every strategy here is Flower's own class (``flwr.serverapp.strategy``); this module
only maps config keys onto their constructor arguments.
"""

from __future__ import annotations

from typing import Any, TypedDict

from flwr.serverapp import strategy as flwr_strategy

from common.config import ConfigError, RunConfig


class _Sampling(TypedDict):
    """The constructor arguments every Flower strategy here takes, typed for the checker."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str


_SERVER_OPTIMISERS = {
    "fedadam": flwr_strategy.FedAdam,
    "fedyogi": flwr_strategy.FedYogi,
    "fedadagrad": flwr_strategy.FedAdagrad,
}


def build_strategy(cfg: RunConfig) -> flwr_strategy.Strategy:
    """Return the Flower strategy named by ``cfg.strategy``.

    Sampling minimums are set so that Flower's own wait loop never blocks: the
    ``NodeWaitingGrid`` (server/grid.py) waits for ``min-nodes`` with a deadline
    before Flower samples. A ``server-learning-rate`` of 0 leaves the argument out, so
    Flower's own default applies.
    """
    common = _Sampling(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_nodes,
        weighted_by_key="num-examples",
    )
    lr_set = cfg.server_learning_rate > 0
    name = cfg.strategy
    if name == "fedavg":
        return flwr_strategy.FedAvg(**common)
    if name == "fedprox":
        return flwr_strategy.FedProx(**common, proximal_mu=cfg.proximal_mu)
    if name in _SERVER_OPTIMISERS:
        optimiser = _SERVER_OPTIMISERS[name]
        if lr_set:
            return optimiser(**common, eta=cfg.server_learning_rate)
        return optimiser(**common)
    if name == "fedavgm":
        if lr_set:
            return flwr_strategy.FedAvgM(**common, server_momentum=cfg.server_momentum,
                                         server_learning_rate=cfg.server_learning_rate)
        return flwr_strategy.FedAvgM(**common, server_momentum=cfg.server_momentum)
    if name == "fedmedian":
        return flwr_strategy.FedMedian(**common)
    if name == "fedtrimmedavg":
        return flwr_strategy.FedTrimmedAvg(**common, beta=cfg.trim_fraction)
    if name == "krum":
        return flwr_strategy.Krum(**common, num_malicious_nodes=cfg.num_malicious)
    if name == "multikrum":
        return flwr_strategy.MultiKrum(
            **common,
            num_malicious_nodes=cfg.num_malicious,
            num_nodes_to_select=cfg.krum_keep,
        )
    if name == "bulyan":
        return flwr_strategy.Bulyan(**common, num_malicious_nodes=cfg.num_malicious)
    raise ConfigError(f"`strategy` {name!r} is not supported")  # RunConfig already checks


# Attributes that Flower's stateful strategies keep between rounds (server optimiser
# moments of FedAdam/FedYogi/FedAdagrad, FedAvgM's momentum). A checkpoint saves them so
# that a resumed run continues exactly where the interrupted one stopped.
_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")


def _innermost(strategy: flwr_strategy.Strategy) -> flwr_strategy.Strategy:
    """The aggregating strategy inside Flower's DP wrappers (they keep it in .strategy)."""
    while isinstance(getattr(strategy, "strategy", None), flwr_strategy.Strategy):
        strategy = strategy.strategy  # type: ignore[attr-defined]
    return strategy


def strategy_state(strategy: flwr_strategy.Strategy) -> dict[str, Any]:
    """The between-round state of a Flower strategy, for checkpoints (None = unset)."""
    inner = _innermost(strategy)
    return {
        name: getattr(inner, name)
        for name in _STATE_ATTRIBUTES
        if getattr(inner, name, None) is not None
    }


def restore_strategy_state(strategy: flwr_strategy.Strategy, state: dict[str, Any]) -> None:
    """Put a state taken by :func:`strategy_state` back into a fresh strategy."""
    inner = _innermost(strategy)
    for name, value in state.items():
        if name not in _STATE_ATTRIBUTES:
            raise ValueError(f"unknown strategy state {name!r} in checkpoint")
        setattr(inner, name, value)
