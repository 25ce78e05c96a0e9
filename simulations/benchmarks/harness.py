"""What the benchmarks share: sizes per mode, fedsft runs, in-process training, targets.

Every number a benchmark reports comes from a measurement taken in the same invocation;
nothing here estimates. Federated runs go through ``simulations.runner.run_app`` (the
same ``flwr run`` path a user takes) and are read back from the run folder's
``results.jsonl``. ``Bench.runner`` can be replaced (tests/simulations/
test_benchmark_logic.py checks the benchmarks' arithmetic without starting Flower).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.results import ResultsRow, read_results
from simulations.runner import APP_DIR, HarnessError, SimulationResult, run_app

if TYPE_CHECKING:  # torch and the task layer load lazily: most benchmarks only run Flower
    import torch

    from common.config import RunConfig
    from common.tasks.base import Task

SST2_DIR = APP_DIR.parent / "shared" / "data" / "sst2"
MODES = ("quick", "default", "full")


class BenchmarkError(RuntimeError):
    """A benchmark could not measure what it needs (a failed run, missing data)."""


def base_config(mode: str, model: str) -> dict[str, Any]:
    """Run-config overrides every benchmark starts from in ``mode``.

    ``quick`` is tiny (smoke test: the tiny random BERT, 2 clients, 2 rounds) and is the
    same for every benchmark, so that identical runs are shared through the run cache.
    """
    if mode == "quick":
        return {
            "model": model, "dataset": "builtin", "builtin-examples": 600,
            "max-length": 32, "batch-size": 8, "local-steps": 2, "learning-rate": 0.005,
            "num-server-rounds": 2, "fraction-train": 1.0, "fraction-evaluate": 1.0,
            "min-nodes": 2, "node-wait-timeout": 120.0, "round-timeout": 600.0,
        }
    return {
        "model": model, "dataset": "builtin", "builtin-examples": 3000,
        "max-length": 64, "batch-size": 16, "local-steps": 10, "learning-rate": 0.002,
        "num-server-rounds": 3, "fraction-train": 1.0, "fraction-evaluate": 0.0,
        "min-nodes": 10, "node-wait-timeout": 300.0, "round-timeout": 1200.0,
    }


def sst2_config() -> dict[str, Any]:
    """Overrides that train on SST-2 train.tsv and evaluate on dev.tsv (fails if absent)."""
    train, dev = SST2_DIR / "train.tsv", SST2_DIR / "dev.tsv"
    missing = [str(p) for p in (train, dev) if not p.is_file()]
    if missing:
        raise BenchmarkError(
            f"SST-2 is missing: {', '.join(missing)} (expected GLUE SST-2 TSV files with a "
            "header `sentence<TAB>label`); run this benchmark with --quick to use the "
            "built-in data instead"
        )
    return {"dataset": str(train), "eval-dataset": str(dev), "text-column": "sentence",
            "label-column": "label"}


def data_text(data: Mapping[str, Any]) -> str:
    """How a description names the data: ``sst2_config()``'s, or the built-in set if empty."""
    if data:
        return "SST-2 (train.tsv as `dataset`, dev.tsv as `eval-dataset`)"
    return "the built-in data (quick mode)"


@dataclass(frozen=True)
class FedRun:
    """One finished fedsft (or baseline) simulation and what it measured."""

    name: str
    run_dir: Path
    wall_seconds: float  # the whole `flwr run`, start-up and shut-down included
    rows: list[ResultsRow]  # results.jsonl, round 0 (initial evaluation) first

    @property
    def rounds(self) -> list[ResultsRow]:
        """The rows of training rounds (round >= 1)."""
        return [r for r in self.rows if r.round >= 1]

    def mean_round_seconds(self, *, skip_first: bool = False) -> float:
        """Mean ``seconds.round`` over training rounds (optionally without round 1)."""
        rows = self.rounds[1:] if skip_first and len(self.rounds) > 1 else self.rounds
        return float(np.mean([r.seconds.round for r in rows]))

    def mean_bytes(self, direction: str) -> float:
        """Mean bytes per training round, ``up`` or ``down``."""
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        return float(np.mean([r.bytes.up if direction == "up" else r.bytes.down
                              for r in self.rounds]))

    def final_accuracy(self) -> float:
        """Central accuracy after the last round."""
        central = self.rows[-1].central
        if central is None:
            raise BenchmarkError(f"{self.run_dir}: no central evaluation in the last round")
        return float(central["accuracy"])

    def outcome(self) -> dict[str, Any]:
        """What every benchmark reports of a run: accuracy before and after, eval size, folder."""
        return {
            "final_accuracy": self.final_accuracy(),
            "initial_accuracy": float(central_metrics(self.rows[0], self.run_dir)["accuracy"]),
            "eval_examples": int(central_metrics(self.rows[-1], self.run_dir)["num_examples"]),
            "wall_seconds": self.wall_seconds,
            "run_dir": str(self.run_dir),
        }


