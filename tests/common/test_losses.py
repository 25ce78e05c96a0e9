"""common/losses.py: the logit-adjusted loss, with numbers checkable by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.losses import class_log_prior, logit_adjusted_cross_entropy
from common.tasks.classification import TASK, EncodedData
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
        train_local(model, site, cfg, task=TASK, seed=0, device=CPU, pad_token_id=pad)
        moved[skew_loss] = _mean_gap(model, balanced, pad) - before

    assert moved["none"] > 0.5
    assert moved["logit-adjusted"] < 0.25 * moved["none"]


def test_rule_data_still_learnable_with_the_adjusted_loss(tiny_model_dir: Path) -> None:
    cfg, model, data, pad = setup(tiny_model_dir, n=64, local_steps=30, batch_size=8,
                                  learning_rate=0.01, skew_loss="logit-adjusted")
    result = train_local(model, data, cfg, task=TASK, seed=0, device=CPU, pad_token_id=pad)
    assert result.train_loss < result.first_loss
    assert len(rule_data(4)[0]) == 4
