"""Everything a run leaves on disk, in one folder per run.

```
<output-dir>/<run-name>/
  config.json          the resolved run config
  label_map.json       class index -> label, as discovered from the training data
  results.jsonl        one JSON object per round (round 0 = the initial model)
  checkpoints/round-NNNN.safetensors   global exchanged state + strategy state
  final/model/         the selected round's model in Hugging Face layout (LoRA merged)
  final/adapter/       method=lora: the adapter, loadable with peft
  outcome.json         how the run ended (written last, also when it failed)
  app.json             the Flower App (FAB) each attempt ran, when Flower names one
```

Files are written atomically (temporary file + rename) so an interrupted run never
leaves a half-written checkpoint; ``final/`` is built in a hidden sibling folder and
renamed into place, so ``final/model/config.json`` only exists for a complete model.

``resume-from`` continues from the newest round that has both a results line and an
intact checkpoint: ``check_resume`` finds it without changing anything on disk (a
corrupt newer checkpoint is skipped and reported), ``RunOutputs.last_checkpoint``
loads it and drops the results lines after it. ``keep-checkpoints`` prunes the oldest
checkpoints, but never those the recorder protects: the best round's (see
server/model_selection.py), which ``select-model=best`` exports, also after a resume.

``outcome.json`` (``write_outcome`` / ``read_outcome``, one ``RunOutcomeRecord``)::

    {"status": "completed" | "failed",  # failed: no round aggregated, or an error
     "message": str,                    # one paragraph: what happened and why
     "rounds_done": int,                # the last round with a results line
     "rounds_aggregated": int,          # rounds (> 0) whose update was aggregated,
                                        # earlier attempts of a resumed run included
     "final_model": bool,               # this attempt wrote final/
     "stopped_early": str | null,       # why fewer rounds ran (privacy budget,
                                        # early-stopping patience: still completed)
     "selection": {...} | null}         # which round final/ holds and why
                                        # (model_selection.Selection.to_json)

A run in which no round aggregated ends ``failed`` with no ``final/`` (the initial
model is not a result) and raises ``RunFailed``, quoting the clients' problems.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from common.config import ConfigError, RunConfig
from server.results import ResultsRow, read_results

# Keys that may differ between an interrupted run and its resumption: they do not
# change what is computed, only how long we wait or where we write.
RESUMABLE_CHANGES = frozenset(
    {"num-server-rounds", "resume-from", "round-timeout", "node-wait-timeout",
     "output-dir", "run-name", "keep-checkpoints", "device", "log-to", "audit-egress"}
)


def run_folder(cfg: RunConfig) -> Path:
    """The run's folder: ``resume-from`` if set, else ``<output-dir>/<run-name>``."""
    if cfg.resume_from:
        return Path(cfg.resume_from).expanduser().resolve()
    name = cfg.run_name or f"{cfg.strategy}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    return (Path(cfg.output_dir).expanduser() / name).resolve()


