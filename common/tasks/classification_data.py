"""Classification tables: read, clean and label-map a text / label table.

The classification task's rules for a table (``common/tasks/classification.py``): the
built-in data is ``common.tasks.classification_builtin_data``; other sources are read by
``common.data.read_source`` (its formats and its ``DataError`` messages). Problems raise
``common.data.DataError``, whose message names the source and the problem.

Labels are normalised the same way wherever they are read (training data, eval data,
site files; the ``labels`` run-config key follows the same rule in ``RunConfig``):
string labels are stripped of surrounding whitespace (``" pos"`` and ``"pos"`` are one
class; a label that is blank after stripping is missing) and, only with
``label-case-fold=true``, case-folded (``"Pos"`` and ``"pos"`` are one class, named
``"pos"``). Without folding, labels that differ only by case stay separate classes and a
warning lists them. Whole-number float labels (``1.0``) become integers; float labels
with a fractional part are refused, as is a text column that holds only numbers.
"""

from __future__ import annotations

import logging
import numbers
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from common.data import DataError, read_source
from common.tasks.classification_builtin_data import generate_builtin

logger = logging.getLogger(__name__)

_MAX_LISTED = 5  # unknown labels quoted in an error message
# A text column whose every value matches this (or is a JSON / parquet number) holds
# numbers, not text: most likely `text-column` names an id or score column.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


# --- reading ---------------------------------------------------------------------------


def read_table(
    source: str,
    *,
    text_column: str,
    label_column: str,
    seed: int,
    builtin_examples: int,
    label_case_fold: bool = False,
) -> pd.DataFrame:
    """Read a data source into a frame with clean text and label columns.

    Parameters
    ----------
    source
        ``"builtin"``, ``"hf:<name>"`` / ``"hf:<name>:<split>"`` (default split
        ``train``), or the path of a ``.csv``, ``.tsv``, ``.jsonl``, ``.json`` or
        ``.parquet`` file (UTF-8; TSV is read without quote handling, as SST-2 needs).
    text_column, label_column
        Column names of the text and the label. The built-in data's ``text`` and
        ``label`` columns are renamed to these.
    seed, builtin_examples
        Seed and number of rows of the built-in data; unused for other sources.
    label_case_fold
        Case-fold string labels (``label-case-fold``), see the module docstring.

    Returns
    -------
    pandas.DataFrame
        All columns of the source with a fresh index. Rows with an empty or missing text
        or a missing (or blank) label are dropped (with a logged warning); texts are
        ``str``; string labels are stripped (and case-folded when asked); integer and
        whole-number float labels are integers, other labels keep their type.

    Raises
    ------
    DataError
        If the source is missing or a directory, has an unknown format, cannot be decoded
        or parsed (a tab-separated ``.csv`` included), has no rows, lacks one of the two
        columns, has no row left after cleaning, has a text column of numbers only, or
        has float labels with a fractional part.
    """
    frame = read_raw_table(
        source, text_column=text_column, label_column=label_column, seed=seed,
        builtin_examples=builtin_examples,
    )
    return clean_table(
        frame, source=source, text_column=text_column, label_column=label_column,
        label_case_fold=label_case_fold,
    )


def read_raw_table(
    source: str, *, text_column: str, label_column: str, seed: int, builtin_examples: int
) -> pd.DataFrame:
    """The first half of ``read_table``: read the source and check the two columns exist.

    Rows are as in the source (nothing dropped or normalised); ``clean_table`` is the
    second half. Raises ``DataError`` as ``read_table`` does for reading problems, no
    rows and missing columns.
    """
    if source == "builtin":
        frame = generate_builtin(builtin_examples, seed=seed).rename(
            columns={"text": text_column, "label": label_column}
        )
    else:
        frame = read_source(source, text_column=text_column)
    check_columns(frame, source=source, text_column=text_column, label_column=label_column)
    return frame


