"""``python -m simulations.benchmarks [--only NAME,...] [--quick | --full] [--output DIR]``.

Runs the benchmarks one after another, each catching its own failure, and writes
``<output>/results/<name>.json`` (raw numbers) and ``<output>/RESULTS.md`` after each
one, so an interrupted suite still leaves what it measured. RESULTS.md is rendered from
every ``results/*.json`` in the output folder, so benchmarks run one at a time with
``--only`` add up to one report; each section names the command and date that measured it.
A benchmark that returns ``figures`` (``[{"file": path, "caption": text}]``) has them
copied next to its JSON (``publish_figures``) and linked at the end of its section.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from simulations.benchmarks.harness import Bench, machine_info
from simulations.benchmarks.tiny_model import write_tiny_bert
from simulations.runner import APP_DIR

BENCHMARKS = {  # name -> module
    "compute-fraction": "simulations.benchmarks.compute_fraction",
    "baseline-app": "simulations.benchmarks.baseline",
    "communication": "simulations.benchmarks.communication",
    "at-convergence": "simulations.benchmarks.at_convergence",
    "scale": "simulations.benchmarks.scale",
    "secure-aggregation": "simulations.benchmarks.secure_aggregation",
    "dp-accuracy": "simulations.benchmarks.dp_accuracy",
    "dp-sgd": "simulations.benchmarks.dp_sgd",
    "robustness": "simulations.benchmarks.robustness",
    "sft": "simulations.benchmarks.sft",
    "imbalance": "simulations.benchmarks.imbalance",
}
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.benchmarks",
        description="Run fedsft's benchmarks and write their measured numbers to RESULTS.md "
                    "(one section per benchmark).")
    parser.add_argument("--only", default="",
                        help=f"comma list of benchmarks ({', '.join(BENCHMARKS)})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="tiny random BERT, built-in data, 2-5 clients (100 for scale), "
                           "2 rounds, fewer settings (checks that it runs, measures nothing "
                           "useful; the smoke test runs it for the benchmarks with machinery "
                           "of their own)")
    size.add_argument("--full", action="store_true",
                      help="the issue's full-size settings (much longer than the default)")
    parser.add_argument("--output", type=Path, default=HERE,
                        help="where RESULTS.md and results/ go (default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="where the run folders go (default: <output>/runs for --output, "
                             "else outputs/benchmarks-<time>)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; "
                     f"choose from {', '.join(BENCHMARKS)}")
    args.names = names
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    return args


def command_line(name: str, mode: str) -> str:
    """The exact command that reruns one benchmark in ``mode``."""
    flag = {"quick": " --quick", "full": " --full", "default": ""}[mode]
    return f"python -m simulations.benchmarks --only {name}{flag}"


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; exit status 1 if any of them failed."""
    args = parse_args(argv)
    output: Path = args.output.resolve()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    # A new folder per invocation: a run never goes into an earlier run's folder.
    runs_dir = args.runs_dir or (
        output / "runs" / stamp if output != HERE else APP_DIR / "outputs" / f"benchmarks-{stamp}"
    )
    (output / "results").mkdir(parents=True, exist_ok=True)
    runs_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    tmp = Path(tempfile.mkdtemp(prefix="fedsft-bench-"))
    try:
        model = str(write_tiny_bert(tmp / "tiny-bert")) if args.mode == "quick" else "minilm"
        bench = Bench(mode=args.mode, model=model, runs_dir=runs_dir,
                      parallel_workers=max(1, os.cpu_count() or 1))
        results: dict[str, dict[str, Any]] = {}
        for name in args.names:
            print(f"[bench] === {name} ({args.mode}) ===", flush=True)
            t0 = time.monotonic()
            result = run_benchmark(name, bench, output)
            result.update(name=name, mode=args.mode, command=command_line(name, args.mode),
                          seconds=time.monotonic() - t0, machine=machine_info(),
                          runs_dir=str(runs_dir))
            results[name] = result
            write_result(output, name, result, machine, pending=args.names[len(results):])
            print(f"[bench] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"[bench] wrote {output / 'RESULTS.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


def write_result(output: Path, name: str, result: dict[str, Any], machine: dict[str, Any],
                 *, pending: Sequence[str] = ()) -> Path:
    """Save ``result`` as ``output/results/<name>.json`` and re-render
    ``output/RESULTS.md`` from every result there (a benchmark's, or a hand-run
    section's: the tune, a sweep); returns RESULTS.md's path."""
    (output / "results").mkdir(parents=True, exist_ok=True)
    (output / "results" / f"{name}.json").write_text(
        json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    results = output / "RESULTS.md"
    results.write_text(render(load_results(output / "results"), machine, pending=list(pending)),
                       encoding="utf-8")
    return results


def run_benchmark(name: str, bench: Bench, output: Path) -> dict[str, Any]:
    """Run benchmark ``name`` and publish its figures (``publish_figures``): its result
    with ``status`` ok, or ``{"status": "failed", "error", "traceback"}`` when either
    raised, so that one benchmark's failure (a figure it did not write included) leaves
    the others to run."""
    try:
        result = importlib.import_module(BENCHMARKS[name]).run(bench)
        if result.get("figures"):
            result["figures"] = publish_figures(result["figures"], output, name)
        result["status"] = "ok"
    except Exception as error:  # each benchmark fails alone; the others still run
        traceback.print_exc()
        result = {"status": "failed", "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc()[-4000:]}
    return result


def publish_figures(
    figures: list[dict[str, str]], output: Path, name: str
) -> list[dict[str, str]]:
    """Copy a benchmark's figures next to its results JSON, ``<output>/results/<name>-<file
    name>``, and return them with ``file`` relative to ``output`` (where RESULTS.md links
    them from). Each figure is ``{"file": path, "caption": text}``, as ``run`` returns it.
    """
    published = []
    for figure in figures:
        source = Path(figure["file"])
        target = output / "results" / f"{name}-{source.name}"
        shutil.copyfile(source, target)
        published.append({**figure, "file": target.relative_to(output).as_posix()})
    return published


# --- RESULTS.md ------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits, big numbers with separators."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(v).replace("|", "\\|") for v in row) + " |"
              for row in rows]
    return lines


def load_results(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every ``<name>.json`` in ``results_dir``, in the suite's order (unknown names last)."""
    found = {p.stem: json.loads(p.read_text(encoding="utf-8"))
             for p in sorted(results_dir.glob("*.json"))}
    order = [n for n in BENCHMARKS if n in found] + [n for n in found if n not in BENCHMARKS]
    return {name: found[name] for name in order}


def render(
    results: dict[str, dict[str, Any]], machine: dict[str, Any], *, pending: list[str],
) -> str:
    """RESULTS.md from the measured results (each section from its own invocation)."""
    lines = [
        "# fedsft benchmark results", "",
        "Written by `python -m simulations.benchmarks` (all benchmarks; "
        "`--only NAME` reruns one and rewrites its section). Every number below was "
        "measured by the command its section names, on the date it gives; nothing is "
        "estimated or typed in.", "",
        "## Machine", "",
        *[f"- {k}: {v}" for k, v in machine.items() if k != "date"],
        "",
        f"Timings come from a {machine.get('cores', '?')}-core machine that other work "
        "may share, so absolute seconds are noisy; each benchmark measures its setups side "
        "by side in the same invocation and reports ratios.", "",
    ]
    default = [r["seconds"] for r in results.values() if r.get("mode") == "default"]
    if default:
        lines += ["The default sizes are scaled down (fewer clients, rounds and local steps "
                  "than the issue's full-size settings) to fit a 2-core machine: the "
                  f"{len(default)} default-size section(s) below took "
                  f"{sum(default) / 60:.0f} minutes in all. `--full` runs the full-size "
                  "settings. Each benchmark's configuration is listed in its section.", ""]
    if pending:
        lines += [f"Not yet run (suite still running or interrupted): {', '.join(pending)}.",
                  ""]
    lines += ["## Summary", "", "| benchmark | mode | measured on | status | targets met |",
              "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        met = "-" if r["status"] != "ok" or not r["targets"] else (
            f"{sum(t['met'] for t in r['targets'])} of {len(r['targets'])}")
        lines.append(f"| [{name}](#{name}) | {r['mode']} | {r['machine']['date']} | "
                     f"{r['status']} | {met} |")
    lines.append("")
    for name, r in results.items():
        lines += [f"## {name}", "",
                  f"Command: `{r['command']}` ({r['seconds']:.0f} s, {r['machine']['date']}, "
                  f"run folders under `{r.get('runs_dir', '?')}`)", ""]
        if r["status"] != "ok":
            lines += [f"**FAILED**: {r['error']}", "", "```", r["traceback"].strip(), "```", ""]
            continue
        lines += [r["description"], "", "Configuration:", "", "```json",
                  json.dumps(r["config"], indent=1, default=str), "```", "",
                  "Measured:", "", *_table(r["table"]["columns"], r["table"]["rows"]), ""]
        if r["targets"]:
            trows = [[t["what"], f"{'<=' if t['kind'] == 'max' else '>='} {fmt(t['limit'])} "
                      f"{t['unit']}", f"{fmt(t['measured'])} {t['unit']}",
                      fmt(t["ratio_to_target"]), "met" if t["met"] else "NOT met"]
                     for t in r["targets"]]
            lines += ["Targets:", "",
                      *_table(["what", "target", "measured", "measured / target", "result"],
                              trows), ""]
            missed = [t for t in r["targets"] if not t["met"]]
            lines.append(f"{len(r['targets']) - len(missed)} of {len(r['targets'])} targets "
                         "met." + (" Not met: " + "; ".join(
                             f"{t['what']} (measured {fmt(t['measured'])} {t['unit']}, "
                             f"target {'<=' if t['kind'] == 'max' else '>='} "
                             f"{fmt(t['limit'])} {t['unit']})" for t in missed) + "."
                                   if missed else ""))
        lines += ["", *[f"Note: {n}" for n in r.get("notes", [])], ""]
        lines += [line for f in r.get("figures", []) for line in
                  (f"![{f['caption']}]({f['file']})", "")]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
