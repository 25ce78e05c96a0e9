"""server/preflight.py: the checks a run passes before Flower starts (no Flower)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, RunConfig
from common.data import DataError
from server import preflight as pf
from server.results import ResultsRow
from server.run_outputs import RunOutputs

TINY = {"builtin-examples": 200, "num-server-rounds": 2}


def _cfg(**overrides) -> RunConfig:
    return RunConfig.from_flower({**TINY, **overrides})


def _tree(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*"))


def test_a_good_new_run_passes_and_writes_nothing(tmp_path):
    pf.preflight(_cfg(**{"output-dir": str(tmp_path / "new" / "out"), "run-name": "r"}),
                 num_partitions=2)

    assert _tree(tmp_path) == []  # the output folder is created by the run, not here


@pytest.mark.parametrize(("output_dir", "run_name", "message"), [
    ("f", "", "f cannot be a folder: .* is a file"),
    ("f/deeper", "", "deeper cannot be a folder"),
    (".", "f", "the run folder .*f .* is a file"),
])
def test_an_output_dir_that_cannot_be_a_folder_is_named(tmp_path, output_dir, run_name,
                                                        message):
    (tmp_path / "f").write_text("a file")

    with pytest.raises(ConfigError, match=message):
        pf.check_output_dir(_cfg(**{"output-dir": str(tmp_path / output_dir),
                                    "run-name": run_name}))


def _run_folder(folder: Path, **config) -> Path:
    """A run folder as an interrupted run leaves it: round 1 recorded and checkpointed."""
    outputs = RunOutputs(folder, keep_checkpoints=0)
    outputs.start(_cfg(**config), ["neg", "pos"])
    outputs.save_checkpoint(1, {"w": np.zeros(2, dtype=np.float32)}, {})
    outputs.append_result(ResultsRow.from_json({"round": 1, "clients": {"aggregated": 1}}))
    return folder


def test_resume_checks_the_folder_without_creating_or_changing_it(tmp_path):
    run = _run_folder(tmp_path / "run")
    before = _tree(tmp_path)

    note = pf.check_resume_folder(_cfg(**{"resume-from": str(run), "num-server-rounds": 5}))
    assert note == f"resuming {run} after round 1 (round-0001.safetensors)"
    for folder, message in ((tmp_path / "gone", "gone does not exist"),
                            (run / "config.json", "is not a folder"),
                            (tmp_path, "is not a fedsft run: config.json and results.jsonl")):
        with pytest.raises(ConfigError, match=message):
            pf.check_resume_folder(_cfg(**{"resume-from": str(folder)}))

    assert _tree(tmp_path) == before


def test_resume_with_changed_settings_or_a_broken_config_is_refused(tmp_path):
    run = _run_folder(tmp_path / "run")

    with pytest.raises(ConfigError, match="changed settings .*learning-rate"):
        pf.check_resume_folder(_cfg(**{"resume-from": str(run), "learning-rate": 0.5}))
    (run / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        pf.check_resume_folder(_cfg(**{"resume-from": str(run)}))


def test_the_servers_data_is_loaded_and_checked(tmp_path):
    data = tmp_path / "train.csv"
    data.write_text("sentence,label\nfine,pos\nbad,neg\n")

    with pytest.raises(DataError, match="missing column 'text'"):
        pf.preflight(_cfg(dataset=str(data), **{"output-dir": str(tmp_path)}),
                     num_partitions=2)


def test_the_retention_file_is_read_and_prepared_before_flower(tmp_path):
    good = tmp_path / "general.jsonl"
    good.write_text('{"prompt": "Name a colour.", "response": "Blue."}\n'
                    '{"prompt": "2 + 2?", "response": "4"}\n')
    bad = tmp_path / "no_answers.jsonl"
    bad.write_text('{"question": "Name a colour."}\n')
    sft = {"task": "sft", "builtin-examples": 60}

    note = pf.check_retention_data(_cfg(**sft, **{"retention-dataset": str(good)}))
    with pytest.raises(DataError, match=r"`retention-dataset` .*no_answers\.jsonl"):
        pf.check_retention_data(_cfg(**sft, **{"retention-dataset": str(bad)}))
    with pytest.raises(DataError, match=r"`retention-dataset` .*not found: .*missing\.jsonl"):
        pf.check_retention_data(_cfg(**sft, **{"retention-dataset": str(tmp_path
                                                                       / "missing.jsonl")}))

    assert note == f"`retention-dataset` {good}: 2 rows"
    assert pf.check_retention_data(_cfg(**sft)) is None  # off
    assert pf.check_retention_data in pf.CHECKS


def test_checks_run_in_order_and_stop_at_the_first_problem(tmp_path, monkeypatch):
    seen = []

    def failing(cfg, num_partitions):
        seen.append(("failing", num_partitions))
        raise ConfigError("first problem")

    monkeypatch.setattr(pf, "CHECKS", (lambda c, n: seen.append(("ok", n)), failing,
                                       lambda c, n: seen.append(("never", n))))

    with pytest.raises(ConfigError, match="first problem"):
        pf.preflight(_cfg(), num_partitions=3)
    assert seen == [("ok", 3), ("failing", 3)]


def test_a_new_run_never_writes_into_an_earlier_runs_folder(tmp_path):
    run = _run_folder(tmp_path / "r")
    cfg = _cfg(**{"output-dir": str(tmp_path), "run-name": "r"})

    with pytest.raises(ConfigError, match=f"the run folder {run} already holds a run "
                                          r"\(results.jsonl, config.json, checkpoints\).*"
                                          f"resume-from={run}"):
        pf.check_new_run_folder(cfg)
    assert pf.check_new_run_folder(cfg.replace(run_name="other")) is None
    (tmp_path / "empty").mkdir()  # an empty folder (e.g. made by hand) is fine
    assert pf.check_new_run_folder(cfg.replace(run_name="empty")) is None


def test_resume_names_the_corrupt_checkpoint_it_will_skip(tmp_path):
    run = _run_folder(tmp_path / "run")
    outputs = RunOutputs(run, keep_checkpoints=0)
    outputs.save_checkpoint(2, {"w": np.ones(2, dtype=np.float32)}, {})
    outputs.append_result(ResultsRow.from_json({"round": 2, "clients": {"aggregated": 1}}))
    (run / "checkpoints" / "round-0002.safetensors").write_bytes(b"not a checkpoint")

    note = pf.check_resume_folder(_cfg(**{"resume-from": str(run)}))

    assert note.startswith(f"resuming {run} after round 1 (round-0001.safetensors); "
                           "skipping unreadable newer checkpoint(s): round-0002.safetensors")


def test_model_and_max_length_are_checked_before_flower(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ConfigError, match="`model` 'no-such-model-xyz' is not a local "
                                          "model folder"):
        pf.preflight(_cfg(model="no-such-model-xyz", **{"output-dir": str(tmp_path)}),
                     num_partitions=2)
    with pytest.raises(ConfigError, match="`max-length` 100000 exceeds the model's "
                                          "maximum of 512 positions"):
        pf.preflight(_cfg(**{"max-length": 100000, "output-dir": str(tmp_path)}),
                     num_partitions=2)


@pytest.mark.parametrize(("overrides", "clients", "message"), [
    ({"partitioner": "column:hospital"}, 2, "column 'hospital'"),
    ({"partitioner": "pathological", "classes-per-client": 4}, 2,
     "`classes-per-client` is 4 but the training data has only 3 classes"),
    ({"builtin-examples": 20}, 50, "fewer"),
])
def test_an_infeasible_partition_plan_is_refused(tmp_path, overrides, clients,
                                                           message):
    cfg = _cfg(**{**overrides, "output-dir": str(tmp_path)})

    with pytest.raises(DataError, match=message):
        pf.preflight(cfg, num_partitions=clients)
    assert pf.check_partitions(cfg, None) is None  # deployment: the sites hold the data


def test_a_feasible_plan_is_described(tmp_path):
    note = pf.check_partitions(_cfg(**{"output-dir": str(tmp_path)}), 4)

    assert note is not None and note.startswith("4 clients get ") and note.endswith("(iid)")


def test_an_sft_coordinator_without_the_sites_data_passes_and_says_so(tmp_path,
                                                                      tiny_llama_dir):
    # `dataset` none: nothing of the training data is read (the path would be missing).
    cfg = _cfg(task="sft", dataset="none", model=str(tiny_llama_dir),
               **{"output-dir": str(tmp_path)})
    notes = pf.preflight(cfg, num_partitions=None)
    assert pf.NO_CENTRAL_EVALUATION in notes
    # Its own eval file is read and checked, and then there is central evaluation.
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text('{"prompt": "2 + 2?", "response": "4"}\n')
    with_eval = _cfg(task="sft", dataset="none", **{"eval-dataset": str(eval_file)})
    assert pf.check_server_data(with_eval) is None
    with pytest.raises(DataError, match="gone.jsonl"):
        pf.check_server_data(_cfg(task="sft", dataset="none",
                                  **{"eval-dataset": str(tmp_path / "gone.jsonl")}))


def test_without_dataset_none_a_missing_sft_dataset_fails_preflight(tmp_path):
    with pytest.raises(DataError, match="absent.jsonl"):
        pf.check_server_data(_cfg(task="sft", dataset=str(tmp_path / "absent.jsonl")))


def test_a_simulation_cannot_partition_dataset_none(tmp_path):
    with pytest.raises(ConfigError, match='`dataset` = "none" says the training data is '
                                          "only at the sites, but the 3 virtual clients"):
        pf.check_partitions(_cfg(task="sft", dataset="none"), 3)
    assert pf.check_partitions(_cfg(task="sft", dataset="none"), None) is None
