"""FFA-LoRA (`lora-aggregation` ffa): A frozen at its seeded init, only B and the head train.

On the tiny random BERT (hidden 32, LoRA rank 4 on query and value of 2 layers): every
A is 4 x 32 and every B 32 x 4, so dropping the A's halves the LoRA part exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.config import ConfigError, RunConfig
from common.model import (
    build_model,
    clear_model_cache,
    get_exchanged_state,
    get_model,
    set_exchanged_state,
)
from common.specs import DPSGDSpec, ModelSpec, TrainSpec
from common.tasks.classification import TASK
from common.training import train_local
from tests.common.test_training import setup

CPU = torch.device("cpu")
LABELS = ["neg", "pos"]


def _lora_parts(names: list[str]) -> tuple[list[str], list[str], list[str]]:
    a = [n for n in names if ".lora_A." in n]
    b = [n for n in names if ".lora_B." in n]
    head = [n for n in names if ".classifier.modules_to_save." in n]  # the trained copy
    return a, b, head


def test_ffa_exchanges_only_b_and_the_head(tiny_model_dir: Path) -> None:
    cfg, model, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="ffa")

    names = list(get_exchanged_state(model))

    a, b, head = _lora_parts(names)
    assert a == []
    assert len(b) == 2 * 2  # query and value in each of 2 layers
    assert len(head) == 2  # classifier weight and bias (peft's modules_to_save)
    assert sorted(names) == sorted(b + head)
    # The A matrices are still there (the forward pass uses them), only frozen.
    assert sum(".lora_A." in n for n, _ in model.named_parameters()) == 4


def test_ffa_halves_the_lora_bytes(tiny_model_dir: Path) -> None:
    _, fedavg, _, _ = setup(tiny_model_dir, method="lora")
    _, ffa, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="ffa")
    full, half = get_exchanged_state(fedavg), get_exchanged_state(ffa)

    def lora_bytes(state: dict[str, np.ndarray]) -> int:
        return sum(a.nbytes for name, a in state.items() if ".lora_" in name)

    assert lora_bytes(full) == 4 * (4 * 32 + 32 * 4) * 4  # 4 adapters, A and B, float32
    assert lora_bytes(half) == lora_bytes(full) // 2
    head = sum(a.nbytes for name, a in half.items() if ".classifier.modules_to_save." in name)
    assert sum(a.nbytes for a in half.values()) == lora_bytes(half) + head


def test_after_local_training_a_equals_its_init_and_b_changed(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", lora_aggregation="ffa",
                                  local_steps=5, batch_size=8, learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg), seed=1,
                device=CPU, pad_token_id=pad)

    after = dict(model.named_parameters())
    a, b, head = _lora_parts(list(after))
    assert all(torch.equal(after[n], before[n]) for n in a)
    assert all(not torch.equal(after[n], before[n]) for n in b)  # B starts at 0 and moves
    assert all(not torch.equal(after[n], before[n]) for n in head)
    frozen_rest = [n for n in after if n not in b and n not in head]
    assert all(torch.equal(after[n], before[n]) for n in frozen_rest)


def test_a_is_identical_in_every_process_that_builds_the_model(tiny_model_dir: Path) -> None:
    # The server and every client build the model right after torch.manual_seed(seed):
    # the frozen A's agree bit for bit without ever being sent, whatever ran before.
    cfg = RunConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8,
                    lora_aggregation="ffa")
    server, _ = build_model(ModelSpec.of(cfg, LABELS))
    torch.rand(1000)  # a client process whose global RNG was used for something else
    client, _ = build_model(ModelSpec.of(cfg, LABELS))
    other_seed, _ = build_model(ModelSpec.of(cfg.replace(seed=cfg.seed + 1), LABELS))

    a_server = {n: p for n, p in server.named_parameters() if ".lora_A." in n}
    a_client = dict(client.named_parameters())
    a_other = dict(other_seed.named_parameters())
    assert a_server and all(torch.equal(p, a_client[n]) for n, p in a_server.items())
    assert not all(torch.equal(p, a_other[n]) for n, p in a_server.items())


def mean_of_ones_and_threes(shared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flower's weighted mean of two replies of ``shared``'s names and shapes, one all 1
    and one all 3, 10 examples each: 2 everywhere when the aggregation is a plain mean."""
    replies = [
        RecordDict({"arrays": ArrayRecord({n: Array(np.full_like(v, value))
                                           for n, v in shared.items()}),
                    "metrics": MetricRecord({"num-examples": 10})})
        for value in (1.0, 3.0)
    ]
    return {n: a.numpy() for n, a in aggregate_arrayrecords(replies, "num-examples").items()}


