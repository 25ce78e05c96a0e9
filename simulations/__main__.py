"""Command line of the simulation harness: ``python -m simulations run <scenario>``."""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from simulations.runner import APP_DIR, HarnessError, run_app
from simulations.scenarios import ScenarioError, available, load_scenario


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as TOML (numbers, booleans), else strings."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            overrides[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key.strip()] = value
    return overrides


def _command_run(args: argparse.Namespace) -> int:
    scenario = load_scenario(args.scenario)
    missing = [p for p in scenario.requires if not (APP_DIR / p).exists()]
    if missing:
        raise ScenarioError(
            f"scenario {scenario.name!r} needs {', '.join(missing)} (relative to {APP_DIR}), "
            "which is missing: it uses the shared SST-2 data next to the repository"
        )
    run_config = {**scenario.run_config, **parse_set(args.set)}
    run_config = {k: (str((APP_DIR / v).resolve()) if k in ("dataset", "eval-dataset")
                      and isinstance(v, str) and v.startswith("../") else v)
                  for k, v in run_config.items()}
    run_config["output-dir"] = str(Path(args.output_dir).resolve())
    run_config.setdefault("run-name", f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    RunConfig.from_flower(run_config)  # fail here, not inside the simulation
    nodes = args.num_supernodes or scenario.num_supernodes
    print(f"[fedsft] scenario {scenario.name}: {scenario.description} "
          f"({nodes} virtual clients)", flush=True)
    started = time.monotonic()
    result = run_app(run_config, num_supernodes=nodes, num_cpus=scenario.num_cpus,
                     num_gpus=scenario.num_gpus, quiet=args.quiet)
    results = result.run_dir / "results.jsonl"
    finished = (result.run_dir / "final" / "model" / "config.json").exists()
    if result.returncode != 0 or not finished:
        print(f"[fedsft] simulation failed (exit code {result.returncode}); "
              f"log: {result.log_path}", file=sys.stderr)
        return 1
    last = json.loads(results.read_text(encoding="utf-8").splitlines()[-1])
    print(f"[fedsft] done in {time.monotonic() - started:.0f} s: round {last['round']} "
          f"central accuracy {last['central']['accuracy']:.4f}, "
          f"macro-F1 {last['central']['f1_macro']:.4f}")
    print(f"[fedsft] outputs: {result.run_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Run fedsft federated fine-tuning simulations through Flower.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run one scenario",
        description=f"Run a named scenario ({', '.join(available())}) or a scenario "
        "TOML file through `flwr run` on a private local SuperLink, then stop it.",
    )
    run.add_argument("scenario", help="scenario name or path to a scenario .toml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a run-config key (repeatable), e.g. --set strategy=fedprox")
    run.add_argument("--output-dir", default="outputs",
                     help="folder that receives the run folder (default: ./outputs)")
    run.add_argument("--num-supernodes", type=int, default=0,
                     help="override the scenario's number of virtual clients")
    run.add_argument("--quiet", action="store_true",
                     help="do not stream Flower's log (it is still saved to flwr.log)")
    run.set_defaults(handler=_command_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (ConfigError, ScenarioError, HarnessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
