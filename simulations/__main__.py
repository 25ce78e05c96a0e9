"""Command line of the simulation harness.

```
python -m simulations run <scenario> [--set key=value ...]
python -m simulations sweep <scenario> --grid key=v1,v2 ... [--seeds 1,2,3]
python -m simulations tune <scenario> --space key=lo:hi[:log] --space key=a,b --trials N
python -m simulations compare <run dir> <run dir> ... [--output DIR]
python -m simulations report <run dir>
```

Exit status: 0 the run did what was asked, 1 it failed (or an unexpected error), 2 a
usage, configuration or data error found before anything started, 130 interrupted.
The heavy modules (Flower's runner, data loading, reports) are imported by the
command handlers, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from simulations.scenarios import available, load_scenario, parse_set, safe_name

__all__ = ["build_parser", "main", "parse_set"]

# The project's error types, by module: a user error prints one paragraph, no
# traceback. Looked up in sys.modules, so checking an error imports nothing.
_USER_ERRORS = {
    "common.config": ("ConfigError",),
    "common.data": ("DataError",),
    "common.encoding": ("EncodingError",),
    "simulations.scenarios": ("ScenarioError",),
    "simulations.runner": ("HarnessError",),
    "simulations.report": ("ReportError",),
    "simulations.benchmarks.harness": ("BenchmarkError",),
}


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _is_user_error(error: BaseException) -> bool:
    for module, names in _USER_ERRORS.items():
        loaded = sys.modules.get(module)
        for name in names:
            cls = getattr(loaded, name, None)
            if isinstance(cls, type) and isinstance(error, cls):
                return True
    return False


def _config_error(message: str) -> Exception:
    from common.config import ConfigError

    return ConfigError(message)


def _output_dir(args: argparse.Namespace, overrides: dict[str, Any],
                scenario_config: dict[str, Any]) -> Path:
    """The folder that receives the run: ``--output-dir``, else ``--set output-dir``,
    else the scenario's ``output-dir``, else ./outputs; the two flags must agree."""
    from_set = overrides.pop("output-dir", None)
    if args.output_dir is not None:
        if from_set is not None and Path(str(from_set)).resolve() != Path(
                args.output_dir).resolve():
            raise _config_error(
                f"--output-dir {args.output_dir} and --set output-dir={from_set} disagree; "
                "give the folder once, with --output-dir"
            )
        return Path(args.output_dir)
    chosen = from_set if from_set is not None else scenario_config.get("output-dir")
    return Path(str(chosen or "outputs"))


def _command_run(args: argparse.Namespace) -> int:
    from common.tasks import DEFAULT_TASK, TASK_METRICS
    from server.results import read_results
    from simulations.sweep import run_scenario

    scenario = load_scenario(args.scenario)
    overrides = parse_set(args.set)
    output_dir = _output_dir(args, overrides, scenario.run_config)
    run_name = str(overrides.get("run-name") or scenario.run_config.get("run-name")
                   or f"{scenario.name}-{_stamp()}")
    nodes = args.num_supernodes or scenario.num_supernodes
    how = (f"resuming {overrides['resume-from']}" if overrides.get("resume-from")
           else f"{nodes} virtual clients")
    print(f"[fedsft] scenario {scenario.name}: {scenario.description} ({how})", flush=True)
    started = time.monotonic()
    outcome = run_scenario(
        scenario, overrides, output_dir=output_dir, run_name=run_name,
        num_supernodes=args.num_supernodes, quiet=args.quiet,
    )
    if outcome.report:
        print(f"[fedsft] report: {outcome.report}")
    if not outcome.ok:
        print(f"[fedsft] outputs: {outcome.run_dir}")
        print(f"[fedsft] run failed: {outcome.message}", file=sys.stderr)
        return 1
    rows = read_results(outcome.run_dir / "results.jsonl")
    selection = (outcome.outcome or {}).get("selection") or {}
    exported = next((r for r in rows if r.round == selection.get("round")), rows[-1])
    metrics = "no central evaluation"
    if exported.central:
        # The first two of the task's metrics the round measured ("central accuracy
        # 0.8833, macro-F1 0.8835"; sft without generation: loss and perplexity).
        config = json.loads((outcome.run_dir / "config.json").read_text(encoding="utf-8"))
        shown = [m for m in TASK_METRICS[config.get("task") or DEFAULT_TASK]
                 if m.name in exported.central][:2]
        metrics = "central " + ", ".join(f"{m.label} {exported.central[m.name]:.4f}"
                                         for m in shown)
    stopped = (outcome.outcome or {}).get("stopped_early")
    which = f"round {exported.round}"
    if exported is not rows[-1]:
        which = f"final model = round {exported.round} of {rows[-1].round}"
    print(f"[fedsft] outputs: {outcome.run_dir}")
    print(f"[fedsft] done in {time.monotonic() - started:.0f} s: {which} "
          f"{metrics}" + (f" (stopped early: {stopped})" if stopped else ""))
    return 0


