"""FedSA-LoRA (`lora-aggregation` fedsa): A and B train, only A and the head are shared.

On the tiny random BERT (hidden 32, LoRA rank 4 on query and value of 2 layers): every
A is 4 x 32 and every B 32 x 4, so keeping the B's at the site halves the LoRA part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.model import (
    get_exchanged_state,
    get_site_state,
    set_exchanged_state,
    set_site_state,
    trainable_parameter_count,
)
from common.specs import DPSGDSpec, TrainSpec
from common.tasks.classification import TASK
from common.training import train_local
from tests.common.test_ffa_lora import mean_of_ones_and_threes
from tests.common.test_training import setup

CPU = torch.device("cpu")


def _parts(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    a = [n for n in names if ".lora_A." in n]
    b = [n for n in names if ".lora_B." in n]
    head = [n for n in names if ".classifier.modules_to_save." in n]  # the trained copy
    return a, b, head


def test_fedsa_shares_a_and_the_head_and_keeps_b_at_the_site(tiny_model_dir: Path) -> None:
    _, model, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa")

    shared, site = list(get_exchanged_state(model)), list(get_site_state(model))

    a, b, head = _parts(shared)
    assert len(a) == 2 * 2 and b == [] and len(head) == 2
    assert sorted(shared) == sorted(a + head)
    assert site == _parts(site)[1] and len(site) == 4  # every B, and only the B's
    # Every LoRA matrix trains (unlike ffa, which freezes A).
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(shared + site)
    assert trainable_parameter_count(model) == sum(
        v.size for v in [*get_exchanged_state(model).values(), *get_site_state(model).values()])


def test_fedsa_sends_half_the_lora_bytes(tiny_model_dir: Path) -> None:
    _, fedavg, _, _ = setup(tiny_model_dir, method="lora")
    _, fedsa, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa")

    def lora_bytes(state: dict[str, np.ndarray]) -> int:
        return sum(a.nbytes for name, a in state.items() if ".lora_" in name)

    full, half = get_exchanged_state(fedavg), get_exchanged_state(fedsa)
    assert lora_bytes(half) == lora_bytes(full) // 2 == 4 * (4 * 32) * 4
    assert get_site_state(fedavg) == {}  # other modes keep nothing at the site


def test_local_training_moves_a_and_b_and_set_exchanged_state_resets_b(
    tiny_model_dir: Path,
) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa",
                                  local_steps=5, batch_size=8, learning_rate=1e-2)
    start_shared, start_site = get_exchanged_state(model), get_site_state(model)
    assert all(not v.any() for v in start_site.values())  # peft: B starts at zero

    train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                seed=1, device=CPU, pad_token_id=pad)

    trained_site = get_site_state(model)
    assert all(not np.array_equal(trained_site[n], start_site[n]) for n in start_site)
    trained_shared = get_exchanged_state(model)
    assert all(not np.array_equal(trained_shared[n], start_shared[n])
               for n in _parts(list(start_shared))[0])  # every A moved too
    # Receiving a global state resets B to its init: a cached model shared by several
    # virtual clients carries no site's B into another's round.
    set_exchanged_state(model, start_shared)
    assert all(np.array_equal(v, start_site[n]) for n, v in get_site_state(model).items())
    set_site_state(model, trained_site)
    assert all(np.array_equal(v, trained_site[n]) for n, v in get_site_state(model).items())


def test_set_site_state_checks_names_and_shapes(tiny_model_dir: Path) -> None:
    _, model, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa")
    site = get_site_state(model)
    before = {n: v.copy() for n, v in site.items()}
    first = next(iter(site))

    with pytest.raises(ValueError, match=r"site state does not match.*missing \["):
        set_site_state(model, {n: v + 1 for n, v in site.items() if n != first})
    with pytest.raises(ValueError, match=f"site state '{first}' has shape"):
        set_site_state(model, {**site, first: np.zeros((2, 2), np.float32)})
    assert all(np.array_equal(v, before[n]) for n, v in get_site_state(model).items())


def test_aggregating_fedsa_replies_is_the_plain_mean_of_a_and_the_head(
    tiny_model_dir: Path,
) -> None:
    # Two sites' shared parts, hand-made: 1 everywhere and 3 everywhere, equal weights.
    _, server, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa")
    shared = get_exchanged_state(server)

    mean = mean_of_ones_and_threes(shared)

    assert mean.keys() == shared.keys()
    assert all(np.array_equal(mean[n], np.full_like(shared[n], 2.0)) for n in shared)
    # The server's model takes the mean A and head; it has no site's B: B stays at init.
    set_exchanged_state(server, mean)
    assert all(not v.any() for v in get_site_state(server).values())


def test_dp_sgd_trains_a_and_b(tiny_model_dir: Path) -> None:
    from common.dp_sgd import train_local_dp_sgd

    cfg, model, data, pad = setup(tiny_model_dir, method="lora", lora_aggregation="fedsa",
                                  local_steps=3, batch_size=8, dp_sgd_noise_multiplier=1.0)
    shared, site = get_exchanged_state(model), get_site_state(model)

    train_local_dp_sgd(model, data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg), task=TASK,
                       loss_spec=TASK.loss_spec(cfg), seed=1, device=CPU, pad_token_id=pad)

    after_shared, after_site = get_exchanged_state(model), get_site_state(model)
    assert all(not np.array_equal(after_site[n], site[n]) for n in site)
    assert all(not np.array_equal(after_shared[n], shared[n]) for n in _parts(list(shared))[0])


@pytest.mark.parametrize("method", ["full", "head", "freeze"])
def test_fedsa_needs_lora(method: str) -> None:
    with pytest.raises(ConfigError, match="`lora-aggregation` 'fedsa' needs `method` lora"):
        RunConfig(method=method, lora_aggregation="fedsa")


def test_fedsa_refuses_resume_from() -> None:
    with pytest.raises(ConfigError, match=r"fedsa keeps each site's B.*`resume-from` "
                                          r"'outputs/run-1'"):
        RunConfig(lora_aggregation="fedsa", resume_from="outputs/run-1")


def test_fedsa_refuses_fedprox() -> None:
    with pytest.raises(ConfigError, match="fedsa cannot be combined with `strategy` fedprox"):
        RunConfig(lora_aggregation="fedsa", strategy="fedprox")


def test_fedsa_refuses_early_stopping_and_tasks_without_a_head() -> None:
    # The server's model has no site's B: its validation measures the shared part only.
    with pytest.raises(ConfigError, match="fedsa cannot be combined with "
                                          "`early-stopping-patience` 2"):
        RunConfig(lora_aggregation="fedsa", early_stopping_patience=2)
    with pytest.raises(ConfigError, match="fedsa needs a task with a shared head"):
        RunConfig(task="sft", lora_aggregation="fedsa")


def test_fedsa_refuses_an_embedding_adapter(tiny_llama_dir: Path) -> None:
    # Only reachable with a model whose embedding peft can adapt: a classification
    # model on the tiny Llama (the model class loads any decoder with a fresh head).
    from common.model import build_model
    from common.specs import ModelSpec

    cfg = RunConfig(model=str(tiny_llama_dir), lora_aggregation="fedsa",
                    lora_target_modules="embed_tokens,q_proj")
    with pytest.raises(ConfigError, match="embedding module.*embed_tokens"):
        build_model(ModelSpec.of(cfg, ["a", "b"]))


@pytest.mark.parametrize("changes", [
    {"strategy": "fedadam"}, {"strategy": "krum"},
    {"secure-aggregation": True, "dp-noise-multiplier": 1.0, "dp-side": "client"},
    {"update-encoding": "int8", "topk-fraction": 0.1},
    {"dp-sgd-noise-multiplier": 1.0},
])
def test_fedsa_combines_with_strategies_privacy_and_encodings(
    changes: dict[str, object],
) -> None:
    # Accepted: only which tensors cross the wire changes (the client's encodings, the
    # masking and the clipping read the names of the state they received). Run for real
    # here: fedavg + the egress audit (tests/e2e/test_simulation.py).
    cfg = RunConfig.from_flower({**RunConfig().to_flower(), "lora-aggregation": "fedsa",
                                 **changes})
    assert cfg.lora_aggregation == "fedsa"