def central_metrics(row: ResultsRow, run_dir: Path) -> Mapping[str, float]:
    """The row's central evaluation; a BenchmarkError naming the run when there is none."""
    if row.central is None:
        raise BenchmarkError(f"{run_dir}: no central evaluation in round {row.round}")
    return row.central


@dataclass
class Bench:
    """The context every benchmark's ``run`` receives."""

    mode: str
    model: str  # "minilm" or the tiny BERT's directory (quick)
    runs_dir: Path
    parallel_workers: int  # virtual clients that run at once (1 CPU each)
    run_timeout: float = 1800.0
    # Starts one simulation, called as ``run_app`` (the default) is: run config, then
    # ``num_supernodes``, ``num_cpus``, ``app_dir``, ``timeout`` and ``quiet`` by keyword.
    # A test gives a fake that validates the config and writes results.jsonl itself.
    runner: Callable[..., SimulationResult] = run_app
    _cache: dict[str, FedRun] = field(default_factory=dict)

    def base(self) -> dict[str, Any]:
        """This mode's base run-config overrides."""
        return base_config(self.mode, self.model)

    def fedsft(self, name: str, overrides: Mapping[str, Any], *, num_supernodes: int,
               timeout: float | None = None) -> FedRun:
        """Run fedsft with ``overrides``; an identical earlier run is reused.

        ``timeout`` (seconds) replaces ``run_timeout`` for this run (a run of many rounds).
        """
        return self._run(name, overrides, num_supernodes=num_supernodes, app_dir=APP_DIR,
                         timeout=timeout)

    def app(
        self, name: str, overrides: Mapping[str, Any], *, num_supernodes: int, app_dir: Path
    ) -> FedRun:
        """Run another Flower App that writes fedsft-style ``results.jsonl`` rows."""
        return self._run(name, overrides, num_supernodes=num_supernodes, app_dir=app_dir)

    def _run(
        self, name: str, overrides: Mapping[str, Any], *, num_supernodes: int, app_dir: Path,
        timeout: float | None = None,
    ) -> FedRun:
        key = json.dumps([str(app_dir), num_supernodes, sorted(overrides.items())])
        if key in self._cache:
            return self._cache[key]
        run_name = f"{name}-{len(self._cache):02d}"
        config = {**overrides, "output-dir": str(self.runs_dir), "run-name": run_name}
        print(f"[bench] run {run_name}: {num_supernodes} supernodes", flush=True)
        try:
            result = self.runner(config, num_supernodes=num_supernodes, num_cpus=1,
                                 app_dir=app_dir, timeout=timeout or self.run_timeout,
                                 quiet=True)
        except HarnessError as error:
            raise BenchmarkError(f"run {run_name} failed: {error}") from error
        wall = result.seconds  # measured by run_app after it holds the machine
        results = result.run_dir / "results.jsonl"
        if result.returncode != 0 or not results.is_file():
            tail = result.log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
            raise BenchmarkError(
                f"run {run_name} exited with {result.returncode}; log {result.log_path}:\n{tail}"
            )
        rows = read_results(results)
        expected = int(overrides.get("num-server-rounds", 0))
        if expected and (not rows or rows[-1].round != expected) and not _stopped_early(
                result.run_dir, rows, expected):
            raise BenchmarkError(
                f"run {run_name} recorded rounds {[r.round for r in rows]}, "
                f"expected up to {expected}; log {result.log_path}"
            )
        print(f"[bench] run {run_name}: done in {wall:.1f} s", flush=True)
        run = FedRun(name=run_name, run_dir=result.run_dir, wall_seconds=wall, rows=rows)
        self._cache[key] = run
        return run


def _stopped_early(run_dir: Path, rows: list[ResultsRow], expected: int) -> bool:
    """Whether the run ended before round ``expected`` by its own rule (e.g.
    ``early-stopping-patience``), as ``outcome.json`` ``stopped_early`` records it."""
    from server.run_outputs import read_outcome

    outcome = read_outcome(run_dir)
    return bool(rows and rows[-1].round < expected and outcome is not None
                and outcome.status == "completed" and outcome.stopped_early)


# --- in-process (non-federated) training -------------------------------------------------


@dataclass(frozen=True)
class InProcess:
    """A model and the encoded data to train it in this process (``prepare_in_process``)."""

    cfg: RunConfig
    task: Task
    model: torch.nn.Module  # on ``device``
    tokenizer: Any
    train: Any  # the union of the clients' training shares, encoded
    eval: Any  # the server's eval split, encoded
    validation: Any  # the validation split (``validation-fraction`` > 0), encoded, or None
    device: torch.device
    prepare_seconds: float

    def evaluate(self, data: Any) -> dict[str, float]:
        """The task's metrics of the model on ``data`` (one of the encoded splits)."""
        from common.tasks.base import EvalContext

        return self.task.evaluate(self.model, self.tokenizer, data, EvalContext(
            batch_size=max(self.cfg.batch_size, 64), device=self.device,
            precision=self.cfg.precision, spec=self.task.eval_spec(self.cfg)))


