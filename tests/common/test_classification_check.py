"""The site data check: every statistic of a small file counted by hand."""

from __future__ import annotations

import pandas as pd
import pytest

from common.config import RunConfig
from common.data import DataError
from common.specs import DataSpec, EncodeSpec
from common.tasks import get_site_check, get_task
from common.tasks.classification_check import (
    TOKENIZER_COUNT,
    WHITESPACE_ESTIMATE,
    check_site_data,
    imbalance_ratio,
    normalize_text,
)

# 10 rows. Row 4 has no text, row 6 no label: 8 rows are kept, 3 'neg' and 5 'pos'.
# Rows 1-3 are one text: row 3 repeats row 1 exactly, row 2 only after normalizing.
# Short (< 3 words): rows 1, 2, 3 (2 words) and 7 (1 word). Row 8 has 9 words.
SITE = """\
text,label
Great product!,pos
great   product,pos
Great product!,pos
,neg
Terrible service here,neg
no label here,
ok,neg
The delivery was late and the box was damaged,neg
Fine overall experience really,pos
Would buy again,pos
"""
# Row 1 is row 5 of SITE once normalized; row 2 is new.
EVAL = "text,label\nTerrible service here!,neg\nsomething new entirely here,pos\n"


@pytest.fixture
def site(tmp_path):
    (tmp_path / "site.csv").write_text(SITE)
    (tmp_path / "eval.csv").write_text(EVAL)
    return tmp_path


def _check(data, **kwargs):
    return check_site_data(data, text_column="text", label_column="label",
                           **{"max_length": 8, **kwargs})


def test_every_statistic_of_a_small_file(site):
    report = _check(site / "site.csv", label_names=["neg", "pos"],
                    eval_data=site / "eval.csv")

    assert (report.rows_read, report.rows_kept) == (10, 8)
    assert (report.dropped_empty_text, report.dropped_missing_label) == (1, 1)
    assert report.label_counts == (("neg", 3), ("pos", 5))
    assert report.imbalance_ratio == pytest.approx(5 / 3)
    assert (report.exact_duplicates, report.normalized_duplicates) == (1, 2)
    assert report.conflicting_labels == 0
    assert report.short_texts == 4 and report.short_share == 0.5
    assert report.too_long == 1 and report.truncated_share == 1 / 8
    assert report.length_measure == WHITESPACE_ESTIMATE
    assert (report.eval_rows, report.eval_overlap) == (2, 1)
    assert report.unknown_labels == ()
    # 12.5 % truncated and 5:3 are below their thresholds: no warning for them.
    assert [f.check for f in report.findings] == [
        "dropped-rows", "duplicates", "short-texts", "eval-overlap"]
    assert report.blocking == ()
    assert report.lines()[-1] == "result: no blocking problem, 4 warning(s)"


def test_the_light_site_check_is_the_tasks(site):
    # `fedsft check-data` calls get_site_check (no torch import), a deployed client the
    # task object's check_site: one check, with the run's columns and label rule.
    cfg = RunConfig(max_length=8, label_case_fold=True)
    args = {"spec": DataSpec.of(cfg), "encoding": EncodeSpec.of(cfg, tokenizer_path=""),
            "label_names": ["neg"], "tokenizer": None, "eval_path": str(site / "eval.csv")}
    light = get_site_check("classification")(str(site / "site.csv"), **args)
    assert light == get_task("classification").check_site(str(site / "site.csv"), **args)
    assert light == _check(site / "site.csv", label_names=["neg"], label_case_fold=True,
                           eval_data=str(site / "eval.csv"))
    assert light.unknown_labels == ("pos",)  # the label rule reached the check
    # A task without a light check module: its task object's.
    assert get_site_check("sft") == get_task("sft").check_site


def test_aggregate_stats_are_counts_and_shares_only(site):
    report = _check(site / "site.csv", label_names=["neg", "pos"])

    assert report.aggregate_stats() == {
        "data-rows-read": 10, "data-rows": 8,
        "data-label-count-0": 3, "data-label-share-0": 3 / 8,
        "data-label-count-1": 5, "data-label-share-1": 5 / 8,
        "data-duplicate-share": 2 / 8, "data-short-share": 4 / 8,
        "data-truncated-share": 1 / 8,
    }


