"""Tests for common/training.py: batching, the local loop and evaluation."""

from __future__ import annotations

import math
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from common.config import RunConfig
from common.model import build_model, get_exchanged_state, set_exchanged_state
from common.specs import ModelSpec, TrainSpec
from common.tasks.classification import TASK, EncodedData, collate, encode
from common.training import (
    SGD_MOMENTUM,
    batch_tokens,
    derive_seed,
    iterate_batches,
    make_optimizer,
    train_local,
)
from tests.helpers import classify_eval as evaluate

CPU = torch.device("cpu")
LABELS = ["neg", "pos"]


def rule_data(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Sentences whose label is whether they contain a positive word: trivially learnable."""
    rng = random.Random(seed)
    positive, negative = ["great", "good", "nice", "fine"], ["awful", "bad", "poor", "dull"]
    fillers = ["the", "movie", "was", "plot", "acting", "really", "quite"]
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(fillers, 3) + [rng.choice(positive if label else negative)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def setup(model_dir: Path, n: int = 64, **changes: object):  # type: ignore[no-untyped-def]
    # replace: a task's own keys (e.g. skew-loss) are not RunConfig fields
    cfg = RunConfig(model=str(model_dir), lora_r=4, lora_alpha=8, precision="fp32"
                    ).replace(**changes)
    model, tokenizer = build_model(ModelSpec.of(cfg, LABELS))
    texts, labels = rule_data(n)
    data = encode(texts, labels, tokenizer, max_length=cfg.max_length)
    return cfg, model, data, tokenizer.pad_token_id


# --- encoding and batches ------------------------------------------------------------------


def test_encode_truncates_and_keeps_labels(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    data = encode(["good " * 50, "bad"], [1, 0], tokenizer, max_length=8)

    assert len(data) == 2
    assert [len(ids) for ids in data.input_ids] == [8, 3]  # [CLS] bad [SEP]
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [1, 0]
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        encode(["a", "b"], [1], tokenizer, max_length=8)
    empty = encode([], [], tokenizer, max_length=8)  # no local eval rows
    assert len(empty) == 0 and empty.labels.dtype == torch.int64


def test_iterate_batches_pads_each_batch_in_order() -> None:
    data = EncodedData(input_ids=[[1, 2, 3], [4], [5, 6]], labels=torch.tensor([0, 1, 0]))

    batches = list(iterate_batches(data, collate, batch_size=2, pad_token_id=0, generator=None))

    assert len(batches) == 2
    assert batches[0]["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batches[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batches[0]["labels"].tolist() == [0, 1]
    assert batches[1]["input_ids"].tolist() == [[5, 6]]  # padded to its own longest row
    assert batches[1]["attention_mask"].tolist() == [[1, 1]]


def test_batch_tokens_counts_the_tokens_not_the_padding() -> None:
    data = EncodedData(input_ids=[[1, 2, 3], [4], [5, 6]], labels=torch.tensor([0, 1, 0]))
    batch = collate(data, [0, 1, 2], 0)  # 3 rows padded to width 3: 9 positions

    assert batch_tokens(batch) == 3 + 1 + 2
    assert batch_tokens({"input_ids": batch["input_ids"]}) is None  # no mask: not counted


def test_the_loop_counts_every_row_and_token_it_processed(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, n=10, batch_size=4, local_steps=0,
                                local_epochs=2)

    result = train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                         seed=0, device=CPU, pad_token_id=pad)

    # Two epochs over 10 examples (batches of 4, 4, 2): each row and its tokens twice.
    assert result.examples_seen == 20 and result.num_examples == 10
    assert result.tokens == 2 * sum(len(ids) for ids in data.input_ids)


def test_iterate_batches_shuffles_reproducibly() -> None:
    data = EncodedData(input_ids=[[i] for i in range(20)], labels=torch.arange(20))

    def order(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        batches = iterate_batches(data, collate, batch_size=3, pad_token_id=0, generator=gen)
        return [i for b in batches
                for i in b["input_ids"][:, 0].tolist()]

    assert sorted(order(1)) == list(range(20))
    assert order(1) == order(1) != list(range(20))
    assert order(1) != order(2)


def test_derive_seed_is_stable_and_separates_parts() -> None:
    seed = derive_seed(42, 1, "client-3")

    assert seed == derive_seed(42, 1, "client-3")
    assert 0 <= seed < 2**63
    assert derive_seed(1, 23) != derive_seed(12, 3)
    assert derive_seed(1) != derive_seed("1")
    assert derive_seed(42, 1, "client-3") == 6_450_453_549_682_713_659  # pinned: hashlib


# --- the local training loop ----------------------------------------------------------------


def test_training_lowers_the_loss_and_learns_the_rule(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="full", local_steps=60,
                                  batch_size=16, learning_rate=1e-2)
    before = evaluate(model, data, batch_size=32, device=CPU, pad_token_id=pad)

    result = train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                         seed=1, device=CPU, pad_token_id=pad)
    after = evaluate(model, data, batch_size=32, device=CPU, pad_token_id=pad)

    assert result.steps == 60
    assert result.train_loss < result.first_loss
    assert after.loss < before.loss / 2
    assert after.accuracy >= 0.95
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_first_loss_regression(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", local_steps=2)

    result = train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                         seed=derive_seed(42, 1, 0), device=CPU,
                         pad_token_id=pad)

    # pinned: tiny BERT (seed 0), head and LoRA seeded by RunConfig.seed=42
    assert result.first_loss == pytest.approx(0.69583, abs=1e-4)


def test_gradient_checkpointing_trains_a_classifier_as_without_it(tiny_model_dir: Path) -> None:
    # A generic key (not sft's): checkpointing recomputes activations, the steps are equal.
    states = []
    for checkpointing in (False, True):
        cfg, model, data, pad = setup(tiny_model_dir, n=16, method="lora", local_steps=2,
                                      batch_size=8, gradient_checkpointing=checkpointing)
        assert model.base_model.model.is_gradient_checkpointing is checkpointing
        train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=3, device=CPU, pad_token_id=pad)
        states.append(get_exchanged_state(model))
    plain, checkpointed = states
    assert all(np.allclose(plain[k], checkpointed[k], atol=1e-5) for k in plain)


def test_same_seed_same_weights_other_seed_other_weights(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="lora", local_steps=4, batch_size=8)
    start = get_exchanged_state(model)

    def train(seed: int) -> dict[str, np.ndarray]:
        set_exchanged_state(model, start)
        train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=seed, device=CPU, pad_token_id=pad)
        return get_exchanged_state(model)

    first, again, other = train(1), train(1), train(2)

    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)
    assert not all(np.array_equal(first[k], start[k]) for k in first)


@pytest.mark.parametrize(
    ("local_steps", "local_epochs", "steps", "num_examples"),
    [
        (2, 1, 2, 8),  # a cap below one epoch: 2 full batches of 4 distinct examples
        (5, 1, 5, 10),  # more steps than one epoch (4+4+2): cycles, 10 distinct
        (0, 2, 6, 10),  # whole epochs: 2 x ceil(10 / 4) steps, every example once
    ],
)
def test_step_cap_and_num_examples(tiny_model_dir: Path, local_steps: int, local_epochs: int,
                                   steps: int, num_examples: int) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, n=10, method="head", batch_size=4,
                                  local_steps=local_steps, local_epochs=local_epochs)

    result = train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                         seed=0, device=CPU, pad_token_id=pad)

    assert (result.steps, result.num_examples) == (steps, num_examples)
    assert result.seconds > 0


def test_proximal_term_keeps_weights_near_the_global_ones(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, method="head", local_steps=20,
                                  learning_rate=1e-2, grad_clip=0.0)
    start = get_exchanged_state(model)

    def distance_moved(mu: float) -> float:
        set_exchanged_state(model, start)
        train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=0, device=CPU, pad_token_id=pad,
                    proximal_mu=mu)
        end = get_exchanged_state(model)
        return math.sqrt(sum(float(((end[k] - start[k]) ** 2).sum()) for k in start))

    free, proximal = distance_moved(0.0), distance_moved(10.0)

    assert proximal < free / 2


def test_training_under_bf16_autocast_on_cpu(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, n=8, method="lora", local_steps=1)

    result = train_local(model, data, TrainSpec.of(cfg.replace(precision="bf16")), task=TASK,
                         loss_spec=TASK.loss_spec(cfg), seed=0, device=CPU, pad_token_id=pad)

    assert math.isfinite(result.train_loss)


def test_empty_data_is_an_error(tiny_model_dir: Path) -> None:
    cfg, model, _, pad = setup(tiny_model_dir, n=2, method="head")
    empty = EncodedData(input_ids=[], labels=torch.zeros(0, dtype=torch.int64))

    with pytest.raises(ValueError, match="empty"):
        train_local(model, empty, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=0, device=CPU, pad_token_id=pad)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty, batch_size=4, device=CPU, pad_token_id=pad)


# --- evaluation -------------------------------------------------------------------------------


class FirstTokenClassifier(torch.nn.Module):
    """Predicts the class given by each row's first token with probability 1/2."""

    def __init__(self, num_labels: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_labels=num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        k = self.config.num_labels
        probs = torch.full((len(input_ids), k), 0.5 / (k - 1))
        probs[torch.arange(len(input_ids)), input_ids[:, 0]] = 0.5
        return SimpleNamespace(logits=probs.log())


def test_evaluate_metrics_by_hand() -> None:
    # predictions 0, 1, 1, 2 against labels 0, 1, 2, 2
    data = EncodedData(input_ids=[[0, 9], [1], [1, 5, 5], [2]], labels=torch.tensor([0, 1, 2, 2]))

    result = evaluate(FirstTokenClassifier(3), data, batch_size=3, device=CPU, pad_token_id=7)

    assert result.num_examples == 4
    assert result.accuracy == 0.75
    # F1: class 0 = 1, class 1 = 2/3 (P 1/2, R 1), class 2 = 2/3 (P 1, R 1/2)
    assert result.f1_macro == pytest.approx(7 / 9)
    # each correct row costs -ln(1/2), the wrong one -ln(1/4): (3 ln 2 + 2 ln 2) / 4
    assert result.loss == pytest.approx(5 / 4 * math.log(2))
    # recall: class 0 1/1, class 1 1/1, class 2 1/2 (one of its two rows predicted 1)
    assert (result.recall_0, result.recall_1, result.recall_2) == (1.0, 1.0, 0.5)
    assert result.recall_min == 0.5


def test_evaluate_macro_f1_counts_every_class_of_the_model() -> None:
    data = EncodedData(input_ids=[[0], [1], [1], [2]], labels=torch.tensor([0, 1, 2, 2]))

    result = evaluate(FirstTokenClassifier(4), data, batch_size=8, device=CPU, pad_token_id=0)

    assert result.f1_macro == pytest.approx((1 + 2 / 3 + 2 / 3 + 0) / 4)
    # class 3 has no eval rows: no recall of its own, and it is not the worst recall
    assert not hasattr(result, "recall_3") and result.recall_min == 0.5


# --- the local optimizer ---------------------------------------------------------------------


def _first_step(optimizer_name: str, gradient: float, **keys: float) -> float:
    """How far one step of ``make_optimizer`` moves a parameter at 0 whose loss is
    ``gradient * p`` (weight decay has nothing to act on at 0)."""
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = RunConfig(local_optimizer=optimizer_name, learning_rate=0.1, **keys)
    optimizer = make_optimizer([param], TrainSpec.of(cfg))
    (gradient * param).sum().backward()
    optimizer.step()
    return float(param.detach()[0])


def test_sgd_steps_keep_the_gradients_size_and_adamw_steps_do_not() -> None:
    # SGD: -lr * g on the first step (momentum has no history yet), so a gradient 1000x
    # smaller moves 1000x less. AdamW's bias-corrected first step is -lr * g / |g|:
    # the same length for both (why a barely-pulling site still moves the model).
    assert _first_step("sgd", 1.0) == pytest.approx(-0.1)
    assert _first_step("sgd", 1e-3) == pytest.approx(-1e-4)
    assert _first_step("adamw", 1.0, adam_epsilon=1e-8) == pytest.approx(-0.1, rel=1e-3)
    assert _first_step("adamw", 1e-3, adam_epsilon=1e-8) == pytest.approx(-0.1, rel=1e-2)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))],
                               TrainSpec.of(RunConfig(local_optimizer="sgd")))
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["momentum"] == SGD_MOMENTUM == 0.9