def prepare_in_process(overrides: Mapping[str, Any], *, num_clients: int) -> InProcess:
    """The model and the union of the clients' training data of a run with ``overrides``.

    The union is built exactly as the clients build their shares (``partition_dataset``
    then ``split_for_local_eval``), so the examples are those of the federated run with
    the same ``overrides``; the eval and validation splits are the server's.
    """
    import datasets
    import torch

    from common.config import RunConfig
    from common.data import load_splits, partition_dataset, split_for_local_eval
    from common.model import build_model
    from common.specs import DataSpec, EncodeSpec, ModelSpec, PartitionSpec
    from common.tasks import get_task

    started = time.perf_counter()
    cfg = RunConfig.from_flower(dict(overrides))
    splits = load_splits(DataSpec.of(cfg))
    task = get_task(cfg.task)
    parts = []
    for partition_id in range(num_clients):
        part = partition_dataset(splits.train, PartitionSpec.of(cfg), source=cfg.dataset,
                                 num_partitions=num_clients,
                                 partition_id=partition_id)
        train, _ = split_for_local_eval(part, fraction=cfg.client_eval_fraction, seed=cfg.seed)
        parts.append(train)
    model, tokenizer = build_model(ModelSpec.of(cfg, splits.label_names))
    encoding = EncodeSpec.of(cfg, tokenizer_path=tokenizer.name_or_path)
    validation = (None if splits.validation is None
                  else task.encode(splits.validation, tokenizer, spec=encoding))
    return InProcess(
        cfg=cfg, task=task, model=model, tokenizer=tokenizer,
        train=task.encode(datasets.concatenate_datasets(parts), tokenizer, spec=encoding),
        eval=task.encode(splits.eval, tokenizer, spec=encoding), validation=validation,
        device=torch.device("cpu"), prepare_seconds=time.perf_counter() - started)


def train_in_process(
    overrides: Mapping[str, Any], *, num_clients: int, total_steps: int
) -> dict[str, float]:
    """Train one model in this process on the union of the clients' training data.

    ``prepare_in_process`` builds the union, then ``total_steps`` optimizer steps of
    ``train_local`` with the same batch size and learning rate, then ``evaluate`` on the
    server's eval split.
    """
    import torch

    from common.specs import TrainSpec
    from common.training import train_local

    run = prepare_in_process({**overrides, "local-steps": total_steps},
                             num_clients=num_clients)
    cfg = run.cfg
    prepared = time.perf_counter()
    result = train_local(run.model, run.train, TrainSpec.of(cfg), task=run.task,
                         loss_spec=run.task.loss_spec(cfg), seed=cfg.seed, device=run.device,
                         pad_token_id=run.tokenizer.pad_token_id)
    trained = time.perf_counter()
    metrics = run.evaluate(run.eval)
    finished = time.perf_counter()
    return {
        "examples_available": len(run.train),
        "steps": result.steps,
        "examples_seen": result.steps * cfg.batch_size,
        "torch_threads": torch.get_num_threads(),
        "prepare_seconds": run.prepare_seconds,
        "train_seconds": trained - prepared,
        "eval_seconds": finished - trained,
        "total_seconds": run.prepare_seconds + finished - prepared,
        **{name: value for name, value in metrics.items() if name != "num_examples"},
    }


# --- targets and machine ----------------------------------------------------------------


def target(what: str, *, measured: float, limit: float, kind: str, unit: str = "") -> dict:
    """A target check: ``measured <= limit`` (kind "max") or ``>= limit`` (kind "min")."""
    if kind not in ("max", "min"):
        raise ValueError(f"kind must be 'max' or 'min', got {kind!r}")
    met = bool(measured <= limit) if kind == "max" else bool(measured >= limit)
    return {
        "what": what, "kind": kind, "limit": limit, "measured": measured, "unit": unit,
        "ratio_to_target": measured / limit if limit else None, "met": met,
    }


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, OS, library versions and the date of this invocation."""
    import flwr
    import peft
    import psutil
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "flwr": flwr.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# --- small readers shared by the privacy and robustness benchmarks ---------------------


def trainable_values(run_dir: Path) -> int:
    """Number of exchanged (trainable) values, counted in a run's last checkpoint."""
    from safetensors.numpy import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))
    if not checkpoints:
        raise BenchmarkError(f"{run_dir}: no checkpoint to count the trainable values in")
    state = load_file(str(checkpoints[-1]))
    return int(sum(a.size for k, a in state.items() if k.startswith("global/")))


def majority_share(path: Path, label_column: str = "label") -> float:
    """Share of the most common label in a tab-separated file with a header (e.g. dev.tsv)."""
    import csv
    from collections import Counter

    with path.open(encoding="utf-8", newline="") as f:
        counts = Counter(row[label_column] for row in csv.DictReader(f, delimiter="\t",
                                                                     quoting=csv.QUOTE_NONE))
    return max(counts.values()) / sum(counts.values())
