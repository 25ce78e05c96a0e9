"""tune.html: the trials of a hyperparameter search side by side, from its tune.json.

Three figures (PNGs in ``tune/``, embedded in the page): the objective per trial with
the best so far, each trial's validation metric per round (pruned trials end early),
and the objective against each searched key. The best trial's final test set numbers
are shown apart from the search's validation numbers: the search never read them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common.tasks import TASK_METRICS, metric_info
from server.results import read_results
from simulations import plots
from simulations.report import _esc, _figure_html, _page, _table
from simulations.tune import defaults_sentence

REPORT_FILE = "tune.html"
FIGURE_DIR = "tune"
_MARKERS = {"complete": "o", "pruned": "x"}


def metric_label(task: str, metric: str) -> str:
    """How reports name ``metric`` of ``task`` (``accuracy``, ``macro-F1``)."""
    try:
        return metric_info(task, metric).label
    except (KeyError, ValueError):
        return metric


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return "-" if value is None else str(value)


def plot_objective(path: Path, trials: Sequence[Mapping[str, Any]], *, direction: str,
                   label: str, title: str) -> Path:
    """Each trial's objective (complete: its value; pruned: its last round's value,
    marked x), and the best complete value so far as a step line."""
    fig = plots._figure()
    ax = fig.add_subplot()
    for state, marker in _MARKERS.items():
        points = [(t["number"], t["value"] if state == "complete" else t["values"][-1][1])
                  for t in trials if t["state"] == state and (
                      t["value"] is not None if state == "complete" else t["values"])]
        if points:
            ax.plot(*zip(*points, strict=True), linestyle="none", marker=marker,
                    label=f"{state} trials")
    best: list[tuple[int, float]] = []
    for t in trials:
        if t["state"] != "complete" or t["value"] is None:
            continue
        if not best or (t["value"] > best[-1][1] if direction == "maximize"
                        else t["value"] < best[-1][1]):
            best.append((t["number"], t["value"]))
        else:
            best.append((t["number"], best[-1][1]))
    if best:
        ax.step(*zip(*best, strict=True), where="post", color="0.3", label="best so far")
    if not ax.lines:
        plots._empty_note(ax, "no trial measured the metric")
    ax.set_xlabel("trial")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if trials:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(loc="best")
    return plots._save(fig, path)


def plot_params(path: Path, trials: Sequence[Mapping[str, Any]],
                space: Mapping[str, Mapping[str, Any]], *, label: str) -> Path:
    """The objective of the complete trials against each searched key (one panel each);
    categorical keys on evenly spaced positions."""
    keys = list(space)
    fig = plots._figure((plots._SIZE[0], 3.2 * max(1, math.ceil(len(keys) / 2))))
    done = [t for t in trials if t["state"] == "complete" and t["value"] is not None]
    for i, key in enumerate(keys, start=1):
        ax = fig.add_subplot(math.ceil(len(keys) / 2), min(2, len(keys)), i)
        dim = space[key]
        values = [t["value"] for t in done]
        if dim["kind"] == "categorical":
            choices = [str(c) for c in dim["choices"]]
            xs: list[float] = [choices.index(str(t["params"][key])) for t in done]
            ax.set_xticks(range(len(choices)), choices)
        else:
            xs = [t["params"][key] for t in done]
            if dim.get("log"):
                ax.set_xscale("log")
        if done:
            ax.plot(xs, values, linestyle="none", marker="o")
        else:
            plots._empty_note(ax, "no complete trial")
        ax.set_xlabel(key)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    return plots._save(fig, path)


def write_tune_report(tune_dir: Path, record: Mapping[str, Any]) -> Path:
    """Write tune.html (+ PNGs in tune/) for the search that ``record`` (tune.json)
    describes; returns the page's path."""
    out = tune_dir / FIGURE_DIR
    trials = record["trials"]
    label = f"validation {metric_label(record['task'], record['metric'])}"
    title = f"tune of {record['scenario']} ({tune_dir.name})"
    objective = plot_objective(out / "objective.png", trials,
                               direction=record["direction"], label=label,
                               title=f"{label} per trial ({record['direction']})")
    series = {f"trial {t['number']} ({t['state']})": ([v[0] for v in t["values"]],
                                                      [v[1] for v in t["values"]])
              for t in trials if t["values"]}
    curves = plots.plot_overlay(out / "curves.png", series=series, xlabel="round",
                                ylabel=label, title=f"{label} per round, per trial")
    params = plot_params(out / "params.png", trials, record["space"], label=label)
    counts = record["counts"]
    body = [f"<h1>{_esc(title)}</h1>",
            f"<p class='meta'>status {_esc(record['status'])}; "
            f"{len(trials)}/{record['trials_requested']} trial(s): "
            + ", ".join(f"{n} {s}" for s, n in counts.items())
            + f"; objective: {record['direction']} {_esc(label)} (the validation split "
            "held out of the training data); sampler TPE (seed "
            f"{record['sampler']['seed']}), pruner {_esc(record['pruner'])}; "
            f"{record['seconds']:.0f} s</p>"]
    trial0 = defaults_sentence(record.get("defaults"), note=record.get("defaults_note", ""),
                               label=label)
    body.append(f"<p>{_esc(trial0)}.</p>")
    best = record["best"]
    if best is None:
        body.append("<p class='note'>No trial completed: there is no best setting.</p>")
    else:
        settings = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items())
        tests = ", ".join(f"{_esc(metric_label(record['task'], k))} {v:.4f}"
                          for k, v in best["test"].items()) or "none measured"
        body += ["<h2>Best trial</h2>",
                 f"<p>trial {best['number']}: {_esc(settings)}; {_esc(label)} "
                 f"{best['value']:.4f} at round {best['selected_round']}. "
                 "Its settings are in <a href='best.toml'>best.toml</a>.</p>",
                 f"<p>Final test set (central eval, not used by the search): {tests}.</p>"]
    keys = list(record["space"])
    rows = []
    for t in trials:
        own = " (the scenario's settings)" if (
            t["number"] == 0 and record.get("defaults") is not None) else ""
        name = _esc(f"trial {t['number']}{own}")
        if t["run_dir"]:
            report = Path(t["run_dir"]) / "report.html"
            if report.is_file():
                href = Path(os.path.relpath(report, tune_dir)).as_posix()
                name = f"<a href='{_esc(href)}'>{name}</a>"
        last = t["values"][-1][0] if t["values"] else "-"
        rows.append([name, t["state"], *(_fmt(t["params"][k]) for k in keys),
                     _fmt(t["value"]), str(last), t["message"] or ""])
    body += ["<h2>Trials</h2>",
             _table(["trial", "state", *keys, label, "last round", "note"], rows,
                    raw_first=True),
             _figure_html(f"{label} per trial", objective),
             _figure_html(f"{label} per round, per trial", curves),
             _figure_html(f"{label} against each searched key", params)]
    path = tune_dir / REPORT_FILE
    path.write_text(_page(title, body), encoding="utf-8")
    return path


