"""A site's data, checked before it joins a federation: what fine-tuning would trip on.

``check_site_data`` reads a classification table with the reading and cleaning rules of
``common.data`` (``read_raw_table`` + ``clean_table``: the same rows are dropped and the
same labels normalised as in training) and returns a ``DataReport``: row counts, why
rows were dropped, the label distribution, duplicates, short and over-long texts, the
overlap with an eval file and labels the federation does not know. Each problem is a
``Finding`` that is ``blocking`` (the site cannot usefully train: nothing to learn from,
or labels the federation's label map cannot encode) or a ``warning`` (training works
but the data deserves a look).

The rules, so the numbers can be checked by hand:

- **Exact duplicate**: a row whose text (as read; labels ignored) equals an earlier
  row's. The count is the number of repeats (rows minus distinct texts).
- **Normalized duplicate**: the same with the normalized text (``common.tasks.duplicates``:
  case-folded, every run of whitespace collapsed to one space, then punctuation
  (Unicode category ``P*``) and whitespace stripped at both ends). ``"Great  product!"``
  and ``"great product"`` are one text; inner punctuation counts. It includes the exact
  duplicates.
- **Conflicting labels**: normalized texts that occur with more than one label.
- **Short text**: fewer than ``SHORT_WORDS`` (3) whitespace-separated words. Empty
  texts never get here: cleaning drops them (counted as dropped rows).
- **Too long**: more than ``max_length`` tokens, so truncated in training. Counted with
  the tokenizer when one is given (special tokens included, as training encodes), else
  estimated by whitespace words, a lower bound (subword tokenizers give more tokens).
- **Eval overlap**: eval rows whose normalized text is also a training text.
- **Imbalance ratio**: rows of the largest class / rows of the smallest class, over the
  classes present in the file.

Warnings fire above the thresholds below (and for a site holding a single class, which
label skew makes normal); blocking findings are no row left after cleaning, a column
``clean_table`` refuses (numbers as text, fractional float labels), and labels outside
``label_names``.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from common.data import DataError
from common.tasks.classification_data import (
    build_label_names,
    check_columns,
    clean_table,
    label_text,
    read_raw_table,
    unusable_rows,
)
from common.tasks.duplicates import normalize_text, repeats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from common.specs import DataSpec, EncodeSpec

SHORT_WORDS = 3  # a text of fewer words says little for a classifier
IMBALANCE_WARNING = 10.0  # largest / smallest class above this: a warning
TRUNCATED_WARNING = 0.20  # share of rows longer than max-length above this: a warning
SHORT_WARNING = 0.05  # share of short texts above this: a warning
WHITESPACE_ESTIMATE = "estimated by whitespace words, a lower bound"
TOKENIZER_COUNT = "counted by the tokenizer"
_SHOWN = 5  # labels quoted in a finding

Severity = Literal["blocking", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem of the data: ``check`` names the rule, ``message`` says what to do."""

    severity: Severity
    check: str
    message: str


