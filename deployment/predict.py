"""Predict a CSV / JSONL file with an exported model, in batches, with a progress bar.

The export's task does the work (``Task.predict_inputs`` / ``Task.predict``): a
classifier labels each text, tokenized exactly as in training and evaluation (right
padding per batch, ``max-length`` from the export's fedsft.json unless given), so
predictions on the server's eval file reproduce its final accuracy; a chat model
answers each prompt by greedy generation. The model folder
and the input file are checked before the model is loaded; the output appears only
when it is complete (written to a temporary file, then renamed).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.model_source import has_weights
from common.tasks import DEFAULT_TASK
from deployment.export import EXPORT_META

if TYPE_CHECKING:
    import pandas as pd

# pandas, torch and transformers are imported where they are used, after the cheap
# checks: a wrong path is reported in a fraction of a second, not after ten.

FORMATS = (".csv", ".jsonl")
# Any one of these holds a tokenizer's vocabulary (fast tokenizers, WordPiece, BPE,
# SentencePiece), as `save_pretrained` writes them.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


class PredictError(ValueError):
    """The model or the input file cannot be used; the message names which and why."""


def read_input(path: Path, *, text_column: str | None) -> pd.DataFrame:
    """Read a CSV or JSONL file, keeping every row and column; texts as ``str``.

    ``text_column`` must exist when given (None: the task finds its input columns).
    """
    if path.is_dir():
        raise PredictError(f"input {path} is a folder; give a .csv or .jsonl file")
    if not path.is_file():
        raise PredictError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise PredictError(f"{path}: unknown format {path.suffix!r}; allowed: .csv, .jsonl")
    import pandas as pd

    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str if text_column is None else {text_column: str},
                                keep_default_na=False,
                                na_values=[""], encoding="utf-8-sig")
        else:
            frame = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise PredictError(f"{path}: could not parse the file: {error}") from error
    if text_column is not None and text_column not in frame.columns:
        found = ", ".join(map(repr, map(str, frame.columns)))
        raise PredictError(f"{path}: missing text column {text_column!r}; columns found: {found}")
    if frame.empty:
        raise PredictError(f"{path}: no rows to label")
    if text_column is not None:
        frame[text_column] = frame[text_column].fillna("").map(str)
    return frame


def check_model_dir(model_dir: Path, *, task: str = DEFAULT_TASK) -> None:
    """Raise ``PredictError`` naming what ``model_dir`` lacks to be a model of ``task``.

    A usable folder (an export of ``fedsft export``, or any Hugging Face model of the
    task's kind: a sequence classifier, a causal LM) has config.json, weights
    (``*.safetensors`` or ``*.bin``) and tokenizer files.
    """
    from common.tasks import get_task

    suffix = get_task(task).architecture_suffix
    if not model_dir.exists():
        raise PredictError(f"model folder not found: {model_dir}")
    if not model_dir.is_dir():
        raise PredictError(f"model {model_dir} is a file; give the folder `fedsft export` "
                           "wrote")
    missing = []
    if not (model_dir / "config.json").is_file():
        missing.append("config.json")
    if not has_weights(model_dir):
        missing.append("weights (*.safetensors or *.bin)")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if missing:
        raise PredictError(f"{model_dir} is not an exported model (make one with `fedsft "
                           f"export RUN_DIR OUT`): missing {'; '.join(missing)}")
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PredictError(f"{model_dir / 'config.json'}: not valid JSON: {error}") from error
    architectures = (config.get("architectures") if isinstance(config, dict) else None) or []
    if not any(str(a).endswith(suffix) for a in architectures):
        raise PredictError(f"{model_dir} is not a model of task {task}: config.json names "
                           f"architectures {architectures}, none *{suffix} "
                           "(a base model without the task's head?)")


def export_settings(model_dir: Path) -> dict:
    """The export's fedsft.json, or {} for a model exported elsewhere."""
    path = model_dir / EXPORT_META
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PredictError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(settings, dict):
        raise PredictError(f"{path}: expected a JSON object, got {type(settings).__name__}")
    return settings


def predict_labels(
    model_dir: Path,
    inputs: list[Any],
    *,
    max_length: int,
    settings: dict[str, Any],
    batch_size: int = 64,
    progress: bool = True,
) -> list[str]:
    """The task's prediction for each input (``Task.predict_inputs``): a class name, an
    answer. The task is the export's (``settings["task"]``; classification for older
    exports)."""
    import torch
    from safetensors import SafetensorError
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from common.tasks import get_task

    task_name = str(settings.get("task") or DEFAULT_TASK)
    check_model_dir(model_dir, task=task_name)
    task = get_task(task_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = task.load_trained(str(model_dir))
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:  # bad files
        raise PredictError(f"{model_dir}: could not load the model: "
                           f"{type(error).__name__}: {error}") from error
    with tqdm(total=len(inputs), unit="row", disable=not progress) as bar:
        return task.predict(model, tokenizer, inputs, settings=settings,
                            max_length=max_length, batch_size=batch_size,
                            device=torch.device("cpu"), progress=bar.update)


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
    """Write ``input_path`` plus a ``prediction`` column to ``output_path`` (.csv/.jsonl).

    ``output_path`` is replaced only once every row is labelled and written; it may not
    be ``input_path``.

    Raises
    ------
    PredictError
        If the model folder, the input file or the output path cannot be used.
    """
    from common.data import DataError
    from common.tasks import get_task

    settings = export_settings(model_dir)
    task_name = str(settings.get("task") or DEFAULT_TASK)
    check_model_dir(model_dir, task=task_name)
    if max_length is None:
        if not settings.get("max-length"):
            raise PredictError(f"{model_dir} has no {EXPORT_META}: pass --max-length "
                               "(the run's `max-length`)")
        max_length = int(settings["max-length"])
    if output_path.suffix.lower() not in FORMATS:
        raise PredictError(f"{output_path}: output must end in .csv or .jsonl")
    if _same_file(output_path, input_path):
        raise PredictError(f"--output {output_path} is the input file; write the "
                           "predictions to another file")
    if output_path.is_dir():
        raise PredictError(f"--output {output_path} is a folder; give a .csv or .jsonl file")
    owner = fedsft_folder_of(output_path)
    if owner is not None and output_path.exists():
        raise PredictError(
            f"--output {output_path} would replace a file of the fedsft run or export "
            f"{owner}; write the predictions somewhere else"
        )
    frame = read_input(input_path, text_column=text_column)
    try:  # every input checked before the model loads
        inputs = get_task(task_name).predict_inputs(frame, column=text_column,
                                                    settings=settings, source=str(input_path))
    except DataError as error:
        raise PredictError(str(error)) from error
    frame["prediction"] = predict_labels(
        model_dir, inputs, max_length=max_length, settings=settings,
        batch_size=batch_size, progress=progress,
    )
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # A crash mid-write must not leave a file that looks like complete predictions.
    tmp = output_path.with_name(f".{output_path.name}.{os.getpid()}.tmp")
    try:
        if output_path.suffix.lower() == ".csv":
            frame.to_csv(tmp, index=False, quoting=csv.QUOTE_MINIMAL)
        else:
            frame.to_json(tmp, orient="records", lines=True, force_ascii=False)
        tmp.replace(output_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return output_path


def fedsft_folder_of(path: Path) -> Path | None:
    """The fedsft run folder (config.json + results.jsonl) or model export (fedsft.json)
    that ``path`` lies in, or None: predict never replaces a file of one."""
    for folder in path.resolve().parents:
        if (folder / EXPORT_META).is_file() or (
            (folder / "config.json").is_file() and (folder / "results.jsonl").is_file()
        ):
            return folder
    return None


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (also through links, or before ``a`` exists)."""
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()