def check_columns(frame: pd.DataFrame, *, source: str, text_column: str,
                  label_column: str) -> None:
    """Raise ``DataError`` if ``frame`` has no rows or lacks the text or label column."""
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    for column in (text_column, label_column):
        if column not in frame.columns:
            found = ", ".join(map(repr, map(str, frame.columns)))
            raise DataError(f"{source}: missing column {column!r}; columns found: {found}")


def unusable_rows(
    frame: pd.DataFrame, *, text_column: str, label_column: str
) -> tuple[pd.Series, pd.Series]:
    """Boolean masks of the rows ``clean_table`` drops: (empty text, missing label).

    A text is empty when missing or blank after stripping; a label is missing when
    missing or blank after stripping. A row may be in both masks.
    """
    texts, labels = frame[text_column], frame[label_column]
    return texts.isna() | texts.map(_is_blank), labels.isna() | labels.map(_is_blank)


def clean_table(
    frame: pd.DataFrame,
    *,
    source: str,
    text_column: str,
    label_column: str,
    label_case_fold: bool,
) -> pd.DataFrame:
    """Drop rows without text or label; check and normalise both columns (module doc).

    The second half of ``read_table`` (same contract), for a frame of
    ``read_raw_table``; the input frame is not changed.
    """
    empty_text, missing_label = unusable_rows(
        frame, text_column=text_column, label_column=label_column
    )
    drop = empty_text | missing_label
    if drop.all():
        raise DataError(
            f"{source}: all {len(frame)} rows have an empty text or a missing label"
        )
    if drop.any():
        logger.warning(
            "%s: dropped %d of %d rows with an empty text or a missing label",
            source, int(drop.sum()), len(frame),
        )
    frame = frame.loc[~drop].reset_index(drop=True)
    _check_text_is_text(frame, source=source, text_column=text_column)
    frame[text_column] = frame[text_column].map(str)
    labels = frame[label_column]
    _check_labels_are_classes(labels, source=source, label_column=label_column)
    if pd.api.types.is_float_dtype(labels):
        # Whole numbers only (checked above): a blank label in an integer column, or a
        # JSON 1.0, turns the column to float; the classes are the integers.
        frame[label_column] = labels.astype("int64")
    elif pd.api.types.is_object_dtype(labels) or pd.api.types.is_string_dtype(labels):
        frame[label_column] = labels.map(
            lambda label: _normalise_label(label, case_fold=label_case_fold)
        )
    return frame


def _is_blank(value: Any) -> bool:
    """A string of whitespace only (missing values are caught by ``isna``)."""
    return isinstance(value, str) and not value.strip()


def _normalise_label(label: Any, *, case_fold: bool) -> Any:
    """Strip a string label (and case-fold it when asked); other labels unchanged."""
    if not isinstance(label, str):
        return label
    label = label.strip()
    return label.casefold() if case_fold else label


def _is_number(value: Any) -> bool:
    """A number (bools included) or a string that reads as one."""
    if isinstance(value, str):
        return _NUMBER.fullmatch(value.strip()) is not None
    return isinstance(value, (numbers.Number, np.bool_))


def _check_text_is_text(frame: pd.DataFrame, *, source: str, text_column: str) -> None:
    """Refuse a text column whose every value is a number (it names the wrong column)."""
    texts = frame[text_column]
    if not all(_is_number(text) for text in texts):  # stops at the first real text
        return
    examples = ", ".join(str(text) for text in pd.unique(texts)[:2])
    columns = ", ".join(map(repr, map(str, frame.columns)))
    raise DataError(
        f"text column {text_column!r} in {source} holds numbers, not text (e.g. "
        f"{examples}): set `text-column` to the column with the text; columns: {columns}"
    )


