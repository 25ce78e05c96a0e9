"""Checks a run must pass before Flower starts, so a bad setting fails in seconds.

The ServerApp would find these problems too, but only after a SuperLink, a simulation
(or a federation's nodes) have started, and it reports them deep in Flower's log.
``preflight`` runs the same checks up front, in order, cheapest first; each raises
``ConfigError`` or ``DataError`` with a one-paragraph message naming the setting, the
file and what would work. A check never creates or changes a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from common.config import ConfigError, RunConfig
from common.data import load_server_eval
from server.run_outputs import RunOutputs, run_folder

Check = Callable[[RunConfig, "int | None"], None]


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(cfg: RunConfig, num_partitions: int | None = None) -> None:
    """A new run's ``output-dir`` is a folder this process can create and write into."""
    if cfg.resume_from:
        return
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


def check_resume_folder(cfg: RunConfig, num_partitions: int | None = None) -> None:
    """``resume-from`` names an existing run folder whose settings match this run's."""
    if not cfg.resume_from:
        return
    folder = run_folder(cfg)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(
            f"`resume-from` folder {folder} {state}; give the folder of an interrupted "
            "run (it holds config.json, results.jsonl and checkpoints/)."
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"`resume-from` folder {folder} is not a fedsft run folder (it has no "
            "config.json): give the folder of an interrupted run."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"`resume-from` folder {folder} is not writable by this user")
    try:
        RunOutputs(folder, keep_checkpoints=cfg.keep_checkpoints).check_resumable(cfg)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"`resume-from` folder {folder}: config.json is not valid JSON "
                          f"({error}); it cannot be resumed") from error


def check_server_data(cfg: RunConfig, num_partitions: int | None = None) -> None:
    """The server's training data (or label list) and its evaluation split load."""
    # Cached per process: the points of a sweep that share their data load it once.
    load_server_eval(cfg)


# In order: the cheap file-system checks first, the data last.
CHECKS: tuple[Check, ...] = (check_output_dir, check_resume_folder, check_server_data)


def preflight(cfg: RunConfig, *, num_partitions: int | None) -> None:
    """Check ``cfg`` before anything starts; raise on the first problem.

    Parameters
    ----------
    cfg
        The validated run config.
    num_partitions
        The number of clients the training data is split into (simulation: the number
        of virtual clients); ``None`` when the sites hold their own data.

    Raises
    ------
    ConfigError
        A setting cannot work: an output folder that cannot be written, a
        ``resume-from`` folder that is missing, unrelated or ran with other settings.
    DataError
        The server's data or evaluation split cannot be read or used.
    """
    for check in CHECKS:
        check(cfg, num_partitions)
