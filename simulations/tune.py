"""Federated hyperparameter search: ``python -m simulations tune <scenario> --space ...``.

Each trial is one run of the scenario through the harness (``run_scenario``), with the
trial's values of the ``--space`` keys as run-config overrides. Optuna proposes the
values (TPE, seeded) and prunes: each round's validation metric is reported to the
pruner as the round lands in the run's results.jsonl, and a pruned run is stopped by
the harness like an interrupted one (``run_app(should_stop=...)``: its SuperLink and
Ray workers are stopped; its folder keeps the rounds it finished).

Trials are compared on the **validation split** (``validation-fraction`` > 0, held
out of the training data before partitioning), never on the central eval split: that
one stays the final test set, whose numbers are reported for the best trial only. A
completed trial's objective is the validation metric of the round its run exports
(``select-model``, by ``selection-metric`` = the tuned metric), so the trial's value
is the model the user would get.

Outputs in the tune folder: one run folder per trial (``trial-000``, ...),
``tune.json`` (rewritten after every trial, so an interrupt leaves the finished ones),
``tune.html`` (``simulations.tune_report``) and ``best.toml``, a scenario file with
the best trial's settings.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from common.config import ConfigError, RunConfig, key_types, selection_metrics
from common.tasks import metric_info
from server.model_selection import finite
from server.results import read_results
from server.run_outputs import atomic_write_bytes
from simulations.runner import QUEUED_RUN_WAIT_SECONDS, run_app
from simulations.scenarios import Scenario, parse_value, resolve_run_config

TUNE_FILE = "tune.json"
BEST_FILE = "best.toml"
# Held out when the scenario holds out nothing: the share the README suggests for
# model selection, small enough to leave the sites most of their data.
DEFAULT_VALIDATION_FRACTION = 0.1
PRUNERS = ("median", "hyperband", "successive-halving", "none")
# Keys a search may not vary: the harness names and places the runs; the validation
# split and the metric are what trials are compared on (changing them per trial makes
# the values incomparable), and tuning the seed would pick a lucky draw.
RESERVED_KEYS = ("run-name", "output-dir", "resume-from", "seed", "validation-fraction",
                 "selection-metric")
STATES = ("complete", "pruned", "failed")
# How long a trial waits for the machine-wide simulation lock (queued work).
MACHINE_WAIT_SECONDS = QUEUED_RUN_WAIT_SECONDS

# (round, validation value) -> True when the trial should stop (pruned).
ReportFn = Callable[[int, float], bool]


@dataclass(frozen=True)
class SpaceParam:
    """One ``--space`` dimension: a numeric range or a list of choices.

    ``kind`` is ``float`` (uniform, or log-uniform with ``log``), ``int`` (integers in
    ``[low, high]``, log-spaced with ``log``) or ``categorical`` (``choices``).
    """

    key: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def distribution(self) -> Any:
        """The Optuna distribution of this dimension."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(float(self.low), float(self.high), log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension (a choice, or in the range
        with the range's type: an integer range holds integers only). Numeric choices
        match by value (RunConfig holds a float key's choice ``0`` as ``0.0``); a bool
        matches a bool only (True is not the choice 1), text matches text only."""
        if self.kind == "categorical":
            return any(_same_choice(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def values_to_check(self) -> list[Any]:
        """The values that must each be a valid run config: the bounds or the choices."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> str:
        """``learning-rate in [0.0001, 0.01] (log)`` / ``local-steps in {5, 10, 20}``."""
        if self.kind == "categorical":
            return f"{self.key} in {{{', '.join(_fmt(c) for c in self.choices)}}}"
        scale = ", log" if self.log else ""
        return f"{self.key} in [{_fmt(self.low)}, {_fmt(self.high)}] ({self.kind}{scale})"

    def to_json(self) -> dict[str, Any]:
        """The dimension as written to tune.json."""
        if self.kind == "categorical":
            return {"kind": self.kind, "choices": list(self.choices)}
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log}


