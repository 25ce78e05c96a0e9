"""Sample-level differential privacy inside a client: DP-SGD with Opacus.

For sites whose own policy asks that no single *record* can be told from the model,
independently of what the federation does. Each step samples the local examples
with Poisson sampling (rate q = batch-size / local examples, what the accountant
assumes), computes per-example gradients (Opacus' ``GradSampleModule``), clips each to
``dp-sgd-max-grad-norm`` and adds Gaussian noise (Opacus' ``DPOptimizer`` around AdamW).
The privacy spent is accounted with Opacus' RDP accountant over every DP-SGD step this
client has taken in the run (the steps carry over between rounds in the node's state).
Given only ``dp-sgd-target-epsilon``, each site calibrates its noise multiplier to that
budget over every planned round, as Opacus' ``make_private_with_epsilon`` does.

The noise is drawn from a generator seeded by the operating system, not from the run's
seed: every participant knows the seed, and seeded noise could be subtracted.
"""

from __future__ import annotations

import functools
import itertools
import math
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from transformers import get_linear_schedule_with_warmup

from common.specs import DPSGDSpec, TrainSpec
from common.tasks.base import Examples, Task, TrainContext
from common.training import TrainResult, make_optimizer


def sample_level_epsilon(
    history: list[tuple[float, float, int]], *, delta: float
) -> float:
    """Epsilon at ``delta`` after DP-SGD steps ``[(noise multiplier, sample rate, steps)]``."""
    if not any(steps for _, _, steps in history):
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [entry for entry in history if entry[2] > 0]
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)  # pure; a site asks again every round
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """The smallest noise multiplier (to Opacus' tolerance) whose epsilon stays in budget.

    Opacus' ``get_noise_multiplier`` (what ``make_private_with_epsilon`` uses) with the
    RDP accountant ``sample_level_epsilon`` reports with: ``steps`` DP-SGD steps of
    Poisson sampling at ``sample_rate`` then spend at most ``target_epsilon`` at
    ``delta``, and no more than 0.01 below it.

    Parameters
    ----------
    target_epsilon
        The budget, > 0 and finite.
    delta
        In (0, 1).
    sample_rate
        Each example's probability of being in a batch, in (0, 1].
    steps
        Every DP-SGD step planned over the run, >= 1.

    Raises
    ------
    ValueError
        For arguments out of range, or a budget so small that it would need a noise
        multiplier above Opacus' limit (1e6).
    """
    if not (0 < target_epsilon < math.inf and 0 < delta < 1 and 0 < sample_rate <= 1
            and steps >= 1):
        raise ValueError(
            f"cannot calibrate DP-SGD noise for target epsilon {target_epsilon!r}, delta "
            f"{delta!r}, sample rate {sample_rate!r}, {steps!r} steps: need epsilon > 0 "
            "finite, delta in (0, 1), rate in (0, 1], steps >= 1"
        )
    try:
        with warnings.catch_warnings():
            # Probes far from the answer hit the largest RDP order; the bound stays valid.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant="rdp",
            ))
    except ValueError as error:  # Opacus: "The privacy budget is too low."
        raise ValueError(
            f"`dp-sgd-target-epsilon` {target_epsilon:g} at delta {delta:g} cannot be "
            f"kept over {steps} DP-SGD steps at sample rate {sample_rate:.4g} with any "
            f"noise multiplier up to 1e6 ({error}): raise the target, or plan fewer "
            "rounds or local steps"
        ) from error


def site_noise_multiplier(dp: DPSGDSpec, train: TrainSpec, num_examples: int) -> float:
    """The noise multiplier a site with ``num_examples`` training examples uses.

    ``dp-sgd-noise-multiplier`` when set (or no target is); otherwise calibrated from
    ``dp-sgd-target-epsilon`` for every round the run plans: ``num-server-rounds``
    times this site's steps per round (``train.steps``) at its own sample rate. The plan
    assumes the site trains in every round; with ``fraction-train`` < 1 it trains in
    fewer and spends less than the target (conservative: more noise than needed).
    """
    if dp.dp_sgd_noise_multiplier > 0 or math.isinf(dp.dp_sgd_target_epsilon):
        return dp.dp_sgd_noise_multiplier
    sample_rate, steps = _sample_rate_and_steps(train, num_examples)
    return calibrate_noise_multiplier(
        target_epsilon=dp.dp_sgd_target_epsilon, delta=dp.dp_sgd_delta,
        sample_rate=sample_rate, steps=dp.num_server_rounds * steps,
    )


def planned_entry(
    dp: DPSGDSpec, train: TrainSpec, num_examples: int
) -> tuple[float, float, int]:
    """The accountant entry ``(noise multiplier, sample rate, steps)`` one call will add."""
    sample_rate, steps = _sample_rate_and_steps(train, num_examples)
    return site_noise_multiplier(dp, train, num_examples), sample_rate, steps


def _sample_rate_and_steps(train: TrainSpec, num_examples: int) -> tuple[float, int]:
    """This site's Poisson sample rate and its DP-SGD steps in one round."""
    return min(train.batch_size / num_examples, 1.0), train.steps(num_examples)


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
    spec: TrainSpec,
    *,
    dp: DPSGDSpec,
    task: Task,
    loss_spec: Any,
    seed: int,
    device: torch.device,
    pad_token_id: int,
    round_config: Mapping[str, Any] | None = None,
) -> tuple[TrainResult, tuple[float, float, int]]:
    """``train_local`` with DP-SGD: per-example clipping, Gaussian noise, Poisson batches.

    The same optimizer (``make_optimizer``), schedule and step count as
    ``common.training.train_local`` (``local-steps``, else ``local-epochs`` expected
    passes over the data); ``grad-clip``
    is replaced by the per-example bound ``dp-sgd-max-grad-norm`` of ``dp``; autocast is
    off (Opacus computes per-example gradients in fp32); the noise multiplier is
    ``site_noise_multiplier(dp, spec, len(data))``.

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
    noise_multiplier, sample_rate, total_steps = planned_entry(dp, spec, len(data))

    params = [p for p in model.parameters() if p.requires_grad]
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    optimizer = DPOptimizer(
        make_optimizer(params, spec),
        noise_multiplier=noise_multiplier,
        max_grad_norm=dp.dp_sgd_max_grad_norm,
        expected_batch_size=spec.batch_size,
        generator=noise,
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer,
        num_warmup_steps=round(spec.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    loss_of = task.make_loss(data, spec=loss_spec, ctx=TrainContext(
        seed=seed, round_config=dict(round_config or {})))
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
                    # Opacus keeps per-example gradients in an attribute it adds to each
                    # Parameter at run time; torch's Parameter type does not declare it.
                    p.grad_sample = torch.zeros(  # type: ignore[attr-defined]
                        (0, *p.shape), device=p.device)
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
    return result, (noise_multiplier, sample_rate, steps)