def _command_sweep(args: argparse.Namespace) -> int:
    from simulations.sweep import parse_grid, parse_seeds, run_sweep

    scenario = load_scenario(args.scenario)
    grid = parse_grid(args.grid)
    base = parse_set(args.set)
    output_dir = _output_dir(args, base, scenario.run_config)
    if args.seeds:
        if "seed" in base:
            raise _config_error("give seeds either with --seeds or with --set seed=..., "
                                "not both")
        seeds = parse_seeds(args.seeds)
    else:
        seeds = [int(base.pop("seed", scenario.run_config.get("seed", 42)))]
    if "run-name" in base or "resume-from" in base:
        raise _config_error("a sweep names its runs itself: drop --set run-name / "
                            "resume-from")
    name = args.name or f"{scenario.name}-sweep-{_stamp()}"
    sweep_dir = output_dir.resolve() / safe_name(name)
    total = len(seeds)
    for values in grid.values():
        total *= len(values)
    print(f"[fedsft] sweep {sweep_dir.name}: {total} run(s) of scenario {scenario.name}",
          flush=True)
    outcomes, compare = run_sweep(
        scenario, grid=grid, seeds=seeds, base_overrides=base, sweep_dir=sweep_dir,
        num_supernodes=args.num_supernodes, quiet=args.quiet,
    )
    failed = [o for o in outcomes if not o.ok]
    if compare:
        print(f"[fedsft] comparison: {compare}")
    print(f"[fedsft] outputs: {sweep_dir}")
    for outcome in failed:
        print(f"[fedsft] FAILED {outcome.name}: {outcome.message}", file=sys.stderr)
    summary = f"[fedsft] sweep finished: {len(outcomes) - len(failed)}/{len(outcomes)} runs ok"
    print(summary, file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _command_tune(args: argparse.Namespace) -> int:
    from simulations.tune import parse_space, tune_scenario

    scenario = load_scenario(args.scenario)
    space = parse_space(args.space)  # the grammar first: a bad --space fails at once
    base = parse_set(args.set)
    output_dir = _output_dir(args, base, scenario.run_config)
    if args.trials < 1:
        raise _config_error(f"--trials must be >= 1, got {args.trials}")
    name = args.name or f"{scenario.name}-tune-{_stamp()}"
    tune_dir = output_dir.resolve() / safe_name(name)
    records, written, plan = tune_scenario(
        scenario, space, base, trials=args.trials, tune_dir=tune_dir, metric=args.metric,
        seed=args.seed, pruner=args.pruner, num_supernodes=args.num_supernodes,
        quiet=args.quiet,
    )
    for what in ("report", "best", "tune"):
        if what in written:
            print(f"[fedsft] {what}: {written[what]}")
    counts = {s: sum(r.state == s for r in records) for s in ("complete", "pruned", "failed")}
    summary = (f"[fedsft] tune finished: {counts['complete']} complete, {counts['pruned']} "
               f"pruned, {counts['failed']} failed of {len(records)} trial(s)")
    if "best" not in written:
        print(summary + "; no trial completed, so there is no best setting", file=sys.stderr)
        return 1
    print(summary)
    return 0


def _command_compare(args: argparse.Namespace) -> int:
    from simulations.report import write_comparison

    output = Path(args.output or Path("outputs") / f"compare-{_stamp()}")
    path = write_comparison([Path(d) for d in args.runs], output, title=args.title)
    print(f"[fedsft] comparison: {path}")
    return 0


def _command_report(args: argparse.Namespace) -> int:
    from simulations.report import write_report

    path = write_report(Path(args.run), num_supernodes=args.num_supernodes)
    print(f"[fedsft] report: {path}")
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", help="scenario name or path to a scenario .toml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a run-config key (repeatable), "
                        "e.g. --set strategy=fedprox")
    parser.add_argument("--output-dir", default=None,
                        help="folder that receives the run (or sweep) folder (default: "
                        "--set output-dir, else the scenario's, else ./outputs)")
    parser.add_argument("--num-supernodes", type=int, default=None,
                        help="override the scenario's number of virtual clients (a "
                        "resumed run keeps the number it ran with)")
    parser.add_argument("--quiet", action="store_true",
                        help="do not stream Flower's log (it is still saved to flwr.log)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m simulations`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Run fedsft federated fine-tuning simulations through Flower, "
        "sweep them, and write reports.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error, not only its message")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run one scenario",
        description=f"Run a named scenario ({', '.join(available())}) or a scenario "
        "TOML file through `flwr run` on a private local SuperLink, then stop it. "
        "Writes report.html into the run folder. Exit status 0 only if the run "
        "completed and wrote its final model.",
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

    tune = sub.add_parser(
        "tune", help="search hyperparameters with Optuna, one run per trial",
        description="Search the --space keys of a scenario with Optuna (TPE sampler): each "
        "trial is one run of the scenario (<tune folder>/trial-NNN), compared on the "
        "validation split (validation-fraction is set to 0.1 when the scenario holds out "
        "none), so the central eval split stays the final test set; bad trials are "
        "pruned after a round whose validation metric falls behind (--pruner). Writes "
        "tune.json (every trial), tune.html (plots) and best.toml (a scenario with the "
        "best settings: `python -m simulations run best.toml`). Exit status 0 when at "
        "least one trial completed, 1 when none did.",
    )
    _add_common(tune)
    tune.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                      help="a run-config key to search (repeatable): key=lo:hi (uniform; "
                      "integers for an integer key), key=lo:hi:log (log-uniform) or "
                      "key=a,b,c (choices), e.g. --space learning-rate=1e-4:1e-2:log "
                      "--space local-steps=5,10,20")
    tune.add_argument("--trials", type=int, required=True, help="number of trials (runs)")
    tune.add_argument("--metric", default="auto",
                      help="the validation metric to optimise: auto (the scenario's "
                      "selection-metric; classification: accuracy, sft: loss) or a metric "
                      "of the task (f1_macro, loss, ...); its direction is the metric's")
    tune.add_argument("--seed", type=int, default=0,
                      help="seed of the sampler (the runs keep the scenario's `seed`)")
    tune.add_argument("--pruner", default="median",
                      choices=("median", "hyperband", "successive-halving", "none"),
                      help="how bad trials are stopped early: median (default; after 2 "
                      "finished trials, a trial worse than their median at a round), "
                      "hyperband, successive-halving, or none")
    tune.add_argument("--name", default="",
                      help="tune folder name (default: <scenario>-tune-<timestamp>)")
    tune.set_defaults(handler=_command_tune)

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
    report.add_argument("--num-supernodes", type=int, default=None,
                        help="number of virtual clients, for the label distribution of "
                        "runs without simulation.json")
    report.set_defaults(handler=_command_report)
    return parser


