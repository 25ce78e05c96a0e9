"""at-convergence: federated accuracy at its plateau against centralized at its best.

``python -m simulations.benchmarks --only at-convergence``. Neither side stops at a budget
chosen in advance:

- **centralized**: LoRA trained in this process on the union of the clients' training
  shares (``prepare_in_process``), evaluated on the validation split held out of the
  training data (``validation-fraction``) every ``central_eval_every`` optimizer steps
  and stopped after ``central_patience`` evaluations without improvement (or at
  ``central_max_steps``); its accuracy on the eval split (SST-2 dev) is reported at the
  best *validation* evaluation, never at the best dev one.
- **federated**: for IID and Dirichlet 1.0, 0.5 and 0.1 label skew, with half the
  clients per round, two settings side by side: plain FedAvg-of-LoRA (``PLAIN``, every
  label-skew remedy off) and fedsft's recommended settings (no training override: its
  defaults, so this measures whatever the defaults are). Each run stops by its own early stopping
  (``early-stopping-patience`` on the same validation split) or at the round cap, and
  exports the best-validation round (``select-model`` best); the number reported is that
  exported model's central accuracy.

Reported per run: the exported model's accuracy (the plateau), its gap to centralized,
the rounds and bytes (up + down) until a round came within 1 point of the plateau, the
largest drop between consecutive rounds after round 3, and the exported model against
the last round's. Targets (recommended settings): gap <= 1 point (IID), 2 (Dirichlet
1.0 and 0.5), 3.5 (0.1); no drop of more than 3 points after round 3; and in every run
the exported model at least as accurate as the last round's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.results import ResultsRow
from simulations.benchmarks.harness import (
    Bench,
    BenchmarkError,
    FedRun,
    central_metrics,
    data_text,
    prepare_in_process,
    sst2_config,
    target,
)

WITHIN = 0.01  # "rounds to within 1 point of the plateau"
MAX_DROP_POINTS = 3.0  # the largest allowed drop between consecutive rounds
PARTITIONS: dict[str, tuple[dict[str, Any], float]] = {  # name -> overrides, allowed gap
    "iid": ({"partitioner": "iid"}, 1.0),
    "dirichlet-1.0": ({"partitioner": "dirichlet", "dirichlet-alpha": 1.0}, 2.0),
    "dirichlet-0.5": ({"partitioner": "dirichlet", "dirichlet-alpha": 0.5}, 2.0),
    "dirichlet-0.1": ({"partitioner": "dirichlet", "dirichlet-alpha": 0.1}, 3.5),
}
# Plain FedAvg-of-LoRA, the way a new user runs it: every remedy fedsft has for label
# skew switched off by name (skew-aware loss, class weighting, focal loss, a server
# optimizer, LoRA-aware aggregation) and the local training the issue tried, so that this
# baseline stays the same whatever fedsft's defaults become.
PLAIN: dict[str, Any] = {
    "method": "lora", "lora-aggregation": "fedavg", "strategy": "fedavg",
    "skew-loss": "none", "class-weighting": "none", "focal-gamma": 0.0,
    "learning-rate": 2e-3, "local-steps": 10, "batch-size": 16, "local-optimizer": "adamw",
    "adam-epsilon": 1e-8,
}
# Recommended: no training override (only the protocol every run shares), so the
# benchmark measures fedsft's defaults as they are when it runs.
SETTINGS: dict[str, dict[str, Any]] = {"plain": PLAIN, "recommended": {}}
# Keys of the shared base config (``Bench.base``) that would override the defaults'
# local training or encoding: left out, so that "recommended" trains as the defaults say.
TRAINING_KEYS = ("batch-size", "local-steps", "learning-rate", "max-length")


@dataclass(frozen=True)
class Size:
    """One mode's size (see the module docstring for what each part does)."""

    clients: int
    fraction_train: float
    max_rounds: int  # `num-server-rounds`: the cap when early stopping does not end a run
    patience: int  # `early-stopping-patience` of every federated run
    partitions: tuple[str, ...]
    drop_after: int  # the largest drop is measured between rounds after this one
    validation_fraction: float  # `validation-fraction`: both sides select on it
    central_eval_every: int  # centralized: optimizer steps between validation checks
    central_patience: int  # centralized: checks without improvement before it stops
    central_max_steps: int  # centralized: the step cap
    run_timeout: float  # seconds one federated run may take


