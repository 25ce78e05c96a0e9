"""Tests for common/tasks/classification_data.py: reading and cleaning a classification
table, and its label map."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from common.data import DataError
from common.tasks.classification_data import build_label_names, encode_labels, read_table
from tests.common.test_data import ROWS, _write

SST2_DEV = Path("/work/shared/data/sst2/dev.tsv")


def _read(path: Path | str, *, label_case_fold: bool = False, **columns: str) -> pd.DataFrame:
    return read_table(
        str(path),
        text_column=columns.get("text_column", "text"),
        label_column=columns.get("label_column", "label"),
        seed=0,
        builtin_examples=30,
        label_case_fold=label_case_fold,
    )


# --- read_table ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_format_reads_the_same_frame(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"data{suffix}", ROWS)

    frame = _read(path)

    assert list(frame["text"]) == [r["text"] for r in ROWS]
    assert list(frame["label"]) == [r["label"] for r in ROWS]


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.csv", ROWS).rename(tmp_path / "DATA.CSV")

    assert len(_read(path)) == 4


def test_json_lines_saved_as_json(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", ROWS).rename(tmp_path / "data.json")

    assert len(_read(path)) == 4


def test_integer_labels_stay_integers(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 10}])

    frame = _read(path)

    assert list(frame["label"]) == [2, 10]
    assert pd.api.types.is_integer_dtype(frame["label"])


def test_other_columns_and_custom_names_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    pd.DataFrame({"sentence": ["a b", "c d"], "y": [0, 1], "site": ["x", "y"]}).to_csv(
        path, index=False
    )

    frame = _read(path, text_column="sentence", label_column="y")

    assert list(frame.columns) == ["sentence", "y", "site"]


def test_builtin_is_renamed_to_the_configured_columns() -> None:
    frame = read_table(
        "builtin", text_column="sentence", label_column="y", seed=0, builtin_examples=30
    )

    assert list(frame.columns) == ["sentence", "y", "domain"]
    assert len(frame) == 30


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"

    with pytest.raises(DataError, match=f"data file not found: {path}"):
        _read(path)


def test_unknown_format_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"x")

    with pytest.raises(DataError, match=r"data\.xlsx.*'\.xlsx'.*\.csv, \.tsv, \.jsonl"):
        _read(path)


def test_missing_column_names_it_and_lists_the_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.csv", ROWS)

    with pytest.raises(DataError, match=r"data\.csv: missing column 'y'; columns found: "
                                        r"'text', 'label'"):
        _read(path, label_column="y")


@pytest.mark.parametrize("content", [b"text,label\n", b"", b"  \n"])
def test_empty_data(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(content)

    with pytest.raises(DataError, match=r"data\.csv: (no data rows|the file is empty)"):
        _read(path)


def test_empty_json_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text("[]", encoding="utf-8")

    with pytest.raises(DataError, match=r"data\.json: no data rows"):
        _read(path)


def test_undecodable_bytes_name_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_bytes(b"text,label\nok,1\n\xff\xfe bad,0\n")

    with pytest.raises(DataError, match=r"data\.csv: not valid UTF-8 at byte 16"):
        _read(path)


def test_parse_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "a", "label": 1}\n{"text": \n', encoding="utf-8")
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("text,label\na,1\nb,2,3,4\n", encoding="utf-8")
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"not parquet at all")

    with pytest.raises(DataError, match=r"data\.jsonl: invalid JSON on line 2"):
        _read(jsonl)
    with pytest.raises(DataError, match=r"data\.csv: could not parse.*in line 3"):
        _read(csv_path)
    with pytest.raises(DataError, match=r"data\.parquet: could not parse"):
        _read(parquet)


def test_empty_texts_and_missing_labels_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\ngood,1\n,0\n   ,1\nbad,\nfine,0\n", encoding="utf-8")

    with caplog.at_level(logging.WARNING, logger="common.tasks.classification_data"):
        frame = _read(path)

    assert list(frame["text"]) == ["good", "fine"]
    assert list(frame["label"]) == [1, 0]
    assert pd.api.types.is_integer_dtype(frame["label"])  # not float after the blank
    assert "dropped 3 of 5 rows" in caplog.text


def test_na_like_words_are_text_not_missing(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\nNA,no\nnull,NA\n", encoding="utf-8")

    frame = _read(path)

    assert list(frame["text"]) == ["NA", "null"]
    assert list(frame["label"]) == ["no", "NA"]


def test_none_texts_in_jsonl_are_dropped(tmp_path: Path) -> None:
    path = _write(tmp_path / "data.jsonl", [{"text": None, "label": "a"}, *ROWS])

    assert len(_read(path)) == 4


def test_all_texts_empty_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("text,label\n,0\n  ,1\n", encoding="utf-8")

    with pytest.raises(DataError, match=r"data\.csv: all 2 rows have an empty text"):
        _read(path)


def test_hf_errors_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load(name: str, split: str) -> datasets.Dataset:
        calls.append((name, split))
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)

    with pytest.raises(DataError, match=r"hf:org/set:validation: could not load.*offline"):
        _read("hf:org/set:validation")
    assert calls == [("org/set", "validation")]


def test_hf_source_default_split(monkeypatch: pytest.MonkeyPatch) -> None:
    table = datasets.Dataset.from_list(ROWS)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: table)

    frame = _read("hf:org/set")

    assert list(frame["label"]) == ["pos", "neg", "pos", "neg"]


def test_tsv_quotes_are_plain_characters(tmp_path: Path) -> None:
    path = tmp_path / "data.tsv"
    path.write_text('text\tlabel\n"a" film\t1\nits "ending\t0\n" tail\t1\n', encoding="utf-8")

    frame = _read(path)

    assert list(frame["text"]) == ['"a" film', 'its "ending', '" tail']
    assert list(frame["label"]) == [1, 0, 1]


def test_sst2_sample_reads_as_tsv(tmp_path: Path) -> None:
    if not SST2_DEV.exists():
        pytest.skip(f"{SST2_DEV} not present")
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines()[:201]
    sample = tmp_path / "sst2.tsv"
    sample.write_text("\n".join(lines) + "\n", encoding="utf-8")

    frame = _read(sample, text_column="sentence")

    # Quotes inside sentences must not swallow rows: 200 rows, labels 0/1 as ints.
    assert len(frame) == 200
    assert set(frame["label"]) == {0, 1}
    assert pd.api.types.is_integer_dtype(frame["label"])
    assert frame["sentence"][0] == lines[1].split("\t")[0]


# --- labels ----------------------------------------------------------------------------


def test_label_names_of_strings_are_sorted() -> None:
    assert build_label_names(["pos", "neg", "pos", "mixed"], source="s") == [
        "mixed", "neg", "pos"
    ]


def test_label_names_of_integers_are_in_numeric_order() -> None:
    labels = np.array([10, 2, 0, 1, 2], dtype=np.int64)

    assert build_label_names(labels, source="s") == ["0", "1", "2", "10"]


def test_single_class_is_an_error() -> None:
    with pytest.raises(DataError, match="only one class 'x' found in f.csv: classification "
                                        "needs at least 2"):
        build_label_names(["x", "x"], source="f.csv")


def test_encode_labels_by_string() -> None:
    names = ["0", "1", "2", "10"]

    codes = encode_labels([10, np.int64(2), "1", 0], names, source="s")

    assert codes.dtype == np.int64
    assert codes.tolist() == [3, 2, 1, 0]


def test_encode_unknown_labels_names_them() -> None:
    with pytest.raises(DataError, match=r"eval\.csv: labels 'maybe', 'zzz' not seen in "
                                        r"training"):
        encode_labels(["pos", "zzz", "maybe"], ["neg", "pos"], source="eval.csv")


# --- data that cannot be classification data -------------------------------------------


def _raw(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _raw(path, "".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("data.csv", "text,label\na,0.13\nb,0.57\nc,1.5\nd,2.25\n",
     r"label column 'label' in .*data\.csv has 4 distinct non-integer float values "
     r"\(e\.g\. 0\.13, 0\.57, 1\.5, \.\.\.\): fedsft does classification; bin the values"),
    ("data.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0.5}\n',
     r"label column 'label' in .*data\.jsonl has 1 distinct non-integer float values "
     r"\(e\.g\. 0\.5\)"),
    ("data.csv", "id,text,label\nx,3.5,a\ny,7,b\nz, -1e3 ,a\n",
     r"text column 'text' in .*data\.csv holds numbers, not text \(e\.g\. 3\.5, 7\): set "
     r"`text-column` to the column with the text; columns: 'id', 'text', 'label'"),
    ("data.jsonl", '{"text": 3.5, "label": "a"}\n{"text": 7, "label": "b"}\n',
     r"text column 'text' in .*data\.jsonl holds numbers, not text \(e\.g\. 3\.5, 7\.0\)"),
    ("data.json", '[{"text": true, "label": "a"}, {"text": false, "label": "b"}]',
     r"text column 'text' in .*data\.json holds numbers, not text"),
    ("data.csv", "text\tlabel\ngood\t1\nbad\t0\n",
     r"data\.csv: the header line has tabs and no commas, so the file is tab-separated: "
     r"rename it to \.tsv"),
])
def test_bad_data_files_name_the_file_and_column(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = _raw(tmp_path / name, content)

    with pytest.raises(DataError, match=message):
        _read(path)


def test_a_directory_is_not_a_data_file(tmp_path: Path) -> None:
    folder = tmp_path / "data.csv"
    folder.mkdir()

    with pytest.raises(DataError, match=f"data file {folder} is a directory, not a file"):
        _read(folder)


def test_a_text_column_with_one_real_text_is_text(tmp_path: Path) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\n3.5,a\n7 days,b\n")

    assert list(_read(path)["text"]) == ["3.5", "7 days"]


def test_whole_number_float_labels_become_integers(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "data.jsonl", [{"text": "a", "label": 1.0},
                                            {"text": "b", "label": 2.0}])

    frame = _read(path)

    assert list(frame["label"]) == [1, 2]
    assert pd.api.types.is_integer_dtype(frame["label"])


def test_labels_are_stripped_and_blank_labels_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\na, pos\nb,pos\nc,neg \nd,\"  \"\ne,neg\n")

    with caplog.at_level(logging.WARNING, logger="common.tasks.classification_data"):
        frame = _read(path)

    assert list(frame["label"]) == ["pos", "pos", "neg", "neg"]
    assert build_label_names(frame["label"], source="s") == ["neg", "pos"]
    assert "dropped 1 of 5 rows" in caplog.text


def test_case_variants_stay_apart_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\na,Pos\nb,pos\nc,neg\nd,NEG\ne,neg\n")

    with caplog.at_level(logging.WARNING, logger="common.tasks.classification_data"):
        names = build_label_names(_read(path)["label"], source="data.csv")

    assert names == ["NEG", "Pos", "neg", "pos"]
    assert ("data.csv: labels that differ only by case: 'NEG'/'neg', 'Pos'/'pos'; set "
            "label-case-fold=true to merge them") in caplog.text


def test_case_fold_merges_case_variants(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\na,Pos\nb, pos\nc,neg\nd,NEG\n")

    with caplog.at_level(logging.WARNING, logger="common.tasks.classification_data"):
        frame = _read(path, label_case_fold=True)
        names = build_label_names(frame["label"], source="data.csv")

    assert list(frame["label"]) == ["pos", "pos", "neg", "neg"]
    assert names == ["neg", "pos"]
    assert "differ only by case" not in caplog.text
