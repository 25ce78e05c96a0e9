import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAvg

from common.config import ConfigError, RunConfig
from common.tasks import get_task
from server.recorder import EarlyStop, RoundRecorder
from server.reply_pipeline import Reply, client_measurements
from server.results import Clients, ResultsRow, read_results
from server.run_outputs import (
    OutcomeError,
    ResumePoint,
    RunOutcomeRecord,
    RunOutputs,
    check_resume,
    failure_reasons,
    no_aggregation_message,
    outcome_of,
    read_outcome,
    replace_folder,
    rounds_aggregated,
    staging_folder,
    write_outcome,
)
from server.strategies import strategy_state
from server.tracked_strategy import RoundStats


def _outputs(tmp_path, keep=0):
    outputs = RunOutputs(tmp_path / "run", keep_checkpoints=keep)
    outputs.start(RunConfig(), ["neg", "pos"])
    return outputs


def test_start_writes_config_and_label_map(tmp_path):
    outputs = _outputs(tmp_path)
    config = json.loads((outputs.folder / "config.json").read_text())
    assert config["learning-rate"] == RunConfig().learning_rate
    assert json.loads((outputs.folder / "label_map.json").read_text()) == {"0": "neg", "1": "pos"}


def test_checkpoint_round_trip_is_bit_exact_with_strategy_state(tmp_path):
    outputs = _outputs(tmp_path)
    state = {"a.weight": np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32)}
    strategy_state = {"m_t": {"a.weight": np.ones((3, 2))}, "momentum_vector": [np.zeros(2)]}
    outputs.save_checkpoint(1, state, strategy_state)
    outputs.append_result(ResultsRow.from_json({"round": 1}))
    checkpoint = outputs.last_checkpoint()
    assert checkpoint.round == 1
    assert checkpoint.global_state["a.weight"].tobytes() == state["a.weight"].tobytes()
    np.testing.assert_array_equal(checkpoint.strategy_state["m_t"]["a.weight"], np.ones((3, 2)))
    assert isinstance(checkpoint.strategy_state["momentum_vector"], list)


def test_resume_point_is_the_last_round_with_results_and_checkpoint(tmp_path):
    outputs = _outputs(tmp_path)
    for rnd in (0, 1, 2):
        outputs.save_checkpoint(rnd, {"w": np.full(1, rnd, np.float32)}, {})
        outputs.append_result(ResultsRow.from_json({"round": rnd}))
    outputs.save_checkpoint(3, {"w": np.full(1, 3, np.float32)}, {})  # crashed before line
    with outputs.results_path.open("a") as f:
        f.write('{"round": 4, "torn')  # crashed mid-write
    checkpoint = outputs.last_checkpoint()
    assert checkpoint.round == 2 and checkpoint.global_state["w"][0] == 2
    assert [r.round for r in outputs.read_results()] == [0, 1, 2]


def test_old_checkpoints_are_pruned(tmp_path):
    outputs = _outputs(tmp_path, keep=2)
    for rnd in range(5):
        outputs.save_checkpoint(rnd, {"w": np.zeros(1, np.float32)}, {})
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0003.safetensors", "round-0004.safetensors"]


def test_resume_refuses_changed_settings_but_allows_more_rounds(tmp_path):
    outputs = _outputs(tmp_path)
    outputs.check_resumable(RunConfig(num_server_rounds=9, resume_from=str(outputs.folder)))
    with pytest.raises(ConfigError, match=f"learning-rate: {RunConfig().learning_rate} -> 0.1"):
        outputs.check_resumable(RunConfig(learning_rate=0.1))


def test_resume_without_completed_round_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no completed round"):
        _outputs(tmp_path).last_checkpoint()


# --- resume from damaged checkpoints, and the pure check -------------------------
def _three_rounds(tmp_path, keep=0):
    outputs = _outputs(tmp_path, keep=keep)
    for rnd in (0, 1, 2):
        outputs.save_checkpoint(rnd, {"w": np.full(1, rnd, np.float32)}, {})
        outputs.append_result(ResultsRow.from_json({"round": rnd}))
    return outputs


