"""Everything a run leaves on disk, in one folder per run.

```
<output-dir>/<run-name>/
  config.json          the resolved run config
  label_map.json       class index -> label, as discovered from the training data
  results.jsonl        one JSON object per round (round 0 = the initial model)
  checkpoints/round-NNNN.safetensors   global exchanged state + strategy state
  final/model/         the final model in Hugging Face layout (LoRA merged)
  final/adapter/       method=lora: the adapter, loadable with peft
```

Files are written atomically (temporary file + rename) so an interrupted run never
leaves a half-written checkpoint; ``resume-from`` continues from the last round that
has both a results line and a checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from common.config import ConfigError, RunConfig

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


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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


class RunOutputs:
    """Writes (and, for resume, reads) the files of one run folder."""

    def __init__(self, folder: Path, *, keep_checkpoints: int) -> None:
        self.folder = folder
        self.keep_checkpoints = keep_checkpoints
        self.checkpoint_dir = folder / "checkpoints"
        self.results_path = folder / "results.jsonl"

    def start(self, cfg: RunConfig, label_names: list[str]) -> None:
        """Create the folder and write config.json and label_map.json."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_json(self.folder / "config.json", cfg.to_flower())
        _atomic_write_json(self.folder / "label_map.json", dict(enumerate(label_names)))

    def append_result(self, row: Mapping[str, Any]) -> None:
        """Append one round's results line (flushed and synced: it marks the round done)."""
        with self.results_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_checkpoint(
        self,
        round_: int,
        global_state: Mapping[str, np.ndarray],
        strategy_state: Mapping[str, Any],
    ) -> Path:
        """Write ``round-NNNN.safetensors`` atomically and prune old checkpoints."""
        path = self.checkpoint_dir / f"round-{round_:04d}.safetensors"
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(
            _flatten_state(global_state, strategy_state), str(tmp),
            metadata={"round": str(round_)},
        )
        os.replace(tmp, path)
        if self.keep_checkpoints:
            for old in sorted(self.checkpoint_dir.glob("round-*.safetensors"))[
                : -self.keep_checkpoints
            ]:
                old.unlink()
        return path

    # --- resume -----------------------------------------------------------------
    def read_results(self) -> list[dict[str, Any]]:
        """Rows of results.jsonl; a torn last line (crash mid-write) is ignored."""
        if not self.results_path.exists():
            return []
        rows = []
        for line in self.results_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def last_checkpoint(self) -> Checkpoint:
        """The latest round with both a results line and a checkpoint file.

        Results lines after that round are dropped, so the resumed run appends cleanly.
        """
        done = {row["round"] for row in self.read_results()}
        candidates = sorted(self.checkpoint_dir.glob("round-*.safetensors"), reverse=True)
        for path in candidates:
            round_ = int(path.stem.split("-")[1])
            if round_ in done:
                global_state, strategy_state = _unflatten_state(load_file(str(path)))
                rows = [r for r in self.read_results() if r["round"] <= round_]
                _atomic_write_bytes(
                    self.results_path,
                    "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(),
                )
                return Checkpoint(round_, global_state, strategy_state)
        raise ConfigError(
            f"`resume-from` folder {self.folder} has no completed round to resume "
            "(no checkpoint matching a results.jsonl line)"
        )

    def check_resumable(self, cfg: RunConfig) -> None:
        """Refuse to resume with settings that change what is computed."""
        path = self.folder / "config.json"
        if not path.exists():
            raise ConfigError(f"`resume-from` folder {self.folder} has no config.json")
        saved = json.loads(path.read_text(encoding="utf-8"))
        current = cfg.to_flower()
        changed = sorted(
            k for k in current
            if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]
        )
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ConfigError(
                f"cannot resume {self.folder} with changed settings ({details}); "
                f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )
