"""Tests for common/dp_sgd.py and client/sample_dp.py: sample-level DP-SGD (Opacus)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from client.sample_dp import BudgetExhausted, load_history, train_with_dp_sgd
from common.config import ConfigError, RunConfig
from common.dp_sgd import (
    calibrate_noise_multiplier,
    planned_entry,
    poisson_batches,
    sample_level_epsilon,
    site_noise_multiplier,
    train_local_dp_sgd,
)
from common.model import get_exchanged_state, set_exchanged_state
from common.specs import DPSGDSpec, TrainSpec
from common.tasks.classification import TASK
from common.training import train_local
from tests.common.test_training import setup
from tests.helpers import classify_eval as evaluate

CPU = torch.device("cpu")


def test_accountant_matches_the_opacus_reference() -> None:
    # Opacus pins epsilon 7.329 (RDP) for noise 1.5, sampling rate 0.04, 90 epochs.
    steps = round(90 / 0.04)
    assert sample_level_epsilon([(1.5, 0.04, steps)], delta=1e-5) == pytest.approx(7.329,
                                                                                     abs=1e-3)


def test_epsilon_composes_over_rounds_and_grows() -> None:
    one = sample_level_epsilon([(1.0, 0.1, 100)], delta=1e-5)
    two = sample_level_epsilon([(1.0, 0.1, 100), (1.0, 0.1, 100)], delta=1e-5)
    assert two == pytest.approx(sample_level_epsilon([(1.0, 0.1, 200)], delta=1e-5))
    assert 0 < one < two
    assert sample_level_epsilon([], delta=1e-5) == 0.0


def test_poisson_batches_sample_at_the_rate() -> None:
    batches = poisson_batches(1000, sample_rate=0.05,
                              generator=torch.Generator().manual_seed(0))
    sizes = [len(next(batches)) for _ in range(200)]
    assert np.mean(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(map(len, [next(batches) for _ in range(20)]))) > 1  # sizes vary


@pytest.mark.parametrize("changes, key", [
    ({"dp_sgd_noise_multiplier": -1.0}, "dp-sgd-noise-multiplier"),
    ({"dp_sgd_noise_multiplier": float("nan")}, "dp-sgd-noise-multiplier"),
    ({"dp_sgd_max_grad_norm": 0.0}, "dp-sgd-max-grad-norm"),
    ({"dp_sgd_delta": 1.0}, "dp-sgd-delta"),
    ({"dp_sgd_noise_multiplier": 1.0, "method": "full"}, "method"),
    ({"dp_sgd_noise_multiplier": 1.0, "strategy": "fedprox"}, "fedprox"),
])
def test_bad_dp_sgd_settings_are_config_errors(changes: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig(**changes)


def _one_sgd_step(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path, **changes: object):
    """The weight change of one DP-SGD step with plain SGD (lr 1), all 16 examples sampled."""
    monkeypatch.setattr(torch.optim, "AdamW",
                        lambda params, **_: torch.optim.SGD(params, lr=1.0))
    cfg, model, data, pad = setup(tiny_model_dir, n=16, method="lora", local_steps=1,
                                  batch_size=16, **changes)
    before = get_exchanged_state(model)
    train_local_dp_sgd(model, data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg), task=TASK,
                       loss_spec=TASK.loss_spec(cfg), seed=3, device=CPU, pad_token_id=pad)
    after = get_exchanged_state(model)
    return np.concatenate([(after[k] - before[k]).ravel() for k in before])


def test_per_example_clipping_bounds_the_step(monkeypatch, tiny_model_dir: Path) -> None:
    # The update is the mean of per-example gradients clipped to C, so its norm is <= C.
    loose = _one_sgd_step(monkeypatch, tiny_model_dir, dp_sgd_max_grad_norm=1e3)
    tight = _one_sgd_step(monkeypatch, tiny_model_dir, dp_sgd_max_grad_norm=1e-3)
    assert np.linalg.norm(loose) > 1e-2  # unclipped gradients are much larger than C
    assert np.linalg.norm(tight) <= 1e-3 * (1 + 1e-4)


def test_noise_of_the_right_scale_is_added(monkeypatch, tiny_model_dir: Path) -> None:
    # Same seed, same batch: the difference is the noise, std z * C / batch per value.
    clean = _one_sgd_step(monkeypatch, tiny_model_dir, dp_sgd_max_grad_norm=1.0)
    noisy = _one_sgd_step(monkeypatch, tiny_model_dir, dp_sgd_max_grad_norm=1.0,
                          dp_sgd_noise_multiplier=2.0)
    assert np.std(noisy - clean) == pytest.approx(2.0 * 1.0 / 16, rel=0.1)
    again = _one_sgd_step(monkeypatch, tiny_model_dir, dp_sgd_max_grad_norm=1.0,
                          dp_sgd_noise_multiplier=2.0)
    assert not np.array_equal(noisy, again)  # noise is not derived from the run's seed


def test_dp_sgd_learns_and_leaves_the_cached_model_clean(tiny_model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The noise is seeded from the operating system by design, so "the loss falls" would
    # hold only with high probability; a fixed noise seed makes this test deterministic.
    import common.dp_sgd

    monkeypatch.setattr(common.dp_sgd.secrets, "randbits", lambda bits: 12345)
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", local_steps=60,
                                  batch_size=16, learning_rate=2e-2,
                                  dp_sgd_noise_multiplier=0.3, dp_sgd_max_grad_norm=1.0)
    start = get_exchanged_state(model)
    before = evaluate(model, data, batch_size=32, device=CPU, pad_token_id=pad)

    result, (z, q, steps) = train_local_dp_sgd(model, data, TrainSpec.of(cfg),
                                               dp=DPSGDSpec.of(cfg), task=TASK,
                                               loss_spec=TASK.loss_spec(cfg), seed=1, device=CPU,
                                               pad_token_id=pad)
    after = evaluate(model, data, batch_size=32, device=CPU, pad_token_id=pad)

    assert (z, q, steps) == (0.3, 16 / 64, 60)
    assert result.steps == 60 and 0 < result.num_examples <= 64
    assert after.loss < before.loss
    assert not model.training
    assert all(not hasattr(p, "grad_sample") or p.grad_sample is None
               for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    # The same (cached) model then trains without DP as before.
    set_exchanged_state(model, start)
    train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg), seed=1,
                device=CPU, pad_token_id=pad)


def _dp_round(model, data, cfg, **kwargs):  # noqa: ANN001, ANN003, ANN202
    """One client round of DP-SGD with the specs of ``cfg``, as client/app.py calls it."""
    return train_with_dp_sgd(model, data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg), task=TASK,
                             loss_spec=TASK.loss_spec(cfg), **kwargs)


def test_client_accounts_every_round_in_its_node_state(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", local_steps=5, batch_size=8,
                                  dp_sgd_noise_multiplier=1.0)
    state = RecordDict()
    _, first = _dp_round(model, data, cfg, seed=1, device=CPU, pad_token_id=pad,
                                 state=state)
    _, second = _dp_round(model, data, cfg, seed=2, device=CPU, pad_token_id=pad,
                                  state=state)

    assert load_history(state) == [(1.0, 8 / 64, 5), (1.0, 8 / 64, 5)]
    assert (first["dp-sgd-steps"], second["dp-sgd-steps"]) == (5, 10)
    assert second["dp-sgd-epsilon"] == pytest.approx(
        sample_level_epsilon([(1.0, 8 / 64, 10)], delta=cfg.dp_sgd_delta))
    assert 0 < first["dp-sgd-epsilon"] < second["dp-sgd-epsilon"]


def test_a_site_refuses_a_round_beyond_the_calibrated_plan(tiny_model_dir: Path) -> None:
    # Calibrated for one round (num-server-rounds 1): a second round would overspend.
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", local_steps=5, batch_size=8,
                                  dp_sgd_target_epsilon=4.0, num_server_rounds=1)
    state = RecordDict()
    _, metrics = _dp_round(model, data, cfg, seed=1, device=CPU,
                                   pad_token_id=pad, state=state)
    before = get_exchanged_state(model)

    with pytest.raises(BudgetExhausted, match="dp-sgd-target-epsilon"):
        _dp_round(model, data, cfg, seed=2, device=CPU, pad_token_id=pad,
                          state=state)
    after = get_exchanged_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing trained
    assert load_history(state) == [(metrics["dp-sgd-noise-multiplier"], 8 / 64, 5)]
    assert metrics["dp-sgd-epsilon"] <= 4.0


# --- calibration from a target epsilon -----------------------------------------------


@pytest.mark.parametrize("target", [8.0, 3.0, 1.0])
def test_calibrated_noise_is_the_smallest_within_budget(target: float) -> None:
    # A site with 800 examples, batch 32, 10 rounds of 20 steps (the DP setting).
    plan = {"sample_rate": 32 / 800, "steps": 10 * 20}

    z = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, **plan)

    history = [(z, plan["sample_rate"], plan["steps"])]
    assert target - 0.01 <= sample_level_epsilon(history, delta=1e-5) <= target
    smaller = [(0.98 * z, plan["sample_rate"], plan["steps"])]
    assert sample_level_epsilon(smaller, delta=1e-5) > target


def test_calibration_needs_more_noise_for_a_smaller_budget_or_site() -> None:
    def z(target: float, rate: float) -> float:
        return calibrate_noise_multiplier(target_epsilon=target, delta=1e-5,
                                          sample_rate=rate, steps=200)

    assert z(1.0, 0.04) > z(3.0, 0.04) > z(8.0, 0.04)
    assert z(8.0, 0.08) > z(8.0, 0.04)  # a smaller site samples each record more often


def test_an_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="`dp-sgd-target-epsilon` 0.05 .* raise the target"):
        calibrate_noise_multiplier(target_epsilon=0.05, delta=1e-5, sample_rate=1.0,
                                   steps=10_000)
    with pytest.raises(ValueError, match="steps >= 1"):
        calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=0.1, steps=0)


def test_each_site_calibrates_for_every_planned_round_at_its_own_rate() -> None:
    cfg = RunConfig(dp_sgd_target_epsilon=8.0, num_server_rounds=10, local_steps=20,
                    batch_size=32)

    dp, train = DPSGDSpec.of(cfg), TrainSpec.of(cfg)
    small, large = site_noise_multiplier(dp, train, 400), site_noise_multiplier(dp, train, 1600)

    assert small == calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5,
                                               sample_rate=32 / 400, steps=200)
    assert small > large
    assert planned_entry(dp, train, 400) == (small, 32 / 400, 20)
    # All planned rounds together stay within the budget, at each site.
    for z, n in ((small, 400), (large, 1600)):
        assert sample_level_epsilon([(z, 32 / n, 20)] * 10, delta=1e-5) <= 8.0
    # A set noise multiplier is used as it is.
    set_noise = RunConfig(dp_sgd_noise_multiplier=0.7)
    assert site_noise_multiplier(DPSGDSpec.of(set_noise), TrainSpec.of(set_noise), 400) == 0.7


def test_a_target_epsilon_alone_turns_dp_sgd_on() -> None:
    assert RunConfig(dp_sgd_target_epsilon=8.0).dp_sgd_enabled
    assert RunConfig(dp_sgd_noise_multiplier=1.0).dp_sgd_enabled
    assert not RunConfig().dp_sgd_enabled
    with pytest.raises(ConfigError, match="`method` lora, head or freeze"):
        RunConfig(dp_sgd_target_epsilon=8.0, method="full")


def test_a_noise_multiplier_and_a_target_epsilon_together_are_refused() -> None:
    with pytest.raises(ConfigError, match="either `dp-sgd-target-epsilon` .* not both"):
        RunConfig(dp_sgd_noise_multiplier=0.7, dp_sgd_target_epsilon=8.0)


def test_a_call_whose_batches_are_all_empty_takes_noise_steps_only(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    import common.dp_sgd

    monkeypatch.setattr(common.dp_sgd, "poisson_batches",
                        lambda num_examples, *, sample_rate, generator: iter(lambda: [], None))
    cfg, model, data, pad = setup(tiny_model_dir, n=4, method="lora", local_steps=3,
                                  batch_size=1, dp_sgd_noise_multiplier=1.0)
    before = get_exchanged_state(model)

    result, entry = train_local_dp_sgd(model, data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg),
                                       task=TASK, loss_spec=TASK.loss_spec(cfg), seed=1, device=CPU,
                                       pad_token_id=pad)

    after = get_exchanged_state(model)
    assert entry == (1.0, 1 / 4, 3) and (result.steps, result.num_examples) == (3, 1)
    assert np.isnan(result.train_loss) and np.isnan(result.first_loss)  # no loss computed
    assert all(np.isfinite(after[k]).all() for k in after)
    assert any(not np.array_equal(before[k], after[k]) for k in before)  # the noise steps
