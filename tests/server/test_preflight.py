"""server/preflight.py: the checks a run passes before Flower starts (no Flower)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import ConfigError, RunConfig
from common.data import DataError
from server import preflight as pf

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
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(_cfg(**config).to_flower()))
    return folder


def test_resume_checks_the_folder_without_creating_or_changing_it(tmp_path):
    run = _run_folder(tmp_path / "run")
    before = _tree(tmp_path)

    pf.check_resume_folder(_cfg(**{"resume-from": str(run), "num-server-rounds": 5}))
    for folder, message in ((tmp_path / "gone", "gone does not exist"),
                            (run / "config.json", "is not a folder"),
                            (tmp_path, "is not a fedsft run folder")):
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
