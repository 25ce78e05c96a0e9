import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from client.dp_clipping import clip_update
from common.config import ConfigError, RunConfig
from server.privacy import client_level_epsilon, max_rounds_within, wrap_with_dp
from server.tracked_strategy import TrackedStrategy
from tests.server.messages import send_round, train_reply


def test_accountant_matches_the_published_opacus_reference():
    # Opacus pins epsilon 7.329 (RDP) for noise 1.5, sampling rate 0.04, 90 epochs
    # (= 90 / 0.04 = 2250 steps), delta 1e-5.
    eps = client_level_epsilon(noise_multiplier=1.5, sampling_rate=0.04, rounds=2250,
                               delta=1e-5)
    assert eps == pytest.approx(7.329, abs=5e-3)


def test_epsilon_grows_with_rounds_and_sampling_amplifies():
    def eps(rounds, rate):
        return client_level_epsilon(noise_multiplier=1.0, sampling_rate=rate,
                                    rounds=rounds, delta=1e-5)
    assert eps(0, 0.1) == 0.0
    assert eps(10, 0.1) < eps(20, 0.1)
    assert eps(10, 0.1) < eps(10, 1.0)  # sampling amplification counted


def test_budget_gives_the_last_round_within_the_target():
    kwargs = {"noise_multiplier": 2.0, "sampling_rate": 0.1, "delta": 1e-5}
    last = max_rounds_within(target_epsilon=1.5, limit=100, **kwargs)
    assert 0 < last < 100
    assert client_level_epsilon(rounds=last, **kwargs) <= 1.5
    assert client_level_epsilon(rounds=last + 1, **kwargs) > 1.5
    assert max_rounds_within(target_epsilon=math.inf, limit=7, **kwargs) == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dp-target-epsilon": 0}, "`dp-target-epsilon` must be > 0"),
        ({"dp-target-epsilon": -1}, "`dp-target-epsilon` must be > 0"),
        ({"dp-target-epsilon": math.nan}, "`dp-target-epsilon` must be a finite number"),
        ({"dp-delta": 0}, "`dp-delta` must be > 0"),
        ({"dp-delta": 1}, "`dp-delta` must be < 1"),
        ({"dp-noise-multiplier": -0.1}, "`dp-noise-multiplier` must be >= 0"),
        ({"dp-clipping-norm": 0}, "`dp-clipping-norm` must be > 0"),
        ({"dp-clipping": "auto"}, "`dp-clipping` must be one of fixed, adaptive"),
        ({"dp-noise-multiplier": 1.0, "strategy": "krum"}, "mean-based `strategy`"),
    ],
)
def test_bad_dp_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as excinfo:
        RunConfig.from_flower(overrides)
    assert message in str(excinfo.value)


def _dp_round(cfg, updates, *, num_sampled):
    inner = wrap_with_dp(FedAvg(), cfg, num_sampled=num_sampled)
    size = len(updates[0])
    inner.current_arrays = ArrayRecord({"w": Array(np.zeros(size, np.float32))})
    strategy = TrackedStrategy(
        inner, exchanged_spec={"w": ((size,), np.dtype("float32"))}, seed=0,
        min_replies=1, uniform_weights=True,
    )
    send_round(strategy, 1, {"w": np.zeros(size, np.float32)}, nodes=num_sampled)
    replies = [train_reply(i, {"w": u.astype(np.float32)}, **{"num-examples": 10 * (i + 1)})
               for i, u in enumerate(updates)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["w"].numpy()


@pytest.mark.usefixtures("task_identity")
def test_server_side_noise_has_the_calibrated_scale():
    cfg = RunConfig(dp_noise_multiplier=2.0, dp_clipping_norm=0.5)
    tiny = np.full(20000, 1e-6)  # Flower's clipping divides by the norm: not exactly 0
    result = _dp_round(cfg, [tiny] * 4, num_sampled=4)
    # Gaussian noise with std z * C / m = 2.0 * 0.5 / 4 on the mean of ~zero updates.
    assert result.std() == pytest.approx(0.25, rel=0.03)
    assert abs(result.mean()) < 0.01


@pytest.mark.usefixtures("task_identity")
def test_server_side_clipping_bounds_each_update_and_weights_are_uniform():
    cfg = RunConfig(dp_noise_multiplier=1e-9, dp_clipping_norm=1.0)
    big, small = np.full(4, 10.0), np.array([0.1, 0.0, 0.0, 0.0])
    result = _dp_round(cfg, [big, small], num_sampled=2)
    # big clipped to norm 1 -> 0.5 each; uniform mean of the two, despite weights 10 vs 20.
    np.testing.assert_allclose(result, (np.full(4, 0.5) + small) / 2, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_client_side_clipping_bound_holds(adaptive):
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(5, 5)).astype(np.float32), "b": np.zeros(3, np.float32)}
    new = {k: v + rng.normal(scale=3.0, size=v.shape).astype(np.float32)
           for k, v in base.items()}
    clipped, metrics = clip_update(new, base, clipping_norm=0.7, adaptive=adaptive)
    norm = np.sqrt(sum(((clipped[k] - base[k]) ** 2).sum() for k in base))
    assert norm == pytest.approx(0.7, rel=1e-5)
    assert metrics == ({"norm_bit": 1} if adaptive else {})
    tiny = {k: v + 1e-4 for k, v in base.items()}
    unchanged, _ = clip_update(tiny, base, clipping_norm=0.7, adaptive=adaptive)
    np.testing.assert_allclose(unchanged["a"], tiny["a"])
