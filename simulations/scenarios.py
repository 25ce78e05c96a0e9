"""Named simulation scenarios: TOML files under simulations/scenarios/."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
_TOP_LEVEL_KEYS = {"description", "num-supernodes", "resources", "run-config", "requires"}


class ScenarioError(ValueError):
    """A scenario file is missing or malformed."""


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


def available() -> list[str]:
    """Names of the shipped scenarios."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """Read a scenario by name (simulations/scenarios/<name>.toml) or by file path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(
            f"scenario {name_or_path!r} not found ({path}); available: {', '.join(available())}"
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
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
    resources = raw.get("resources", {})
    bad = sorted(set(resources) - {"num-cpus", "num-gpus"})
    if bad:
        raise ScenarioError(
            f"{path}: unknown [resources] key(s) {bad}; allowed: num-cpus, num-gpus"
        )
    return Scenario(
        name=path.stem,
        description=str(raw.get("description", "")),
        num_supernodes=nodes,
        num_cpus=resources.get("num-cpus", 1),
        num_gpus=resources.get("num-gpus", 0.0),
        run_config=dict(raw.get("run-config", {})),
        requires=tuple(raw.get("requires", ())),
    )