def staging_folder(target: Path) -> Path:
    """A new, empty hidden folder next to ``target`` to build its replacement in.

    Made with ``mkdir`` (not ``tempfile.mkdtemp``, whose folders are private to the
    user) so the finished folder gets the usual permissions.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            staging.mkdir()
            return staging
        except FileExistsError:
            continue


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target``, replacing what is there.

    Both must be in the same parent folder (a rename then never copies). The old
    ``target`` is renamed aside first and deleted only once ``new`` is in place, so at
    every moment either the old or the new folder is complete.
    """
    if not target.exists():
        os.rename(new, target)
        return
    aside = new.with_name(f"{new.name}.old")
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    # The new folder is in place: a failure to delete the old one loses nothing.
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` through a temporary sibling and a rename: readers see the old or the
    new content, never a part. The temporary name is per process, so writers never collide."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _flatten_state(
    global_state: Mapping[str, np.ndarray], strategy_state: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    flat = {f"global/{k}": np.ascontiguousarray(v) for k, v in global_state.items()}
    for attr, value in strategy_state.items():
        items = value.items() if isinstance(value, dict) else enumerate(value)
        kind = "dict" if isinstance(value, dict) else "list"
        for key, array in items:
            flat[f"strategy/{attr}/{kind}/{key}"] = np.ascontiguousarray(array)
    return flat


def _unflatten_state(
    flat: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    global_state: dict[str, np.ndarray] = {}
    strategy_state: dict[str, Any] = {}
    for key, array in flat.items():
        section, rest = key.split("/", 1)
        if section == "global":
            global_state[rest] = array
            continue
        attr, kind, name = rest.split("/", 2)
        if kind == "dict":
            strategy_state.setdefault(attr, {})[name] = array
        else:
            strategy_state.setdefault(attr, {})[int(name)] = array
    for attr, value in strategy_state.items():
        if all(isinstance(k, int) for k in value):
            strategy_state[attr] = [value[i] for i in sorted(value)]
    return global_state, strategy_state


@dataclass(frozen=True)
class Checkpoint:
    """A saved round: the global exchanged state and the strategy's own state."""

    round: int
    global_state: dict[str, np.ndarray]
    strategy_state: dict[str, Any]


@dataclass(frozen=True)
class ResumePoint:
    """Where ``resume-from`` would continue: after ``round``, from ``checkpoint``.

    ``skipped`` lists the newer checkpoints (matching a results line) that could not be
    read, each with the reason, newest first.
    """

    round: int
    checkpoint: Path
    skipped: tuple[tuple[Path, str], ...] = ()


_CHECKPOINT_NAME = re.compile(r"round-(\d+)\.safetensors")


def _checkpoint_files(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``(round, path)`` of the checkpoint files, oldest first (by round, not by name)."""
    found = []
    for path in checkpoint_dir.glob("round-*.safetensors"):
        if match := _CHECKPOINT_NAME.fullmatch(path.name):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _read_checkpoint(path: Path, round_: int) -> Checkpoint:
    """Load one checkpoint file; raises whatever a truncated or foreign file raises."""
    with safe_open(str(path), framework="np") as f:
        saved_round = (f.metadata() or {}).get("round")
        flat = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    if saved_round is not None and int(saved_round) != round_:
        raise ValueError(f"it holds round {saved_round}, not {round_}")
    global_state, strategy_state = _unflatten_state(flat)
    if not global_state:
        raise ValueError("it holds no global state")
    return Checkpoint(round_, global_state, strategy_state)


def _newest_intact(
    folder: Path, rows: Sequence[ResultsRow]
) -> tuple[Checkpoint, ResumePoint]:
    """The newest checkpoint that matches a results line and loads; see ``check_resume``."""
    done = {row.round for row in rows}
    skipped: list[tuple[Path, str]] = []
    for round_, path in reversed(_checkpoint_files(folder / "checkpoints")):
        if round_ not in done:
            continue  # written, but the run stopped before its results line
        try:
            checkpoint = _read_checkpoint(path, round_)
        except Exception as exc:  # any unreadable file: fall back to an older one
            skipped.append((path, f"{type(exc).__name__}: {exc}"))
            continue
        return checkpoint, ResumePoint(round_, path, tuple(skipped))
    if skipped:
        tried = "; ".join(f"{path} ({why})" for path, why in skipped)
        raise ConfigError(
            f"`resume-from` folder {folder} has no completed round to resume: every "
            f"checkpoint matching a results.jsonl line is unreadable: {tried}"
        )
    raise ConfigError(
        f"`resume-from` folder {folder} has no completed round to resume "
        "(no checkpoint matching a results.jsonl line)"
    )


def resumable_round(folder: Path) -> int | None:
    """The round a resume of ``folder`` would continue after, or None if there is none
    (no results line with an intact checkpoint). Settings are not compared."""
    try:
        return _newest_intact(folder, read_results(folder / "results.jsonl"))[1].round
    except ConfigError:
        return None


def _check_settings(folder: Path, cfg: RunConfig) -> None:
    """Refuse to resume with settings that change what is computed."""
    path = folder / "config.json"
    if not path.exists():
        raise ConfigError(f"`resume-from` folder {folder} has no config.json")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): cannot resume from it") from exc
    current = cfg.to_flower()
    changed = sorted(
        k for k in current
        if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]
    )
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ConfigError(
            f"cannot resume {folder} with changed settings ({details}); "
            f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
        )


def check_resume(folder: Path, cfg: RunConfig) -> ResumePoint:
    """Check that ``cfg`` can resume the run in ``folder``; nothing on disk changes.

    Usable before Flower starts (the harness) and by the server itself. The resume
    point is the newest round with both a results.jsonl line and a checkpoint that
    loads; newer unreadable checkpoints are skipped and listed in ``skipped``.

    Raises
    ------
    ConfigError
        ``folder`` does not exist or is not a fedsft run (config.json or results.jsonl
        missing), ``cfg`` changes a setting outside ``RESUMABLE_CHANGES``, or no intact
        checkpoint matches a results line.
    """
    folder = Path(folder)
    if not folder.exists():
        raise ConfigError(f"`resume-from` folder {folder} does not exist")
    if not folder.is_dir():
        raise ConfigError(f"`resume-from` {folder} is not a folder")
    missing = [name for name in ("config.json", "results.jsonl") if not (folder / name).is_file()]
    if missing:
        raise ConfigError(
            f"`resume-from` folder {folder} is not a fedsft run: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing (a run folder holds "
            "config.json, results.jsonl and checkpoints/)"
        )
    _check_settings(folder, cfg)
    return _newest_intact(folder, read_results(folder / "results.jsonl"))[1]


APP_RECORD = "app.json"


@dataclass(frozen=True)
class AppRecord:
    """The Flower App (FAB) one attempt of a run ran, as Flower's run names it.

    ``app.json`` is ``{"attempts": [{"fab-id", "fab-version", "fab-hash", "run-id"}, ...]}``,
    one entry per attempt (a resumed run has several). ``fab-hash`` is the SHA-256 of
    the FAB, what an app signature covers (deployment/app_signing.py): the coordinator's
    export names the signature of this hash (the ServerApp is not told signatures).
    """

    fab_id: str
    fab_version: str
    fab_hash: str
    run_id: int

    def to_json(self) -> dict[str, Any]:
        return {"fab-id": self.fab_id, "fab-version": self.fab_version,
                "fab-hash": self.fab_hash, "run-id": self.run_id}


def read_app_records(folder: Path) -> list[AppRecord]:
    """The attempts of ``folder/app.json`` (none when the file is absent).

    Raises
    ------
    OutcomeError
        If app.json is not the format above.
    """
    path = folder / APP_RECORD
    if not path.exists():
        return []
    try:
        attempts = json.loads(path.read_text(encoding="utf-8"))["attempts"]
        return [AppRecord(fab_id=str(a["fab-id"]), fab_version=str(a["fab-version"]),
                          fab_hash=str(a["fab-hash"]), run_id=int(a["run-id"]))
                for a in attempts]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OutcomeError(f"{path}: not a fedsft app record ({error})") from error


class RunOutputs:
    """Writes (and, for resume, reads) the files of one run folder."""

    def __init__(self, folder: Path, *, keep_checkpoints: int) -> None:
        self.folder = folder
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_dir = folder / "checkpoints"
        self.results_path = folder / "results.jsonl"
        self.started = False  # start() ran: the folder is this run's

    def start(self, cfg: RunConfig, label_names: list[str]) -> None:
        """Create the folder and write config.json and label_map.json."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.started = True
        _atomic_write_json(self.folder / "config.json", cfg.to_flower())
        _atomic_write_json(self.folder / "label_map.json", dict(enumerate(label_names)))

    def record_app(self, app: AppRecord) -> None:
        """Add this attempt's app to app.json (an attempt with no FAB hash adds nothing)."""
        if app.fab_hash:
            attempts = [a.to_json() for a in read_app_records(self.folder)]
            _atomic_write_json(self.folder / APP_RECORD, {"attempts": [*attempts,
                                                                        app.to_json()]})

    def append_result(self, row: ResultsRow) -> None:
        """Append one round's results line (flushed and synced: it marks the round done)."""
        with self.results_path.open("a", encoding="utf-8") as f:
            f.write(row.to_line())
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(
        self,
        round_: int,
        global_state: Mapping[str, np.ndarray],
        strategy_state: Mapping[str, Any],
        *,
        protect: Collection[int] = (),
    ) -> Path:
        """Write ``round-NNNN.safetensors`` atomically and prune old checkpoints.

        ``keep-checkpoints`` newest checkpoints stay, and so do those of the rounds in
        ``protect`` (the best round's, whatever its age).
        """
        path = self.checkpoint_dir / f"round-{round_:04d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            _flatten_state(global_state, strategy_state), str(tmp),
            metadata={"round": str(round_)},
        )
        os.replace(tmp, path)
        if self.keep_checkpoints:
            for rnd, old in _checkpoint_files(self.checkpoint_dir)[: -self.keep_checkpoints]:
                if rnd not in protect:
                    old.unlink()
        return path

    def load_checkpoint(self, round_: int) -> Checkpoint:
        """The checkpoint of ``round_`` (the best round's, to export it after a resume).

        Raises
        ------
        FileNotFoundError
            No checkpoint of that round is on disk.
        """
        path = self.checkpoint_dir / f"round-{round_:04d}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint of round {round_} not found: {path}")
        return _read_checkpoint(path, round_)

    # --- resume -----------------------------------------------------------------
    def read_results(self) -> list[ResultsRow]:
        """Rows of results.jsonl; a torn last line (crash mid-write) is ignored."""
        return read_results(self.results_path)

    def last_checkpoint(self) -> Checkpoint:
        """The newest round with both a results line and an intact checkpoint.

        Unreadable newer checkpoints are skipped with a warning naming each file.
        Results lines after that round are dropped, so the resumed run appends cleanly.
        """
        checkpoint, point = _newest_intact(self.folder, self.read_results())
        for path, why in point.skipped:
            print(f"[fedsft] warning: checkpoint {path} is unreadable ({why}); "
                  "resuming from an older round", flush=True)
        rows = [r for r in self.read_results() if r.round <= checkpoint.round]
        atomic_write_bytes(self.results_path, "".join(r.to_line() for r in rows).encode())
        return checkpoint

    def check_resumable(self, cfg: RunConfig) -> None:
        """Refuse to resume with settings that change what is computed."""
        _check_settings(self.folder, cfg)


# --- how the run ended ---------------------------------------------------------
OUTCOME_FILE = "outcome.json"
OUTCOME_STATUSES = ("completed", "failed")


class RunFailed(RuntimeError):
    """The run ended without a result worth exporting (no round aggregated)."""


class OutcomeError(ValueError):
    """An outcome.json that is not valid (hand-edited or from another program)."""


@dataclass(frozen=True)
class RunOutcomeRecord:
    """The content of ``outcome.json``; see the module docstring."""

    status: str
    message: str
    rounds_done: int
    rounds_aggregated: int
    final_model: bool
    stopped_early: str | None = None
    selection: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.status not in OUTCOME_STATUSES:
            raise OutcomeError(f"outcome status must be one of {', '.join(OUTCOME_STATUSES)}, "
                               f"got {self.status!r}")


def round_aggregated(row: ResultsRow) -> bool:
    """Whether a results row is a training round (> 0) whose update changed the model."""
    return row.round > 0 and row.clients.aggregated > 0 and not row.clients.skipped


def rounds_aggregated(rows: Sequence[ResultsRow]) -> int:
    """How many rounds of ``rows`` aggregated at least one client update."""
    return sum(1 for row in rows if round_aggregated(row))


_NODE_PREFIX = re.compile(r"^(?:node \d+|\S+ \(node \d+\)): ")


def failure_reasons(rows: Sequence[ResultsRow], *, limit: int = 3) -> tuple[list[str], int]:
    """The distinct problems recorded in ``rows`` (first ``limit``) and how many there are.

    The ``node N:`` (or ``site (node N):``) prefix is dropped first, so one reason
    shared by every client (the usual case: the same data error at each site) is quoted
    once.
    """
    distinct: list[str] = []
    for row in rows:
        for problem in row.clients.problems:
            reason = _NODE_PREFIX.sub("", str(problem))
            if reason not in distinct:
                distinct.append(reason)
    return distinct[:limit], len(distinct)


def no_aggregation_message(
    folder: Path, rows: Sequence[ResultsRow], *, stopped_early: str | None = None
) -> str:
    """The one-paragraph reason of a run in which no round aggregated (``RunFailed``)."""
    trained = [row for row in rows if row.round > 0]
    reasons, total = failure_reasons(trained)
    if trained:
        what = (f"none of its {len(trained)} round(s) aggregated a client update (every "
                "round was skipped)")
    else:
        what = "no training round ran"
    text = f"run {folder}: {what}, so no final model was written (it would be the untrained "
    text += "initial model)"
    if stopped_early:
        text += f"; {stopped_early}"
    if reasons:
        quoted = "; ".join(f"'{reason}'" for reason in reasons)
        more = f" (and {total - len(reasons)} more)" if total > len(reasons) else ""
        text += f". The clients' problems: {quoted}{more}"
    return text + f". See {folder / 'results.jsonl'}."


def outcome_of(
    rows: Sequence[ResultsRow], *, status: str, message: str, final_model: bool,
    stopped_early: str | None = None, selection: Mapping[str, Any] | None = None,
) -> RunOutcomeRecord:
    """The outcome record of a run whose results.jsonl holds ``rows``."""
    return RunOutcomeRecord(
        status=status, message=message,
        rounds_done=max((row.round for row in rows), default=0),
        rounds_aggregated=rounds_aggregated(rows), final_model=final_model,
        stopped_early=stopped_early, selection=None if selection is None else dict(selection),
    )


def write_outcome(folder: Path, outcome: RunOutcomeRecord) -> Path:
    """Write ``folder/outcome.json`` atomically (replacing an earlier attempt's)."""
    path = folder / OUTCOME_FILE
    _atomic_write_json(path, asdict(outcome))
    return path


def read_outcome(folder: Path) -> RunOutcomeRecord | None:
    """The run's ``outcome.json``; None when the run has not ended (or predates it).

    Raises
    ------
    OutcomeError
        The file is not valid JSON or lacks a field (``selection``, added later, may be
        missing: an older run's file).
    """
    path = Path(folder) / OUTCOME_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunOutcomeRecord(**{f.name: data[f.name] for f in fields(RunOutcomeRecord)
                                   if f.name in data or f.name != "selection"})
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise OutcomeError(f"{path} is not a fedsft outcome file: {type(exc).__name__}: "
                           f"{exc}") from exc