# --- a tune as a section of the benchmarks' RESULTS.md -----------------------------------


SPLIT_NAMES = {"validation": "validation split", "central": "test set (central eval)"}


def split_rows(run_dirs: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """The rows each evaluation split had (``num_examples`` of results.jsonl's
    ``validation`` and ``central``), over every round of the runs in ``run_dirs``: split
    -> its distinct sizes, sorted (one, unless the runs differ); a split no row
    measured is left out.

    Raises ``ResultsError`` (server/results.py) for a results.jsonl that is not one.
    """
    sizes: dict[str, set[int]] = {}
    for run_dir in run_dirs:
        for row in read_results(Path(run_dir) / "results.jsonl"):
            for split in SPLIT_NAMES:
                block = row.metrics(split)
                if block and block.get("num_examples"):
                    sizes.setdefault(split, set()).add(int(block["num_examples"]))
    return {split: tuple(sorted(sizes[split])) for split in SPLIT_NAMES if split in sizes}


def split_rows_note(sizes: Mapping[str, Sequence[int]], *, label: str) -> str:
    """The sentence on the splits' sizes: how much one row moves a per-row share such
    as ``label`` (accuracy), so a reader sees what a difference in the table resolves."""
    parts = []
    for split, counts in sizes.items():
        rows = " or ".join(str(n) for n in counts)
        step = " or ".join(f"{100 / n:.2f}" for n in counts)
        parts.append(f"{SPLIT_NAMES[split]} {rows} rows (one row = {step} points of "
                     f"{label})")
    return f"Split sizes, from the trials' results.jsonl: {'; '.join(parts)}."


def results_section(record: Mapping[str, Any], *, command: str, machine: Mapping[str, Any],
                    sizes: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
    """A search (its tune.json) in the benchmark result format that
    ``simulations.benchmarks`` renders into RESULTS.md: one row per trial, trial 0
    (the scenario's settings) and the best marked, their objective and final test
    numbers side by side. ``command`` is the tune's command line, ``machine`` the
    benchmark machine record (its ``date`` says when the search finished); ``sizes``
    (:func:`split_rows` of the trials' runs), when given, adds a note on the splits'
    sizes."""
    label = f"validation {metric_label(record['task'], record['metric'])}"
    # The test column is the task's headline metric (accuracy, exact match), whatever
    # the search compared on.
    headline = TASK_METRICS[record["task"]][0]
    keys = list(record["space"])
    defaults = record.get("defaults")
    best = record.get("best")
    rows = []
    for t in record["trials"]:
        role = []
        if defaults is not None and t["number"] == 0:
            role.append("the scenario's settings")
        if best is not None and t["number"] == best["number"]:
            role.append("best")
        test = t["test"].get(headline.name)
        rows.append([t["number"], ", ".join(role) or "-", *(t["params"][k] for k in keys),
                     t["state"], "-" if t["value"] is None else t["value"],
                     "-" if t["selected_round"] is None else t["selected_round"],
                     "-" if test is None else test])
    sentence = defaults_sentence(defaults, note=record.get("defaults_note", ""), label=label)
    notes = [sentence + "."]
    if defaults is not None and best is not None and defaults.get("test") and best["test"]:
        first, top = defaults["test"].get(headline.name), best["test"].get(headline.name)
        if first is not None and top is not None:
            notes.append(f"Final test set (central eval, never read by the search) "
                         f"{headline.label} "
                         f"of the exported model: trial 0 {first:.4f}, best trial "
                         f"{best['number']} {top:.4f} ({(top - first) * 100:+.2f} points).")
    notes.append(f"{len(record['trials'])} of {record['trials_requested']} trial(s) ran "
                 f"({', '.join(f'{n} {s}' for s, n in record['counts'].items())}); sampler "
                 f"TPE (seed {record['sampler']['seed']}), pruner {record['pruner']}; "
                 f"status {record['status']}.")
    if sizes:
        notes.append(split_rows_note(sizes, label=headline.label))
    return {
        "status": "ok", "mode": "hand-run", "command": command,
        "seconds": float(record["seconds"]), "machine": dict(machine),
        "description": (
            f"`python -m simulations tune` on scenario `{record['scenario']}`: each trial "
            f"is one federated run, compared on the {label} (a split held out of the "
            "training rows); trial 0 is the scenario's own settings, so the table says "
            f"whether the search beat them. Test {headline.label} is the final test set "
            "(central eval) of the round each run exports."),
        "config": {"scenario_file": record["scenario_file"], "overrides": record["overrides"],
                   "space": record["space"], "num_supernodes": record["num_supernodes"]},
        "table": {"columns": ["trial", "role", *keys, "state", label, "exported round",
                              f"test {headline.label}"], "rows": rows},
        "targets": [],
        "notes": notes,
    }


def write_results_section(tune_dir: Path, *, command: str, output: Path) -> Path:
    """Add ``tune_dir``'s search to ``output``/RESULTS.md as the ``tune`` section:
    writes ``output/results/tune.json`` and re-renders RESULTS.md from every result
    there (as ``python -m simulations.benchmarks`` does, which keeps the section)."""
    import json
    from datetime import UTC, datetime

    from simulations.benchmarks.__main__ import write_result
    from simulations.benchmarks.harness import machine_info

    source = tune_dir / "tune.json"
    record = json.loads(source.read_text(encoding="utf-8"))
    machine = machine_info()
    finished = datetime.fromtimestamp(source.stat().st_mtime, UTC)
    run_dirs = [Path(t["run_dir"]) for t in record["trials"] if t["run_dir"]]
    section = results_section(record, command=command, machine={
        **machine, "date": finished.strftime("%Y-%m-%d %H:%M UTC")},
        sizes=split_rows(run_dirs))
    section.update(name="tune", runs_dir=str(tune_dir))
    return write_result(output, "tune", section, machine)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m simulations.tune_report",
        description="Add a finished search (its tune.json) to the benchmarks' RESULTS.md "
                    "as the `tune` section.")
    parser.add_argument("tune_dir", type=Path)
    parser.add_argument("--command", required=True, help="the tune's command line")
    parser.add_argument("--output", type=Path,
                        default=Path(__file__).resolve().parent / "benchmarks",
                        help="the benchmarks folder whose results/tune.json and "
                             "RESULTS.md are written (default: this checkout's "
                             "simulations/benchmarks)")
    args = parser.parse_args()
    print(write_results_section(args.tune_dir, command=args.command, output=args.output))
