"""Pure parts of the benchmark plans (the smoke test runs the benchmarks themselves)."""

from types import SimpleNamespace

import pytest

from simulations.benchmarks.robustness import infeasible, num_malicious, setting_name


def test_byzantine_settings_a_strategy_cannot_aggregate_are_reported_not_run():
    # Bulyan needs n >= 4f + 3, Krum n >= 2f + 3 replies.
    assert "needs n >= 4f+3 = 7" in infeasible("bulyan", sampled=5, malicious=1)
    assert infeasible("bulyan", sampled=7, malicious=1) is None
    assert infeasible("bulyan", sampled=20, malicious=6) == (
        "not applicable (needs n >= 4f+3 = 27, n = 20)")
    assert "needs n >= 2f+3 = 7" in infeasible("krum", sampled=6, malicious=2)
    assert infeasible("krum", sampled=5, malicious=0) is None
    assert infeasible("fedmedian", sampled=3, malicious=2) is None


def test_setting_names_have_no_dots():
    assert setting_name("none", 0.0) == "no-attack"
    assert setting_name("sign-flip", 0.2) == "sign-flip-20pct"
    assert setting_name("scale", 0.3) == "scale-30pct"


def test_only_krum_and_bulyan_are_told_the_number_of_attackers():
    assert num_malicious("krum", 4) == 4 and num_malicious("bulyan", 2) == 2
    assert num_malicious("fedmedian", 4) == 0 and num_malicious("fedavg", 3) == 0


# --- sft -------------------------------------------------------------------------------

def test_sft_token_counts_are_the_shifted_labels_and_the_unpadded_tokens():
    import torch

    from simulations.benchmarks.sft import token_counts

    batch = {  # row 0: 5 real tokens, 2 trained after the shift; row 1: 3 real, 1 trained
        "labels": torch.tensor([[7, -100, -100, 4, 5, -100], [-100, -100, 9, -100, -100, -100]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]),
    }
    # The label of position 0 is never predicted (nothing comes before it).
    assert token_counts([batch]) == (3, 8)
    assert token_counts([batch, batch]) == (6, 16)


def test_sft_serialized_bytes_are_the_flower_arrays_not_the_raw_values():
    import numpy as np
    from flwr.app import Array

    from simulations.benchmarks.sft import serialized_bytes

    state = {"a": np.zeros((3, 4), np.float32), "b": np.ones(5, np.float32)}
    measured = serialized_bytes(state)
    assert measured == len(Array(state["a"]).data) + len(Array(state["b"]).data)
    assert measured > (12 + 5) * 4  # each array also carries its header


def test_sft_lora_values_match_the_exchanged_state_of_the_tiny_llama(tiny_llama_dir):
    from common.config import RunConfig
    from common.model import build_model, get_exchanged_state
    from common.specs import ModelSpec
    from simulations.benchmarks.sft import lora_values

    # Tiny Llama: hidden 32, 4 heads of 8, 2 key/value heads -> k and v project to 16.
    shapes = [(32, 32), (32, 16), (32, 16), (32, 32)] * 2  # q, k, v, o in 2 layers
    for rank in (8, 16):
        cfg = RunConfig(task="sft", model=str(tiny_llama_dir), lora_r=rank)
        state = get_exchanged_state(build_model(ModelSpec.of(cfg, []))[0])
        assert sum(a.size for a in state.values()) == lora_values(shapes, rank)
    # r * (64 + 48 + 48 + 64) per layer
    assert lora_values(shapes, 16) == 2 * lora_values(shapes, 8) == 2 * 8 * 448


def test_sft_stopping_rule_waits_patience_evaluations_without_gain():
    from simulations.benchmarks.sft import best_index, should_stop

    assert not should_stop([3.0, 2.0, 2.5], patience=2)
    assert should_stop([3.0, 2.0, 2.5, 2.1], patience=2)
    assert not should_stop([3.0, 2.0, 2.5, 1.9], patience=2)
    assert should_stop([3.0, 2.9], patience=1, min_delta=0.5)  # a gain below min_delta
    assert not should_stop([3.0, 4.0, 5.0], patience=0)  # 0: off
    assert best_index([3.0, 2.0, 2.0, 2.5]) == 1  # the first of equal losses


def test_sft_plans_fit_the_non_iid_split_and_the_centralized_budget():
    from common.tasks.sft_builtin_data import SFT_TASKS
    from simulations.benchmarks.sft import PLANS, SETTINGS, gap_points

    # The built-in SFT data has 4 task types: column:task gives one to each client.
    assert dict(SETTINGS)["by-task"] == {"partitioner": "column:task"}
    for plan in PLANS.values():
        assert plan.clients == len(SFT_TASKS)
        assert plan.budget_steps == plan.clients * plan.rounds * plan.local_steps
        assert plan.patience < plan.rounds or plan.rounds == 1
    assert PLANS["quick"].budget_steps <= PLANS["default"].budget_steps
    assert round(gap_points(0.5, 0.375), 6) == 12.5


@pytest.mark.parametrize("optimizer, step", [("sgd", 0.1), ("adamw", 0.01)])
def test_sft_plain_loop_steps_with_the_runs_local_optimizer(optimizer, step):
    # One step on loss 10 * w: SGD moves w by lr * 10, AdamW by about lr whatever the
    # gradient (no weight decay, warm-up or clipping).
    import torch

    from common.config import RunConfig
    from simulations.benchmarks.sft import _plain_steps

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, **batch: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(loss=10 * self.w)

    cfg = RunConfig(local_optimizer=optimizer, learning_rate=0.01, weight_decay=0.0,
                    warmup_ratio=0.0, grad_clip=0.0)
    model = Model()
    batch = {"input_ids": torch.zeros(1), "attention_mask": torch.zeros(1),
             "labels": torch.zeros(1)}
    assert _plain_steps(model, [batch], cfg) == [0.0]
    assert float(model.w) == pytest.approx(-step, rel=1e-3)
