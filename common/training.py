"""Batches and the local training loop, for any task.

The training loop is written out in full in ``train_local`` (forward and loss through
the task, optional proximal term, backward, clipping, step): no ``Trainer``, nothing
hidden. What a batch holds and what the loss is belong to the task
(``common/tasks/``); this module never looks inside a batch.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from common.model import autocast_context
from common.specs import TrainSpec
from common.tasks.base import Batch, Examples, Task, TrainContext


def iterate_batches(
    examples: Examples,
    collate: Callable[[Any, list[int], int], Batch],
    *,
    batch_size: int,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Iterator[Batch]:
    """One pass over ``examples`` in batches of ``batch_size`` (the last may be smaller).

    Shuffled with ``generator`` when one is given, in order otherwise; each batch is
    the task's ``collate`` of its indices (right-padded with ``pad_token_id``).
    """
    if generator is None:
        order = torch.arange(len(examples))
    else:
        order = torch.randperm(len(examples), generator=generator)
    for start in range(0, len(examples), batch_size):
        yield collate(examples, order[start : start + batch_size].tolist(), pad_token_id)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from e.g. (run seed, round, client id); stable across processes.

    Python's ``hash()`` of a string changes between processes, so this hashes with
    SHA-256 instead. ``derive_seed(1, 23)`` and ``derive_seed(12, 3)`` differ.
    """
    text = "\x1f".join(f"{type(part).__name__}:{part}" for part in parts)
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class TrainResult:
    """What one call of ``train_local`` did."""

    num_examples: int  # distinct examples trained on: the FedAvg aggregation weight
    train_loss: float  # mean task loss (no proximal term) over the steps
    steps: int  # optimizer steps taken
    seconds: float  # wall time of the loop
    first_loss: float  # task loss of the first step (before any update)
    # What the loop processed, repeats included (throughput); None where not counted.
    examples_seen: int | None = None
    tokens: int | None = None  # non-padding tokens (``batch_tokens``)


def batch_tokens(batch: Batch) -> int | None:
    """The non-padding tokens of a batch: the sum of its ``attention_mask`` (1 = token,
    as every task's ``collate`` returns it); None for a batch without one."""
    mask = batch.get("attention_mask")
    return None if mask is None else int(mask.sum())


SGD_MOMENTUM = 0.9  # the usual value; the local optimizer restarts every round anyway


def make_optimizer(params: list[torch.nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    """The local optimizer of ``spec.local_optimizer``: AdamW (eps ``spec.adam_epsilon``),
    or SGD with momentum ``SGD_MOMENTUM`` (``weight_decay`` as its L2 penalty), at
    ``spec.learning_rate``."""
    if spec.local_optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.learning_rate, momentum=SGD_MOMENTUM,
                               weight_decay=spec.weight_decay)
    if spec.local_optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay,
                                 eps=spec.adam_epsilon)
    raise ValueError(f"local optimizer must be adamw or sgd, got {spec.local_optimizer!r}")


def train_local(
    model: torch.nn.Module,
    data: Examples,
    spec: TrainSpec,
    *,
    task: Task,
    loss_spec: Any,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    pad_token_id: int,
    round_config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``data`` in place.

    AdamW or SGD (``make_optimizer``: ``local_optimizer``, ``learning_rate``,
    ``weight_decay``) over the trainable parameters, linear
    warm-up over ``warmup_ratio`` of the steps then linear decay to 0, gradient-norm
    clipping at ``grad_clip`` (0: off) and, when ``proximal_mu > 0``, FedProx's term
    ``mu/2 * sum ||w - w_global||^2`` with ``w_global`` the weights at the start of
    this call. The loss of a batch is the task's (``task.make_loss`` with ``loss_spec``:
    e.g. cross-entropy, or with ``skew-loss`` the logit-adjusted loss with this site's
    class prior).

    Parameters
    ----------
    model
        Already on ``device``. Left in eval mode.
    data
        The local partition; must not be empty.
    spec
        ``local_steps`` (> 0: exactly that many optimizer steps, cycling through
        reshuffled epochs if needed), else ``local_epochs`` full epochs (``spec.steps``);
        ``batch_size``, ``learning_rate``, ``weight_decay``, ``warmup_ratio``,
        ``grad_clip``, ``precision``.
    task
        The run's task: its ``collate`` and ``make_loss``.
    loss_spec
        The task's loss spec, ``task.loss_spec(cfg)``.
    seed
        Seeds dropout and the shuffling order; derive it with ``derive_seed`` from
        (run seed, round, client) so every round and client differs reproducibly.
    device
        Where batches are sent.
    proximal_mu
        FedProx's mu; 0 is plain local SGD as in FedAvg.
    pad_token_id
        The tokenizer's padding id.
    round_config
        The round config the server sent, handed to the task's loss with ``seed``
        (``TrainContext``); None outside a federated round.

    Returns
    -------
    TrainResult
        ``num_examples`` is the number of *distinct* examples trained on in this call,
        ``min(steps * batch_size, len(data))`` (``len(data)`` for whole epochs). It is
        FedAvg's aggregation weight, so a client that saw few examples counts less.
        ``examples_seen`` and ``tokens`` count every batch row and non-padding token
        the loop processed (for throughput).

    Raises
    ------
    ValueError
        If ``data`` is empty.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty data set")
    start = time.perf_counter()
    torch.manual_seed(seed)  # dropout
    shuffle = torch.Generator().manual_seed(seed)
    total_steps = spec.steps(len(data))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec)
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # fp16 autocast needs loss scaling against gradient underflow; disabled it is a no-op.
    scaler = torch.amp.GradScaler(
        device.type, enabled=spec.precision == "fp16" and device.type == "cuda"
    )
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    loss_of = task.make_loss(data, spec=loss_spec, ctx=TrainContext(
        seed=seed, round_config=dict(round_config or {})))

    def endless_batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:  # a fresh shuffle per epoch
            yield from iterate_batches(data, task.collate, batch_size=spec.batch_size,
                                       pad_token_id=pad_token_id, generator=shuffle)

    model.train()
    losses: list[float] = []
    examples_seen = 0
    tokens: int | None = 0
    for batch in itertools.islice(endless_batches(), total_steps):
        examples_seen += len(next(iter(batch.values())))
        counted = batch_tokens(batch)  # on the CPU tensors: no device sync
        tokens = tokens + counted if tokens is not None and counted is not None else None
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with autocast_context(spec.precision, device):
            loss = loss_of(model, batch)
        objective = loss
        if proximal_mu > 0:
            distance = sum(
                ((p - g) ** 2).sum() for p, g in zip(params, global_params, strict=True)
            )
            objective = loss + proximal_mu / 2 * distance
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if spec.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)  # free gradient memory of a cached model
    model.eval()
    return TrainResult(
        num_examples=min(len(losses) * spec.batch_size, len(data)),
        train_loss=float(np.mean(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - start,
        first_loss=losses[0],
        examples_seen=examples_seen,
        tokens=tokens,
    )
