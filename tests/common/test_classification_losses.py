"""common/tasks/classification_losses.py: the label-skew and imbalance losses and the
augmentation, with numbers checkable by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.config import RunConfig
from common.specs import TrainSpec
from common.tasks import get_task
from common.tasks.base import TrainContext
from common.tasks.classification import TASK, EncodedData
from common.tasks.classification_losses import (
    augment_token_ids,
    class_log_prior,
    class_weights,
    focal_cross_entropy,
    label_count_metrics,
    logit_adjusted_cross_entropy,
    read_label_counts,
    sum_label_counts,
)
from common.training import train_local
from tests.common.test_training import CPU, rule_data, setup


def test_class_log_prior_is_laplace_smoothed_frequencies() -> None:
    # labels 0,0,0,1 over 2 classes: (3+1)/(4+2) = 2/3 and (1+1)/6 = 1/3
    prior = class_log_prior(torch.tensor([0, 0, 0, 1]), 2).exp()
    assert prior.tolist() == pytest.approx([2 / 3, 1 / 3])
    # a class the site lacks gets a small, finite prior: (0+1)/(2+3) = 0.2
    prior = class_log_prior(torch.tensor([0, 0]), 3).exp()
    assert prior.tolist() == pytest.approx([0.6, 0.2, 0.2])
    with pytest.raises(ValueError, match="smoothing must be > 0"):
        class_log_prior(torch.tensor([0]), 2, smoothing=0)


def test_logit_adjusted_loss_by_hand() -> None:
    # Equal logits, prior (3/4, 1/4), tau 1: adjusted logits are log 3/4 and log 1/4, so
    # the softmax is (3/4, 1/4): loss -log 3/4 for class 0 and -log 1/4 for class 1.
    logits = torch.zeros(2, 2)
    log_prior = torch.tensor([0.75, 0.25]).log()

    per_class = [logit_adjusted_cross_entropy(logits[i:i + 1], torch.tensor([i]),
                                              log_prior=log_prior, tau=1.0).item()
                 for i in range(2)]

    assert per_class == pytest.approx([-math.log(0.75), -math.log(0.25)])
    # tau 0.5 halves the shift: logits (0.5 log 3/4, 0.5 log 1/4) for class 1
    half = logit_adjusted_cross_entropy(logits[:1], torch.tensor([1]), log_prior=log_prior,
                                        tau=0.5).item()
    shifted = 0.5 * log_prior
    assert half == pytest.approx(-(shifted[1] - torch.logsumexp(shifted, 0)).item())
    # tau 0 is plain cross-entropy
    assert logit_adjusted_cross_entropy(logits, torch.tensor([0, 1]), log_prior=log_prior,
                                        tau=0.0).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([0, 1])).item())


def _skewed_site(tiny_model_dir: Path, **changes: object):  # type: ignore[no-untyped-def]
    """A site with 100 rows of class 0 and 10 of class 1 (10:1 label skew), and the
    balanced 200-row set it was drawn from."""
    cfg, model, balanced, pad = setup(tiny_model_dir, n=200, local_steps=30, batch_size=16,
                                      learning_rate=0.01, **changes)
    labels = balanced.labels.tolist()
    keep = ([i for i, label in enumerate(labels) if label == 0]
            + [i for i, label in enumerate(labels) if label == 1][:10])
    site = EncodedData([balanced.input_ids[i] for i in keep], balanced.labels[keep])
    return cfg, model, site, balanced, pad


def _mean_gap(model: torch.nn.Module, data: EncodedData, pad: int) -> float:
    """Mean of logit(class 0) - logit(class 1) over ``data``."""
    width = max(len(row) for row in data.input_ids)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in data.input_ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in data.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return float((logits[:, 0] - logits[:, 1]).mean())


def test_logit_adjustment_removes_most_of_a_skewed_sites_bias(tiny_model_dir: Path) -> None:
    """Trained on a 10:1 site, plain cross-entropy shifts the model's logits towards the
    majority class on balanced data (here by about 1.5); the adjusted loss, whose raw
    logits estimate the balanced posterior, by a small fraction of that."""
    moved = {}
    for skew_loss in ("none", "logit-adjusted"):
        cfg, model, site, balanced, pad = _skewed_site(tiny_model_dir, skew_loss=skew_loss)
        before = _mean_gap(model, balanced, pad)
        train_local(model, site, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=0, device=CPU, pad_token_id=pad)
        moved[skew_loss] = _mean_gap(model, balanced, pad) - before

    assert moved["none"] > 0.5
    assert moved["logit-adjusted"] < 0.25 * moved["none"]


def test_rule_data_still_learnable_with_the_adjusted_loss(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, n=64, local_steps=30, batch_size=8,
                                  learning_rate=0.01, skew_loss="logit-adjusted")
    result = train_local(model, data, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                         seed=0, device=CPU, pad_token_id=pad)
    assert result.train_loss < result.first_loss
    assert len(rule_data(4)[0]) == 4


# --- class weights, focal loss, label counts on the wire -------------------------------


def test_inverse_frequency_weights_by_hand() -> None:
    # counts (6, 3, 1), N = 10: w_c = N / (C * n_c) = (10/18, 10/9, 10/3)
    weights = class_weights([6, 3, 1], "inverse-frequency")
    assert weights.tolist() == pytest.approx([5 / 9, 10 / 9, 10 / 3])
    # the scale keeps an average example at weight 1: sum n_c w_c = N
    assert float((torch.tensor([6.0, 3.0, 1.0]) * weights).sum()) == pytest.approx(10)
    # balanced counts: all 1; a class without examples weighs as if it had one (N/C_present)
    assert class_weights([5, 5], "inverse-frequency").tolist() == pytest.approx([1, 1])
    assert class_weights([3, 1, 0], "inverse-frequency").tolist() == pytest.approx(
        [2 / 3, 2, 2])


def test_effective_number_weights_by_hand() -> None:
    # beta 0.5: effective numbers (1 - 0.5^n) / (1 - 0.5) are 1.75 (n=3) and 1 (n=1), so
    # w is proportional to (1/1.75, 1) = (4/7, 1); scaled so 3 w0 + w1 = 4: (16/19, 28/19)
    weights = class_weights([3, 1], "effective-number", beta=0.5)
    assert weights.tolist() == pytest.approx([16 / 19, 28 / 19])
    # beta -> 1 approaches inverse frequency (2/3, 2)
    near = class_weights([3, 1], "effective-number", beta=1 - 1e-6).tolist()
    assert near == pytest.approx([2 / 3, 2], rel=1e-4)


@pytest.mark.parametrize(("counts", "scheme", "beta", "message"), [
    ([3, 1], "balanced", 0.9, "inverse-frequency or effective-number"),
    ([0, 0], "inverse-frequency", 0.9, "at least one example"),
    ([3, -1], "inverse-frequency", 0.9, ">= 0"),
    ([3, 1], "effective-number", 1.0, r"beta must be in \(0, 1\)"),
])
def test_class_weights_refuse_bad_input(counts, scheme, beta, message) -> None:
    with pytest.raises(ValueError, match=message):
        class_weights(counts, scheme, beta=beta)


def test_focal_loss_by_hand() -> None:
    # logits (0, ln 3): softmax (1/4, 3/4). gamma 2: label 1 gives (1/4)^2 * -ln(3/4),
    # label 0 gives (3/4)^2 * -ln(1/4).
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    labels = torch.tensor([1, 0])
    one = (1 / 16) * -math.log(3 / 4)  # 0.017980
    zero = (9 / 16) * -math.log(1 / 4)  # 0.779791
    assert focal_cross_entropy(logits, labels, gamma=2).item() == pytest.approx(
        (one + zero) / 2)
    # class weights (2/3, 2) multiply each term; the mean divides by the batch size (2)
    weighted = focal_cross_entropy(logits, labels, gamma=2,
                                   class_weight=torch.tensor([2 / 3, 2.0])).item()
    assert weighted == pytest.approx((2 * one + 2 / 3 * zero) / 2)
    # gamma 0 without weights is cross-entropy
    assert focal_cross_entropy(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits, labels).item())
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_cross_entropy(logits, labels, gamma=-1)


def test_label_counts_round_trip_and_sum() -> None:
    metrics = {"train-loss": 0.3, **label_count_metrics([4, 0, 2])}
    assert metrics["label-count-1"] == 0
    assert read_label_counts(metrics) == [4, 0, 2]
    assert read_label_counts({"train-loss": 0.3}) is None
    assert read_label_counts({"label-count-0": 1, "label-count-2": 3}) is None  # a gap
    assert read_label_counts({"label-count-0": -1}) is None
    assert read_label_counts({"label-count-0": 1.5}) is None
    assert read_label_counts({"label-count-x": 1}) is None
    assert sum_label_counts([[4, 0, 2], [1, 5]]) == [5, 5, 2]
    assert sum_label_counts([]) == []


# --- augmentation ----------------------------------------------------------------------

# Two rows: [CLS]=101 10..15 [SEP]=102 and a short one padded with 0.
IDS = torch.tensor([[101, 10, 11, 12, 13, 14, 15, 102],
                    [101, 20, 102, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def _augment(mode: str, rate: float, seed: int):  # type: ignore[no-untyped-def]
    return augment_token_ids(IDS, MASK, mode=mode, rate=rate, pad_token_id=0,
                             generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["token-dropout", "random-swap", "both"])
def test_augmentation_keeps_special_tokens_padding_and_is_seeded(mode) -> None:
    for seed in range(20):
        ids, mask = _augment(mode, 0.3, seed)
        assert ids.shape == IDS.shape and mask.shape == MASK.shape
        for row in range(2):
            length = int(mask[row].sum())
            kept = ids[row, :length].tolist()
            assert kept[0] == 101 and kept[-1] == 102  # [CLS] ... [SEP]
            assert ids[row, length:].eq(0).all()  # padding after the row
            assert mask[row, :length].eq(1).all()
            inner = kept[1:-1]
            original = IDS[row, 1 : int(MASK[row].sum()) - 1].tolist()
            assert 1 <= len(inner) <= len(original)
            if mode == "random-swap":
                assert sorted(inner) == sorted(original)  # a permutation
            else:  # dropout keeps the survivors' multiset within the original
                assert set(inner) <= set(original)
        # the one-token row has nothing to swap and keeps its only inner token
        assert ids[1].tolist() == IDS[1].tolist()
        again = _augment(mode, 0.3, seed)
        assert torch.equal(again[0], ids) and torch.equal(again[1], mask)
    assert IDS[0].tolist() == [101, 10, 11, 12, 13, 14, 15, 102]  # input unchanged
    outputs = {tuple(_augment(mode, 0.3, seed)[0][0].tolist()) for seed in range(20)}
    assert len(outputs) > 1  # different seeds augment differently


def test_token_dropout_rate_and_swap_count() -> None:
    # rate 0.5 over 6 inner tokens: about half survive (seeded: an exact count per seed)
    survivors = [int(_augment("token-dropout", 0.5, s)[1][0].sum()) - 2 for s in range(200)]
    assert 2.4 < sum(survivors) / len(survivors) < 3.6
    # random-swap with rate 0.1 of 6 inner tokens swaps max(1, round(0.6)) = 1 pair:
    # at most 2 positions differ
    for seed in range(20):
        ids, _ = _augment("random-swap", 0.1, seed)
        assert int((ids[0] != IDS[0]).sum()) in (0, 2)
    with pytest.raises(ValueError, match="augmentation must be one of"):
        _augment("synonyms", 0.1, 0)
    with pytest.raises(ValueError, match=r"rate must be in \[0, 1\]"):
        _augment("both", 1.5, 0)


# --- the classification task's loss with these options ---------------------------------


class _Recorder(torch.nn.Module):
    """Logits (0, ln 3) for every row; remembers the ids it was given."""

    config = type("Config", (), {"pad_token_id": 0})()

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):  # type: ignore[no-untyped-def]
        self.seen.append(input_ids.clone())
        logits = torch.tensor([[0.0, math.log(3)]]).repeat(len(input_ids), 1)
        return type("Out", (), {"logits": logits})()


# A site with labels 0, 0, 0, 1: counts (3, 1), inverse-frequency weights (2/3, 2).
SITE = EncodedData([[101, 5, 6, 7, 8, 9, 102]] * 4, torch.tensor([0, 0, 0, 1]))
BATCH = {"input_ids": torch.tensor([[101, 5, 6, 7, 8, 9, 102]] * 2),
         "attention_mask": torch.ones(2, 7, dtype=torch.int64), "labels": torch.tensor([1, 0])}
ONE, ZERO = -math.log(3 / 4), -math.log(1 / 4)  # cross-entropy of label 1 and of label 0


def _task_loss(ctx: TrainContext | None = None, **keys: object) -> float:
    # skew-loss none unless given (its default, auto, adjusts the logits by the prior)
    cfg = RunConfig().replace(**{"skew_loss": "none", **keys})
    loss = TASK.make_loss(SITE, spec=TASK.loss_spec(cfg), ctx=ctx or TrainContext(seed=1))
    return loss(_Recorder(), BATCH).item()


def test_task_loss_with_site_and_federation_class_weights() -> None:
    assert _task_loss() == pytest.approx((ONE + ZERO) / 2)
    assert _task_loss(class_weighting="inverse-frequency") == pytest.approx(
        (2 * ONE + 2 / 3 * ZERO) / 2)
    # global: the federation's counts (1, 1) from the round config weigh both classes 1
    federation = TrainContext(seed=1, round_config={"label-counts": [1, 1]})
    assert _task_loss(federation, class_weighting="inverse-frequency",
                      class_weighting_source="global") == pytest.approx((ONE + ZERO) / 2)
    # before the server knows the counts (round 1) the site's own are used
    assert _task_loss(class_weighting="inverse-frequency",
                      class_weighting_source="global") == pytest.approx(
        (2 * ONE + 2 / 3 * ZERO) / 2)
    # focal on top: gamma 2 multiplies by (1 - p_y)^2 = 1/16 and 9/16
    assert _task_loss(class_weighting="inverse-frequency", focal_gamma=2.0) == pytest.approx(
        (2 * ONE / 16 + 2 / 3 * ZERO * 9 / 16) / 2)
    with pytest.raises(ValueError, match="3 label counts"):
        _task_loss(TrainContext(round_config={"label-counts": [1, 1, 1]}),
                   class_weighting="inverse-frequency", class_weighting_source="global")


def test_task_loss_augments_training_batches_per_seed_and_step() -> None:
    def ids_seen(seed: int) -> list[list[list[int]]]:
        model = _Recorder()
        spec = TASK.loss_spec(RunConfig().replace(augment="both", augment_rate=0.5))
        loss = TASK.make_loss(SITE, spec=spec, ctx=TrainContext(seed=seed))
        for _ in range(3):
            loss(model, BATCH)
        return [ids.tolist() for ids in model.seen]

    first = ids_seen(1)
    assert first == ids_seen(1)  # same seed: same augmentation at every step
    assert first != ids_seen(2)
    assert len({str(step) for step in first}) > 1  # each step draws anew
    assert all(row[0] == 101 for step in first for row in step)
    assert BATCH["input_ids"][0].tolist() == [101, 5, 6, 7, 8, 9, 102]  # not in place


def test_site_reports_label_counts_only_for_federation_weights() -> None:
    def metrics(**keys: str) -> dict[str, int | float]:
        return TASK.site_metrics(SITE, spec=TASK.loss_spec(RunConfig().replace(**keys)))

    assert metrics() == {}
    assert metrics(class_weighting="inverse-frequency") == {}
    assert metrics(class_weighting="inverse-frequency", class_weighting_source="global") == {
        "label-count-0": 3, "label-count-1": 1}
    # with the round's label names: a count for every class, also those without rows
    ctx = TrainContext(round_config={"label-names": ["a", "b", "c"]})
    spec = TASK.loss_spec(RunConfig().replace(class_weighting="inverse-frequency",
                                              class_weighting_source="global"))
    assert TASK.site_metrics(SITE, spec=spec, ctx=ctx) == {
        "label-count-0": 3, "label-count-1": 1, "label-count-2": 0}


def test_inverse_frequency_weights_remove_part_of_a_skewed_sites_bias(
        tiny_model_dir: Path) -> None:
    """As the logit adjustment above: on a 10:1 site, class weights (10:1 against the
    majority) keep the model's logits on balanced data from moving towards class 0."""
    moved = {}
    for weighting in ("none", "inverse-frequency"):
        cfg, model, site, balanced, pad = _skewed_site(tiny_model_dir, skew_loss="none",
                                                      class_weighting=weighting)
        before = _mean_gap(model, balanced, pad)
        train_local(model, site, TrainSpec.of(cfg), task=TASK, loss_spec=TASK.loss_spec(cfg),
                    seed=0, device=CPU, pad_token_id=pad)
        moved[weighting] = _mean_gap(model, balanced, pad) - before

    assert moved["none"] > 0.5
    assert moved["inverse-frequency"] < 0.5 * moved["none"]


