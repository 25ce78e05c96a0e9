"""Sample-level differential privacy inside a client: DP-SGD with Opacus.

For sites whose own policy asks that no single *record* can be told from the model,
independently of what the federation does. Each step samples the local examples
with Poisson sampling (rate q = batch-size / local examples, what the accountant
assumes), computes per-example gradients (Opacus' ``GradSampleModule``), clips each to
``dp-sgd-max-grad-norm`` and adds Gaussian noise (Opacus' ``DPOptimizer`` around AdamW).
The privacy spent is accounted with Opacus' RDP accountant over every DP-SGD step this
client has taken in the run (the steps carry over between rounds in the node's state).

The noise is drawn from a generator seeded by the operating system, not from the run's
seed: every participant knows the seed, and seeded noise could be subtracted.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from transformers import get_linear_schedule_with_warmup

from common.config import RunConfig
from common.tasks.base import Examples, Task
from common.training import TrainResult


def sample_level_epsilon(
    history: list[tuple[float, float, int]], *, delta: float
) -> float:
    """Epsilon at ``delta`` after DP-SGD steps ``[(noise multiplier, sample rate, steps)]``."""
    if not any(steps for _, _, steps in history):
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [entry for entry in history if entry[2] > 0]
    return float(accountant.get_epsilon(delta))


def planned_entry(cfg: RunConfig, num_examples: int) -> tuple[float, float, int]:
    """The accountant entry ``(noise multiplier, sample rate, steps)`` one call will add."""
    sample_rate = min(cfg.batch_size / num_examples, 1.0)
    steps = (cfg.local_steps if cfg.local_steps > 0
             else cfg.local_epochs * math.ceil(num_examples / cfg.batch_size))
    return cfg.dp_sgd_noise_multiplier, sample_rate, steps


def poisson_batches(
    num_examples: int, *, sample_rate: float, generator: torch.Generator
) -> Iterator[list[int]]:
    """Endless Poisson-sampled index lists: each example is in a batch with ``sample_rate``."""
    while True:
        mask = torch.rand(num_examples, generator=generator) < sample_rate
        yield mask.nonzero().flatten().tolist()


def train_local_dp_sgd(
    model: torch.nn.Module,
    data: Examples,
    cfg: RunConfig,
    *,
    task: Task,
    seed: int,
    device: torch.device,
    pad_token_id: int,
) -> tuple[TrainResult, tuple[float, float, int]]:
    """``train_local`` with DP-SGD: per-example clipping, Gaussian noise, Poisson batches.

    The same AdamW, schedule and step count as ``common.training.train_local``
    (``local-steps``, else ``local-epochs`` expected passes over the data); ``grad-clip``
    is replaced by the per-example bound ``dp-sgd-max-grad-norm``; autocast is off
    (Opacus computes per-example gradients in fp32).

    A Poisson batch may be empty; its step still runs (noise only), as the accountant
    assumes. When every batch of the call was empty no loss was computed:
    ``train_loss`` and ``first_loss`` are NaN (the client leaves them out of its reply),
    the weights moved by noise steps alone, and ``num_examples`` is 1.

    Returns
    -------
    tuple
        The ``TrainResult`` and this call's accountant entry
        ``(noise multiplier, sample rate, steps)``.

    Raises
    ------
    ValueError
        If ``data`` is empty.
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty data set")
    start = time.perf_counter()
    torch.manual_seed(seed)  # dropout; sampling below has its own seeded generator
    sampling = torch.Generator().manual_seed(seed)
    _, sample_rate, total_steps = planned_entry(cfg, len(data))

    params = [p for p in model.parameters() if p.requires_grad]
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay),
        noise_multiplier=cfg.dp_sgd_noise_multiplier,
        max_grad_norm=cfg.dp_sgd_max_grad_norm,
        expected_batch_size=cfg.batch_size,
        generator=noise,
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loss_of = task.make_loss(data, cfg=cfg)
    model.train()  # Opacus records activations in training mode only
    per_example = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    losses: list[float] = []
    seen: set[int] = set()
    try:
        for index in itertools.islice(
            poisson_batches(len(data), sample_rate=sample_rate, generator=sampling),
            total_steps,
        ):
            optimizer.zero_grad(set_to_none=True)
            if index:
                batch = {k: t.to(device)
                         for k, t in task.collate(data, index, pad_token_id).items()}
                loss = loss_of(per_example, batch)
                with warnings.catch_warnings():
                    # The first hooked module takes token ids (no gradient) as input:
                    # torch warns every step, Opacus needs only the output gradients.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(loss.item())
                seen.update(index)
            else:  # an empty Poisson batch still takes its (noise-only) step
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device)
            optimizer.step()
            scheduler.step()
    finally:
        optimizer.zero_grad(set_to_none=True)  # also drops the per-example gradients
        per_example.remove_hooks()  # the model is cached and reused next round
        model.eval()
    steps = total_steps
    train_loss = float(np.mean(losses)) if losses else float("nan")
    result = TrainResult(
        # A noise-only update is still a valid one: give it the smallest weight the
        # server accepts rather than 0, which it would drop.
        num_examples=max(len(seen), 1), train_loss=train_loss, steps=steps,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else float("nan"),
    )
    return result, (cfg.dp_sgd_noise_multiplier, sample_rate, steps)
