"""Local objectives for label skew: the site's own class prior folded into the loss.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