def test_a_larger_adam_epsilon_damps_gradients_far_below_it() -> None:
    # AdamW's first step is -lr * g / (|g| + eps): with eps 1e-4 (the default) a gradient
    # of 1e-6 moves 0.1 * 1e-6 / 1.01e-4 (about 100x less than at torch's 1e-8), one of 1
    # barely less.
    assert RunConfig().adam_epsilon == 1e-4
    assert _first_step("adamw", 1e-6, adam_epsilon=1e-4) == pytest.approx(
        -0.1 * 1e-6 / (1e-6 + 1e-4), rel=1e-3)
    assert _first_step("adamw", 1e-6, adam_epsilon=1e-8) == pytest.approx(
        -0.1 * 1e-6 / (1e-6 + 1e-8), rel=1e-3)
    assert _first_step("adamw", 1.0, adam_epsilon=1e-4) == pytest.approx(-0.1, rel=1e-3)


def test_adam_epsilon_is_refused_with_sgd_and_must_be_positive() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="adam-epsilon.*sgd"):
        RunConfig(local_optimizer="sgd", adam_epsilon=1e-8)
    assert RunConfig(local_optimizer="sgd").local_optimizer == "sgd"  # the default eps is fine
    with pytest.raises(ConfigError, match="adam-epsilon.*> 0"):
        RunConfig(adam_epsilon=0.0)


def _moved(model_dir: Path, optimizer_name: str) -> float:
    cfg, model, data, pad = setup(model_dir, method="full", local_steps=3, batch_size=16,
                                  learning_rate=1e-3, local_optimizer=optimizer_name)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                seed=1, device=CPU, pad_token_id=pad)
    after = [p.detach() for p in model.parameters() if p.requires_grad]
    return float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before,
                                                                      strict=True))))


def test_train_local_steps_with_the_configured_optimizer(tiny_model_dir: Path) -> None:
    # Gradients are clipped to norm 1, so 3 SGD steps (momentum 0.9) move the weights by
    # at most lr * (1 + 1.9 + 2.71); AdamW moves every coordinate by about lr per step,
    # far more over the model's many coordinates.
    sgd, adamw = _moved(tiny_model_dir, "sgd"), _moved(tiny_model_dir, "adamw")
    assert 0 < sgd <= 1e-3 * (1 + 1.9 + 2.71) + 1e-9
    assert adamw > 10 * sgd


def test_an_unknown_local_optimizer_is_refused() -> None:
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="local-optimizer.*adamw.*sgd"):
        RunConfig(local_optimizer="lion")