def _same_choice(value: Any, choice: Any) -> bool:
    def numeric(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if numeric(value) and numeric(choice):
        return bool(value == choice)
    return type(value) is type(choice) and bool(value == choice)


def _fmt(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def _field_types() -> dict[str, str]:
    """Run-config key -> its type name (``float``, ``int``, ``str``, ``bool``)."""
    return key_types()


_GRAMMAR = ("key=lo:hi (uniform; integers for an integer key), key=lo:hi:log "
            "(log-uniform, lo > 0) or key=a,b,c (choices)")


def parse_space_item(item: str, *, types: Mapping[str, str] | None = None) -> SpaceParam:
    """One ``--space`` item; see :data:`_GRAMMAR`. Values are read as ``--set`` reads them.

    Raises
    ------
    ConfigError
        The item is not of one of the three forms, names an unknown or reserved key,
        gives a range for a non-numeric key, or bounds of the wrong type or order.
    """
    types = _field_types() if types is None else types
    key, sep, text = item.partition("=")
    key, text = key.strip(), text.strip()
    if not sep or not key or not text:
        raise ConfigError(f"--space expects {_GRAMMAR}; got {item!r}")
    if key not in types:
        raise ConfigError(f"--space {item!r}: unknown run-config key {key!r}; allowed keys: "
                          f"{', '.join(sorted(set(types) - set(RESERVED_KEYS)))}")
    if key in RESERVED_KEYS:
        raise ConfigError(f"--space {item!r}: a search cannot vary {key!r} (reserved: "
                          f"{', '.join(RESERVED_KEYS)}; the tuner sets them itself)")
    kind = types[key]
    if "," in text:
        choices = [parse_value(key, v.strip()) for v in text.split(",")]
        if any(v == "" for v in choices):
            raise ConfigError(f"--space {item!r}: an empty choice; expected key=a,b,c")
        if len({repr(v) for v in choices}) != len(choices):
            raise ConfigError(f"--space {item!r}: a choice is repeated")
        return SpaceParam(key=key, kind="categorical", choices=tuple(choices))
    if ":" not in text or kind not in ("int", "float"):
        what = ("a single value is not a search space (fix it with --set)"
                if ":" not in text else
                f"{key!r} is a {kind} key: a range needs a numeric key; list choices a,b,c")
        raise ConfigError(f"--space {item!r}: {what}; expected {_GRAMMAR}")
    parts = [p.strip() for p in text.split(":")]
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise ConfigError(f"--space {item!r}: a range is lo:hi or lo:hi:log; expected "
                          f"{_GRAMMAR}")
    bounds = [parse_value(key, p) for p in parts[:2]]
    for bound in bounds:
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or (
                isinstance(bound, float) and not math.isfinite(bound)):
            raise ConfigError(f"--space {item!r}: bound {bound!r} is not a finite number")
        if kind == "int" and not isinstance(bound, int):
            raise ConfigError(f"--space {item!r}: {key!r} is an integer key, so its bounds "
                              f"must be integers, got {bound!r}")
    low, high = bounds
    if not low < high:
        raise ConfigError(f"--space {item!r}: lo must be below hi, got {low!r}:{high!r} "
                          "(one value is not a search: use --set)")
    if log and low <= 0:
        raise ConfigError(f"--space {item!r}: a log range needs lo > 0, got {low!r}")
    if kind == "float":
        low, high = float(low), float(high)
    return SpaceParam(key=key, kind=kind, low=low, high=high, log=log)


def parse_space(items: Sequence[str]) -> dict[str, SpaceParam]:
    """Every ``--space`` item, by key; at least one, each key once."""
    if not items:
        raise ConfigError(f"tune needs at least one --space ({_GRAMMAR})")
    types = _field_types()
    space: dict[str, SpaceParam] = {}
    for item in items:
        param = parse_space_item(item, types=types)
        if param.key in space:
            raise ConfigError(f"--space names {param.key!r} twice")
        space[param.key] = param
    return space


def make_pruner(name: str, *, max_rounds: int) -> Any:
    """The Optuna pruner named by ``--pruner`` (see :data:`PRUNERS`).

    ``median`` prunes a trial whose round value is worse than the median of the earlier
    trials at the same round, once two trials have finished (fewer gives no median
    worth the name); ``hyperband`` / ``successive-halving`` use rounds as the resource.
    """
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_rounds)
    if name == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {name!r}")


# --- the search loop (no simulation: a trial is whatever ``run_trial`` does) -------------


@dataclass(frozen=True)
class TrialRun:
    """What running one trial gave: the round values it reported, and how it ended.

    ``values`` are (round, validation value) for rounds >= 1 that measured the metric
    (finite values only); a pruned trial has ``pruned_at``;
    ``selected_round`` is the round the run exports (its objective), ``test`` the
    central (final test set) metrics of that round.
    """

    values: tuple[tuple[int, float], ...] = ()
    ok: bool = False
    pruned_at: int | None = None  # the round after which the trial was stopped
    selected_round: int | None = None
    test: Mapping[str, float] = field(default_factory=dict)
    run_dir: Path | None = None
    message: str = ""


TrialFn = Callable[[int, Mapping[str, Any], ReportFn], TrialRun]


@dataclass(frozen=True)
class TrialRecord:
    """One trial as tune.json lists it."""

    number: int
    params: Mapping[str, Any]
    state: str  # complete | pruned | failed
    value: float | None  # the objective (complete trials only)
    values: tuple[tuple[int, float], ...]
    selected_round: int | None = None
    pruned_at: int | None = None
    test: Mapping[str, float] = field(default_factory=dict)
    run_dir: str | None = None
    message: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The trial's tune.json object (``values`` as ``[[round, value], ...]``)."""
        return {"number": self.number, "params": dict(self.params), "state": self.state,
                "value": self.value, "values": [list(v) for v in self.values],
                "selected_round": self.selected_round, "pruned_at": self.pruned_at,
                "test": dict(self.test), "run_dir": self.run_dir, "message": self.message,
                "seconds": round(self.seconds, 1)}


def _record(number: int, params: Mapping[str, Any], run: TrialRun, seconds: float
            ) -> TrialRecord:
    """The trial's state and objective from what its run gave."""
    value = None
    state = "failed"
    message = run.message
    if run.pruned_at is not None:
        state = "pruned"
    elif run.ok:
        value = dict(run.values).get(run.selected_round) if run.selected_round else None
        value = finite(value)
        if value is None:
            message = (f"its exported round {run.selected_round} has no finite validation "
                       "value")
        else:
            state = "complete"
    return TrialRecord(
        number=number, params=dict(params), state=state, value=value, values=run.values,
        selected_round=run.selected_round,
        pruned_at=run.pruned_at,
        test=dict(run.test) if state == "complete" else {},
        run_dir=None if run.run_dir is None else str(run.run_dir), message=message,
        seconds=seconds)


def best_trial(records: Sequence[TrialRecord], direction: str) -> TrialRecord | None:
    """The complete trial with the best value (ties: the earliest), or None."""
    done = [r for r in records if r.state == "complete" and r.value is not None]
    if not done:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(done, key=lambda r: (sign * float(r.value or 0.0), r.number))


def run_search(
    space: Mapping[str, SpaceParam],
    *,
    trials: int,
    direction: str,
    run_trial: TrialFn,
    sampler: Any,
    pruner: Any,
    on_trial: Callable[[list[TrialRecord]], None] | None = None,
    on_start: Callable[[int, Mapping[str, Any]], None] | None = None,
    first: Mapping[str, Any] | None = None,
) -> list[TrialRecord]:
    """Ask Optuna for ``trials`` settings in turn, run each, tell it how it ended.

    ``first`` (a value for every key of the space) is trial 0's settings, enqueued
    before the sampler proposes any: the search then measures the scenario's own
    settings under the same conditions as the rest, so "best beats the defaults" is a
    comparison in the same tune.json, not an assumption.

    ``run_trial(number, params, report)`` runs one trial; it calls ``report(round,
    value)`` as each round's validation value lands, and stops the trial (returning
    ``TrialRun(pruned_at=round)``) when ``report`` returns True. A trial that raises is
    recorded as failed and the search goes on; an interrupt propagates (the records so
    far went to ``on_trial`` after each trial).
    """
    import optuna
    from optuna.trial import TrialState

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be maximize or minimize, got {direction!r}")
    study = optuna.create_study(
        direction="maximize" if direction == "maximize" else "minimize", sampler=sampler,
        pruner=pruner)
    distributions = {key: p.distribution() for key, p in space.items()}
    if first is not None:
        if set(first) != set(space) or not all(space[k].contains(v) for k, v in first.items()):
            raise ConfigError(f"trial 0's settings {dict(first)} must give every key of the "
                              "space a value inside it")
        study.enqueue_trial(dict(first))
    records: list[TrialRecord] = []
    for _ in range(trials):
        trial = study.ask(distributions)
        params = {key: trial.params[key] for key in space}
        if on_start is not None:
            on_start(trial.number, params)

        def report(rnd: int, value: float, trial: Any = trial) -> bool:
            trial.report(value, rnd)
            return bool(trial.should_prune())

        started = time.monotonic()
        try:
            run = run_trial(trial.number, params, report)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as error:  # one broken trial must not end the search
            run = TrialRun(message=f"{type(error).__name__}: {error}")
        record = _record(trial.number, params, run, time.monotonic() - started)
        if record.state == "complete":
            study.tell(trial, record.value)
        else:
            study.tell(trial, state=TrialState.PRUNED if record.state == "pruned"
                       else TrialState.FAIL)
        records.append(record)
        if on_trial is not None:
            on_trial(records)
    return records


# --- trials as harness runs ------------------------------------------------------------


class RoundWatcher:
    """Tails a run's results.jsonl; reports each new round's validation value.

    Called by the harness after every output line of the simulation (``should_stop``):
    reads the file only when it grew, reports rounds >= 1 that measured ``metric``
    (a non-finite value is reported as NaN, which Optuna's pruners prune), and returns
    True, stopping the run, once ``report`` says prune. The run's last planned round
    is never pruned: the run is done by then anyway.
    """

    def __init__(self, results: Path, *, metric: str, report: ReportFn, last_round: int
                 ) -> None:
        self.results = results
        self.metric = metric
        self.report = report
        self.last_round = last_round
        self.values: dict[int, float] = {}  # finite values only
        self.pruned_at: int | None = None
        self._seen: set[int] = set()
        self._size = -1

    def __call__(self) -> bool:
        if self.pruned_at is not None:
            return True
        try:
            size = self.results.stat().st_size
        except OSError:
            return False
        if size == self._size:
            return False
        self._size = size
        for row in read_results(self.results):
            measured = (row.validation or {}).get(self.metric)
            if row.round < 1 or row.round in self._seen or measured is None:
                continue
            self._seen.add(row.round)
            value = finite(measured)
            if value is not None:
                self.values[row.round] = value
            prune = self.report(row.round, math.nan if value is None else value)
            if prune and row.round < self.last_round:
                self.pruned_at = row.round
                return True
        return False


def scenario_trial_fn(
    scenario: Scenario,
    base_overrides: Mapping[str, Any],
    *,
    tune_dir: Path,
    metric: str,
    num_supernodes: int | None = None,
    quiet: bool = False,
    run_fn: Callable[..., Any] = run_app,
) -> TrialFn:
    """A :data:`TrialFn` that runs the trial as ``tune_dir/trial-NNN`` of ``scenario``."""
    from simulations.sweep import run_scenario

    def run_trial(number: int, params: Mapping[str, Any], report: ReportFn) -> TrialRun:
        name = f"trial-{number:03d}"
        overrides = {**base_overrides, **params}
        cfg = RunConfig.from_flower(resolve_run_config(
            scenario, overrides, output_dir=tune_dir, run_name=name))
        run_dir = tune_dir / name
        watcher = RoundWatcher(run_dir / "results.jsonl", metric=metric, report=report,
                               last_round=cfg.num_server_rounds)
        outcome = run_scenario(
            scenario, overrides, output_dir=tune_dir, run_name=name,
            num_supernodes=num_supernodes, quiet=quiet,
            run_fn=functools.partial(run_fn, should_stop=watcher),
            port_wait=MACHINE_WAIT_SECONDS)
        rows = read_results(run_dir / "results.jsonl")
        values = tuple((r.round, v) for r in rows if r.round >= 1 and
                       (v := finite((r.validation or {}).get(metric))) is not None)
        if watcher.pruned_at is not None:
            return TrialRun(values=tuple(v for v in values if v[0] <= watcher.pruned_at),
                            pruned_at=watcher.pruned_at, run_dir=run_dir,
                            message=f"pruned after round {watcher.pruned_at}")
        selection = (outcome.outcome or {}).get("selection") or {}
        selected = selection.get("round") if outcome.ok else None
        test: dict[str, float] = {}
        for row in rows:
            if row.round == selected and row.central:
                test = {k: float(v) for k, v in row.central.items() if k != "num_examples"}
        return TrialRun(values=values, ok=outcome.ok, selected_round=selected, test=test,
                        run_dir=run_dir, message=outcome.message)

    return run_trial


# --- setting up a search, and its outputs ----------------------------------------------


@dataclass(frozen=True)
class TunePlan:
    """A checked search: what every trial shares, and what they are compared on."""

    scenario: Scenario
    space: Mapping[str, SpaceParam]
    base_overrides: Mapping[str, Any]  # every trial's overrides besides the space's
    task: str
    metric: str
    direction: str  # maximize | minimize
    max_rounds: int
    notes: tuple[str, ...] = ()
    # Trial 0's settings: the scenario's (+ --set) values of the searched keys, when
    # every one of them lies in the space; else None and ``defaults_note`` says why.
    defaults: Mapping[str, Any] | None = None
    defaults_note: str = ""


def plan_search(
    scenario: Scenario,
    space: Mapping[str, SpaceParam],
    overrides: Mapping[str, Any],
    *,
    metric: str = "auto",
    tune_dir: Path,
    num_partitions: int,
) -> TunePlan:
    """Check the search before any trial runs; turn the validation split on.

    The scenario + ``overrides`` must hold out a validation split: ``validation-fraction``
    is set to :data:`DEFAULT_VALIDATION_FRACTION` when the scenario holds out none, and
    refused when given as 0 (or impossible: ``labels`` set, the server reads no
    training data). ``selection-metric`` is set to the tuned metric so each run exports
    its best round by it. Every bound and choice of the space is validated as a run
    config, and the base config is preflighted (data, model), as a sweep does.

    Raises
    ------
    ConfigError
        A key of the space is also in ``--set``, a reserved key is overridden, the
        metric is not one of the task's, no validation split is possible, or a value
        of the space is not valid for this scenario (the message names the --space).
    """
    from server.preflight import preflight

    for key in ("run-name", "resume-from"):
        if key in overrides:
            raise ConfigError(f"a search names its runs itself: drop --set {key}")
    clash = sorted(set(space) & set(overrides))
    if clash:
        raise ConfigError(f"{', '.join(clash)} given both with --space and --set: give "
                          "each key once")
    base = dict(overrides)
    notes = []
    merged = {**scenario.run_config, **base}
    cfg = RunConfig.from_flower(resolve_run_config(scenario, base, output_dir=tune_dir,
                                                   run_name="check"))
    if cfg.validation_fraction == 0:
        if "validation-fraction" in merged:
            raise ConfigError(
                "tune compares trials on the validation split, but validation-fraction is "
                "0 here: set it > 0 (e.g. --set validation-fraction=0.1) so the central "
                "eval split stays the final test set")
        if cfg.labels:
            raise ConfigError(
                "tune compares trials on a validation split held out of `dataset`, but "
                "with `labels` set the server reads no training data to hold one out; "
                "tune a scenario whose server reads `dataset`")
        base["validation-fraction"] = DEFAULT_VALIDATION_FRACTION
        notes.append(f"validation-fraction={DEFAULT_VALIDATION_FRACTION:g}: trials are "
                     "compared on this held-out share of the training rows, the central "
                     "eval split stays the final test set")
    allowed = selection_metrics(cfg.task)  # live: a registered task's too
    if metric not in allowed:
        raise ConfigError(f"--metric must be auto or a metric of task {cfg.task!r} "
                          f"({', '.join(allowed[1:])}), got {metric!r}")
    if metric == "auto":
        name = cfg.selection_metric_name  # the scenario's, or the task's headline
    else:
        name = metric
        if "selection-metric" in base and base["selection-metric"] not in ("auto", name):
            raise ConfigError(f"--metric {name} and --set selection-metric="
                              f"{base['selection-metric']} disagree: give the metric once")
    base["selection-metric"] = name
    cfg = RunConfig.from_flower(resolve_run_config(scenario, base, output_dir=tune_dir,
                                                   run_name="check"))
    max_rounds = cfg.num_server_rounds
    for key, param in space.items():
        for value in param.values_to_check():
            try:
                checked = RunConfig.from_flower(resolve_run_config(
                    scenario, {**base, key: value}, output_dir=tune_dir, run_name="check"))
            except ConfigError as error:
                raise ConfigError(f"--space {key}: value {value!r} is not valid for "
                                  f"scenario {scenario.name!r}: {error}") from error
            max_rounds = max(max_rounds, checked.num_server_rounds)
    preflight(cfg, num_partitions=num_partitions)
    direction = "maximize" if metric_info(cfg.task, name).higher_is_better else "minimize"
    defaults, defaults_note = scenario_defaults(cfg, space)
    return TunePlan(scenario=scenario, space=dict(space), base_overrides=base,
                    task=cfg.task, metric=name, direction=direction, max_rounds=max_rounds,
                    notes=tuple(notes), defaults=defaults, defaults_note=defaults_note)


def scenario_defaults(cfg: RunConfig, space: Mapping[str, SpaceParam]
                      ) -> tuple[dict[str, Any] | None, str]:
    """The run's own values of the searched keys, and why they cannot be trial 0.

    Returns ``(values, "")`` when every value lies in the space (they become trial 0),
    else ``(None, reason)`` naming the values outside it: a trial 0 outside the space
    would not be a trial of this search.
    """
    flat = cfg.to_flower()  # a task's own keys too (they are not RunConfig fields)
    values = {key: flat[key] for key in space}
    outside = [f"{key}={_fmt(v)} (space: {space[key].describe()})"
               for key, v in values.items() if not space[key].contains(v)]
    if outside:
        return None, ("trial 0 is not the scenario's settings: its "
                      + "; ".join(outside) + " lie outside the space, so whether the best "
                      "trial beats them is not measured")
    return values, ""


def defaults_comparison(records: Sequence[TrialRecord], plan: TunePlan
                        ) -> dict[str, Any] | None:
    """tune.json's ``defaults``: trial 0 (the scenario's settings) against the best.

    ``improvement`` is best minus trial 0 on the objective, signed so that > 0 means
    better in the search's direction; ``beats`` is True only when it is > 0. None when
    trial 0 was not the scenario's settings or has not run yet.
    """
    if plan.defaults is None or not records or records[0].number != 0:
        return None
    first = records[0]
    best = best_trial(records, plan.direction)
    entry: dict[str, Any] = {
        "trial": 0, "params": dict(plan.defaults), "state": first.state,
        "value": first.value, "test": dict(first.test), "best_trial": None,
        "improvement": None, "beats": None}
    if best is not None and first.value is not None:
        sign = 1.0 if plan.direction == "maximize" else -1.0
        improvement = sign * (float(best.value or 0.0) - first.value)
        entry.update(best_trial=best.number, improvement=improvement,
                     beats=improvement > 0)
    return entry


def defaults_sentence(entry: Mapping[str, Any] | None, *, note: str, label: str) -> str:
    """One line on trial 0 vs the best, for the printed summary and tune.html."""
    if entry is None:
        return note or "trial 0 = the scenario's settings, not run"
    head = f"trial 0 = the scenario's settings ({_params_text(entry['params'])})"
    if entry["value"] is None:
        return f"{head}: {entry['state']}, no objective to compare with"
    if entry["improvement"] is None:
        return f"{head}: {label} {entry['value']:.4f}; no complete trial to compare"
    if not entry["beats"]:
        return (f"{head}: {label} {entry['value']:.4f}; no trial beat it (the best is "
                f"trial {entry['best_trial']})")
    return (f"{head}: {label} {entry['value']:.4f}; the best, trial {entry['best_trial']}, "
            f"beats it by {entry['improvement']:+.4f}")


def tune_json(plan: TunePlan, records: Sequence[TrialRecord], *, status: str,
              trials: int, seed: int, pruner: str, num_supernodes: int, seconds: float
              ) -> dict[str, Any]:
    """The tune.json object (see the README, "simulations tune")."""
    best = best_trial(records, plan.direction)
    counts = {state: sum(r.state == state for r in records) for state in STATES}
    return {
        "scenario": plan.scenario.name,
        "scenario_file": str(plan.scenario.path or ""),
        "status": status,  # running | completed | interrupted
        "task": plan.task,
        "metric": plan.metric,
        "split": "validation",
        "direction": plan.direction,
        "space": {key: p.to_json() for key, p in plan.space.items()},
        "overrides": dict(plan.base_overrides),
        "trials_requested": trials,
        "counts": counts,
        "defaults": defaults_comparison(records, plan),
        "defaults_note": plan.defaults_note,
        "sampler": {"name": "TPESampler", "seed": seed},
        "pruner": pruner,
        "num_supernodes": num_supernodes,
        "seconds": round(seconds, 1),
        "best": None if best is None else {
            "number": best.number, "params": dict(best.params), "value": best.value,
            "selected_round": best.selected_round, "test": dict(best.test),
            "run_dir": best.run_dir},
        "trials": [r.to_json() for r in records],
    }


def best_scenario(plan: TunePlan, best: TrialRecord, *, num_supernodes: int) -> str:
    """best.toml: the scenario with the best trial's settings in ``[run-config]``.

    It keeps the scenario's federation, resources, requirements and run config, the
    search's overrides (with its validation split and metric, so a run of it repeats
    the best trial) and the best values; not the tune folder as ``output-dir``.
    """
    scenario = plan.scenario
    run_config = {**scenario.run_config, **plan.base_overrides, **best.params}
    run_config.pop("run-name", None)
    settings = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    doc: dict[str, Any] = {
        "description": f"{scenario.description} (tuned: {settings})".strip(),
        "num-supernodes": num_supernodes,
        "resources": {"num-cpus": scenario.num_cpus, "num-gpus": float(scenario.num_gpus)},
    }
    if scenario.requires:
        doc["requires"] = list(scenario.requires)
    doc["run-config"] = run_config
    tests = ", ".join(f"{k} {v:.4f}" for k, v in best.test.items())
    header = (
        f"# Written by `python -m simulations tune` from scenario {scenario.name!r}:\n"
        f"# the best of its trials, trial {best.number}, validation {plan.metric} "
        f"{best.value:.4f} (round {best.selected_round}).\n"
        f"# Its final test set (central eval) numbers, not used by the search: "
        f"{tests or 'none'}.\n"
        "# Run it with: python -m simulations run <this file>\n"
    )
    return header + tomli_w.dumps(doc)


def write_outputs(tune_dir: Path, plan: TunePlan, records: Sequence[TrialRecord], *,
                  status: str, report: bool, **info: Any) -> dict[str, Path]:
    """Write tune.json; at the end (``report``) also best.toml and tune.html."""
    written: dict[str, Path] = {}
    tune_dir.mkdir(parents=True, exist_ok=True)
    record = tune_json(plan, records, status=status, **info)
    path = tune_dir / TUNE_FILE
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=True, default=str)
                              + "\n").encode())
    written["tune"] = path
    if not report:
        return written
    best = best_trial(records, plan.direction)
    if best is not None:
        path = tune_dir / BEST_FILE
        atomic_write_bytes(path, best_scenario(
            plan, best, num_supernodes=info["num_supernodes"]).encode())
        written["best"] = path
    from simulations.tune_report import write_tune_report

    try:
        written["report"] = write_tune_report(tune_dir, record)
    except (OSError, ValueError) as error:
        print(f"[fedsft] could not write the tune report: {error}", file=sys.stderr)
    return written