SIZES = {
    # Quick only checks that it runs: 3 rounds, so the drop is measured after round 1.
    "quick": Size(clients=2, fraction_train=0.5, max_rounds=3, patience=2,
                  partitions=("iid",), drop_after=1, validation_fraction=0.1,
                  central_eval_every=4, central_patience=2, central_max_steps=12,
                  run_timeout=1800.0),
    # 2 % of train.tsv is about 1,350 rows, held out before partitioning: enough that
    # one example moves validation accuracy by under 0.1 point (dev, 872 rows, stays the
    # eval split), and cheap for the server to evaluate every round. 200 steps of batch
    # 16 are 3,200 examples, about 6 % of an epoch of the union.
    "default": Size(clients=10, fraction_train=0.5, max_rounds=40, patience=4,
                    partitions=tuple(PARTITIONS), drop_after=3, validation_fraction=0.02,
                    central_eval_every=200, central_patience=4, central_max_steps=4000,
                    run_timeout=4 * 3600.0),
    "full": Size(clients=10, fraction_train=0.5, max_rounds=100, patience=8,
                 partitions=tuple(PARTITIONS), drop_after=3, validation_fraction=0.02,
                 central_eval_every=200, central_patience=8, central_max_steps=10000,
                 run_timeout=10 * 3600.0),
}


# --- pure parts ------------------------------------------------------------------------


def plateau_round(
    accuracies: Mapping[int, float], *, plateau: float, within: float = WITHIN
) -> int:
    """The first round of ``accuracies`` (round -> accuracy) within ``within`` of ``plateau``.

    Raises
    ------
    ValueError
        No round comes that close (``plateau`` above every accuracy by more than ``within``).
    """
    # Accuracies are counts / eval rows: "exactly 1 point below" must count as within,
    # whatever the float subtraction rounds to.
    for rnd in sorted(accuracies):
        if accuracies[rnd] >= plateau - within - 1e-9:
            return rnd
    raise ValueError(f"no round is within {within:g} of the plateau {plateau:g}: "
                     f"{dict(sorted(accuracies.items()))}")


def largest_drop(accuracies: Mapping[int, float], *, after: int) -> float | None:
    """The largest fall of accuracy from round r - 1 to round r over the rounds r >
    ``after`` whose previous round is in ``accuracies`` (round -> accuracy): 0.0 when none
    fell, None when there is no such pair (the run ended by round ``after``)."""
    drops = [accuracies[r - 1] - accuracies[r] for r in sorted(accuracies)
             if r > after and r - 1 in accuracies]
    return max(0.0, *drops) if drops else None


def bytes_until(rows: Sequence[ResultsRow], last_round: int) -> int:
    """Bytes sent up and down in the training rounds 1 .. ``last_round``."""
    return sum(r.bytes.up + r.bytes.down for r in rows if 1 <= r.round <= last_round)


@dataclass(frozen=True)
class Check:
    """One centralized evaluation: after ``steps`` optimizer steps, on both splits."""

    steps: int
    validation_accuracy: float
    eval_metrics: Mapping[str, float]


@dataclass(frozen=True)
class Plateau:
    """The centralized checks until early stopping, and the best one by validation."""

    checks: tuple[Check, ...]
    best: int  # index into ``checks``
    stopped_early: bool  # False: the step cap ended it

    @property
    def best_check(self) -> Check:
        return self.checks[self.best]


def train_until_plateau(
    step: Callable[[int], Check], *, patience: int, max_checks: int
) -> Plateau:
    """Call ``step(i)`` for i = 1, 2, ... (train one chunk, evaluate) until ``patience``
    checks in a row brought no higher validation accuracy, or ``max_checks`` were made.

    The rule is the federated runs' (``server.model_selection``): the best check is the
    first with the highest validation accuracy, and patience counts the checks after it.
    """
    from server.model_selection import best_round, should_stop

    if patience < 1 or max_checks < 1:
        raise ValueError(f"patience and max_checks must be >= 1, got {patience}, {max_checks}")
    checks: list[Check] = []
    while len(checks) < max_checks:
        checks.append(step(len(checks) + 1))
        history = [c.validation_accuracy for c in checks]
        if should_stop(history, patience=patience, min_delta=0.0, mode="max"):
            break
    history = [c.validation_accuracy for c in checks]
    best = best_round(dict(enumerate(history)), mode="max")
    if best is None:
        raise BenchmarkError(f"centralized: no finite validation accuracy in {history}")
    stopped = should_stop(history, patience=patience, min_delta=0.0, mode="max")
    return Plateau(checks=tuple(checks), best=best, stopped_early=stopped)


