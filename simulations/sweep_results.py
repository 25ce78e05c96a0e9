"""Finished sweeps as one RESULTS.md section: every run's central accuracy per round.

``python -m simulations sweep`` compares its runs in its own compare.html; a defaults
decision (issue #12: the label-skew sweep) rests on several sweeps run one after
another, and belongs in the benchmarks' RESULTS.md next to the other measurements,
with the commands that made them. This module reads the sweeps' ``sweep.json`` and
each run's ``results.jsonl`` (nothing is typed in) and writes the section.

Interrupted runs are listed with the rounds they finished (marked), so a sweep that
was stopped is not silently dropped; their best is over the rounds they ran. A run that
the run config's early stopping ended is complete, and marked as early-stopped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.results import read_results
from simulations.benchmarks.at_convergence import largest_drop


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep as the section reports it."""

    name: str
    settings: dict[str, Any]  # the sweep's fixed overrides, then the grid point and seed
    accuracies: dict[int, float]  # round -> central accuracy (0: before training)
    status: str  # outcome.json's status ("completed", ...); "interrupted" without one
    stopped_early: bool  # the run config's early stopping ended it (a complete run)
    exported_round: int | None  # outcome.json's selection
    # The run's config.json (every run-config key as it ran; {} without one): where a
    # key another sweep of the section varies is read, so defaults show as values.
    config: dict[str, Any] = field(default_factory=dict)
    named: tuple[str, ...] = ()  # the keys its sweep sets, varies or seeds

    def value(self, key: str) -> Any:
        return self.config.get(key, self.settings.get(key))

    @property
    def finished(self) -> bool:
        return self.status == "completed"

    @property
    def last(self) -> float:
        return self.accuracies[max(self.accuracies)]

    @property
    def best(self) -> tuple[int, float]:
        """(round, accuracy) of the best training round (round 0 when none ran); the
        earliest of equal ones."""
        rounds = [(r, a) for r, a in self.accuracies.items() if r > 0] or [
            (min(self.accuracies), self.accuracies[min(self.accuracies)])]
        return max(rounds, key=lambda pair: (pair[1], -pair[0]))


def read_sweep(sweep_dir: Path) -> tuple[dict[str, Any], list[SweepRun]]:
    """``sweep_dir``'s sweep.json and the runs that recorded at least one round: those
    it lists, then (sorted) the run folders in ``sweep_dir`` it does not list (a run the
    sweep was stopped in is not in sweep.json, but its rounds were measured).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file when sweep.json is
    missing or unreadable."""
    path = sweep_dir / "sweep.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a sweep record ({error})") from error
    listed = list(record.get("runs", []))
    named = tuple(sorted({*record.get("overrides", {}), *record.get("grid", {}), "seed",
                          *(key for run in listed for key in run.get("overrides", {}))}))
    known = {Path(run["run_dir"]).resolve() for run in listed}
    listed += [{"name": folder.name, "run_dir": str(folder), "overrides": {}}
               for folder in sorted(sweep_dir.iterdir())
               if (folder / "results.jsonl").is_file() and folder.resolve() not in known]
    runs = []
    for run in listed:
        run_dir = Path(run["run_dir"])
        results = run_dir / "results.jsonl"
        if not results.is_file():
            continue  # stopped before its first evaluation: nothing measured
        accuracies = {r.round: float(r.central["accuracy"])
                      for r in read_results(results) if r.central}
        if not accuracies:
            continue
        outcome_path = run_dir / "outcome.json"
        outcome = (json.loads(outcome_path.read_text(encoding="utf-8"))
                   if outcome_path.is_file() else {})
        selection = outcome.get("selection") or {}
        config_path = run_dir / "config.json"
        config = (json.loads(config_path.read_text(encoding="utf-8"))
                  if config_path.is_file() else {})
        runs.append(SweepRun(
            name=run["name"], settings={**record.get("overrides", {}), **run["overrides"]},
            accuracies=accuracies, status=str(outcome.get("status") or "interrupted"),
            stopped_early=bool(outcome.get("stopped_early")),
            exported_round=selection.get("round"), config=config, named=named))
    return record, runs


