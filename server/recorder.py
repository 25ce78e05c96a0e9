"""Centralized evaluation each round, plus the results line and the checkpoint.

``RoundRecorder`` is the ``evaluate_fn`` handed to Flower's ``Strategy.start``: Flower
calls it with the new global arrays at the end of every round (and once before the
first), which is exactly when a round is complete. It evaluates on the server's
held-out data, takes the round's ``RoundStats`` from ``TrackedStrategy``
(``take_round_stats``), builds the typed ``ResultsRow`` (server/results.py), writes the
checkpoint and then the results line (in that order: a results line means the
round's checkpoint exists), and prints one progress line.

With a validation split (``validation-fraction`` > 0) it is evaluated too, into the
row's ``validation``, and so is the forgetting monitor's ``retention-dataset``, into
``retention``. The recorder keeps the best round's state in memory and protects
its checkpoint from pruning (``select-model=best``, server/model_selection.py). When
``early-stopping-patience`` rounds brought no improvement it raises ``EarlyStop``, last
of all: Flower calls ``evaluate_fn`` as the final step of a round, so the exception
leaves ``Strategy.start`` between rounds, after this round's checkpoint and results
line are on disk, and before the next round sends anything. That needs no copy of
Flower's loop and loses no round, where emptying the later rounds' ``configure_train``
would still run (and record) them as skipped rounds.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from transformers import PreTrainedTokenizerBase

from common.config import RunConfig
from common.model import set_exchanged_state
from common.tasks import TASK_METRICS, MetricInfo
from common.tasks.base import EvalContext, Examples, Task
from server.metric_sinks import MetricSink
from server.model_selection import (
    Selection,
    early_stop_reason,
    select_round,
    selection_split,
)
from server.privacy import PrivacyReport
from server.results import (
    Bytes,
    Clients,
    DpSgd,
    Memory,
    Metrics,
    ResultsRow,
    Seconds,
    SiteData,
    summarize_spread,
)
from server.run_outputs import RunOutputs
from server.tracked_strategy import RoundStats, TrackedStrategy


def arrays_to_state(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower ArrayRecord -> name-keyed numpy arrays."""
    return {name: array.numpy() for name, array in arrays.items()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# The metrics of a global state on a split (``state``, its examples, the call's context):
# the task's ``evaluate`` of the server's model with ``state`` loaded, unless a caller
# (a test of the recording around it) gives its own.
StateEvaluator = Callable[[dict[str, np.ndarray], Examples, EvalContext], dict[str, Any]]


class EarlyStop(Exception):  # noqa: N818 (not an error: a normal end of the run)
    """Raised by ``RoundRecorder`` after the round that exhausted the patience.

    ``str(exc)`` is the reason, for ``outcome.json`` ``stopped_early``.
    """


class RoundRecorder:
    """``evaluate_fn`` for ``Strategy.start``; see the module docstring.

    ``evaluate`` computes a state's metrics on each server split with data (default: the
    state loaded into ``model``, then ``task.evaluate``).
    """

    def __init__(
        self,
        *,
        cfg: RunConfig,
        task: Task,
        model: torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        eval_data: Examples | None,
        device: torch.device,
        strategy: TrackedStrategy,
        outputs: RunOutputs,
        total_rounds: int,
        last_round: int | None = None,
        privacy: PrivacyReport | None = None,
        sinks: Sequence[MetricSink] = (),
        validation_data: Examples | None = None,
        retention_data: Examples | None = None,
        evaluate: StateEvaluator | None = None,
    ) -> None:
        self.cfg = cfg
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.eval_data = eval_data
        self.device = device
        self.strategy = strategy
        self.outputs = outputs
        self.total_rounds = total_rounds
        # The last round the run plans (the privacy budget may end it before
        # total_rounds): its evaluation is the final one (sft: greedy generation).
        self.last_round = total_rounds if last_round is None else last_round
        self.privacy = privacy
        self.sinks = sinks
        self.bytes_up_total = 0
        self.bytes_down_total = 0
        self.last_row: ResultsRow | None = None
        self.validation_data = validation_data
        self.retention_data = retention_data
        self.evaluate_state = self._task_evaluate if evaluate is None else evaluate
        self.split = selection_split(cfg.validation_fraction)
        # Rows so far: on resume, those of the earlier attempts (already cut back to the
        # resumed round), so the best round and the patience count carry over.
        self.rows: list[ResultsRow] = outputs.read_results()
        self.last_state: dict[str, np.ndarray] | None = None
        self.best_state: tuple[int, dict[str, np.ndarray]] | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = self.strategy.to_round(server_round)
        if server_round == 0 and rnd > 0:
            return None  # resuming: this round is already recorded
        started = time.monotonic()
        state = arrays_to_state(arrays)
        stats = self.strategy.take_round_stats(rnd) or RoundStats(round=rnd, started=started)
        row = self._evaluated_row(rnd, state, stats, final=rnd >= self.last_round)
        if rnd > 0 and rnd < self.last_round and self._stop_reason([*self.rows, row]):
            # The patience ends the run here, so this round is the last: evaluate it as the
            # final one (sft: greedy generation). The stop is decided again below, on the
            # final metrics.
            row = self._evaluated_row(rnd, state, stats, final=True)
        self.bytes_up_total, self.bytes_down_total = row.bytes.up_total, row.bytes.down_total
        # Until this row is on disk, a resume would still select the previous best: keep
        # both checkpoints.
        protect = {best for best in (self._best(), self._best([*self.rows, row]))
                   if best is not None}
        self.rows.append(row)
        if self._best() == rnd:
            self.best_state = (rnd, state)
        self.last_state = state
        self.outputs.save_checkpoint(rnd, state, self.strategy.inner_state(), protect=protect)
        self.outputs.append_result(row)
        for sink in self.sinks:
            sink.log_round(row)
        self.last_row = row
        print(progress_line(row, self.total_rounds, metrics=TASK_METRICS[self.cfg.task]),
              flush=True)
        if rnd > 0 and (reason := self.early_stop_reason()):
            print(f"[fedsft] {reason}", flush=True)
            raise EarlyStop(reason)
        if row.central is None:
            return None
        return MetricRecord({name.replace("_", "-"): value
                             for name, value in row.central.items() if name != "num_examples"})

    def _evaluated_row(self, rnd: int, state: dict[str, np.ndarray], stats: RoundStats, *,
                       final: bool) -> ResultsRow:
        """Round ``rnd``'s results row: ``state`` evaluated on every server split."""
        began = time.monotonic()
        central = self._evaluate(state, self.eval_data, rnd, final=final)
        validation = self._evaluate(state, self.validation_data, rnd, final=final)
        retention = self._evaluate(state, self.retention_data, rnd, final=final)
        return self._row(rnd, central, validation, stats,
                         eval_seconds=time.monotonic() - began, retention=retention)

    def selection(self) -> Selection | None:
        """Which round's model to export (``select-model``), from the rows so far."""
        return select_round(self.rows, rule=self.cfg.select_model,
                            metric=self.cfg.selection_metric_name, split=self.split,
                            min_delta=self.cfg.early_stopping_min_delta, task=self.cfg.task)

    def early_stop_reason(self) -> str | None:
        """Why the run should stop after the rows so far (patience), else None."""
        return self._stop_reason(self.rows)

    def _stop_reason(self, rows: Sequence[ResultsRow]) -> str | None:
        return early_stop_reason(
            rows, patience=self.cfg.early_stopping_patience,
            min_delta=self.cfg.early_stopping_min_delta, metric=self.cfg.selection_metric_name,
            split=self.split, total_rounds=self.total_rounds, task=self.cfg.task)

    def _best(self, rows: Sequence[ResultsRow] | None = None) -> int | None:
        """The best round of ``rows`` (default: so far) under ``select-model=best``."""
        if self.cfg.select_model != "best":
            return None  # `last` exports the newest round: nothing old to protect
        selection = select_round(
            self.rows if rows is None else rows, rule="best",
            metric=self.cfg.selection_metric_name, split=self.split,
            min_delta=self.cfg.early_stopping_min_delta, task=self.cfg.task)
        return selection.round if selection is not None and selection.rule == "best" else None

    def _evaluate(
        self, state: dict[str, np.ndarray], data: Examples | None, rnd: int, *, final: bool
    ) -> dict[str, Any] | None:
        """The task's metrics of ``state`` on ``data``; None when there is no such data."""
        if data is None or len(data) == 0:
            return None
        return self.evaluate_state(state, data, EvalContext(
            batch_size=max(self.cfg.batch_size, 64), device=self.device,
            precision=self.cfg.precision, server_round=rnd,
            final=final, spec=self.task.eval_spec(self.cfg)))

    def _task_evaluate(self, state: dict[str, np.ndarray], data: Examples,
                       ctx: EvalContext) -> dict[str, Any]:
        """The default ``evaluate``: ``state`` loaded into the model, the task's metrics."""
        set_exchanged_state(self.model, state)
        return self.task.evaluate(self.model, self.tokenizer, data, ctx)

    def _row(
        self, rnd: int, central: dict[str, Any] | None, validation: dict[str, Any] | None,
        stats: RoundStats, *, eval_seconds: float, retention: dict[str, Any] | None = None,
    ) -> ResultsRow:
        dp_sgd = None
        if self.cfg.dp_sgd_enabled and stats.dp_sgd_epsilon is not None:
            # Each client accounts its own records; the weakest guarantee is the largest.
            dp_sgd = DpSgd(epsilon_max=stats.dp_sgd_epsilon, delta=self.cfg.dp_sgd_delta,
                           sites=dict(stats.dp_sgd_sites))
        train_seconds = stats.client_train_seconds
        return ResultsRow(
            round=rnd,
            central=central,
            validation=validation,
            federated={k.replace("-", "_"): v for k, v in stats.eval_metrics.items()},
            train={k.replace("-", "_"): v for k, v in stats.train_metrics.items()},
            clients=Clients(
                sampled=stats.sampled, replies=stats.replies, aggregated=stats.aggregated,
                failures=stats.failures, timeouts=stats.timeouts, invalid=stats.invalid,
                skipped=stats.skipped, problems=stats.problems,
                eval_headline=stats.client_eval_headline,
                eval_headline_spread=summarize_spread(stats.client_eval_headline),
                examples=stats.site_examples,
            ),
            bytes=Bytes(up=stats.bytes_up, down=stats.bytes_down,
                        up_total=self.bytes_up_total + stats.bytes_up,
                        down_total=self.bytes_down_total + stats.bytes_down),
            seconds=Seconds(
                round=time.monotonic() - stats.started,
                wait=stats.wait_seconds,
                client_train_max=max(train_seconds, default=0.0),
                client_train_mean=float(np.mean(train_seconds)) if train_seconds else 0.0,
                aggregate=stats.aggregate_seconds,
                central_eval=eval_seconds,
            ),
            memory_mb=Memory(server_peak=peak_rss_mb(), client_peak=stats.client_peak_rss_mb),
            time=time.time(),
            privacy=None if self.privacy is None else self.privacy.row(rnd),
            dp_sgd=dp_sgd,
            retention=retention,
            site_data=self._new_site_data(stats),
            site_compute=dict(stats.site_compute),
        )

    def _new_site_data(self, stats: RoundStats) -> dict[str, SiteData]:
        """The data statistics of the sites that report them for the first time: a site
        that sends them again (e.g. after a resume, new processes) keeps its first."""
        recorded = {site for row in self.rows for site in row.site_data}
        return {site: data for site, data in stats.site_data.items() if site not in recorded}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _metrics_text(block: Metrics, metrics: Sequence[MetricInfo]) -> str:
    """The task's metrics present in ``block``, in the task's order: "acc 0.8833  f1 ..."."""
    return "  ".join(f"{m.short or m.name} {block[m.name]:.4f}"
                     for m in metrics if m.name in block)


def _headline_text(block: Metrics, metrics: Sequence[MetricInfo]) -> str:
    """The first of the task's metrics present in ``block`` (the headline when measured)."""
    first = next((m for m in metrics if m.name in block), None)
    return "" if first is None else _metrics_text(block, [first])


def progress_line(
    row: ResultsRow, total_rounds: int, *, metrics: Sequence[MetricInfo]
) -> str:
    """One line per round: the task's central metrics (``metrics``: its TASK_METRICS)
    present in the row, bytes, time, the validation / retention headline, privacy,
    clients."""
    c, b, s, cl = row.central, row.bytes, row.seconds, row.clients
    federated = {name[len("eval_"):]: value for name, value in row.federated.items()
                 if name.startswith("eval_")}
    if c is not None:
        text = _metrics_text(c, metrics)
    elif headline := _headline_text(federated, metrics):
        text = f"federated {headline}"
    else:
        text = "no central evaluation (no `eval-dataset`)"
    line = (
        f"[fedsft] round {row.round}/{total_rounds}  {text}  |  "
        f"up {_mb(b.up)}  down {_mb(b.down)}  |  {s.round:.1f} s"
    )
    if row.validation and (headline := _headline_text(row.validation, metrics)):
        line += f"  |  validation {headline}"
    if row.retention and (headline := _headline_text(row.retention, metrics)):
        line += f"  |  retention {headline}"
    if row.privacy is not None:
        line += f"  |  epsilon {row.privacy.epsilon:.3g}"
    if row.dp_sgd is not None:
        line += f"  |  DP-SGD epsilon <= {row.dp_sgd.epsilon_max:.3g}"
    if row.round > 0:
        line += f"  |  clients {cl.aggregated}/{cl.sampled}"
        bad = cl.failures + cl.timeouts + cl.invalid
        if bad:
            line += f" ({bad} failed)"
        if cl.skipped:
            line += "  ROUND SKIPPED"
    return line