# --- the two sides ---------------------------------------------------------------------


def train_centralized(overrides: Mapping[str, Any], *, num_clients: int,
                      size: Size) -> dict[str, Any]:
    """Centralized training to its best validation accuracy (see the module docstring).

    Each check is one ``train_local`` call of ``central_eval_every`` steps (a fresh AdamW
    and linear decay per call, with its own shuffling seed), as a federated client trains
    one round; the model carries over from check to check.
    """
    from common.specs import TrainSpec
    from common.training import derive_seed, train_local

    run = prepare_in_process({**overrides, "local-steps": size.central_eval_every},
                             num_clients=num_clients)
    if run.validation is None:
        raise BenchmarkError("centralized: no validation split (set validation-fraction > 0)")
    spec, loss_spec = TrainSpec.of(run.cfg), run.task.loss_spec(run.cfg)
    started = time.perf_counter()

    def step(i: int) -> Check:
        train_local(run.model, run.train, spec, task=run.task, loss_spec=loss_spec,
                    seed=derive_seed(run.cfg.seed, "centralized", i), device=run.device,
                    pad_token_id=run.tokenizer.pad_token_id)
        validation = float(run.evaluate(run.validation)["accuracy"])
        print(f"[bench] centralized: {i * spec.local_steps} steps, validation accuracy "
              f"{validation:.4f}", flush=True)
        return Check(steps=i * spec.local_steps, validation_accuracy=validation,
                     eval_metrics=run.evaluate(run.eval))

    plateau = train_until_plateau(
        step, patience=size.central_patience,
        max_checks=max(1, size.central_max_steps // size.central_eval_every))
    best = plateau.best_check
    return {
        "accuracy": float(best.eval_metrics["accuracy"]),
        "f1_macro": float(best.eval_metrics["f1_macro"]),
        "validation_accuracy": best.validation_accuracy,
        "best_steps": best.steps,
        "steps": plateau.checks[-1].steps,
        "stopped_early": plateau.stopped_early,
        "examples_available": len(run.train),
        "validation_examples": len(run.validation),
        "eval_examples": len(run.eval),
        "prepare_seconds": run.prepare_seconds,
        "train_and_eval_seconds": time.perf_counter() - started,
        "history": [{"steps": c.steps, "validation_accuracy": c.validation_accuracy,
                     "eval_accuracy": float(c.eval_metrics["accuracy"])}
                    for c in plateau.checks],
    }


def summarize(run: FedRun, *, central_accuracy: float, drop_after: int) -> dict[str, Any]:
    """What the table reports of one federated run (see the module docstring).

    Raises
    ------
    BenchmarkError
        The run aggregated nothing, wrote no ``outcome.json`` selection, or selected its
        model on another split than the validation one.
    """
    from server.run_outputs import read_outcome

    if not any(r.clients.aggregated for r in run.rounds):
        problems = [p for r in run.rounds for p in r.clients.problems]
        raise BenchmarkError(f"{run.run_dir}: no client update was aggregated; first "
                             f"problem: {problems[0][-400:] if problems else 'none'}")
    outcome = read_outcome(run.run_dir)
    selection = None if outcome is None else outcome.selection
    if selection is None or selection.get("split") != "validation":
        raise BenchmarkError(f"{run.run_dir}: the exported round was not selected on the "
                             f"validation split (outcome.json selection: {selection})")
    accuracies = {r.round: float(central_metrics(r, run.run_dir)["accuracy"])
                  for r in run.rounds}
    selected, last = int(selection["round"]), max(accuracies)
    exported = accuracies[selected]
    reached = plateau_round(accuracies, plateau=exported)
    drop = largest_drop(accuracies, after=drop_after)
    return {
        "exported_accuracy": exported,
        "exported_round": selected,
        "exported_validation_accuracy": selection.get("value"),
        "last_round": last,
        "last_accuracy": accuracies[last],
        "exported_minus_last_points": (exported - accuracies[last]) * 100,
        "gap_points": (central_accuracy - exported) * 100,
        "rounds_to_plateau": reached,
        "bytes_to_plateau": bytes_until(run.rows, reached),
        "largest_drop_points": None if drop is None else drop * 100,
        "stopped_early": None if outcome is None else outcome.stopped_early,
        "initial_accuracy": float(central_metrics(run.rows[0], run.run_dir)["accuracy"]),
        "accuracy_per_round": [accuracies[r] for r in sorted(accuracies)],
        "wall_seconds": run.wall_seconds,
        "run_dir": str(run.run_dir),
    }


def plot_partition(path: Path, *, partition: str, runs: Mapping[str, FedRun],
                   central_accuracy: float) -> Path:
    """Central accuracy per round of each setting, with the centralized accuracy as a flat
    line (it has no rounds)."""
    from simulations.plots import plot_overlay

    series: dict[str, tuple[list[float], list[float]]] = {}
    for name, run in runs.items():
        series[name] = ([float(r.round) for r in run.rows],
                        [float(central_metrics(r, run.run_dir)["accuracy"]) for r in run.rows])
    last = max(max(x) for x, _ in series.values())
    series["centralized (best validation check)"] = ([0.0, last],
                                                     [central_accuracy, central_accuracy])
    return plot_overlay(path, series=series, xlabel="round", ylabel="central accuracy",
                        title=f"at-convergence, {partition}: accuracy per round")


# --- the benchmark ---------------------------------------------------------------------


def run(bench: Bench) -> dict[str, Any]:
    """Centralized, then every partition x setting; see the module docstring."""
    size = SIZES[bench.mode]
    data = {} if bench.mode == "quick" else sst2_config()
    base = {k: v for k, v in bench.base().items() if k not in TRAINING_KEYS}
    # Seed 0: at seed 42 flwr-datasets' Dirichlet partitioner gives some client no rows
    # of SST-2 at alpha 0.1 in all of its 10 attempts (and the run cannot train).
    common = {**base, **data, "num-server-rounds": size.max_rounds,
              "fraction-train": size.fraction_train, "min-nodes": size.clients, "seed": 0,
              "validation-fraction": size.validation_fraction,
              "early-stopping-patience": size.patience, "select-model": "best",
              "selection-metric": "accuracy"}
    central = train_centralized({**common, **PLAIN, "partitioner": "iid"},
                                num_clients=size.clients, size=size)
    numbers: dict[str, Any] = {"centralized": central}
    rows: list[list[Any]] = [[
        "centralized (in-process)", "-", f"{central['best_steps']} of {central['steps']} steps",
        central["accuracy"], "-", 0.0, "-", "-", "-"]]
    targets = []
    figures = []
    figure_dir = bench.runs_dir / "at-convergence"
    for partition in size.partitions:
        overrides, allowed = PARTITIONS[partition]
        runs = {name: bench.fedsft(f"at-convergence-{name}-{partition}",
                                   {**common, **overrides, **setting},
                                   num_supernodes=size.clients, timeout=size.run_timeout)
                for name, setting in SETTINGS.items()}
        numbers[partition] = {}
        for name, fed in runs.items():
            s = numbers[partition][name] = summarize(
                fed, central_accuracy=central["accuracy"], drop_after=size.drop_after)
            rows.append([name, partition, f"{s['exported_round']} of {s['last_round']}",
                         s["exported_accuracy"], s["last_accuracy"], s["gap_points"],
                         s["rounds_to_plateau"], s["bytes_to_plateau"],
                         "-" if s["largest_drop_points"] is None else s["largest_drop_points"]])
            targets.append(target(f"exported >= last round, {name}, {partition} (exported - "
                                  "last)", measured=s["exported_minus_last_points"],
                                  limit=0.0, kind="min", unit="points"))
        rec = numbers[partition]["recommended"]
        targets.append(target(f"gap to centralized, recommended, {partition}",
                              measured=rec["gap_points"], limit=allowed, kind="max",
                              unit="points"))
        if rec["largest_drop_points"] is not None:
            targets.append(target(
                f"largest drop between rounds after round {size.drop_after}, recommended, "
                f"{partition}", measured=rec["largest_drop_points"], limit=MAX_DROP_POINTS,
                kind="max", unit="points"))
        path = plot_partition(figure_dir / f"accuracy-{partition}.png", partition=partition,
                              runs=runs, central_accuracy=central["accuracy"])
        figures.append({"file": str(path),
                        "caption": f"at-convergence, {partition}: central accuracy per round"})
    eval_examples = central["eval_examples"]
    notes = [
        f"Accuracy is on the server's eval split ({'SST-2 dev, ' if data else ''}"
        f"{eval_examples} rows): one example is {100 / eval_examples:.2g} points, so "
        "differences of about a point are within run-to-run noise (one seed).",
        "Both sides select on the same validation split, held out of the training rows "
        f"before partitioning (`validation-fraction` {size.validation_fraction:g}, "
        f"{central['validation_examples']} rows): the reported accuracy is never the one "
        "the model was picked by. Early stopping and the exported round follow "
        "`server.model_selection` (ties go to the earlier round).",
        f"Centralized: {size.central_eval_every} optimizer steps of batch "
        f"{PLAIN['batch-size']} between checks (one `train_local` call each: a fresh "
        f"`{PLAIN['local-optimizer']}` optimizer and linear decay per check, as a client "
        "trains one round), patience "
        f"{size.central_patience} checks, at most {size.central_max_steps} steps; it "
        f"{'stopped early' if central['stopped_early'] else 'reached the step cap'} after "
        f"{central['steps']} steps, best validation at {central['best_steps']}.",
        f"Rounds to plateau: the first round whose central accuracy is within "
        f"{WITHIN * 100:g} point of the exported model's; bytes are the serialized arrays "
        "sent up and down in rounds 1 to that round.",
        "`recommended` sets only the protocol both settings share (the common "
        "run-config: model and data, `seed`, `fraction-train`, `fraction-evaluate`, "
        "`validation-fraction`, `early-stopping-patience`, `select-model`, "
        "`selection-metric` and the round cap `num-server-rounds`): its training and "
        "encoding are fedsft's defaults at the time of the run, as `config.json` in each "
        "run folder records them; `plain` also sets the keys listed under its name.",
    ]
    if bench.mode == "quick":
        notes.append("Quick mode is a smoke test: a tiny random BERT on the built-in data "
                     "for 3 rounds; its accuracies say nothing about convergence.")
    return {
        "description": (
            "At convergence, on " + data_text(data) + ": centralized LoRA early-stopped on "
            "a validation split against federated runs that stop by their own early "
            f"stopping, for {', '.join(size.partitions)} with {size.clients} clients and "
            f"{size.fraction_train:g} of them per round, plain FedAvg-of-LoRA and fedsft's "
            "recommended (default) settings side by side. Targets (recommended): gap to "
            "centralized <= 1 point (IID), 2 (Dirichlet 1.0, 0.5), 3.5 (0.1); no drop of "
            f"more than {MAX_DROP_POINTS:g} points between consecutive rounds after round "
            f"{size.drop_after}; the exported model at least as accurate as the last round's "
            "in every run."),
        "config": {"common run-config": common, "settings": SETTINGS,
                   "partitions": {p: PARTITIONS[p][0] for p in size.partitions},
                   "num-supernodes": size.clients, "client-resources-num-cpus": 1,
                   "centralized": {"overrides": "common + plain, partitioner iid",
                                   "eval-every-steps": size.central_eval_every,
                                   "patience-checks": size.central_patience,
                                   "max-steps": size.central_max_steps}},
        "numbers": numbers,
        "table": {"columns": ["setting", "partition", "exported round", "exported accuracy",
                              "last-round accuracy", "gap to centralized (points)",
                              "rounds to within 1 point", "bytes to within 1 point",
                              f"largest drop after round {size.drop_after} (points)"],
                  "rows": rows},
        "targets": targets,
        "figures": figures,
        "notes": notes,
    }
