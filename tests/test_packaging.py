"""The installed distribution holds every product package and the files it reads.

A non-editable install (``pip install .``) copies only what pyproject.toml names: a
package missing there (as ``common.tasks`` once was) imports in a checkout and fails
everywhere else.
"""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("common", "server", "client", "simulations", "deployment")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_product_package_is_in_the_distribution():
    packages = set(find_packages(str(ROOT), include=_setuptools()["packages"]["find"]["include"]))
    # Importable packages: every folder up to the root has an __init__.py (the baseline
    # app under simulations/benchmarks/baseline_app is a Flower App of its own, data).
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for root in PRODUCT for p in (ROOT / root).rglob("__init__.py")
               if all((ROOT / Path(*p.parent.relative_to(ROOT).parts[:n]) / "__init__.py")
                      .exists() for n in range(1, len(p.parent.relative_to(ROOT).parts)))}
    assert "common.tasks" in on_disk and "simulations.benchmarks" in on_disk
    assert on_disk <= packages, sorted(on_disk - packages)
    assert not {p for p in packages if p.split(".")[0] not in PRODUCT}, packages


def test_the_data_files_the_code_reads_are_package_data():
    patterns = _setuptools()["package-data"]["simulations"]
    for needed in ("scenarios/quickstart.toml", "scenarios/sft-quickstart.toml",
                   "benchmarks/baseline_app/pyproject.toml", "benchmarks/RESULTS.md",
                   "benchmarks/baseline_app/hfbaseline/__init__.py"):
        assert (ROOT / "simulations" / needed).exists(), needed
        assert any(fnmatch(needed, pattern) for pattern in patterns), needed
    for scenario in (ROOT / "simulations" / "scenarios").glob("*.toml"):
        assert any(fnmatch(f"scenarios/{scenario.name}", p) for p in patterns), scenario


def test_ci_runs_exactly_the_readmes_test_command():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set-up: two commands", 1)[1].split("```", 2)[1]
    (command,) = [line for line in setup.splitlines() if line.startswith("python -m pytest")]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if re.match(r"python -m pytest\b", line)]
    assert ci == [command]
    # The workers' plugin is installed by the extras the set-up installs.
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert any(req.startswith("pytest-xdist") for req in dev) == ("-n " in command)