@dataclass(frozen=True)
class DataReport:
    """What ``check_site_data`` found; counts only, never a text (module docstring).

    ``label_counts`` holds (class name, rows) after cleaning: the classes of
    ``label_names`` in that order (zero for a class the site lacks) then unknown labels,
    or, without ``label_names``, the classes found, sorted as ``build_label_names``
    sorts them. ``eval_rows`` and ``eval_overlap`` are None without eval data. Shares
    are fractions of ``rows_kept``.
    """

    source: str
    rows_read: int
    rows_kept: int
    dropped_empty_text: int
    dropped_missing_label: int
    label_counts: tuple[tuple[str, int], ...]
    label_names: tuple[str, ...] | None
    unknown_labels: tuple[str, ...]
    exact_duplicates: int
    normalized_duplicates: int
    conflicting_labels: int
    short_texts: int
    max_length: int
    too_long: int
    length_measure: str
    eval_rows: int | None
    eval_overlap: int | None
    findings: tuple[Finding, ...] = field(default=())

    @property
    def blocking(self) -> tuple[Finding, ...]:
        """The findings that stop the site from joining."""
        return tuple(f for f in self.findings if f.severity == "blocking")

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The findings worth a look that do not stop training."""
        return tuple(f for f in self.findings if f.severity == "warning")

    @property
    def imbalance_ratio(self) -> float | None:
        """Largest / smallest class count over the classes present; None without rows."""
        return imbalance_ratio([count for _, count in self.label_counts])

    @property
    def truncated_share(self) -> float:
        """Share of the kept rows longer than ``max_length``."""
        return _share(self.too_long, self.rows_kept)

    @property
    def short_share(self) -> float:
        """Share of the kept rows with fewer than ``SHORT_WORDS`` words."""
        return _share(self.short_texts, self.rows_kept)

    def aggregate_stats(self) -> dict[str, int | float]:
        """Aggregate, non-identifying numbers a site may send to the server.

        Flat metric keys: ``data-rows-read``, ``data-rows`` (after cleaning),
        ``data-label-count-<i>`` and ``data-label-share-<i>`` for class index ``i`` of
        the label names (the federation's when given, else this report's classes; unknown
        labels are left out), and the shares ``data-duplicate-share`` (normalized
        duplicates), ``data-short-share`` and ``data-truncated-share``. Only counts and
        shares: no text, no label name, nothing per row.
        """
        known = self.label_counts[:len(self.label_counts) - len(self.unknown_labels)]
        stats: dict[str, int | float] = {
            "data-rows-read": self.rows_read,
            "data-rows": self.rows_kept,
        }
        for index, (_, count) in enumerate(known):
            stats[f"data-label-count-{index}"] = count
            stats[f"data-label-share-{index}"] = _share(count, self.rows_kept)
        stats["data-duplicate-share"] = _share(self.normalized_duplicates, self.rows_kept)
        stats["data-short-share"] = self.short_share
        stats["data-truncated-share"] = self.truncated_share
        return stats

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready values (``fedsft check-data --json``)."""
        return {
            "source": self.source,
            "rows-read": self.rows_read,
            "rows-kept": self.rows_kept,
            "dropped-empty-text": self.dropped_empty_text,
            "dropped-missing-label": self.dropped_missing_label,
            "label-counts": dict(self.label_counts),
            "label-names": list(self.label_names) if self.label_names is not None else None,
            "unknown-labels": list(self.unknown_labels),
            "imbalance-ratio": self.imbalance_ratio,
            "exact-duplicates": self.exact_duplicates,
            "normalized-duplicates": self.normalized_duplicates,
            "conflicting-labels": self.conflicting_labels,
            "short-texts": self.short_texts,
            "max-length": self.max_length,
            "too-long": self.too_long,
            "truncated-share": self.truncated_share,
            "length-measure": self.length_measure,
            "eval-rows": self.eval_rows,
            "eval-overlap": self.eval_overlap,
            "findings": [
                {"severity": f.severity, "check": f.check, "message": f.message}
                for f in self.findings
            ],
            "blocking": bool(self.blocking),
        }

    def lines(self) -> list[str]:
        """The report for a person: one line per statistic, then the findings."""
        kept = self.rows_kept
        lines = [
            f"site data: {self.source}",
            f"  rows read: {self.rows_read}",
            f"  rows kept: {kept} (dropped: {self.dropped_empty_text} with an empty text, "
            f"{self.dropped_missing_label} with a missing label)",
        ]
        if kept:
            counts = ", ".join(
                f"{name!r} {count}{' (unknown)' if name in self.unknown_labels else ''}"
                for name, count in self.label_counts
            )
            ratio = self.imbalance_ratio
            lines += [
                f"  labels: {counts}",
                f"  imbalance ratio (largest / smallest class): {_ratio(ratio)}",
                f"  exact duplicates: {self.exact_duplicates}",
                f"  normalized duplicates (case, whitespace, end punctuation): "
                f"{self.normalized_duplicates}",
                f"  texts with conflicting labels: {self.conflicting_labels}",
                f"  short texts (< {SHORT_WORDS} words): {self.short_texts} "
                f"({self.short_share:.1%})",
                f"  longer than max-length {self.max_length} tokens ({self.length_measure}): "
                f"{self.too_long} ({self.truncated_share:.1%} truncated)",
            ]
        if self.eval_rows is not None:
            lines.append(f"  eval rows also in the data (normalized text): "
                         f"{self.eval_overlap} of {self.eval_rows}")
        for finding in self.findings:
            mark = "BLOCKING" if finding.severity == "blocking" else "WARNING"
            lines.append(f"{mark}: {finding.message}")
        if self.blocking:
            lines.append(f"result: {len(self.blocking)} blocking problem(s): this data "
                         f"cannot join the federation as it is")
        else:
            lines.append(f"result: no blocking problem, {len(self.warnings)} warning(s)")
        return lines