def _snapshot(folder):
    """Bytes and modification time of every file, and the set of paths (folders too)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None,
                                         p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_one_and_says_which(
    tmp_path, capsys
):
    outputs = _three_rounds(tmp_path)
    bad = outputs.checkpoint_dir / "round-0002.safetensors"
    bad.write_bytes(bad.read_bytes()[:-7])  # truncated, as by a full disk
    checkpoint = outputs.last_checkpoint()
    assert checkpoint.round == 1 and checkpoint.global_state["w"][0] == 1
    assert [r.round for r in outputs.read_results()] == [0, 1]
    warning = capsys.readouterr().out
    assert str(bad) in warning and "SafetensorError" in warning


def test_check_resume_names_the_skipped_file_and_the_round_it_would_continue_after(tmp_path):
    outputs = _three_rounds(tmp_path)
    bad = outputs.checkpoint_dir / "round-0002.safetensors"
    bad.write_bytes(b"garbage, not a safetensors file")
    point = check_resume(outputs.folder, RunConfig())
    assert isinstance(point, ResumePoint) and point.round == 1
    assert point.checkpoint == outputs.checkpoint_dir / "round-0001.safetensors"
    assert [path for path, _ in point.skipped] == [bad]
    assert "SafetensorError" in point.skipped[0][1]


def test_a_checkpoint_holding_another_round_is_not_trusted(tmp_path):
    outputs = _three_rounds(tmp_path)
    ckpt = outputs.checkpoint_dir
    (ckpt / "round-0001.safetensors").replace(ckpt / "round-0002.safetensors")
    point = check_resume(outputs.folder, RunConfig())
    assert point.round == 0 and "holds round 1, not 2" in point.skipped[0][1]


def test_all_checkpoints_corrupt_is_an_error_naming_each_file(tmp_path):
    outputs = _three_rounds(tmp_path)
    for path in outputs.checkpoint_dir.iterdir():
        path.write_bytes(b"\x00" * 5)
    with pytest.raises(ConfigError, match="unreadable") as err:
        outputs.last_checkpoint()
    for rnd in (0, 1, 2):
        assert str(outputs.checkpoint_dir / f"round-{rnd:04d}.safetensors") in str(err.value)
    assert [r.round for r in outputs.read_results()] == [0, 1, 2]  # nothing dropped


def test_check_resume_on_a_missing_folder_does_not_create_it(tmp_path):
    with pytest.raises(ConfigError, match="`resume-from` folder .*nope does not exist"):
        check_resume(tmp_path / "nope", RunConfig())
    assert not (tmp_path / "nope").exists()


def test_check_resume_names_what_a_non_run_folder_lacks(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ConfigError, match="not a fedsft run: config.json and results.jsonl"):
        check_resume(tmp_path / "photos", RunConfig())
    (tmp_path / "photos" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a fedsft run: results.jsonl is missing"):
        check_resume(tmp_path / "photos", RunConfig())


def test_check_resume_refuses_changed_settings(tmp_path):
    outputs = _three_rounds(tmp_path)
    default = RunConfig().learning_rate
    with pytest.raises(ConfigError, match=rf"cannot resume .*\(learning-rate: {default} -> 0.01\)"):
        check_resume(outputs.folder, RunConfig(learning_rate=0.01))


def test_check_resume_changes_nothing_on_disk(tmp_path):
    outputs = _three_rounds(tmp_path)
    outputs.save_checkpoint(3, {"w": np.zeros(1, np.float32)}, {})  # no results line
    (outputs.checkpoint_dir / "round-0002.safetensors").write_bytes(b"corrupt")
    with outputs.results_path.open("a") as f:
        f.write('{"round": 3, "to')
    before = _snapshot(outputs.folder)
    assert check_resume(outputs.folder, RunConfig(num_server_rounds=9)).round == 1
    assert _snapshot(outputs.folder) == before


# --- outcome.json --------------------------------------------------------------
def _row(rnd, aggregated, *problems, skipped=False):
    return ResultsRow(round=rnd, clients=Clients(aggregated=aggregated, skipped=skipped,
                                                 problems=problems))


def test_only_rounds_with_an_aggregated_update_count():
    rows = [_row(0, 0), _row(1, 0, skipped=True), _row(2, 3), _row(3, 2, skipped=True),
            _row(4, 1)]
    assert rounds_aggregated(rows) == 2  # round 0 is the initial model; 3 returned no model
    assert rounds_aggregated([_row(0, 0), _row(1, 0, skipped=True)]) == 0


def test_failure_reasons_quote_each_distinct_reason_once():
    same = "error: DataError: /data/a.csv does not exist"
    rows = [_row(0, 0), _row(1, 0, f"node 11: {same}", f"node 12: {same}", skipped=True),
            _row(2, 0, f"node 11: {same}", "node 12: error: CUDA out of memory",
                 "round skipped: too few", "aggregation failed: x", skipped=True)]
    reasons, total = failure_reasons(rows)
    assert reasons == [same, "error: CUDA out of memory", "round skipped: too few"]
    assert total == 4


def test_the_no_aggregation_message_is_one_paragraph_quoting_the_clients(tmp_path):
    rows = [_row(0, 0), _row(1, 0, "node 3: error: DataError: no rows", skipped=True),
            _row(2, 0, "node 3: error: DataError: no rows", skipped=True)]
    message = no_aggregation_message(tmp_path / "run", rows)
    assert "none of its 2 round(s) aggregated" in message and "\n" not in message
    assert message.count("'error: DataError: no rows'") == 1
    assert str(tmp_path / "run" / "results.jsonl") in message


def test_outcome_round_trips_through_outcome_json(tmp_path):
    rows = [_row(0, 0), _row(1, 2), _row(2, 0, skipped=True)]
    outcome = outcome_of(rows, status="completed", message="ok", final_model=True,
                         stopped_early="privacy budget: stopping after round 2")
    assert (outcome.rounds_done, outcome.rounds_aggregated) == (2, 1)
    write_outcome(tmp_path, outcome)
    assert read_outcome(tmp_path) == outcome
    assert json.loads((tmp_path / "outcome.json").read_text())["status"] == "completed"


def test_read_outcome_is_none_before_the_end_and_an_error_when_malformed(tmp_path):
    assert read_outcome(tmp_path) is None
    (tmp_path / "outcome.json").write_text('{"status": "completed"}')
    with pytest.raises(OutcomeError, match="outcome.json is not a fedsft outcome"):
        read_outcome(tmp_path)
    with pytest.raises(OutcomeError, match="must be one of completed, failed"):
        RunOutcomeRecord(status="done", message="", rounds_done=0, rounds_aggregated=0,
                         final_model=False)


# --- replacing a folder atomically ---------------------------------------------
def test_replace_folder_swaps_in_the_new_folder_and_drops_the_old(tmp_path):
    target = tmp_path / "final"
    target.mkdir()
    (target / "old.txt").write_text("old")
    staging = staging_folder(target)
    assert staging.parent == tmp_path and staging.name.startswith(".final.")
    (staging / "new.txt").write_text("new")
    replace_folder(staging, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


# --- the best round's checkpoint (select-model=best) ----------------------------------
def test_pruning_never_removes_a_protected_checkpoint(tmp_path):
    outputs = _outputs(tmp_path, keep=2)
    for rnd in range(5):
        outputs.save_checkpoint(rnd, {"w": np.full(1, rnd, np.float32)}, {}, protect={1})
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0001.safetensors", "round-0003.safetensors", "round-0004.safetensors"]
    assert outputs.load_checkpoint(1).global_state["w"][0] == 1
    with pytest.raises(FileNotFoundError, match="checkpoint of round 0 not found"):
        outputs.load_checkpoint(0)


class _Strategy:
    """TrackedStrategy's public seams the recorder uses: every round aggregated 2 of 2."""

    def __init__(self, round_offset: int = 0) -> None:
        self.round_offset = round_offset
        self.inner = FedAvg()

    def to_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def take_round_stats(self, rnd: int) -> RoundStats:
        return RoundStats(round=rnd, sampled=2, aggregated=2)

    def inner_state(self) -> dict:
        return strategy_state(self.inner)