def _interrupted_message(error: KeyboardInterrupt) -> str:
    run_dir = getattr(error, "run_dir", None)
    if run_dir is None:
        return "interrupted"
    from server.run_outputs import resumable_round

    done = resumable_round(Path(run_dir))
    if done is not None:
        return (f"interrupted; stopped the simulation after round {done}; resume with "
                f"--set resume-from={run_dir}")
    return (f"interrupted; stopped the simulation before its first round was saved; "
            f"nothing to resume in {run_dir}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status.

    0: done as asked; 1: the run failed, or an unexpected error; 2: a usage,
    configuration or data error (one paragraph, no traceback unless ``--debug``);
    130: interrupted by Ctrl-C or SIGTERM (the simulation is stopped first).
    """
    args = build_parser().parse_args(argv)
    nodes = getattr(args, "num_supernodes", None)
    if nodes is not None and nodes < 1:
        print(f"error: --num-supernodes must be >= 1, got {nodes}", file=sys.stderr)
        return 2
    from simulations.runner import sigterm_interrupts

    try:
        with sigterm_interrupts():
            return int(args.handler(args))
    except KeyboardInterrupt as error:
        if args.debug:
            traceback.print_exc()
        print(f"[fedsft] {_interrupted_message(error)}", file=sys.stderr)
        return 130
    except Exception as error:
        if args.debug:
            traceback.print_exc()
        if _is_user_error(error):
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        if not args.debug:
            print("run with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