def section(sweeps: Sequence[tuple[str, dict[str, Any], list[SweepRun]]], *, name: str,
            description: str, machine: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The RESULTS.md section (the benchmarks' result record) of ``sweeps``: one row per
    run with its settings (the keys that vary across all runs), accuracy per round,
    best round, last, largest drop after round 3 and the exported round."""
    runs = [run for _, _, rs in sweeps for run in rs]
    if not runs:
        raise ValueError("no sweep run recorded a round: nothing to report")
    named = sorted({key for run in runs for key in (run.named or run.settings)})
    varying = [key for key in named
               if len({json.dumps(r.value(key), default=str) for r in runs}) > 1]
    rounds = range(min(min(run.accuracies) for run in runs),
                   max(max(run.accuracies) for run in runs) + 1)
    rows = []
    for run in runs:
        best_round, best = run.best
        per_round = [f"{run.accuracies[r]:.3f}" if r in run.accuracies else "-" for r in rounds]
        drop = largest_drop(run.accuracies, after=3)
        mark = " (early-stopped)" if run.stopped_early else (
            "" if run.finished else f" ({run.status})")
        rows.append([*(_value(run.value(key)) for key in varying), *per_round,
                     f"{best:.3f} (round {best_round})", f"{run.last:.3f}{mark}",
                     "-" if drop is None else f"{drop * 100:.1f}",
                     "-" if run.exported_round is None else str(run.exported_round)])
    fixed = {key: runs[0].value(key) for key in named if key not in varying}
    return {
        "name": name, "status": "ok", "mode": "hand-run", "seconds": seconds,
        "command": " ; ".join(command for command, _, _ in sweeps),
        "machine": machine, "description": description,
        "config": {"scenario": sweeps[0][1].get("scenario"), "same in every run": fixed},
        "table": {"columns": [*varying, *(f"round {r}" for r in rounds), "best",
                              "last", "largest drop after round 3 (points)",
                              "exported round"],
                  "rows": rows},
        "targets": [],
        "notes": [
            "Central accuracy on the server's evaluation set after each round (round 0: "
            "before training). A run marked (interrupted) was stopped before its last "
            "round; its best is over the rounds it ran. Largest drop: '-' when the run "
            "ended by round 3.",
            f"{sum(r.finished for r in runs)} of {len(runs)} run(s) finished.",
        ],
    }


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def write_results_section(sweep_dirs: Sequence[Path], commands: Sequence[str], *, name: str,
                          description: str, output: Path) -> Path:
    """Write ``output/results/<name>.json`` from the sweeps and re-render
    ``output/RESULTS.md`` from every result there (as the benchmarks do)."""
    from simulations.benchmarks.__main__ import write_result
    from simulations.benchmarks.harness import machine_info

    if len(commands) != len(sweep_dirs):
        raise ValueError(f"{len(sweep_dirs)} sweep folder(s) but {len(commands)} command(s)")
    sweeps, seconds, last = [], 0.0, 0.0
    for command, folder in zip(commands, sweep_dirs, strict=True):
        record, runs = read_sweep(folder)
        sweeps.append((command, record, runs))
        seconds += float(record.get("seconds", 0.0))
        last = max(last, (folder / "sweep.json").stat().st_mtime)
    machine = {**machine_info(),
               "date": datetime.fromtimestamp(last, UTC).strftime("%Y-%m-%d %H:%M UTC")}
    result = section(sweeps, name=name, description=description, machine=machine,
                     seconds=seconds)
    result["runs_dir"] = ", ".join(str(folder) for folder in sweep_dirs)
    return write_result(output, name, result, machine_info())


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m simulations.sweep_results",
        description="Add finished sweeps (their sweep.json) to the benchmarks' RESULTS.md "
                    "as one section.")
    parser.add_argument("sweep_dir", type=Path, nargs="+")
    parser.add_argument("--command", action="append", required=True,
                        help="each sweep's command line, in the order of the folders")
    parser.add_argument("--name", required=True, help="the section's name")
    parser.add_argument("--description", required=True)
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "benchmarks")
    args = parser.parse_args()
    print(write_results_section(args.sweep_dir, args.command, name=args.name,
                                description=args.description, output=args.output))
