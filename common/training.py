"""Tokenization into batches, the local training loop and evaluation.

The training loop is written out in full in ``train_local`` (forward, loss, optional
proximal term, backward, clipping, step): no ``Trainer``, nothing hidden.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from common.config import RunConfig
from common.losses import class_log_prior, logit_adjusted_cross_entropy
from common.model import autocast_context


@dataclass(frozen=True)
class EncodedData:
    """Token ids (truncated, unpadded) and int64 labels of a set of examples."""

    input_ids: list[list[int]]
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"{len(self.input_ids)} examples but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(
    texts: Sequence[str],
    labels: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
) -> EncodedData:
    """Tokenize ``texts`` once, in one batched call, truncating to ``max_length`` tokens.

    Padding is left to ``iterate_batches`` (to the longest sequence of each batch).

    Raises
    ------
    ValueError
        If ``texts`` and ``labels`` differ in length.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    input_ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return EncodedData(
        input_ids=[list(ids) for ids in input_ids],
        labels=torch.tensor(list(labels), dtype=torch.int64),
    )


def iterate_batches(
    data: EncodedData,
    *,
    batch_size: int,
    pad_token_id: int,
    generator: torch.Generator | None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over ``data`` in batches of ``batch_size`` (the last may be smaller).

    Shuffled with ``generator`` when one is given, in order otherwise. Each batch is
    right-padded with ``pad_token_id`` to its longest sequence and has ``input_ids``,
    ``attention_mask`` (1 = token, 0 = padding) and ``labels``.
    """
    if generator is None:
        order = torch.arange(len(data))
    else:
        order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(data), batch_size):
        yield collate(data, order[start : start + batch_size].tolist(), pad_token_id)


def collate(data: EncodedData, index: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The examples ``index`` of ``data`` as one batch, right-padded to the longest.

    ``input_ids``, ``attention_mask`` (1 = token, 0 = padding) and ``labels``; an empty
    ``index`` gives tensors with 0 rows.
    """
    rows = [data.input_ids[i] for i in index]
    width = max((len(row) for row in rows), default=1)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
        attention_mask[r, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": data.labels[index]}


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
    train_loss: float  # mean task loss (cross-entropy, adjusted with skew-loss; no
    # proximal term) over the steps
    steps: int  # optimizer steps taken
    seconds: float  # wall time of the loop
    first_loss: float  # task loss of the first step (before any update)


def train_local(
    model: torch.nn.Module,
    data: EncodedData,
    cfg: RunConfig,
    *,
    seed: int,
    device: torch.device,
    proximal_mu: float = 0.0,
    pad_token_id: int,
) -> TrainResult:
    """Train the trainable parameters of ``model`` on ``data`` in place.

    AdamW (``learning_rate``, ``weight_decay``) over the trainable parameters, linear
    warm-up over ``warmup_ratio`` of the steps then linear decay to 0, gradient-norm
    clipping at ``grad_clip`` (0: off) and, when ``proximal_mu > 0``, FedProx's term
    ``mu/2 * sum ||w - w_global||^2`` with ``w_global`` the weights at the start of
    this call. With ``skew_loss="logit-adjusted"`` the task loss is
    ``common.losses.logit_adjusted_cross_entropy`` with this site's class prior.

    Parameters
    ----------
    model
        Already on ``device``. Left in eval mode.
    data
        The local partition; must not be empty.
    cfg
        Uses ``local_steps`` (> 0: exactly that many optimizer steps, cycling through
        reshuffled epochs if needed), else ``local_epochs`` full epochs;
        ``batch_size``, ``learning_rate``, ``weight_decay``, ``warmup_ratio``,
        ``grad_clip``, ``precision``, ``skew_loss`` and ``skew_loss_tau``.
    seed
        Seeds dropout and the shuffling order; derive it with ``derive_seed`` from
        (run seed, round, client) so every round and client differs reproducibly.
    device
        Where batches are sent.
    proximal_mu
        FedProx's mu; 0 is plain local SGD as in FedAvg.
    pad_token_id
        The tokenizer's padding id.

    Returns
    -------
    TrainResult
        ``num_examples`` is the number of *distinct* examples trained on in this call,
        ``min(steps * batch_size, len(data))`` (``len(data)`` for whole epochs). It is
        FedAvg's aggregation weight, so a client that saw few examples counts less.

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
    batches_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = cfg.local_steps if cfg.local_steps > 0 else cfg.local_epochs * batches_per_epoch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    # fp16 autocast needs loss scaling against gradient underflow; disabled it is a no-op.
    scaler = torch.amp.GradScaler(
        device.type, enabled=cfg.precision == "fp16" and device.type == "cuda"
    )
    global_params = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    # The site's class prior, from its own labels: it never leaves the site.
    log_prior = None if cfg.skew_loss == "none" else class_log_prior(
        data.labels, int(model.config.num_labels))

    def endless_batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:  # a fresh shuffle per epoch
            yield from iterate_batches(
                data, batch_size=cfg.batch_size, pad_token_id=pad_token_id, generator=shuffle
            )

    model.train()
    losses: list[float] = []
    for batch in itertools.islice(endless_batches(), total_steps):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with autocast_context(cfg.precision, device):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        if log_prior is None:
            loss = F.cross_entropy(logits.float(), batch["labels"])
        else:
            loss = logit_adjusted_cross_entropy(logits.float(), batch["labels"],
                                                log_prior=log_prior, tau=cfg.skew_loss_tau)
        objective = loss
        if proximal_mu > 0:
            distance = sum(
                ((p - g) ** 2).sum() for p, g in zip(params, global_params, strict=True)
            )
            objective = loss + proximal_mu / 2 * distance
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(objective).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)  # free gradient memory of a cached model
    model.eval()
    return TrainResult(
        num_examples=min(len(losses) * cfg.batch_size, len(data)),
        train_loss=float(np.mean(losses)),
        steps=len(losses),
        seconds=time.perf_counter() - start,
        first_loss=losses[0],
    )


@dataclass(frozen=True)
class EvalResult:
    """Metrics of ``evaluate`` over ``num_examples`` examples."""

    loss: float  # mean cross-entropy per example
    accuracy: float
    f1_macro: float  # over all the model's classes; a class never seen nor predicted is 0
    num_examples: int


def evaluate(
    model: torch.nn.Module,
    data: EncodedData,
    *,
    batch_size: int,
    device: torch.device,
    pad_token_id: int,
    precision: str = "fp32",
) -> EvalResult:
    """Loss, accuracy and macro-F1 of ``model`` (already on ``device``) on ``data``.

    Macro-F1 averages over every class of the model (``model.config.num_labels``),
    counting a class with no true and no predicted example as 0.

    Raises
    ------
    ValueError
        If ``data`` is empty (callers skip empty evaluation sets).
    """
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    config: Any = model.config  # a PretrainedConfig (typed as Module attribute access)
    num_labels = int(config.num_labels)
    model.eval()
    loss_sum = 0.0
    predictions: list[torch.Tensor] = []
    with torch.inference_mode():
        for batch in iterate_batches(
            data, batch_size=batch_size, pad_token_id=pad_token_id, generator=None
        ):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
            with autocast_context(precision, device):
                logits = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            predictions.append(logits.argmax(dim=-1).cpu())
    predicted = torch.cat(predictions).numpy()
    labels = data.labels.numpy()
    return EvalResult(
        loss=loss_sum / len(data),
        accuracy=float(np.mean(predicted == labels)),
        f1_macro=float(
            f1_score(labels, predicted, average="macro", labels=list(range(num_labels)),
                     zero_division=0)
        ),
        num_examples=len(data),
    )
