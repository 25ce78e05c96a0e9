"""fedsft predict on a tiny exported model: labels, kept columns, atomic output, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.config import RunConfig
from common.model import build_model
from common.specs import ModelSpec
from deployment.cli import main
from deployment.export import export_run
from deployment.predict import PredictError, check_model_dir, predict_file
from server.export import export_final_model

LABELS = ["negative", "positive"]
TEXTS = ["a terrible awful day", "great", "", "an excellent, wonderful and long " * 20, "ok"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> Path:
    """A run folder as the ServerApp leaves it (untrained LoRA model), then exported."""
    run = tmp_path_factory.mktemp("run") / "tiny"
    model, tokenizer = build_model(
        ModelSpec.of(RunConfig(model=str(tiny_model_dir), method="lora"), LABELS))
    export_final_model(model, tokenizer, run / "final")
    (run / "config.json").write_text(json.dumps({"max-length": 16, "method": "lora",
                                                 "text-column": "text"}))
    (run / "results.jsonl").write_text("")
    (run / "label_map.json").write_text(json.dumps(dict(enumerate(LABELS))))
    return export_run(run, run.parent / "export")


def _one_by_one(model_dir: Path, texts: list[str], max_length: int) -> list[str]:
    """Each text alone, without padding: what batched prediction must reproduce."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            out.append(model.config.id2label[int(model(**ids).logits.argmax(-1))])
    return out


def test_predict_keeps_every_column_and_matches_one_text_at_a_time(exported, tmp_path):
    source = tmp_path / "in.csv"
    pd.DataFrame({"id": range(len(TEXTS)), "text": TEXTS}).to_csv(source, index=False)

    out = predict_file(exported, source, tmp_path / "out" / "pred.csv", batch_size=2,
                       progress=False)

    predicted = pd.read_csv(out, keep_default_na=False)
    assert list(predicted.columns) == ["id", "text", "prediction"]
    assert list(predicted["id"]) == list(range(len(TEXTS)))
    assert list(predicted["prediction"]) == _one_by_one(exported, TEXTS, max_length=16)
    assert [p.name for p in out.parent.iterdir()] == ["pred.csv"]  # no temporary left

    as_jsonl = predict_file(exported, source, tmp_path / "pred.jsonl", progress=False)
    rows = [json.loads(line) for line in as_jsonl.read_text().splitlines()]
    assert [r["prediction"] for r in rows] == list(predicted["prediction"])


def test_predict_command_writes_the_output(exported, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:2]))

    code = main(["predict", str(exported), str(source), "--output", str(tmp_path / "p.csv")])

    assert code == 0
    assert f"predictions: {tmp_path / 'p.csv'}" in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "p.csv")["prediction"]) <= set(LABELS)


def test_a_failed_write_leaves_the_previous_output_untouched(exported, tmp_path,
                                                             monkeypatch):
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS}).to_csv(source, index=False)
    output = tmp_path / "pred.csv"
    output.write_text("previous predictions\n")

    def half_then_crash(self, path, **kwargs):
        Path(path).write_text("id,text,prediction\n0,half")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        predict_file(exported, source, output, progress=False)

    assert output.read_text() == "previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "pred.csv"]


def test_unloadable_weights_are_a_predict_error(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": ["x"]}).to_csv(source, index=False)

    with pytest.raises(PredictError, match="could not load the model"):
        predict_file(broken, source, tmp_path / "p.csv", progress=False)
    assert not (tmp_path / "p.csv").exists()


def test_check_model_dir_names_everything_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictError) as error:
        check_model_dir(tmp_path / "empty")
    message = str(error.value)
    assert str(tmp_path / "empty") in message
    assert "config.json" in message and "*.safetensors or *.bin" in message
    assert "tokenizer files" in message


def test_a_bare_encoder_is_not_a_classifier(tiny_model_dir):
    # tiny_model_dir is a BertModel without a classification head, like the packaged MiniLM
    with pytest.raises(PredictError, match="not a model of task classification.*BertModel"):
        check_model_dir(tiny_model_dir)
    with pytest.raises(PredictError, match="not a model of task sft.*ForCausalLM"):
        check_model_dir(tiny_model_dir, task="sft")


def test_an_input_without_rows_is_an_error(exported, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("text\n")
    with pytest.raises(PredictError, match="no rows to label"):
        predict_file(exported, source, tmp_path / "p.csv", progress=False)


def test_predict_never_replaces_a_file_of_a_run_or_an_export(exported, tmp_path):
    source = tmp_path / "in.csv"
    pd.DataFrame({"text": TEXTS[:2]}).to_csv(source, index=False)
    run = exported.parent / "tiny"
    results = (run / "results.jsonl").read_bytes()

    for target, owner in ((run / "results.jsonl", run), (exported / "labels.csv", exported)):
        target.write_bytes(target.read_bytes() if target.exists() else b"keep")
        before = target.read_bytes()
        with pytest.raises(PredictError, match=f"would replace a file of the fedsft run or "
                                               f"export {owner}"):
            predict_file(exported, source, target, progress=False)
        assert target.read_bytes() == before
    assert (run / "results.jsonl").read_bytes() == results
    # A new file beside the run's files is fine.
    assert predict_file(exported, source, run / "predictions.csv", progress=False).is_file()