def test_federation_label_counts_are_summed_by_site_latest():
    feedback = TASK.round_feedback(TASK.loss_spec(
        RunConfig().replace(class_weighting="inverse-frequency",
                            class_weighting_source="global")))
    assert feedback is not None and feedback.config_entries() == {}  # round 1: not known
    feedback.collect("a", {"num-examples": 4, "label-count-0": 3, "label-count-1": 1})
    feedback.collect("b", {"label-count-0": 1, "label-count-1": 2, "label-count-2": 2})
    assert feedback.config_entries() == {"label-counts": [4, 3, 2]}
    # a site's newer counts replace its older ones; a reply without counts changes nothing
    feedback.collect("a", {"label-count-0": 5, "label-count-1": 1})
    feedback.collect("b", {"num-examples": 5})
    assert feedback.config_entries() == {"label-counts": [6, 3, 2]}


def test_label_counts_are_not_collected_or_sent_unless_asked():
    assert TASK.round_feedback(TASK.loss_spec(RunConfig())) is None
    weighted = RunConfig().replace(class_weighting="inverse-frequency")
    assert TASK.round_feedback(TASK.loss_spec(weighted)) is None
    sft = get_task("sft")
    assert sft.round_feedback(sft.loss_spec(RunConfig(task="sft"))) is None


def test_federation_label_counts_through_the_secure_sum():
    feedback = TASK.round_feedback(TASK.loss_spec(
        RunConfig().replace(class_weighting="inverse-frequency",
                            class_weighting_source="global")))
    assert feedback is not None
    assert feedback.summed_keys({"label-names": ["a", "b", "c"]}) == (
        "label-count-0", "label-count-1", "label-count-2")
    assert feedback.summed_keys({}) == ()
    feedback.collect_sum({"label-count-0": 4, "label-count-1": 0, "label-count-2": 2})
    assert feedback.config_entries() == {"label-counts": [4, 0, 2]}
    # the latest round's sum replaces the earlier one (it is not added to it)
    feedback.collect_sum({"label-count-0": 1, "label-count-1": 1, "label-count-2": 1})
    assert feedback.counts() == [1, 1, 1]
    # a sum with no example (or with gaps in the classes) changes nothing
    feedback.collect_sum({"label-count-0": 0, "label-count-1": 0, "label-count-2": 0})
    feedback.collect_sum({"label-count-0": 5, "label-count-2": 5})
    assert feedback.counts() == [1, 1, 1]
