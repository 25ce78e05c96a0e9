import numpy as np
import pytest
from flwr.serverapp import strategy as flwr_strategy

from common.config import STRATEGIES, RunConfig
from server.strategies import build_strategy, restore_strategy_state, strategy_state


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_name_builds_flowers_class(name):
    strategy = build_strategy(RunConfig(strategy=name))
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    assert strategy.weighted_by_key == "num-examples"


def test_settings_reach_the_strategy():
    cfg = RunConfig(strategy="fedprox", proximal_mu=0.3, fraction_train=0.25, min_nodes=4)
    strategy = build_strategy(cfg)
    assert isinstance(strategy, flwr_strategy.FedProx)
    assert (strategy.proximal_mu, strategy.fraction_train, strategy.min_available_nodes) == (
        0.3, 0.25, 4)
    assert build_strategy(RunConfig(strategy="fedadam", server_learning_rate=0.05)).eta == 0.05
    assert build_strategy(RunConfig(strategy="fedtrimmedavg", trim_fraction=0.1)).beta == 0.1
    assert build_strategy(RunConfig(strategy="multikrum", krum_keep=4)).num_nodes_to_select == 4


def test_strategy_state_round_trip():
    strategy = build_strategy(RunConfig(strategy="fedadam"))
    assert strategy_state(strategy) == {}
    strategy.m_t = {"w": np.ones(2)}
    strategy.v_t = {"w": np.full(2, 2.0)}
    fresh = build_strategy(RunConfig(strategy="fedadam"))
    restore_strategy_state(fresh, strategy_state(strategy))
    np.testing.assert_array_equal(fresh.v_t["w"], [2.0, 2.0])
    with pytest.raises(ValueError, match="unknown strategy state"):
        restore_strategy_state(fresh, {"surprise": 1})
