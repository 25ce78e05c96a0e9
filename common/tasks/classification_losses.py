"""Local objectives for label skew and class imbalance, and token-level augmentation.

Label skew: the site's own class prior folded into the loss.

Under label skew each site's data over-represents a few classes, so plain
cross-entropy pulls the shared classifier towards the site's majority classes and
pushes the logits of classes the site rarely sees down (the swings of FedAvg under
Dirichlet partitions). The logit-adjusted loss of Menon et al. (2021, "Long-tail
learning via logit adjustment"; with ``tau = 1`` it is the balanced softmax of Ren et
al., 2020) trains on ``logits + tau * log(prior)``: a class the site sees often has to
win by less, a class it rarely sees is no longer pushed down, and the raw logits —
what the exported model predicts with — estimate the class-balanced posterior. In
federated learning this is the calibration idea of FedLC (Zhang et al., 2022) with the
site's prior. The prior is computed at the site from its own labels and never leaves it.

Written here rather than taken from a library: no maintained package offers it for
plain PyTorch classification heads; it is three lines over ``F.cross_entropy``.

Class imbalance (``class-weighting``, ``focal-gamma``): per-class weights from label
counts (inverse frequency, or the "effective number of samples" of Cui et al. 2019,
"Class-Balanced Loss Based on Effective Number of Samples") and the focal loss of Lin
et al. (2017, "Focal Loss for Dense Object Detection"), which down-weights examples the
model already gets right. The counts are the site's own, or the federation's summed
counts that the server sends back (``label-count-<k>`` reply metrics, see
``label_count_metrics``).

Augmentation (``augment``): token dropout (random deletion) and random swap of EDA (Wei
and Zou, 2019) on a padded batch of token ids, keeping each row's first and last token
(``[CLS]`` / ``[SEP]``) and its padding in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

# Reply metric names of a site's label counts (``label-count-0``, ``label-count-1``, ...).
LABEL_COUNT_PREFIX = "label-count-"
# The round-config entry with the federation's summed label counts (a list of ints).
LABEL_COUNTS_KEY = "label-counts"


def class_log_prior(labels: torch.Tensor, num_classes: int, *, smoothing: float = 1.0
                    ) -> torch.Tensor:
    """``log`` of the class frequencies of ``labels``, add-``smoothing`` (Laplace).

    A class the site has no row of gets the finite prior ``smoothing / (n + C *
    smoothing)`` instead of ``log 0``: its logit is then barely pushed down.

    Parameters
    ----------
    labels
        Integer class ids of the site's training rows (any shape).
    num_classes
        The federation's number of classes (``C``).
    smoothing
        Pseudo-count added to every class; > 0.
    """
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0, got {smoothing}")
    counts = torch.bincount(labels.reshape(-1).long(), minlength=num_classes).double()
    prior = (counts + smoothing) / (counts.sum() + num_classes * smoothing)
    return prior.log().float()


def logit_adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, log_prior: torch.Tensor, tau: float
) -> torch.Tensor:
    """Mean cross-entropy of ``logits + tau * log_prior`` (training only; predict with
    the raw logits). ``tau = 0`` is plain cross-entropy."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.device, logits.dtype), labels)