def _params_text(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def tune_scenario(
    scenario: Scenario,
    space: Mapping[str, SpaceParam],
    overrides: Mapping[str, Any],
    *,
    trials: int,
    tune_dir: Path,
    metric: str = "auto",
    seed: int = 0,
    pruner: str = "median",
    num_supernodes: int | None = None,
    quiet: bool = False,
    run_trial: TrialFn | None = None,
) -> tuple[list[TrialRecord], dict[str, Path], TunePlan]:
    """Plan the search, run it trial by trial, write tune.json, best.toml, tune.html.

    ``run_trial`` replaces the harness runs (tests). An interrupt writes tune.json
    (``status`` interrupted, the finished trials), best.toml and the report, then
    propagates.
    """
    import optuna

    from simulations.sweep import _supernodes
    from simulations.tune_report import metric_label

    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    nodes = _supernodes(scenario, num_supernodes, None)
    plan = plan_search(scenario, space, overrides, metric=metric, tune_dir=tune_dir,
                       num_partitions=nodes)
    pruner_obj = make_pruner(pruner, max_rounds=plan.max_rounds)
    for note in plan.notes:
        print(f"[fedsft] tune: {note}", flush=True)
    label = f"validation {metric_label(plan.task, plan.metric)}"
    print(f"[fedsft] tune {tune_dir.name}: {trials} trial(s) of scenario {scenario.name}, "
          f"{plan.direction} {label}; space: "
          + "; ".join(p.describe() for p in space.values()), flush=True)
    if run_trial is None:
        run_trial = scenario_trial_fn(scenario, plan.base_overrides, tune_dir=tune_dir,
                                      metric=plan.metric, num_supernodes=num_supernodes,
                                      quiet=quiet)
    started = time.monotonic()
    latest: list[TrialRecord] = []
    info = {"trials": trials, "seed": seed, "pruner": pruner, "num_supernodes": nodes}

    if plan.defaults_note:
        print(f"[fedsft] tune: {plan.defaults_note}", flush=True)

    def on_start(number: int, params: Mapping[str, Any]) -> None:
        own = " (trial 0 = the scenario's settings)" if (
            number == 0 and plan.defaults is not None) else ""
        print(f"[fedsft] tune trial-{number:03d} ({number + 1}/{trials}): "
              f"{_params_text(params)}{own}", flush=True)

    def on_trial(records: list[TrialRecord]) -> None:
        latest[:] = records
        r = records[-1]
        best = best_trial(records, plan.direction)
        if r.state == "complete":
            status = f"complete, {label} {r.value:.4f} (round {r.selected_round})"
        elif r.state == "pruned":
            status = f"pruned after round {r.pruned_at}"
        else:
            status = f"FAILED: {r.message}"
        so_far = "" if best is None else (f"; best so far: trial-{best.number:03d}, "
                                          f"{best.value:.4f}")
        print(f"[fedsft] tune trial-{r.number:03d} ({r.number + 1}/{trials}): "
              f"{status}{so_far}", flush=True)
        write_outputs(tune_dir, plan, records, status="running", report=False,
                      seconds=time.monotonic() - started, **info)

    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        records = run_search(space, trials=trials, direction=plan.direction,
                             run_trial=run_trial, sampler=sampler, pruner=pruner_obj,
                             on_trial=on_trial, on_start=on_start, first=plan.defaults)
    except KeyboardInterrupt:
        # A plain interrupt: the trial's run is not one to resume (the search is).
        write_outputs(tune_dir, plan, latest, status="interrupted", report=True,
                      seconds=time.monotonic() - started, **info)
        print(f"[fedsft] tune interrupted: {tune_dir / TUNE_FILE} keeps the "
              f"{len(latest)} finished trial(s)", file=sys.stderr, flush=True)
        raise KeyboardInterrupt("tune interrupted") from None
    written = write_outputs(tune_dir, plan, records, status="completed", report=True,
                            seconds=time.monotonic() - started, **info)
    print("[fedsft] tune: " + defaults_sentence(defaults_comparison(records, plan),
                                                note=plan.defaults_note, label=label),
          flush=True)
    return records, written, plan
