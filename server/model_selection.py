"""Which round's model the run delivers, and when to stop early: pure functions.

``select-model=best`` exports the round with the best ``selection-metric`` on the
validation split (``validation-fraction`` > 0: held out of the training data, see
``common.data.load_splits``) or, without one, on the central eval split, which then
also reports the model's accuracy: that number is optimistic, and the note says so.
``select-model=last`` exports the last round. ``early-stopping-patience`` > 0 ends the
run once that many rounds in a row brought no improvement larger than
``early-stopping-min-delta``.

The metric is any of the task's (``TASK_METRICS``), its direction from
``MetricInfo.higher_is_better``; ``RunConfig.selection_metric_name`` resolves ``auto``.

Only rounds > 0 whose update was aggregated are candidates (round 0 is the untrained
initial model; a skipped round repeats the previous round's model). A round without a
finite metric is never the best. A round that did not measure the metric at all (its
split has no such key: sft's exact match outside the generation rounds) is left out of
the patience count too: it neither improves nor counts as a round without improvement,
so patience counts the rounds that measured the metric. A measured but non-finite
value (a diverged model) does count as no improvement. Ties go to the earliest round: it
reached the same score with fewer rounds of training, and a skipped round, which
re-evaluates the previous model, then never takes the credit of the round that made it.
The same rule (an improvement must beat the best so far by more than ``min-delta``)
decides both the best round and the patience count, so the exported round is the one
patience waited on.

No Flower, no torch (``server.run_outputs`` is plain file I/O): the recorder and the
run call these with results rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from common.config import SELECT_MODELS
from common.tasks import metric_info
from server.results import ResultsRow
from server.run_outputs import round_aggregated

# The results-row key each split's metrics are under -> how notes name it.
SPLITS = MappingProxyType({"validation": "validation", "central": "eval"})


@dataclass(frozen=True)
class Selection:
    """The round whose model a run exports, and why (``outcome.json`` ``selection``).

    ``rule`` is what was applied: ``best`` or ``last`` (also when ``best`` was asked
    for but no round had the metric: ``note`` then says so). ``split`` is the
    results-row key the metric was read from (``validation`` or ``central``),
    ``value`` the selected round's metric (None under ``last``). ``note`` is one
    sentence for people, e.g. "best validation accuracy 0.8400 at round 5 of 8".
    """

    rule: str
    round: int
    last_round: int
    metric: str | None = None
    split: str | None = None
    value: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``outcome.json``."""
        return asdict(self)


def finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (NaN, None, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _improves(value: float, best: float | None, *, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _check_mode(mode: str) -> None:
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")


def best_round(
    values: Mapping[int, Any], *, mode: str, min_delta: float = 0.0
) -> int | None:
    """The round of ``values`` (round -> metric) with the best finite metric.

    Rounds are taken in increasing order; a round becomes the best only when it beats
    the best so far by more than ``min_delta``, so ties go to the earliest round.
    Non-finite and missing values are ignored; None when no value is finite.
    """
    _check_mode(mode)
    best, best_value = None, None
    for rnd in sorted(values):
        value = finite(values[rnd])
        if value is not None and _improves(value, best_value, mode=mode, min_delta=min_delta):
            best, best_value = rnd, value
    return best


def rounds_without_improvement(
    history: Sequence[Any], *, mode: str, min_delta: float = 0.0
) -> int:
    """How many values of ``history`` (oldest first) came after its best one.

    A missing or non-finite value counts as a round without improvement (a diverged
    model is no progress), but only once some value was finite: before that there is
    nothing to improve on, and 0 is returned.
    """
    _check_mode(mode)
    best_value, since = None, 0
    for raw in history:
        value = finite(raw)
        if value is not None and _improves(value, best_value, mode=mode, min_delta=min_delta):
            best_value, since = value, 0
        elif best_value is not None:
            since += 1
    return since


def should_stop(
    history: Sequence[Any], *, patience: int, min_delta: float, mode: str
) -> bool:
    """Whether the last ``patience`` rounds of ``history`` brought no improvement.

    ``history`` holds the selection metric of each training round, oldest first.
    ``patience`` 0 never stops.
    """
    if patience < 0:
        raise ValueError(f"patience must be >= 0, got {patience}")
    if patience == 0:
        return False
    return rounds_without_improvement(history, mode=mode, min_delta=min_delta) >= patience


def row_metric(row: ResultsRow, *, split: str, metric: str) -> float | None:
    """The row's ``split`` part's ``metric`` as a finite float, else None."""
    block = row.metrics(split)
    return None if block is None else finite(block.get(metric))


def metric_history(
    rows: Sequence[ResultsRow], *, split: str, metric: str
) -> list[float | None]:
    """The metric of every training round (> 0) of ``rows`` that measured it, in round
    order (None for a non-finite value); rounds without the metric are left out."""
    trained = sorted((r for r in rows if r.round > 0 and metric in (r.metrics(split) or {})),
                     key=lambda r: r.round)
    return [row_metric(r, split=split, metric=metric) for r in trained]


def metric_mode(task: str, metric: str) -> str:
    """``max`` or ``min``: the direction of ``metric`` of ``task`` (``MetricInfo``).

    Raises
    ------
    ValueError
        ``task`` has no such metric (``auto`` must be resolved first).
    """
    return "max" if metric_info(task, metric).higher_is_better else "min"


def _what(task: str, split: str, metric: str) -> str:
    """How notes name the metric, e.g. "validation macro-F1"."""
    return f"{SPLITS[split]} {metric_info(task, metric).label}"


def select_round(
    rows: Sequence[ResultsRow], *, rule: str, metric: str, split: str,
    task: str, min_delta: float = 0.0,
) -> Selection | None:
    """The round of ``rows`` (results.jsonl rows) whose model to export, and why.

    ``rule`` ``best`` picks among the aggregated rounds by the ``split`` part's ``metric``
    of ``task`` (``best_round``, in the metric's direction); with no such metric in any
    of them it falls back to the last round, and the note says why. None when ``rows``
    hold no round > 0.
    """
    if rule not in SELECT_MODELS:
        raise ValueError(f"rule must be one of {', '.join(SELECT_MODELS)}, got {rule!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    mode = metric_mode(task, metric)
    rounds = [r.round for r in rows]
    last = max(rounds, default=0)
    if last == 0:
        return None
    if rule == "last":
        return Selection(rule="last", round=last, last_round=last,
                         note=f"the last round, {last} (`select-model` = last)")
    values = {r.round: row_metric(r, split=split, metric=metric)
              for r in rows if round_aggregated(r)}
    best = best_round(values, mode=mode, min_delta=min_delta)
    what = _what(task, split, metric)
    if best is None:
        return Selection(
            rule="last", round=last, last_round=last, metric=metric, split=split,
            note=f"the last round, {last}: no aggregated round has a {what} to select "
                 "the best by (no evaluation data), so `select-model` = best fell back "
                 "to the last round")
    value = values[best]
    note = f"best {what} {value:.4f} at round {best} of {last}"
    if split == "central":
        note += ("; selected on the same eval split that reports the model's scores "
                 "(no `validation-fraction`), so that score is optimistic")
    return Selection(rule="best", round=best, last_round=last, metric=metric, split=split,
                     value=value, note=note)


def early_stop_reason(
    rows: Sequence[ResultsRow], *, patience: int, min_delta: float, metric: str,
    split: str, total_rounds: int, task: str,
) -> str | None:
    """Why the run stops after the last round of ``rows`` (``should_stop``), else None.

    Patience counts the rounds that measured ``metric`` (``metric_history``). The
    sentence goes to ``outcome.json`` ``stopped_early``; stopping for patience is a
    normal end of the run.
    """
    history = metric_history(rows, split=split, metric=metric)
    if not should_stop(history, patience=patience, min_delta=min_delta,
                       mode=metric_mode(task, metric)):
        return None
    last = max(r.round for r in rows)
    what = _what(task, split, metric)
    gain = f"more than {min_delta:g}" if min_delta > 0 else "at all"
    return (f"early stopping: the {what} did not improve {gain} in the last {patience} "
            f"round(s) (`early-stopping-patience` = {patience}); stopped after round "
            f"{last} of {total_rounds}")


def selection_split(validation_fraction: float) -> str:
    """The results-row key the model is selected on: ``validation`` when held out."""
    return "validation" if validation_fraction > 0 else "central"
