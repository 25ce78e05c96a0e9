"""Named simulation scenarios: TOML files under simulations/scenarios/.

A scenario is a description, the simulated federation (``num-supernodes`` and
``[resources]`` per virtual client), the files it needs (``requires``) and
``[run-config]`` overrides. ``resolve_run_config`` turns a scenario plus command-line
overrides into the run config handed to ``flwr run``, validated by ``RunConfig``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
REPO_DIR = Path(__file__).resolve().parent.parent
_TOP_LEVEL_KEYS = {"description", "num-supernodes", "resources", "run-config", "requires"}
# Run-config values that are paths and may be written relative to the repository
# ("../shared/data/..."), so a scenario runs the same from any working directory.
_PATH_KEYS = ("dataset", "eval-dataset", "model", "resume-from")


class ScenarioError(ValueError):
    """A scenario file is missing or malformed, or needs files that are absent."""


@dataclass(frozen=True)
class Scenario:
    """Run-config overrides plus the simulated federation they run on."""

    name: str
    description: str
    num_supernodes: int
    num_cpus: float = 1
    num_gpus: float = 0.0
    run_config: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # paths (relative to the repository) that must exist
    path: Path | None = None


def available() -> list[str]:
    """Names of the shipped scenarios."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """Read a scenario by name (simulations/scenarios/<name>.toml) or by file path."""
    path = Path(name_or_path)
    if path.suffix != ".toml" and not path.is_file():  # a name ("sst2-dirichlet-0.1")
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(
            f"scenario {name_or_path!r} not found ({path}); available: {', '.join(available())}"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(
            f"{path}: not UTF-8 text (byte offset {exc.start}: {exc.reason}); save the "
            "scenario file as UTF-8"
        ) from exc
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario file: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: invalid TOML: {exc}") from exc
    unknown = sorted(set(raw) - _TOP_LEVEL_KEYS)
    if unknown:
        raise ScenarioError(
            f"{path}: unknown key(s) {unknown}; allowed: {sorted(_TOP_LEVEL_KEYS)}"
        )
    nodes = raw.get("num-supernodes")
    if not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1:
        raise ScenarioError(f"{path}: `num-supernodes` must be an integer >= 1, got {nodes!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ScenarioError(f"{path}: `description` must be a string, got {description!r}")
    resources = raw.get("resources", {})
    if not isinstance(resources, dict):
        raise ScenarioError(
            f"{path}: [resources] must be a table (e.g. `[resources]` then "
            f"`num-cpus = 1`), got {resources!r}"
        )
    bad = sorted(set(resources) - {"num-cpus", "num-gpus"})
    if bad:
        raise ScenarioError(
            f"{path}: unknown [resources] key(s) {bad}; allowed: num-cpus, num-gpus"
        )
    for key, low in (("num-cpus", 0.0), ("num-gpus", 0.0)):
        value = resources.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            raise ScenarioError(f"{path}: [resources] `{key}` must be a number >= 0, "
                                f"got {value!r}")
    requires = raw.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(p, str) and p for p in requires):
        raise ScenarioError(f"{path}: `requires` must be a list of paths (strings), "
                            f"got {requires!r}")
    run_config = raw.get("run-config", {})
    if not isinstance(run_config, dict):
        raise ScenarioError(f"{path}: [run-config] must be a table, got {run_config!r}")
    return Scenario(
        name=path.stem,
        description=description,
        num_supernodes=nodes,
        num_cpus=resources.get("num-cpus", 1),
        num_gpus=resources.get("num-gpus", 0.0),
        run_config=dict(run_config),
        requires=tuple(requires),
        path=path.resolve(),
    )


def check_requires(scenario: Scenario, *, repo_dir: Path = REPO_DIR) -> None:
    """Raise ``ScenarioError`` naming the files a scenario needs that are missing."""
    missing = [p for p in scenario.requires if not (repo_dir / p).exists()]
    if missing:
        raise ScenarioError(
            f"scenario {scenario.name!r} needs {', '.join(missing)} (relative to "
            f"{repo_dir}), which is missing: it uses data next to the repository "
            "(the shared SST-2 files are ../shared/data/sst2/train.tsv and dev.tsv)"
        )


# common.config (and numpy with it) is imported by the functions that need it, so
# `python -m simulations --help`, which lists the scenarios, starts at once.


def _string_keys() -> frozenset[str]:
    from common.config import key_types

    return frozenset(key for key, type_name in key_types().items() if type_name == "str")


def parse_value(key: str, text: str) -> Any:
    """A command-line value: TOML scalar (numbers, booleans, quoted strings), else text.

    Values of string keys stay text even when they look like numbers
    (``run-name=2024`` is the string ``"2024"``).
    """
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if key in _string_keys() and not isinstance(value, str):
        return text
    return value


def parse_set(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (``--set``); see :func:`parse_value` for how values are read."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            from common.config import ConfigError

            raise ConfigError(f"--set expects key=value, got {item!r}")
        overrides[key] = parse_value(key, value.strip())
    return overrides


def resolve_paths(run_config: Mapping[str, Any], *, repo_dir: Path = REPO_DIR) -> dict[str, Any]:
    """Path values written relative to the repository (``../``, ``./``) made absolute."""
    resolved = dict(run_config)
    for key in _PATH_KEYS:
        value = resolved.get(key)
        if isinstance(value, str) and value.startswith(("../", "./")):
            resolved[key] = str((repo_dir / value).resolve())
    return resolved


def resolve_run_config(
    scenario: Scenario,
    overrides: Mapping[str, Any],
    *,
    output_dir: Path,
    run_name: str,
) -> dict[str, Any]:
    """The validated run config of one run of ``scenario`` with ``overrides`` applied.

    Raises
    ------
    ConfigError
        If a key is unknown or a value is invalid (checked before Flower starts).
    """
    run_config = resolve_paths({**scenario.run_config, **overrides})
    run_config["output-dir"] = str(Path(output_dir).resolve())
    run_config.setdefault("run-name", run_name)
    from common.config import RunConfig

    RunConfig.from_flower(run_config)
    return run_config


def safe_name(text: str) -> str:
    """``text`` with characters other than letters, digits, ``.=_-`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_") or "run"
