"""server/export.py: final/ appears complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.export import export_final_model


class _Saves:
    """Stands in for a model or tokenizer: ``save_pretrained`` writes one file."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / self.name).write_text(self.name)
        if self.fail:
            raise OSError(28, "No space left on device")


def test_final_model_replaces_an_earlier_final_folder(tmp_path):
    old = tmp_path / "final" / "model"
    old.mkdir(parents=True)
    (old / "config.json").write_text("old")
    paths = export_final_model(_Saves("config.json"), _Saves("tokenizer.json"),
                               tmp_path / "final")
    assert paths == {"model": str(tmp_path / "final" / "model")}
    assert (old / "config.json").read_text() == "config.json"
    assert (old / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_interrupted_final_model_leaves_no_final_folder(tmp_path):
    # The model's config.json is written, then the tokenizer fails: without staging,
    # final/model/config.json would exist and the run would look finished.
    with pytest.raises(OSError, match="No space left"):
        export_final_model(_Saves("config.json"), _Saves("tokenizer.json", fail=True),
                           tmp_path / "final")
    assert list(tmp_path.iterdir()) == []
