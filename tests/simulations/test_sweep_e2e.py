"""A real sweep through `flwr run`: two seeds, reports (tiny BERT).

That a sweep's run is `run --set seed=S` (so reproducible by it) is checked without
Flower in test_scenarios.py; that a run is deterministic per seed, by the resume tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.__main__ import main
from tests.helpers import write_tiny_scenario

pytestmark = pytest.mark.e2e


def _central(run_dir: Path) -> list[dict]:
    rows = (run_dir / "results.jsonl").read_text().splitlines()
    return [json.loads(line)["central"] for line in rows]


def test_sweep_over_two_seeds_runs_both_and_reports_them(tmp_path, tiny_model_dir):
    scenario = write_tiny_scenario(tmp_path / "tiny.toml", tiny_model_dir, rounds=1)
    out = tmp_path / "out"

    status = main(["sweep", str(scenario), "--seeds", "1,2", "--name", "sw",
                   "--output-dir", str(out), "--quiet"])

    assert status == 0
    sweep = out / "sw"
    one, two = sweep / "tiny-seed=1", sweep / "tiny-seed=2"
    record = json.loads((sweep / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == ["tiny-seed=1", "tiny-seed=2"]
    assert all(r["ok"] for r in record["runs"])
    # Another seed: other numbers.
    assert [c["loss"] for c in _central(one)] != [c["loss"] for c in _central(two)]
    for run in (one, two):
        assert (run / "report.html").is_file()
        assert (run / "report" / "label_distribution.png").is_file()
        sim = json.loads((run / "simulation.json").read_text())
        assert sim["num-supernodes"] == 2 and sim["scenario"] == "tiny"
    html = (sweep / "compare.html").read_text()
    assert "tiny-seed=1" in html and "tiny-seed=2" in html
    assert "Mean &plusmn; standard deviation over seeds" in html
