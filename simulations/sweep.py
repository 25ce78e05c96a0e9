"""Run scenarios: one run (``run_scenario``) or a grid of them (``run_sweep``).

A run is checked before Flower starts (``server.preflight``), writes
``simulation.json`` (how it was simulated) into its folder and ``report.html`` after
it ends. It is ``ok`` only if it did what was asked: ``flwr run`` exited with 0, the
ServerApp wrote ``outcome.json`` with status ``completed`` during this attempt and the
final model exists (``flwr run --stream`` exits with 0 even when the ServerApp
crashed). A sweep runs the cartesian product of a grid of run-config values and seeds
one run after another, goes on when a run fails, records every run's outcome in
``sweep.json`` and ends with a comparison report.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig
from server.preflight import preflight
from server.run_outputs import atomic_write_bytes
from server.run_verdict import attempt_outcome, has_final_model, outcome_stamp, run_verdict
from simulations.report import (
    SIMULATION_FILE,
    ReportError,
    write_comparison,
    write_report,
    write_simulation_file,
)
from simulations.runner import (
    ATTEMPT_PREFIX,
    QUEUED_RUN_WAIT_SECONDS,
    HarnessError,
    SimulationResult,
    run_app,
)
from simulations.scenarios import (
    Scenario,
    check_requires,
    parse_value,
    resolve_run_config,
    safe_name,
)

RunFn = Callable[..., SimulationResult]
_LOG_TAIL = 1 << 20  # bytes of the log searched for the last exception


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C, SIGTERM); its simulation has been stopped."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(f"interrupted run {run_dir}")
        self.run_dir = run_dir


@dataclass(frozen=True)
class RunOutcome:
    """How one run of a scenario ended."""

    name: str
    run_dir: Path
    ok: bool
    returncode: int
    message: str = ""
    report: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    outcome: dict[str, Any] | None = None  # the server's outcome.json of this attempt


def _attempt_log(log_path: Path) -> str:
    """The tail of the log written by the last attempt (after its header line)."""
    try:
        with log_path.open("rb") as log:
            log.seek(max(log_path.stat().st_size - _LOG_TAIL, 0))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    start = text.rfind(ATTEMPT_PREFIX)
    return text[start:] if start >= 0 else text


def _recorded_supernodes(run_dir: Path) -> int | None:
    """The number of virtual clients a run folder's simulation.json records."""
    try:
        recorded = json.loads((run_dir / SIMULATION_FILE).read_text(encoding="utf-8"))
        nodes = recorded["num-supernodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return nodes if isinstance(nodes, int) and not isinstance(nodes, bool) else None


def _supernodes(scenario: Scenario, num_supernodes: int | None, resume_dir: Path | None
                ) -> int:
    """The number of virtual clients: a resumed run keeps the one it ran with."""
    if num_supernodes is not None and num_supernodes < 1:
        raise ConfigError(f"--num-supernodes must be >= 1, got {num_supernodes}")
    recorded = None if resume_dir is None else _recorded_supernodes(resume_dir)
    if recorded is not None:
        if num_supernodes is not None and num_supernodes != recorded:
            raise ConfigError(
                f"cannot resume {resume_dir} with {num_supernodes} virtual clients: it ran "
                f"with {recorded} (its {SIMULATION_FILE}); the data would be partitioned "
                "differently. Drop --num-supernodes or pass the same number."
            )
        return recorded
    # (A folder that is no run at all gets the preflight's clearer message.)
    if resume_dir is not None and num_supernodes is None and (
            resume_dir / "config.json").is_file():
        raise ConfigError(
            f"cannot tell how many virtual clients {resume_dir} ran with: it has no "
            f"readable {SIMULATION_FILE} (it was not run by this harness). Pass "
            "--num-supernodes with that number: another one partitions the data differently."
        )
    return num_supernodes or scenario.num_supernodes


def run_scenario(
    scenario: Scenario,
    overrides: Mapping[str, Any],
    *,
    output_dir: Path,
    run_name: str,
    num_supernodes: int | None = None,
    quiet: bool = False,
    timeout: float | None = None,
    run_fn: RunFn = run_app,
    port_wait: float = 900.0,
) -> RunOutcome:
    """Run ``scenario`` once with ``overrides``; write simulation.json and the report.

    ``port_wait``: how long to wait for the machine while other simulations hold it.

    Configuration errors raise (``ConfigError``, ``ScenarioError``, ``DataError``)
    before anything is written or started; a simulation that fails or does not finish
    gives ``ok=False`` (its partial results still get a report). A resumed run keeps
    its number of virtual clients and its simulation.json. An interrupt stops the
    simulation and raises :class:`Interrupted`.
    """
    check_requires(scenario)
    run_config = resolve_run_config(scenario, overrides, output_dir=output_dir,
                                    run_name=run_name)
    cfg = RunConfig.from_flower(run_config)
    resume_dir = Path(cfg.resume_from).expanduser().resolve() if cfg.resume_from else None
    run_dir = resume_dir or Path(cfg.output_dir) / cfg.run_name
    nodes = _supernodes(scenario, num_supernodes, resume_dir)
    for note in preflight(cfg, num_partitions=nodes):
        print(f"[fedsft] preflight: {note}", flush=True)
    if resume_dir is None or not (run_dir / SIMULATION_FILE).exists():
        write_simulation_file(
            run_dir, scenario=scenario.name, num_supernodes=nodes,
            num_cpus=scenario.num_cpus, num_gpus=scenario.num_gpus,
            overrides=dict(overrides), scenario_file=str(scenario.path or ""),
        )
    before = outcome_stamp(run_dir)
    outcome = None
    try:
        result = run_fn(run_config, num_supernodes=nodes, num_cpus=scenario.num_cpus,
                        num_gpus=scenario.num_gpus, quiet=quiet, timeout=timeout,
                        port_wait=port_wait)
        returncode = result.returncode
        outcome = attempt_outcome(run_dir, stamp_before=before)
        ok, message = run_verdict(
            returncode=returncode, outcome=outcome, final_model=has_final_model(run_dir),
            log_text=_attempt_log(result.log_path), log_path=result.log_path,
        )
    except HarnessError as error:
        returncode, ok, message = -1, False, str(error)
    except KeyboardInterrupt:
        raise Interrupted(run_dir) from None
    report = None
    if (run_dir / "results.jsonl").is_file():
        try:
            report = write_report(run_dir, num_supernodes=nodes)
        except (ReportError, OSError, ValueError) as error:
            message = (message + "; " if message else "") + f"report failed: {error}"
            print(f"[fedsft] could not write the report: {error}", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
    return RunOutcome(name=run_dir.name, run_dir=run_dir, ok=ok, returncode=returncode,
                      message=message, report=report, overrides=dict(overrides),
                      outcome=outcome)


# --- sweeps ----------------------------------------------------------------------------


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``key=v1,v2`` items (``--grid``) as ``{key: [v1, v2]}``, values read like ``--set``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key in grid:
            raise ConfigError(f"--grid names {key!r} twice")
        if key in ("seed", "run-name", "output-dir", "resume-from"):
            hint = " (use --seeds)" if key == "seed" else ""
            raise ConfigError(f"--grid cannot vary {key!r}{hint}")
        parsed = [parse_value(key, v.strip()) for v in values.split(",")]
        if any(v == "" for v in parsed):
            raise ConfigError(f"--grid {key!r} has an empty value: {item!r}")
        if len(set(map(repr, parsed))) != len(parsed):
            raise ConfigError(f"--grid {key!r} repeats a value: {item!r}")
        grid[key] = parsed
    return grid


def parse_seeds(text: str) -> list[int]:
    """``--seeds 1,2,3`` as distinct non-negative integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise ConfigError(f"--seeds expects integers like 1,2,3, got {text!r}") from error
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds expects distinct integers >= 0, got {text!r}")
    return seeds


def _fmt_value(value: Any) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)


def grid_points(
    scenario_name: str, grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
) -> list[tuple[str, dict[str, Any]]]:
    """The sweep's runs in order: ``(run name, overrides)`` for each grid point and seed.

    Names read ``<scenario>-<k1>=<v1>-...-seed=<s>`` (unsafe characters replaced by
    ``_``).
    """
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        for seed in seeds:
            overrides = {**dict(zip(keys, values, strict=True)), "seed": seed}
            parts = [scenario_name, *(f"{k}={_fmt_value(v)}" for k, v in overrides.items())]
            points.append((safe_name("-".join(parts)), overrides))
    names = [name for name, _ in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"--grid values give clashing run names: {names}")
    return points


def run_sweep(
    scenario: Scenario,
    *,
    grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int],
    base_overrides: Mapping[str, Any],
    sweep_dir: Path,
    num_supernodes: int | None = None,
    quiet: bool = False,
    timeout: float | None = None,
    run_fn: RunFn = run_app,
) -> tuple[list[RunOutcome], Path | None]:
    """Run every grid point x seed in turn; returns the outcomes and compare.html.

    Every run's config is validated and preflighted before the first starts. A failing
    run (the simulation fails, times out or cannot start) is recorded and the sweep goes
    on; an interrupt stops the sweep (:class:`Interrupted`). Each run waits up to
    ``QUEUED_RUN_WAIT_SECONDS`` for the machine (other simulations may hold it).
    ``sweep.json`` in ``sweep_dir`` lists each run's overrides and outcome.
    """
    check_requires(scenario)
    points = grid_points(scenario.name, grid, seeds)
    nodes = _supernodes(scenario, num_supernodes, None)
    for name, overrides in points:  # fail fast on a bad grid value or data
        run_config = resolve_run_config(scenario, {**base_overrides, **overrides},
                                        output_dir=sweep_dir, run_name=name)
        preflight(RunConfig.from_flower(run_config), num_partitions=nodes)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[RunOutcome] = []
    started = time.monotonic()
    for i, (name, overrides) in enumerate(points, start=1):
        print(f"[fedsft] sweep run {i}/{len(points)}: {name}", flush=True)
        try:
            outcome = run_scenario(
                scenario, {**base_overrides, **overrides}, output_dir=sweep_dir,
                run_name=name, num_supernodes=num_supernodes, quiet=quiet, timeout=timeout,
                run_fn=run_fn, port_wait=QUEUED_RUN_WAIT_SECONDS,
            )
        except Exception as error:  # one broken run must not end the sweep
            outcome = RunOutcome(name=name, run_dir=sweep_dir / name, ok=False,
                                 returncode=-1, message=f"{type(error).__name__}: {error}",
                                 overrides=dict(overrides))
        status = "ok" if outcome.ok else f"FAILED: {outcome.message}"
        print(f"[fedsft] sweep run {i}/{len(points)} {name}: {status}", flush=True)
        outcomes.append(outcome)
        _write_sweep_file(sweep_dir, scenario, grid, seeds, base_overrides, outcomes,
                          seconds=time.monotonic() - started)
    with_results = [o.run_dir for o in outcomes if (o.run_dir / "results.jsonl").is_file()
                    and (o.run_dir / "config.json").is_file()]
    compare = None
    if with_results:
        try:
            compare = write_comparison(with_results, sweep_dir,
                                       title=f"sweep of {scenario.name} ({sweep_dir.name})")
        except (ReportError, OSError, ValueError) as error:
            print(f"[fedsft] could not write the sweep comparison: {error}", file=sys.stderr)
    return outcomes, compare


def _write_sweep_file(
    sweep_dir: Path, scenario: Scenario, grid: Mapping[str, Sequence[Any]],
    seeds: Sequence[int], base_overrides: Mapping[str, Any], outcomes: list[RunOutcome],
    *, seconds: float,
) -> None:
    runs = []
    for o in outcomes:
        entry = asdict(o)
        entry["run_dir"] = str(o.run_dir)
        entry["report"] = str(o.report) if o.report else None
        runs.append(entry)
    atomic_write_bytes(sweep_dir / "sweep.json", (json.dumps({
        "scenario": scenario.name, "grid": dict(grid), "seeds": list(seeds),
        "overrides": dict(base_overrides), "seconds": round(seconds, 1), "runs": runs,
    }, indent=2, sort_keys=True, default=str) + "\n").encode())
