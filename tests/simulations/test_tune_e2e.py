"""A real search through `flwr run`: two trials of a tiny scenario (tiny BERT)."""

from __future__ import annotations

import json

import pytest

from simulations.__main__ import main
from simulations.scenarios import load_scenario, resolve_run_config
from tests.helpers import write_tiny_scenario

pytestmark = pytest.mark.e2e


def test_tune_runs_two_trials_and_writes_a_runnable_best_scenario(tmp_path, tiny_model_dir):
    scenario = write_tiny_scenario(tmp_path / "tiny.toml", tiny_model_dir, rounds=2)
    out = tmp_path / "out"

    status = main(["tune", str(scenario), "--space", "learning-rate=1e-4:1e-2:log",
                   "--space", "local-steps=1,2", "--trials", "2", "--seed", "3",
                   "--name", "t", "--output-dir", str(out), "--quiet"])

    assert status == 0
    record = json.loads((out / "t" / "tune.json").read_text())
    assert record["status"] == "completed" and record["split"] == "validation"
    assert record["overrides"]["validation-fraction"] == 0.1
    # Two trials, never pruned (the median pruner needs two finished trials first).
    assert [t["state"] for t in record["trials"]] == ["complete", "complete"]
    for trial in record["trials"]:
        assert [v[0] for v in trial["values"]] == [1, 2]
        assert 1e-4 <= trial["params"]["learning-rate"] <= 1e-2
        assert set(trial["test"]) >= {"accuracy", "f1_macro", "loss"}
        rows = (out / "t" / f"trial-{trial['number']:03d}" / "results.jsonl").read_text()
        validation = [json.loads(line)["validation"]["accuracy"] for line in rows.splitlines()]
        assert [v[1] for v in trial["values"]] == validation[1:]
    best = record["best"]
    assert best["value"] == max(t["value"] for t in record["trials"])
    scenario_back = load_scenario(str(out / "t" / "best.toml"))
    assert scenario_back.run_config["learning-rate"] == best["params"]["learning-rate"]
    assert scenario_back.run_config["local-steps"] == best["params"]["local-steps"]
    resolve_run_config(scenario_back, {}, output_dir=tmp_path / "again", run_name="x")
    assert (out / "t" / "tune.html").is_file()
