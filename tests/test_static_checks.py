"""The repository's static checks, run as tests: ruff and mypy must report nothing.

Both run from the repository root with the settings in pyproject.toml, exactly as
``ruff check .`` and ``mypy`` would there.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False)


def test_ruff_reports_nothing() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"


# mypy reuses .mypy_cache in the repository root: tens of seconds once it is warm, a few
# minutes on a fresh checkout (it analyses torch and transformers), hence the mark.
@pytest.mark.slow
def test_mypy_reports_nothing() -> None:
    result = _run("mypy")
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