def _recorder(outputs, accuracies, *, round_offset=0, strategy=_Strategy, **cfg_changes):
    """A RoundRecorder whose validation accuracy in round r is ``accuracies[r]``."""
    cfg = RunConfig(validation_fraction=0.1, keep_checkpoints=outputs.keep_checkpoints,
                    **cfg_changes)

    def evaluate(state, data, ctx):  # type: ignore[no-untyped-def]
        return {"accuracy": accuracies[int(state["w"][0])], "f1_macro": 0.0, "loss": 1.0,
                "num_examples": 4}

    # Only a validation split (any examples: evaluate above ignores them), no central one.
    return RoundRecorder(cfg=cfg, task=get_task(cfg.task), model=None, tokenizer=None,
                         eval_data=None, device=None, strategy=strategy(round_offset),
                         outputs=outputs, total_rounds=len(accuracies) - 1, validation_data=[0],
                         evaluate=evaluate)


def _round(recorder, rnd, offset=0):  # type: ignore[no-untyped-def]
    # State "w" is the round number, so evaluate() looks up that round's accuracy.
    recorder(rnd - offset, ArrayRecord({"w": Array(np.full(1, rnd, np.float32))}))


def test_the_best_checkpoint_survives_pruning_and_resume_recomputes_the_best(
    tmp_path, capsys
):
    accuracies = [0.5, 0.7, 0.9, 0.6, 0.6, 0.95, 0.5]
    outputs = _outputs(tmp_path, keep=1)
    recorder = _recorder(outputs, accuracies)
    for rnd in range(5):
        _round(recorder, rnd)
    assert recorder.best_state is not None and recorder.best_state[0] == 2
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0002.safetensors", "round-0004.safetensors"]
    assert [r.validation["accuracy"] for r in outputs.read_results()] == accuracies[:5]

    # Resume after round 4: the best so far comes from results.jsonl, its state from disk.
    resumed_outputs = RunOutputs(outputs.folder, keep_checkpoints=1)
    assert resumed_outputs.last_checkpoint().round == 4
    resumed = _recorder(resumed_outputs, accuracies, round_offset=4)
    selection = resumed.selection()
    assert (selection.round, selection.last_round) == (2, 4)
    assert resumed_outputs.load_checkpoint(2).global_state["w"][0] == 2
    _round(resumed, 5, offset=4)  # a new best: round 2's checkpoint stays until row 5 is on disk
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0002.safetensors", "round-0005.safetensors"]
    _round(resumed, 6, offset=4)
    assert sorted(p.name for p in outputs.checkpoint_dir.iterdir()) == [
        "round-0005.safetensors", "round-0006.safetensors"]
    assert resumed.selection().note == "best validation accuracy 0.9500 at round 5 of 6"


