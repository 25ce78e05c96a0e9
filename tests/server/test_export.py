"""server/export.py: final/ appears complete or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from server.export import export_final_model


@pytest.fixture
def tiny_model(tiny_model_dir):
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)


class _Saves:
    """Stands in for a tokenizer: ``save_pretrained`` writes one file."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail = name, fail

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / self.name).write_text(self.name)
        if self.fail:
            raise OSError(28, "No space left on device")


def test_final_model_replaces_an_earlier_final_folder(tmp_path, tiny_model):
    old = tmp_path / "final" / "model"
    old.mkdir(parents=True)
    (old / "config.json").write_text("old")
    paths = export_final_model(tiny_model, _Saves("tokenizer.json"), tmp_path / "final")
    assert paths == {"model": str(tmp_path / "final" / "model")}
    assert (old / "config.json").read_text() != "old"
    assert (old / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_an_interrupted_final_model_leaves_no_final_folder(tmp_path, tiny_model):
    # The model's config.json is written, then the tokenizer fails: without staging,
    # final/model/config.json would exist and the run would look finished.
    with pytest.raises(OSError, match="No space left"):
        export_final_model(tiny_model, _Saves("tokenizer.json", fail=True),
                           tmp_path / "final")
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_is_not_a_transformers_model_is_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot export a Linear"):
        export_final_model(torch.nn.Linear(2, 2), _Saves("tokenizer.json"), tmp_path / "final")
    assert list(tmp_path.iterdir()) == []