def imbalance_ratio(counts: Sequence[int]) -> float | None:
    """Largest / smallest of the positive counts; None when none is positive."""
    present = [count for count in counts if count > 0]
    return max(present) / min(present) if present else None


def check_site(
    path: str, *, spec: DataSpec, encoding: EncodeSpec,
    label_names: Sequence[str] | None, tokenizer: PreTrainedTokenizerBase | None,
    eval_path: str | None = None,
) -> DataReport:
    """``Task.check_site`` of classification: ``check_site_data`` of the file with the
    run's columns and label rule. Here, not in ``common.tasks.classification``, so that
    ``fedsft check-data`` loads neither torch nor transformers
    (``common.tasks.get_site_check``)."""
    return check_site_data(
        path, text_column=spec.text_column, label_column=spec.label_column,
        max_length=encoding.max_length,
        label_names=list(label_names) if label_names is not None else None,
        tokenizer=tokenizer, eval_data=eval_path, label_case_fold=spec.label_case_fold)


def check_site_data(
    data: str | Path | pd.DataFrame,
    *,
    text_column: str,
    label_column: str,
    max_length: int,
    label_names: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eval_data: str | Path | pd.DataFrame | None = None,
    label_case_fold: bool = False,
    source: str | None = None,
) -> DataReport:
    """Check a classification table for a site before it joins (module docstring).

    Parameters
    ----------
    data
        A data file (any format ``common.data.read_table`` reads) or a frame as read
        from one (uncleaned: the cleaning rules are applied here).
    text_column, label_column
        The columns of the text and the label.
    max_length
        Tokens per text in training (``max-length``); longer texts are truncated.
    label_names
        The federation's class names (``labels``); labels outside them are blocking.
        None: no label map to check against.
    tokenizer
        Counts tokens exactly; without it they are estimated by whitespace words.
    eval_data
        An eval file or frame, read with the same columns and rules, whose overlap with
        ``data`` is counted.
    label_case_fold
        ``label-case-fold``: case-fold string labels, as training does.
    source
        The name used in the report (default: the path, or ``"<frame>"``).

    Returns
    -------
    DataReport
        The statistics and findings; ``report.blocking`` is empty when the data can
        join.

    Raises
    ------
    DataError
        If a file cannot be read (missing, unknown format, undecodable, unparsable),
        has no rows or lacks one of the two columns: problems of the file, not of its
        content.
    ValueError
        If ``max_length`` is not positive.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    name = source or (str(data) if not isinstance(data, pd.DataFrame) else "<frame>")
    raw = _raw(data, source=name, text_column=text_column, label_column=label_column)
    empty_text, missing_label = unusable_rows(
        raw, text_column=text_column, label_column=label_column
    )
    measure = TOKENIZER_COUNT if tokenizer is not None else WHITESPACE_ESTIMATE
    # The fields known before cleaning, shared by the early and the full report.
    report_of = functools.partial(
        DataReport, source=name, rows_read=len(raw), dropped_empty_text=int(empty_text.sum()),
        dropped_missing_label=int(missing_label.sum()),
        label_names=tuple(label_names) if label_names is not None else None,
        max_length=max_length, length_measure=measure,
    )
    dropped = int((empty_text | missing_label).sum())
    findings: list[Finding] = []
    if dropped:
        findings.append(Finding("warning", "dropped-rows", (
            f"{dropped} of {len(raw)} rows have an empty text or a missing label and are "
            f"left out of training")))
    try:
        if dropped == len(raw):
            raise DataError(f"all {len(raw)} rows have an empty text or a missing label")
        frame = clean_table(raw, source=name, text_column=text_column,
                            label_column=label_column, label_case_fold=label_case_fold)
    except DataError as error:  # nothing left, or a column training refuses
        findings.append(Finding("blocking", "unusable-data", str(error)))
        return report_of(
            rows_kept=0, label_counts=(), unknown_labels=(), exact_duplicates=0,
            normalized_duplicates=0, conflicting_labels=0, short_texts=0, too_long=0,
            eval_rows=None, eval_overlap=None, findings=tuple(findings),
        )
    texts = list(frame[text_column])
    labels = [label_text(label) for label in frame[label_column]]
    normalized = [normalize_text(text) for text in texts]
    counts, unknown = _label_counts(labels, label_names, source=name)
    lengths = _lengths(texts, tokenizer)
    eval_rows = eval_overlap = None
    if eval_data is not None:
        eval_texts = _eval_texts(eval_data, text_column=text_column,
                                 label_column=label_column, label_case_fold=label_case_fold)
        seen = set(normalized)
        eval_rows = len(eval_texts)
        eval_overlap = sum(normalize_text(text) in seen for text in eval_texts)
    labels_by_text: dict[str, set[str]] = {}
    for text, label in zip(normalized, labels, strict=True):
        labels_by_text.setdefault(text, set()).add(label)
    report = report_of(
        rows_kept=len(frame),
        label_counts=counts,
        unknown_labels=unknown,
        exact_duplicates=repeats(texts),
        normalized_duplicates=repeats(normalized),
        conflicting_labels=sum(len(found) > 1 for found in labels_by_text.values()),
        short_texts=sum(len(text.split()) < SHORT_WORDS for text in texts),
        too_long=sum(length > max_length for length in lengths),
        eval_rows=eval_rows,
        eval_overlap=eval_overlap,
    )
    findings += _findings(report)
    # Blocking problems first: they are what the site must fix.
    findings.sort(key=lambda finding: finding.severity != "blocking")
    return replace(report, findings=tuple(findings))


def _raw(
    data: str | Path | pd.DataFrame, *, source: str, text_column: str, label_column: str
) -> pd.DataFrame:
    """The uncleaned rows of a file or frame, with both columns present."""
    if not isinstance(data, pd.DataFrame):
        # seed and builtin_examples only matter for the built-in data, never a site's.
        return read_raw_table(str(data), text_column=text_column,
                              label_column=label_column, seed=0, builtin_examples=1000)
    check_columns(data, source=source, text_column=text_column, label_column=label_column)
    return data


def _eval_texts(
    data: str | Path | pd.DataFrame, *, text_column: str, label_column: str,
    label_case_fold: bool,
) -> list[str]:
    """The texts of the eval data after the same cleaning."""
    name = str(data) if not isinstance(data, pd.DataFrame) else "<eval frame>"
    raw = _raw(data, source=name, text_column=text_column, label_column=label_column)
    frame = clean_table(raw, source=name, text_column=text_column,
                        label_column=label_column, label_case_fold=label_case_fold)
    return list(frame[text_column])


def _label_counts(
    labels: list[str], label_names: Sequence[str] | None, *, source: str
) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """(class name, rows) in report order, and the labels outside ``label_names``."""
    found = Counter(labels)
    if label_names is None:
        try:
            order = build_label_names(found, source=source)
        except DataError:  # a single class: reported as a finding
            order = sorted(found)
        return tuple((name, found[name]) for name in order), ()
    known = set(label_names)
    unknown = tuple(sorted(name for name in found if name not in known))
    order = [*label_names, *unknown]
    return tuple((name, found[name]) for name in order), unknown


def _lengths(texts: list[str], tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """Tokens per text (tokenizer, special tokens included) or whitespace words."""
    if tokenizer is None:
        return [len(text.split()) for text in texts]
    # verbose=False: the tokenizer's "longer than the model's maximum" warning is what
    # this check reports.
    encoded = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def _findings(report: DataReport) -> list[Finding]:
    """The blocking problems and warnings of a report of a cleaned table."""
    findings: list[Finding] = []
    if report.unknown_labels:
        shown = ", ".join(map(repr, report.unknown_labels[:_SHOWN]))
        more = len(report.unknown_labels) - _SHOWN
        known = ", ".join(map(repr, report.label_names or ()))
        findings.append(Finding("blocking", "unknown-labels", (
            f"label(s) {shown}{f' and {more} more' if more > 0 else ''} not in the "
            f"federation's labels ({known}): relabel those rows or ask the coordinator "
            f"to add the classes to `labels`")))
    present = [(name, count) for name, count in report.label_counts if count]
    if len(present) < 2:
        # Not blocking: under label skew a site holding one class is normal, and the
        # federation's other sites supply the contrast (pathological partitioning).
        name, count = present[0]
        findings.append(Finding("warning", "single-class", (
            f"only one class {name!r} ({count} rows): this site's updates alone pull the "
            "model towards that class and its local evaluation is trivial; that is "
            "expected under label skew, when other sites hold the other classes")))
    ratio = report.imbalance_ratio
    if ratio is not None and ratio > IMBALANCE_WARNING:
        findings.append(Finding("warning", "imbalance", (
            f"class imbalance {_ratio(ratio)} (largest / smallest class) is above "
            f"{IMBALANCE_WARNING:g}:1: the small classes may be learnt poorly")))
    if report.normalized_duplicates:
        findings.append(Finding("warning", "duplicates", (
            f"{report.normalized_duplicates} duplicate texts ({report.exact_duplicates} "
            f"exact): duplicates weigh those texts more in training")))
    if report.conflicting_labels:
        findings.append(Finding("warning", "conflicting-labels", (
            f"{report.conflicting_labels} texts occur with different labels")))
    if report.short_share > SHORT_WARNING:
        findings.append(Finding("warning", "short-texts", (
            f"{report.short_share:.1%} of the texts have fewer than {SHORT_WORDS} words "
            f"(above {SHORT_WARNING:.0%})")))
    if report.truncated_share > TRUNCATED_WARNING:
        findings.append(Finding("warning", "truncation", (
            f"{report.truncated_share:.1%} of the texts are longer than max-length "
            f"{report.max_length} tokens ({report.length_measure}) and are truncated (above "
            f"{TRUNCATED_WARNING:.0%}): raise `max-length` or shorten the texts")))
    if report.eval_overlap:
        findings.append(Finding("warning", "eval-overlap", (
            f"{report.eval_overlap} of {report.eval_rows} eval rows have a text that is "
            f"also in the data: evaluation on them overstates the model")))
    return findings


def _share(part: int, whole: int) -> float:
    """``part / whole``, 0.0 for an empty whole."""
    return part / whole if whole else 0.0


def _ratio(ratio: float | None) -> str:
    """An imbalance ratio as ``"2.5:1"`` (``"n/a"`` without rows)."""
    return "n/a" if ratio is None or not math.isfinite(ratio) else f"{ratio:.3g}:1"