def test_the_recorder_stops_early_after_the_round_line_is_written(tmp_path):
    outputs = _outputs(tmp_path, keep=0)
    recorder = _recorder(outputs, [0.5, 0.7, 0.6, 0.7, 0.9], early_stopping_patience=2)
    for rnd in range(3):
        _round(recorder, rnd)
    with pytest.raises(EarlyStop, match="after round 3 of 4"):
        _round(recorder, 3)
    assert [r.round for r in outputs.read_results()] == [0, 1, 2, 3]
    assert (outputs.checkpoint_dir / "round-0003.safetensors").is_file()


def test_outcome_records_the_selection_and_reads_older_files_without_it(tmp_path):
    selection = {"rule": "best", "round": 2, "last_round": 3, "metric": "accuracy",
                 "split": "validation", "value": 0.8, "note": "best validation accuracy"}
    outcome = outcome_of([ResultsRow(round=3)], status="completed", message="ok", final_model=True,
                         stopped_early="early stopping: ...", selection=selection)
    write_outcome(tmp_path, outcome)
    assert read_outcome(tmp_path) == outcome and outcome.selection == selection
    data = json.loads((tmp_path / "outcome.json").read_text())
    del data["selection"]  # written before the field existed
    (tmp_path / "outcome.json").write_text(json.dumps(data))
    assert read_outcome(tmp_path).selection is None


class _SitesStrategy(_Strategy):
    """Rounds whose stats come from made-up replies: clinic-a shares its data statistics
    (in every round: a client restarted after a resume sends them again), clinic-b not."""

    def take_round_stats(self, rnd: int) -> RoundStats:
        shared = {"data-rows-read": 12, "data-rows": 10, "data-label-count-0": 7,
                  "data-label-count-1": 3, "data-label-share-0": 0.7,
                  "data-label-share-1": 0.3, "data-duplicate-share": 0.0,
                  "data-short-share": 0.0, "data-truncated-share": 0.0}
        a_rows = 10 + rnd  # a different first report in each round, to see which is kept
        replies = [
            Reply(node=1, metrics={**shared, "data-rows-read": a_rows + 2, "data-rows": a_rows,
                                   "train-seconds": 2.0, "train-examples-seen": 8}),
            Reply(node=2, metrics={"train-seconds": float(rnd)}),
        ]
        measured = client_measurements(replies, site_key={1: "clinic-a", 2: "clinic-b"}.get)
        return RoundStats(round=rnd, sampled=2, aggregated=2, site_data=measured.site_data,
                          site_compute=measured.site_compute)


def test_site_data_is_recorded_in_its_first_round_and_kept_across_a_resume(tmp_path):
    outputs = _outputs(tmp_path)
    recorder = _recorder(outputs, [0.5, 0.6, 0.7, 0.8], strategy=_SitesStrategy)
    for rnd in range(2):
        _round(recorder, rnd)
    resumed = _recorder(RunOutputs(outputs.folder, keep_checkpoints=0), [0.5, 0.6, 0.7, 0.8],
                        round_offset=1, strategy=_SitesStrategy)
    _round(resumed, 2, offset=1)

    rows = read_results(outputs.results_path)

    assert [sorted(r.site_data) for r in rows] == [["clinic-a"], [], []]
    assert rows[0].site_data["clinic-a"].rows == 10  # the first report, not round 2's
    assert rows[0].site_data["clinic-a"].dropped == 2
    assert [r.site_compute["clinic-b"].train_seconds for r in rows] == [0.0, 1.0, 2.0]
    assert rows[2].site_compute["clinic-a"].examples_per_second == 4.0