def test_the_tokenizer_counts_special_tokens(site, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # max-length 2: every text is at least [CLS] word [SEP]; by words only the 4 texts of
    # 3 or more words are longer.
    by_words = _check(site / "site.csv", max_length=2)
    by_tokens = _check(site / "site.csv", max_length=2, tokenizer=tokenizer)

    assert by_words.too_long == 4
    assert by_tokens.too_long == 8 and by_tokens.length_measure == TOKENIZER_COUNT
    assert [f.check for f in by_tokens.findings if f.check == "truncation"] == ["truncation"]


@pytest.mark.parametrize("text, normalized", [
    ("  Great   PRODUCT!! ", "great product"),
    ("great\tproduct", "great product"),
    ("«Hi», there.", "hi», there"),  # inner punctuation stays
    ("¿Qué?", "qué"),
    ("!!!", ""),
])
def test_normalize_text(text, normalized):
    assert normalize_text(text) == normalized


def test_imbalance_ratio_on_known_counts():
    assert imbalance_ratio([30, 0, 2, 5]) == 15.0  # absent classes do not count
    assert imbalance_ratio([4, 4]) == 1.0
    assert imbalance_ratio([0, 0]) is None


@pytest.mark.parametrize("largest, warned", [(10, False), (11, True)])
def test_imbalance_above_10_to_1_is_a_warning(largest, warned):
    frame = pd.DataFrame({"text": [f"text number {i}" for i in range(largest + 1)],
                          "label": ["a"] * largest + ["b"]})

    report = _check(frame)

    assert report.imbalance_ratio == largest
    assert ("imbalance" in [f.check for f in report.warnings]) is warned
    assert report.blocking == ()


def test_unknown_labels_are_blocking(site):
    report = _check(site / "site.csv", label_names=["neg", "neutral"])

    assert report.unknown_labels == ("pos",)
    assert report.label_counts == (("neg", 3), ("neutral", 0), ("pos", 5))
    (problem,) = report.blocking
    assert problem.check == "unknown-labels" and "'pos'" in problem.message
    assert report.findings[0] is problem  # blocking problems come first
    # Unknown labels are never sent: index 1 is 'neutral', the federation's class.
    stats = report.aggregate_stats()
    assert stats["data-label-count-1"] == 0 and "data-label-count-2" not in stats


def test_labels_follow_the_training_rules():
    frame = pd.DataFrame({"text": ["one two three"] * 3, "label": [" Pos", "pos ", "neg"]})
    # A JSON 1.0 (or a blank in an integer column) makes a float column: integer classes.
    floats = pd.DataFrame({"text": ["one two three"] * 3, "label": [1.0, 0.0, 1.0]})

    plain = _check(frame)
    folded = _check(frame, label_case_fold=True)

    assert plain.label_counts == (("Pos", 1), ("neg", 1), ("pos", 1))
    assert folded.label_counts == (("neg", 1), ("pos", 2))
    assert _check(floats, label_names=["0", "1"]).label_counts == (("0", 1), ("1", 2))


def test_conflicting_labels():
    frame = pd.DataFrame({"text": ["a b c", "A b c.", "d e f"], "label": ["x", "y", "x"]})

    report = _check(frame)

    assert (report.normalized_duplicates, report.conflicting_labels) == (1, 1)
    assert "conflicting-labels" in [f.check for f in report.warnings]


def test_a_single_class_is_a_warning_not_blocking():
    """Under label skew a site holding one class is normal (pathological partitions)."""
    report = _check(pd.DataFrame({"text": ["one two three", "four five six"],
                                  "label": ["a", "a"]}))

    assert report.blocking == ()
    assert [f.check for f in report.warnings] == ["single-class"]
    assert "only one class 'a' (2 rows)" in report.warnings[0].message


BLOCKED = {
    "every text empty": ({"text": ["", "  "], "label": ["a", "b"]},
                         "unusable-data", "all 2 rows have an empty text or a missing label"),
    "numbers as text": ({"text": ["1", "2"], "label": ["a", "b"]},
                        "unusable-data", "holds numbers, not text"),
    "fractional labels": ({"text": ["one two three", "four five six"], "label": [0.5, 1.0]},
                          "unusable-data", "non-integer float values"),
}


@pytest.mark.parametrize("columns, check, fragment", BLOCKED.values(), ids=BLOCKED.keys())
def test_blocking_problems(columns, check, fragment):
    report = _check(pd.DataFrame(columns))

    assert [f.check for f in report.blocking] == [check]
    assert fragment in report.blocking[0].message
    assert "blocking problem" in report.lines()[-1]


def test_problems_of_the_file_itself_raise(tmp_path):
    (tmp_path / "other.csv").write_text("body,label\nhello there you,a\n")
    with pytest.raises(DataError, match="data file not found"):
        _check(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="missing column 'text'; columns found: 'body'"):
        _check(tmp_path / "other.csv")
    with pytest.raises(ValueError, match="max_length"):
        _check(tmp_path / "other.csv", max_length=0)