def test_averaging_b_is_exact(tiny_model_dir: Path) -> None:
    # Two clients' B's, hand-made: 1 everywhere and 3 everywhere, equal weights.
    _, model, _, _ = setup(tiny_model_dir, method="lora", lora_aggregation="ffa")
    shared = get_exchanged_state(model)

    mean = mean_of_ones_and_threes(shared)

    assert all(np.array_equal(mean[n], np.full_like(shared[n], 2.0)) for n in shared)
    # With A shared and frozen, the mean of the clients' LoRA updates B_i A is exactly
    # the update of the mean B (plain FedAvg of A and B separately is not).
    set_exchanged_state(model, mean)
    params = dict(model.named_parameters())
    for b_name in (n for n in shared if ".lora_B." in n):
        a = params[b_name.replace(".lora_B.", ".lora_A.")].detach().numpy()
        per_client = [np.full_like(shared[b_name], value) @ a for value in (1.0, 3.0)]
        np.testing.assert_allclose(params[b_name].detach().numpy() @ a,
                                   np.mean(per_client, axis=0), rtol=1e-5, atol=1e-7)


def test_the_cache_keeps_ffa_and_fedavg_models_apart(tiny_model_dir: Path) -> None:
    clear_model_cache()
    cfg = RunConfig(model=str(tiny_model_dir), lora_r=4, lora_alpha=8)

    fedavg = get_model(ModelSpec.of(cfg, LABELS), CPU, max_length=cfg.max_length)[0]
    ffa = get_model(ModelSpec.of(cfg.replace(lora_aggregation="ffa"), LABELS), CPU,
                    max_length=cfg.max_length)[0]

    assert ffa is not fedavg
    assert len(get_exchanged_state(ffa)) < len(get_exchanged_state(fedavg))
    clear_model_cache()


@pytest.mark.parametrize("method", ["full", "head", "freeze"])
def test_ffa_needs_lora(method: str) -> None:
    with pytest.raises(ConfigError, match="`lora-aggregation` 'ffa' needs `method` lora"):
        RunConfig(method=method, lora_aggregation="ffa")


def test_unknown_lora_aggregation_is_refused() -> None:
    with pytest.raises(ConfigError,
                       match="`lora-aggregation` must be one of fedavg, ffa, fedsa"):
        RunConfig(lora_aggregation="fedex")


def test_dp_sgd_trains_only_b_and_the_head(tiny_model_dir: Path) -> None:
    # FFA-LoRA is the DP-friendly variant: per-example gradients exist only for B + head.
    from common.dp_sgd import train_local_dp_sgd

    cfg, model, data, pad = setup(tiny_model_dir, method="lora", lora_aggregation="ffa",
                                  local_steps=3, batch_size=8, dp_sgd_noise_multiplier=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    train_local_dp_sgd(model, data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg), task=TASK,
                       loss_spec=TASK.loss_spec(cfg), seed=1, device=CPU, pad_token_id=pad)

    after = dict(model.named_parameters())
    a, b, _ = _lora_parts(list(after))
    assert all(torch.equal(after[n], before[n]) for n in a)
    assert all(not torch.equal(after[n], before[n]) for n in b)
