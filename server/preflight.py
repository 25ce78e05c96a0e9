"""Checks a run must pass before Flower starts, so a bad setting fails in seconds.

The ServerApp would find these problems too, but only after a SuperLink, a simulation
(or a federation's nodes) have started, and it reports them deep in Flower's log.
``preflight`` runs the same checks up front, in order, cheapest first; each raises
``ConfigError`` or ``DataError`` with a one-paragraph message naming the setting, the
file and what would work. A check never creates or changes a file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from common import model_source
from common.config import NO_DATASET, ConfigError, RunConfig
from common.data import (
    DataError,
    check_partition_plan,
    load_server_eval,
    load_site_data,
    load_splits,
)
from common.specs import DataSpec, PartitionSpec
from common.tasks import get_task
from server.run_outputs import check_resume, run_folder

# A check raises on a problem and may return a note worth printing.

# Said (preflight note, server log) when the server has no evaluation data of its own.
NO_CENTRAL_EVALUATION = ("no central evaluation: the training data is only at the sites "
                         "and no `eval-dataset` is given, so only the sites' federated "
                         "evaluation is recorded")
Check = Callable[[RunConfig, int | None], str | None]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """A new run's ``output-dir`` is a folder this process can create and write into."""
    if cfg.resume_from:
        return None
    output_dir = Path(cfg.output_dir).expanduser().resolve()
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        raise ConfigError(
            f"`output-dir` {output_dir} cannot be a folder: {existing} is a file. "
            "Give a folder (or a path where one can be created) with --output-dir."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == output_dir else f" (its nearest existing folder {existing})"
        raise ConfigError(
            f"`output-dir` {output_dir} is not writable{where}: this user cannot create "
            "the run folder there. Choose another folder with --output-dir."
        )
    if cfg.run_name:
        run_dir = output_dir / cfg.run_name
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"the run folder {run_dir} (`output-dir`/`run-name`) is a "
                              "file; choose another `run-name`.")
    return None


def check_new_run_folder(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """A new run never writes into the folder of an earlier run (it would mix results)."""
    if cfg.resume_from or not cfg.run_name:
        return None  # without `run-name` the folder is named after the current time
    run_dir = Path(cfg.output_dir).expanduser().resolve() / cfg.run_name
    found = [name for name in ("results.jsonl", "config.json", "checkpoints")
             if (run_dir / name).exists()]
    if found:
        raise ConfigError(
            f"the run folder {run_dir} already holds a run ({', '.join(found)}): a new run "
            "there would mix its results with the earlier ones. Choose another `run-name`, "
            f"or continue that run with `resume-from={run_dir}`."
        )
    return None


def check_resume_folder(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """``resume-from`` names a run folder this run can continue (nothing is changed)."""
    if not cfg.resume_from:
        return None
    folder = run_folder(cfg)
    point = check_resume(folder, cfg)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"`resume-from` folder {folder} is not writable by this user")
    note = f"resuming {folder} after round {point.round} ({point.checkpoint.name})"
    if point.skipped:
        bad = "; ".join(f"{path.name}: {why}" for path, why in point.skipped)
        note += f"; skipping unreadable newer checkpoint(s): {bad}"
    return note


@contextlib.contextmanager
def _hub_off_unless_set() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` unless the user set it, for the duration of the block: the
    harness and the deployment start Flower's processes so (simulations/runner.py,
    deployment/processes.py), and the model must be judged by the same rule."""
    if "HF_HUB_OFFLINE" in os.environ:
        yield
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        os.environ.pop("HF_HUB_OFFLINE", None)


def check_model(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """``model`` resolves offline (folder with config and weights, or a cached Hub id),
    ``max-length`` fits its position embeddings, and a local folder suits the task (for
    sft: a causal LM with a chat template)."""
    with _hub_off_unless_set():
        source = model_source.check_model(cfg)
    if source.local and (problem := get_task(cfg.task).check_model_folder(
            Path(source.path), options=cfg.task_options)):
        raise ConfigError(f"`model` {cfg.model_name!r}: {problem}")
    if not source.cached:
        return f"model {cfg.model_name!r} is not cached: it will be downloaded from the Hub"
    return None


def check_server_data(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """The server's training data (or label list) and its evaluation split load; when
    the data is only at the sites and no ``eval-dataset`` is given, a note says that
    only the sites' federated evaluation will be recorded."""
    # Cached per process: the points of a sweep that share their data load it once.
    _, eval_set = load_server_eval(cfg)
    return None if eval_set is not None else NO_CENTRAL_EVALUATION


def check_retention_data(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """``retention-dataset`` (the forgetting monitor, task sft) reads and prepares as the
    task's rows, as the server will read it each round."""
    if not cfg.retention_dataset:
        return None
    label_names, _ = load_server_eval(cfg)  # cached: check_server_data read it already
    try:
        rows = load_site_data(cfg.retention_dataset, DataSpec.of(cfg), label_names)
    except DataError as error:
        # The file is named in the error already; say which setting named the file.
        raise DataError(f"`retention-dataset` (the forgetting monitor): {error}") from error
    return f"`retention-dataset` {cfg.retention_dataset}: {len(rows)} rows"


def check_partitions(cfg: RunConfig, num_partitions: int | None = None) -> str | None:
    """Simulation: every virtual client gets rows of the training data, as the clients
    themselves will partition it (same code, same seed)."""
    if num_partitions is None:
        return None  # deployment: each site reads its own file
    if cfg.dataset == NO_DATASET:
        raise ConfigError(
            f'`dataset` = "{NO_DATASET}" says the training data is only at the sites, but '
            f"the {num_partitions} virtual clients of a simulation partition `dataset`: "
            "give a file, hf:<name> or builtin (`dataset` none is for a deployment's "
            "coordinator, whose sites read their own `data-path`)")
    plan = check_partition_plan(load_splits(DataSpec.of(cfg)).train, PartitionSpec.of(cfg),
                                source=cfg.dataset, num_partitions=num_partitions)
    return (f"{plan.num_partitions} clients get {min(plan.rows)}-{max(plan.rows)} training "
            f"rows each ({cfg.partitioner})")


# In order: the cheap file-system checks first, the data last.
CHECKS: tuple[Check, ...] = (check_output_dir, check_new_run_folder, check_resume_folder,
                             check_model, check_server_data, check_retention_data,
                             check_partitions)


def preflight(cfg: RunConfig, *, num_partitions: int | None) -> list[str]:
    """Check ``cfg`` before anything starts; raise on the first problem.

    Parameters
    ----------
    cfg
        The validated run config.
    num_partitions
        The number of clients the training data is split into (simulation: the number
        of virtual clients); ``None`` when the sites hold their own data.

    Returns
    -------
    list of str
        Notes worth printing (where a resume continues, a checkpoint it skips, the
        partition sizes); each check may add one.

    Raises
    ------
    ConfigError
        A setting cannot work: an output folder that cannot be written or that holds
        an earlier run, a ``resume-from`` folder that is missing, unrelated, ran with
        other settings or has no intact checkpoint, a model that cannot be found
        offline or whose positions ``max-length`` exceeds.
    DataError
        The server's data or evaluation split cannot be read or used, or the
        partition plan leaves a virtual client without rows.
    """
    notes = [check(cfg, num_partitions) for check in CHECKS]
    return [note for note in notes if note]
