"""The sweep-results section: per-round accuracies, best, largest drop, stopped runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.results import ResultsRow
from simulations.sweep_results import largest_drop, read_sweep, section


def test_largest_drop_counts_only_falls_after_round_3() -> None:
    # Round 2 -> 3 falls 0.30 (before the window); 4 -> 5 falls 0.05, 5 -> 6 0.02.
    accuracies = [0.50, 0.60, 0.80, 0.50, 0.75, 0.70, 0.68]
    assert largest_drop(accuracies) == pytest.approx(0.05)
    assert largest_drop(accuracies, after=0) == pytest.approx(0.30)
    assert largest_drop([0.5, 0.6, 0.7, 0.8, 0.9]) == 0.0  # only rises


def _run(folder: Path, name: str, accuracies: list[float], *, planned: int,
         exported: int | None) -> dict:
    run_dir = folder / name
    run_dir.mkdir()
    (run_dir / "results.jsonl").write_text("".join(
        ResultsRow(round=r, central={"accuracy": a}).to_line()
        for r, a in enumerate(accuracies)), encoding="utf-8")
    (run_dir / "config.json").write_text(json.dumps({"num-server-rounds": planned}))
    if exported is not None:
        (run_dir / "outcome.json").write_text(json.dumps({"selection": {"round": exported}}))
    return {"name": name, "run_dir": str(run_dir), "overrides": {"strategy": name, "seed": 1}}


def test_a_sweep_becomes_one_row_per_run_with_the_settings_that_vary(tmp_path: Path) -> None:
    runs = [_run(tmp_path, "fedavg", [0.5, 0.6, 0.7, 0.65, 0.8], planned=4, exported=4),
            _run(tmp_path, "fedavgm", [0.5, 0.7, 0.6], planned=4, exported=None)]
    never = {"name": "fedadam", "run_dir": str(tmp_path / "absent"), "overrides": {}}
    (tmp_path / "sweep.json").write_text(json.dumps({
        "scenario": "skew", "overrides": {"learning-rate": 0.002},
        "runs": [*runs, never], "seconds": 10.0}))
    record, read = read_sweep(tmp_path)
    assert [r.name for r in read] == ["fedavg", "fedavgm"]  # the unstarted run is left out
    assert read[0].finished and not read[1].finished
    assert read[0].best == (4, 0.8) and read[1].best == (1, 0.7)

    result = section([("sweep ...", record, read)], name="skew-sweep", description="d",
                     machine={"date": "today"}, seconds=10.0)
    columns = result["table"]["columns"]
    assert columns[0] == "strategy"  # seed and learning-rate are the same in every run
    assert result["config"]["same in every run"] == {"learning-rate": 0.002, "seed": 1}
    first, second = result["table"]["rows"]
    assert first[columns.index("round 4")] == "0.800"
    assert first[columns.index("best")] == "0.800 (round 4)"
    assert first[columns.index("exported round")] == "4"
    # Round 2 -> 3 falls 5 points, before the window; round 3 -> 4 rises.
    assert first[columns.index("largest drop after round 3 (points)")] == "0.0"
    assert second[columns.index("round 4")] == "-"
    assert second[columns.index("last")] == "0.600 (stopped)"
    assert "1 of 2 run(s) finished." in result["notes"]


def test_no_recorded_round_is_an_error_not_an_empty_section() -> None:
    with pytest.raises(ValueError, match="no sweep run recorded a round"):
        section([("c", {}, [])], name="x", description="d", machine={}, seconds=0.0)