def class_weights(counts: Sequence[int], scheme: str, *, beta: float = 0.999) -> torch.Tensor:
    """Per-class loss weights from label counts, scaled to keep the loss's mean.

    ``inverse-frequency``: ``w_c`` proportional to ``1 / n_c``; ``effective-number``:
    proportional to ``(1 - beta) / (1 - beta ** n_c)`` (Cui et al. 2019: ``beta`` 0 is no
    weighting, ``beta`` -> 1 approaches inverse frequency). Either is then scaled so that
    ``sum_c n_c * w_c = N``: an example drawn from the counted data has weight 1 on
    average, so the loss (and the learning rate tuned for it) keeps its scale, and a
    balanced count vector gives weights of exactly 1. A class with no counted example
    is weighted as if it had one (at least as rare as the rarest).

    Example: counts (3, 1), inverse frequency: ``w = (4/6, 4/2) = (2/3, 2)``.

    Raises
    ------
    ValueError
        For an unknown scheme, a negative count, no counted example at all, or a
        ``beta`` outside (0, 1).
    """
    if scheme not in ("inverse-frequency", "effective-number"):
        raise ValueError(
            f"class weighting must be inverse-frequency or effective-number, got {scheme!r}")
    n = torch.tensor(list(counts), dtype=torch.float64)
    if n.numel() == 0 or bool((n < 0).any()) or float(n.sum()) == 0:
        raise ValueError(f"label counts must be >= 0 with at least one example, got "
                         f"{list(counts)}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    at_least_one = n.clamp(min=1)
    if scheme == "inverse-frequency":
        raw = 1 / at_least_one
    else:
        raw = (1 - beta) / (1 - beta ** at_least_one)
    return (raw * n.sum() / (n * raw).sum()).float()


def focal_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, gamma: float = 0.0,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the batch of ``w_y * (1 - p_y) ** gamma * -log p_y`` (Lin et al. 2017).

    ``p_y`` is the softmax probability of the true class, ``w_y`` its class weight (1
    without ``class_weight``). The mean divides by the batch size, not by the sum of the
    weights (as ``F.cross_entropy(weight=...)`` does): a batch that happens to hold only
    frequent classes then still counts less, and each example's term depends on that
    example alone. ``gamma = 0`` without weights is plain cross-entropy.
    """
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    log_p = F.log_softmax(logits, dim=-1).gather(-1, labels.reshape(-1, 1)).squeeze(-1)
    loss = -log_p
    if gamma > 0:
        loss = (1 - log_p.exp()).clamp(min=0) ** gamma * loss
    if class_weight is not None:
        loss = class_weight.to(logits.device, loss.dtype)[labels] * loss
    return loss.mean()


# --- the federation's label counts on the wire ------------------------------------------


def label_count_metrics(counts: Sequence[int]) -> dict[str, int]:
    """A site's label counts as reply metrics: ``label-count-<k>`` -> count of class k."""
    return {f"{LABEL_COUNT_PREFIX}{k}": int(count) for k, count in enumerate(counts)}


def read_label_counts(metrics: Mapping[str, object]) -> list[int] | None:
    """The label counts in a reply's metrics (``label_count_metrics``), or None.

    None when there are none, or when they are not ``label-count-0..K-1`` with
    non-negative whole numbers (a malformed reply does not count).
    """
    found: dict[int, int] = {}
    for name, value in metrics.items():
        if not name.startswith(LABEL_COUNT_PREFIX):
            continue
        index = name[len(LABEL_COUNT_PREFIX):]
        if not index.isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if value < 0 or float(value) != int(value):
            return None
        found[int(index)] = int(value)
    if not found or sorted(found) != list(range(len(found))):
        return None
    return [found[k] for k in range(len(found))]


def sum_label_counts(per_site: Iterable[Sequence[int]]) -> list[int]:
    """Element-wise sum of the sites' count vectors (shorter ones padded with zeros)."""
    total: list[int] = []
    for counts in per_site:
        total.extend([0] * (len(counts) - len(total)))
        for k, count in enumerate(counts):
            total[k] += int(count)
    return total


# --- token-level augmentation -----------------------------------------------------------

AUGMENTATIONS = ("token-dropout", "random-swap", "both")


def augment_token_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, *, mode: str, rate: float,
    generator: torch.Generator, pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of token ids with some tokens dropped and/or swapped.

    Only the inner tokens of each row change: its first and last real token (``[CLS]``
    and ``[SEP]`` of a BERT tokenizer) and its padding stay where they are.
    ``token-dropout`` deletes each inner token with probability ``rate`` (keeping at
    least one; the row is shifted left and padded with ``pad_token_id``);
    ``random-swap`` swaps ``max(1, round(rate * inner))`` random pairs of inner
    positions (rows with fewer than 2 inner tokens are left alone); ``both`` swaps, then
    drops. Pure: same inputs and generator state, same output; the inputs are not
    changed. Returns new ``(input_ids, attention_mask)`` of the same shape.

    Raises
    ------
    ValueError
        For an unknown mode or a ``rate`` outside [0, 1].
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
    if not 0 <= rate <= 1:
        raise ValueError(f"augmentation rate must be in [0, 1], got {rate}")
    ids = input_ids.detach().cpu().clone()
    mask = attention_mask.detach().cpu().clone()
    for r in range(ids.shape[0]):
        length = int(mask[r].sum())
        if length < 3:  # no inner token
            continue
        inner = ids[r, 1 : length - 1].clone()
        if mode in ("random-swap", "both") and len(inner) >= 2:
            for _ in range(max(1, round(rate * len(inner)))):
                i, j = torch.randint(len(inner), (2,), generator=generator).tolist()
                inner[i], inner[j] = inner[j].clone(), inner[i].clone()
        if mode in ("token-dropout", "both"):
            keep = torch.rand(len(inner), generator=generator) >= rate
            if not bool(keep.any()):
                keep[int(torch.randint(len(inner), (1,), generator=generator))] = True
            inner = inner[keep]
        row = torch.cat([ids[r, :1], inner, ids[r, length - 1 : length]])
        ids[r, : len(row)] = row
        ids[r, len(row) : length] = pad_token_id
        mask[r, len(row) : length] = 0
    return ids.to(input_ids.device), mask.to(attention_mask.device)
