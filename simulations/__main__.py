"""Command line of the simulation harness.

```
python -m simulations run <scenario> [--set key=value ...]
python -m simulations sweep <scenario> --grid key=v1,v2 ... [--seeds 1,2,3]
python -m simulations compare <run dir> <run dir> ... [--output DIR]
python -m simulations report <run dir>
```
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common.config import ConfigError
from simulations.report import ReportError, write_comparison, write_report
from simulations.runner import HarnessError
from simulations.scenarios import (
    ScenarioError,
    available,
    load_scenario,
    parse_set,
    safe_name,
)
from simulations.sweep import parse_grid, parse_seeds, run_scenario, run_sweep

__all__ = ["build_parser", "main", "parse_set"]


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _command_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    overrides = parse_set(args.set)
    nodes = args.num_supernodes or scenario.num_supernodes
    print(f"[fedsft] scenario {scenario.name}: {scenario.description} "
          f"({nodes} virtual clients)", flush=True)
    started = time.monotonic()
    outcome = run_scenario(
        scenario, overrides, output_dir=Path(args.output_dir),
        run_name=f"{scenario.name}-{_stamp()}", num_supernodes=nodes, quiet=args.quiet,
    )
    if outcome.report:
        print(f"[fedsft] report: {outcome.report}")
    if not outcome.ok:
        print(f"[fedsft] {outcome.message}", file=sys.stderr)
        return 1
    lines = (outcome.run_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1])
    metrics = "no central evaluation"
    if last.get("central"):
        metrics = (f"central accuracy {last['central']['accuracy']:.4f}, "
                   f"macro-F1 {last['central']['f1_macro']:.4f}")
    print(f"[fedsft] done in {time.monotonic() - started:.0f} s: round {last['round']} "
          f"{metrics}")
    print(f"[fedsft] outputs: {outcome.run_dir}")
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    grid = parse_grid(args.grid)
    base = parse_set(args.set)
    if args.seeds:
        if "seed" in base:
            raise ConfigError("give seeds either with --seeds or with --set seed=..., not both")
        seeds = parse_seeds(args.seeds)
    else:
        seeds = [int(base.pop("seed", scenario.run_config.get("seed", 42)))]
    if "run-name" in base or "resume-from" in base:
        raise ConfigError("a sweep names its runs itself: drop --set run-name / resume-from")
    name = args.name or f"{scenario.name}-sweep-{_stamp()}"
    sweep_dir = Path(args.output_dir).resolve() / safe_name(name)
    total = len(seeds)
    for values in grid.values():
        total *= len(values)
    print(f"[fedsft] sweep {sweep_dir.name}: {total} run(s) of scenario {scenario.name}",
          flush=True)
    outcomes, compare = run_sweep(
        scenario, grid=grid, seeds=seeds, base_overrides=base, sweep_dir=sweep_dir,
        num_supernodes=args.num_supernodes or None, quiet=args.quiet,
    )
    failed = [o for o in outcomes if not o.ok]
    print(f"[fedsft] sweep finished: {len(outcomes) - len(failed)}/{len(outcomes)} runs ok")
    for outcome in failed:
        print(f"[fedsft] FAILED {outcome.name}: {outcome.message}", file=sys.stderr)
    if compare:
        print(f"[fedsft] comparison: {compare}")
    print(f"[fedsft] outputs: {sweep_dir}")
    return 1 if failed else 0


def _command_compare(args: argparse.Namespace) -> int:
    output = Path(args.output or Path("outputs") / f"compare-{_stamp()}")
    path = write_comparison([Path(d) for d in args.runs], output, title=args.title)
    print(f"[fedsft] comparison: {path}")
    return 0


def _command_report(args: argparse.Namespace) -> int:
    path = write_report(Path(args.run), num_supernodes=args.num_supernodes or None)
    print(f"[fedsft] report: {path}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario name or path to a scenario .toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key (repeatable), "
                        "e.g. --set strategy=fedprox")
    parser.add_argument("--output-dir", default="outputs",
                        help="folder that receives the run (or sweep) folder "
                        "(default: ./outputs)")
    parser.add_argument("--num-supernodes", type=int, default=0,
                        help="override the scenario's number of virtual clients")
    parser.add_argument("--quiet", action="store_true",
                        help="do not stream Flower's log (it is still saved to flwr.log)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m simulations`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Run fedsft federated fine-tuning simulations through Flower, "
        "sweep them, and write reports.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run one scenario",
        description=f"Run a named scenario ({', '.join(available())}) or a scenario "
        "TOML file through `flwr run` on a private local SuperLink, then stop it. "
        "Writes report.html into the run folder.",
    )
    _add_common(run)
    run.set_defaults(handler=_command_run)

    sweep = sub.add_parser(
        "sweep", help="run a grid of settings x seeds of one scenario, then compare",
        description="Run the cartesian product of --grid values and --seeds one after "
        "another (runs named <scenario>-<key>=<value>-...-seed=<s>) in one sweep folder; "
        "a failed run is reported and the sweep goes on. Ends with compare.html.",
    )
    _add_common(sweep)
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a run-config key and its values (repeatable), "
                       "e.g. --grid strategy=fedavg,fedprox")
    sweep.add_argument("--seeds", default="", metavar="S1,S2",
                       help="seeds to repeat every grid point with (default: the "
                       "scenario's seed)")
    sweep.add_argument("--name", default="",
                       help="sweep folder name (default: <scenario>-sweep-<timestamp>)")
    sweep.set_defaults(handler=_command_sweep)

    compare = sub.add_parser(
        "compare", help="overlay finished runs in one report",
        description="Write compare.html (+ PNGs in compare/) overlaying the runs' "
        "accuracy, macro-F1, loss, bytes and round time, with a table of final metrics.",
    )
    compare.add_argument("runs", nargs="+", help="run folders")
    compare.add_argument("--output", default="",
                         help="folder for compare.html (default: outputs/compare-<timestamp>)")
    compare.add_argument("--title", default="", help="title of the comparison")
    compare.set_defaults(handler=_command_compare)

    report = sub.add_parser(
        "report", help="(re)write a run's report.html",
        description="Write report.html and report/*.png for a run folder (harness runs, "
        "plain `flwr run` runs and deployment runs alike).",
    )
    report.add_argument("run", help="run folder (holds results.jsonl and config.json)")
    report.add_argument("--num-supernodes", type=int, default=0,
                        help="number of virtual clients, for the label distribution of "
                        "runs without simulation.json")
    report.set_defaults(handler=_command_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a usage or configuration error)."""
    args = build_parser().parse_args(argv)
    if getattr(args, "num_supernodes", 0) < 0:
        print("error: --num-supernodes must be >= 1", file=sys.stderr)
        return 2
    try:
        return int(args.handler(args))
    except (ConfigError, ScenarioError, HarnessError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
