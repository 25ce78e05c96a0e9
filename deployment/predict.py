"""Label a CSV / JSONL file with an exported model, in batches, with a progress bar.

Texts are tokenized exactly as in training and evaluation (``common.training.encode``,
right padding per batch, ``max-length`` from the export's fedsft.json unless given), so
predictions on the server's eval file reproduce its final accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from common.training import encode, iterate_batches
from deployment.export import EXPORT_META

FORMATS = (".csv", ".jsonl")


class PredictError(ValueError):
    """The model or the input file cannot be used; the message names which and why."""


def read_input(path: Path, *, text_column: str) -> pd.DataFrame:
    """Read a CSV or JSONL file, keeping every row and column; texts as ``str``."""
    if not path.is_file():
        raise PredictError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PredictError(f"{path}: unknown format {path.suffix!r}; allowed: .csv, .jsonl")
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype={text_column: str}, keep_default_na=False,
                                na_values=[""], encoding="utf-8-sig")
        else:
            frame = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise PredictError(f"{path}: could not parse the file: {error}") from error
    if text_column not in frame.columns:
        found = ", ".join(map(repr, map(str, frame.columns)))
        raise PredictError(f"{path}: missing text column {text_column!r}; columns found: {found}")
    frame[text_column] = frame[text_column].fillna("").map(str)
    return frame


def export_settings(model_dir: Path) -> dict:
    """The export's fedsft.json, or {} for a model exported elsewhere."""
    path = model_dir / EXPORT_META
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def predict_labels(
    model_dir: Path,
    texts: list[str],
    *,
    max_length: int,
    batch_size: int = 64,
    progress: bool = True,
) -> list[str]:
    """The predicted label name of each text (``id2label`` of the model config)."""
    if not (model_dir / "config.json").is_file():
        raise PredictError(f"not a Hugging Face model folder (no config.json): {model_dir}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    model.eval()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    data = encode(texts, [0] * len(texts), tokenizer, max_length=max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    predicted: list[int] = []
    batches = iterate_batches(data, batch_size=batch_size, pad_token_id=pad, generator=None)
    with torch.inference_mode(), tqdm(total=len(texts), unit="text", disable=not progress) as bar:
        for batch in batches:
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            predicted.extend(logits.float().argmax(dim=-1).tolist())
            bar.update(len(batch["input_ids"]))
    return [id2label[i] for i in predicted]


def predict_file(
    model_dir: Path,
    input_path: Path,
    output_path: Path,
    *,
    text_column: str | None = None,
    max_length: int | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Path:
    """Write ``input_path`` plus a ``prediction`` column to ``output_path`` (.csv/.jsonl)."""
    if not model_dir.is_dir():
        raise PredictError(f"model folder not found: {model_dir}")
    settings = export_settings(model_dir)
    text_column = text_column or str(settings.get("text-column") or "text")
    if max_length is None:
        if not settings.get("max-length"):
            raise PredictError(f"{model_dir} has no {EXPORT_META}: pass --max-length "
                               "(the run's `max-length`)")
        max_length = int(settings["max-length"])
    if output_path.suffix.lower() not in FORMATS:
        raise PredictError(f"{output_path}: output must end in .csv or .jsonl")
    frame = read_input(input_path, text_column=text_column)
    frame["prediction"] = predict_labels(
        model_dir, list(frame[text_column]), max_length=max_length, batch_size=batch_size,
        progress=progress,
    )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    if output_path.suffix.lower() == ".csv":
        frame.to_csv(output_path, index=False, quoting=csv.QUOTE_MINIMAL)
    else:
        frame.to_json(output_path, orient="records", lines=True, force_ascii=False)
    return output_path
