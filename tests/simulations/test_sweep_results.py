"""The sweep-results section: per-round accuracies, best, largest drop, stopped runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.results import ResultsRow
from simulations.sweep_results import read_sweep, section


def _run(folder: Path, name: str, accuracies: dict[int, float], *,
         outcome: dict | None) -> dict:
    run_dir = folder / name
    run_dir.mkdir()
    (run_dir / "results.jsonl").write_text("".join(
        ResultsRow(round=r, central={"accuracy": a}).to_line()
        for r, a in accuracies.items()), encoding="utf-8")
    if outcome is not None:
        (run_dir / "outcome.json").write_text(json.dumps(outcome))
    return {"name": name, "run_dir": str(run_dir), "overrides": {"strategy": name, "seed": 1}}


def test_a_sweep_becomes_one_row_per_run_with_the_settings_that_vary(tmp_path: Path) -> None:
    done = {"status": "completed", "selection": {"round": 4}}
    runs = [_run(tmp_path, "fedavg", {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.65, 4: 0.8}, outcome=done),
            _run(tmp_path, "fedavgm", {0: 0.5, 1: 0.7, 2: 0.6}, outcome=None),
            # Early-stopped after round 6; round 5 had no central evaluation row.
            _run(tmp_path, "fedprox", {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.8, 4: 0.75, 6: 0.7},
                 outcome={"status": "completed", "stopped_early": "patience",
                          "selection": {"round": 3}})]
    never = {"name": "fedadam", "run_dir": str(tmp_path / "absent"), "overrides": {}}
    # A run the sweep was stopped in: in the folder, not in sweep.json; its settings come
    # from its config.json.
    _run(tmp_path, "stopped-in", {0: 0.5, 1: 0.55}, outcome=None)
    (tmp_path / "stopped-in" / "config.json").write_text(json.dumps(
        {"strategy": "fedyogi", "seed": 1, "learning-rate": 0.002}))
    (tmp_path / "sweep.json").write_text(json.dumps({
        "scenario": "skew", "overrides": {"learning-rate": 0.002},
        "runs": [*runs, never], "seconds": 10.0}))
    record, read = read_sweep(tmp_path)
    # The unstarted run is left out.
    assert [r.name for r in read] == ["fedavg", "fedavgm", "fedprox", "stopped-in"]
    assert read[0].finished and not read[1].finished and read[2].finished
    assert read[0].best == (4, 0.8) and read[1].best == (1, 0.7)

    result = section([("sweep ...", record, read)], name="skew-sweep", description="d",
                     machine={"date": "today"}, seconds=10.0)
    columns = result["table"]["columns"]
    assert columns[0] == "strategy"  # seed and learning-rate are the same in every run
    assert result["config"]["same in every run"] == {"learning-rate": 0.002, "seed": 1}
    first, second, third, fourth = result["table"]["rows"]
    assert fourth[0] == "fedyogi" and fourth[columns.index("last")] == "0.550 (interrupted)"
    assert first[columns.index("round 4")] == "0.800"
    assert first[columns.index("best")] == "0.800 (round 4)"
    assert first[columns.index("exported round")] == "4"
    # Round 2 -> 3 falls 5 points, before the window; round 3 -> 4 rises.
    assert first[columns.index("largest drop after round 3 (points)")] == "0.0"
    assert second[columns.index("round 4")] == "-"
    assert second[columns.index("last")] == "0.600 (interrupted)"
    assert second[columns.index("largest drop after round 3 (points)")] == "-"  # ended by 3
    # Columns follow the round numbers: round 5 is missing, round 6 is in its column;
    # 0.80 -> 0.75 is a 5-point drop after round 3 (4 -> 6 has no pair without round 5).
    assert third[columns.index("round 5")] == "-" and third[columns.index("round 6")] == "0.700"
    assert third[columns.index("largest drop after round 3 (points)")] == "5.0"
    assert third[columns.index("last")] == "0.700 (early-stopped)"
    assert "2 of 4 run(s) finished." in result["notes"]


def test_no_recorded_round_is_an_error_not_an_empty_section() -> None:
    with pytest.raises(ValueError, match="no sweep run recorded a round"):
        section([("c", {}, [])], name="x", description="d", machine={}, seconds=0.0)