def _check_labels_are_classes(labels: pd.Series, *, source: str, label_column: str) -> None:
    """Refuse float labels with a fractional part: they are measurements, not classes."""
    if pd.api.types.is_float_dtype(labels):
        values = labels[(labels % 1 != 0).to_numpy()]  # inf % 1 is nan: refused too
    elif pd.api.types.is_object_dtype(labels):
        values = labels[labels.map(
            lambda v: isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)
            and not float(v).is_integer()
        ).to_numpy(dtype=bool)]
    else:
        return
    if values.empty:
        return
    distinct = pd.unique(values)
    shown = ", ".join(f"{float(v):g}" for v in distinct[:3])
    more = ", ..." if len(distinct) > 3 else ""
    raise DataError(
        f"label column {label_column!r} in {source} has {len(distinct)} distinct "
        f"non-integer float values (e.g. {shown}{more}): fedsft does classification; "
        f"bin the values into classes first"
    )


# --- labels ----------------------------------------------------------------------------


def build_label_names(labels: Iterable[Any], *, source: str) -> list[str]:
    """The sorted class names of a label column.

    Parameters
    ----------
    labels
        The labels (strings or integers).
    source
        Where they come from, for the error message.

    Returns
    -------
    list[str]
        Unique labels as strings; integer labels in numeric order (``"2"`` before
        ``"10"``), others in string order. Labels are taken as given: ``read_table``
        has already normalised them (module docstring). Names that differ only by case
        are logged as a warning.

    Raises
    ------
    DataError
        If there are fewer than two classes.
    """
    unique = list(pd.unique(pd.Series(list(labels), dtype=object)))
    if all(_is_int(label) for label in unique):
        names = [str(label) for label in sorted({int(label) for label in unique})]
    else:
        names = sorted({str(label) for label in unique})
        warn_case_variants(names, source=source)
    if len(names) < 2:
        found = f"only one class {names[0]!r}" if names else "no labels"
        raise DataError(f"{found} found in {source}: classification needs at least 2")
    return names


def encode_labels(
    labels: Iterable[Any], label_names: list[str], *, source: str
) -> np.ndarray:
    """Map labels to their int64 index in ``label_names`` (compared as ``str(label)``).

    Parameters
    ----------
    labels
        The labels to encode.
    label_names
        The class names, as ``build_label_names`` returns them.
    source
        Where the labels come from, for the error message.

    Returns
    -------
    numpy.ndarray
        int64 indices, one per label.

    Raises
    ------
    DataError
        If a label is not in ``label_names`` (e.g. eval labels not seen in training).
    """
    index = {name: i for i, name in enumerate(label_names)}
    as_text = [label_text(label) for label in labels]
    unknown = sorted({text for text in as_text if text not in index})
    if unknown:
        shown = ", ".join(map(repr, unknown[:_MAX_LISTED]))
        more = f" and {len(unknown) - _MAX_LISTED} more" if len(unknown) > _MAX_LISTED else ""
        folded = {name.casefold() for name in label_names}
        by_case = [text for text in unknown if text.casefold() in folded]
        hint = (
            f"; {', '.join(map(repr, by_case[:_MAX_LISTED]))} differ from known labels "
            f"only by case: set `label-case-fold`=true to merge them" if by_case else ""
        )
        raise DataError(
            f"{source}: labels {shown}{more} not seen in training "
            f"(known: {', '.join(map(repr, label_names))}){hint}"
        )
    return np.array([index[text] for text in as_text], dtype=np.int64)


def label_text(label: Any) -> str:
    """A cleaned label as its class name: integers in decimal, others as ``str``."""
    return str(int(label)) if _is_int(label) else str(label)


def warn_case_variants(names: Iterable[str], *, source: str) -> None:
    """Log a warning listing class names that differ only by case (``'Pos'/'pos'``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    variants = ["/".join(map(repr, sorted(g))) for g in groups.values() if len(g) > 1]
    if variants:
        logger.warning(
            "%s: labels that differ only by case: %s; set label-case-fold=true to merge "
            "them", source, ", ".join(variants[:_MAX_LISTED]),
        )


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
