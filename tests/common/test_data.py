"""Tests for common/data.py: reading, labels, held-out split, partitions."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from common import data
from common.config import RunConfig
from common.data import (
    DataError,
    PartitionPlan,
    build_label_names,
    check_partition_plan,
    clear_caches,
    encode_labels,
    load_server_eval,
    load_site_data,
    load_splits,
    partition_dataset,
    read_table,
    split_for_local_eval,
)

SST2_DEV = Path("/work/shared/data/sst2/dev.tsv")
ROWS = [
    {"text": "great film", "label": "pos"},
    {"text": "dull, \"slow\" plot", "label": "neg"},
    {"text": "fine acting", "label": "pos"},
    {"text": "a mess", "label": "neg"},
]


@pytest.fixture(autouse=True)
def _fresh_caches() -> Iterator[None]:
    clear_caches()
    yield
    clear_caches()


def _read(path: Path | str, *, label_case_fold: bool = False, **columns: str) -> pd.DataFrame:
    return read_table(
        str(path),
        text_column=columns.get("text_column", "text"),
        label_column=columns.get("label_column", "label"),
        seed=0,
        builtin_examples=30,
        label_case_fold=label_case_fold,
    )


def _write(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` in the format of ``path``'s extension."""
    frame = pd.DataFrame(rows)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        path.write_text(
            "text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows),
            encoding="utf-8",
        )
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        frame.to_parquet(path)
    return path


def _labelled_csv(path: Path, labels: list, *, prefix: str = "row") -> Path:
    """A CSV with one row per label, texts ``<prefix> <i>``, and a ``site`` column."""
    frame = pd.DataFrame({
        "text": [f"{prefix} {i}" for i in range(len(labels))],
        "label": labels,
        "site": [f"s{i % 4}" for i in range(len(labels))],
    })
    frame.to_csv(path, index=False)
    return path


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

    with caplog.at_level(logging.WARNING, logger="common.data"):
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


# --- load_splits -----------------------------------------------------------------------


def test_builtin_splits_are_deterministic_disjoint_and_stratified() -> None:
    cfg = RunConfig(dataset="builtin", builtin_examples=300, eval_fraction=0.2, seed=5)

    splits = load_splits(cfg)
    clear_caches()
    again = load_splits(cfg)

    assert splits.label_names == ["negative", "neutral", "positive"]
    assert (splits.train.num_rows, splits.eval.num_rows) == (240, 60)
    assert list(splits.train["text"]) == list(again.train["text"])
    assert list(splits.eval["text"]) == list(again.eval["text"])
    assert splits.train.column_names == ["text", "label", "domain"]
    # Stratified: each class is 1/3 of the eval rows.
    assert np.bincount(list(splits.eval["label"])).tolist() == [20, 20, 20]


def test_held_out_rows_are_disjoint(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [i % 3 for i in range(50)])
    cfg = RunConfig(dataset=str(path), eval_fraction=0.2, seed=1)

    splits = load_splits(cfg)

    train, held_out = set(splits.train["text"]), set(splits.eval["text"])
    assert not train & held_out
    assert len(train | held_out) == 50
    assert splits.train.features["label"].dtype == "int64"


def test_other_seed_gives_other_split(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [i % 2 for i in range(40)])

    first = load_splits(RunConfig(dataset=str(path), seed=1)).eval["text"]
    second = load_splits(RunConfig(dataset=str(path), seed=2)).eval["text"]

    assert sorted(first) != sorted(second)


def test_tiny_class_falls_back_to_an_unstratified_split(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [0] * 10 + [1] * 9 + [2])

    splits = load_splits(RunConfig(dataset=str(path), eval_fraction=0.1))

    assert (splits.train.num_rows, splits.eval.num_rows) == (18, 2)


def test_splits_are_cached_and_keyed_by_config(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="builtin", builtin_examples=60)

    assert load_splits(cfg) is load_splits(cfg)
    assert load_splits(cfg) is not load_splits(cfg.replace(seed=43))
    assert load_splits(cfg.replace(builtin_examples=90)).train.num_rows == 81


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [0, 1] * 10)
    cfg = RunConfig(dataset=str(path))
    before = load_splits(cfg)

    _labelled_csv(path, [0, 1] * 20)

    assert load_splits(cfg) is not before
    assert load_splits(cfg).train.num_rows == 36


def test_eval_dataset_is_used_when_set(tmp_path: Path) -> None:
    train_path = _labelled_csv(tmp_path / "train.csv", ["b"] * 10 + ["a"] * 10)
    eval_path = _labelled_csv(tmp_path / "eval.csv", ["a", "b", "b"], prefix="held")
    cfg = RunConfig(dataset=str(train_path), eval_dataset=str(eval_path), seed=3)

    splits = load_splits(cfg)

    assert splits.label_names == ["a", "b"]
    assert splits.train.num_rows == 20  # the whole training file
    assert list(splits.eval["text"]) == ["held 0", "held 1", "held 2"]
    assert list(splits.eval["label"]) == [0, 1, 1]
    # Shuffled once with the seed: the label-sorted file is not label-sorted any more.
    assert list(splits.train["label"])[:10] != [1] * 10


def test_eval_labels_unseen_in_training(tmp_path: Path) -> None:
    train_path = _labelled_csv(tmp_path / "train.csv", ["a", "b"] * 5)
    eval_path = _labelled_csv(tmp_path / "eval.csv", ["a", "c"])
    cfg = RunConfig(dataset=str(train_path), eval_dataset=str(eval_path))

    with pytest.raises(DataError, match=r"eval\.csv: labels 'c' not seen in training"):
        load_splits(cfg)


def test_single_class_dataset(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "one.csv", ["x"] * 5)

    with pytest.raises(DataError, match=r"only one class 'x' found in .*one\.csv"):
        load_splits(RunConfig(dataset=str(path)))


# --- partitions ------------------------------------------------------------------------


def _train(seed: int = 0, examples: int = 300) -> datasets.Dataset:
    return load_splits(RunConfig(builtin_examples=examples, seed=seed)).train


def _partitions(cfg: RunConfig, train: datasets.Dataset, n: int) -> list[datasets.Dataset]:
    return [partition_dataset(train, cfg, num_partitions=n, partition_id=i) for i in range(n)]


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological"])
def test_same_seed_gives_same_partitions(partitioner: str) -> None:
    cfg = RunConfig(builtin_examples=300, seed=0, partitioner=partitioner)

    first = [list(p["text"]) for p in _partitions(cfg, _train(), 5)]
    clear_caches()
    second = [list(p["text"]) for p in _partitions(cfg, _train(), 5)]

    assert first == second


def test_dirichlet_depends_on_the_seed() -> None:
    train = _train()
    first = _partitions(RunConfig(partitioner="dirichlet", seed=0), train, 5)
    second = _partitions(RunConfig(partitioner="dirichlet", seed=1), train, 5)

    assert [p.num_rows for p in first] != [p.num_rows for p in second]


def test_iid_partitions_are_disjoint_and_cover_the_train_set() -> None:
    train = _train()  # 270 rows
    cfg = RunConfig(partitioner="iid")

    parts = _partitions(cfg, train, 4)

    assert [p.num_rows for p in parts] == [68, 68, 67, 67]
    def rows(ds: datasets.Dataset) -> list[tuple]:
        return list(zip(ds["text"], ds["label"], ds["domain"], strict=True))

    assert sorted(row for p in parts for row in rows(p)) == sorted(rows(train))
    # Shuffled before sharding: every shard holds every class.
    assert all(set(p["label"]) == {0, 1, 2} for p in parts)


def test_dirichlet_partitions_cover_the_train_set_and_are_never_empty() -> None:
    train = _train()
    # At this alpha and seed a first Dirichlet draw leaves a client with no row.
    cfg = RunConfig(partitioner="dirichlet", dirichlet_alpha=0.1, seed=0)

    parts = _partitions(cfg, train, 10)

    assert sum(p.num_rows for p in parts) == train.num_rows
    assert min(p.num_rows for p in parts) >= 1
    assert len({text for p in parts for text in p["text"]}) == len(set(train["text"]))


def test_pathological_partitions_have_at_most_classes_per_client() -> None:
    cfg = RunConfig(partitioner="pathological", classes_per_client=2)

    parts = _partitions(cfg, _train(), 6)

    assert all(1 <= len(set(p["label"])) <= 2 for p in parts)
    assert {label for p in parts for label in list(p["label"])} == {0, 1, 2}


def test_column_partitioner_splits_by_the_column() -> None:
    cfg = RunConfig(partitioner="column:domain")
    train = _train()

    parts = _partitions(cfg, train, 3)

    assert [set(p["domain"]) for p in parts] == [{"clinical"}, {"finance"}, {"retail"}]
    assert sum(p.num_rows for p in parts) == train.num_rows


def test_column_partitioner_count_mismatch() -> None:
    cfg = RunConfig(partitioner="column:domain")

    with pytest.raises(DataError, match="column 'domain' has 3 distinct values but the "
                                        "simulation has 10 clients: use num-supernodes=3"):
        partition_dataset(_train(), cfg, num_partitions=10, partition_id=0)


def test_column_partitioner_missing_column() -> None:
    cfg = RunConfig(partitioner="column:site")

    with pytest.raises(DataError, match=r"partition column 'site' not found; columns: "
                                        r"'text', 'label', 'domain'"):
        partition_dataset(_train(), cfg, num_partitions=3, partition_id=0)


@pytest.mark.parametrize(("num_partitions", "partition_id"), [(3, 3), (3, -1), (0, 0)])
def test_partition_id_out_of_range(num_partitions: int, partition_id: int) -> None:
    with pytest.raises(DataError, match="num_partitions|partition_id"):
        partition_dataset(
            _train(), RunConfig(), num_partitions=num_partitions, partition_id=partition_id
        )


def test_more_clients_than_rows() -> None:
    with pytest.raises(DataError, match="30 clients but only 27 training rows"):
        partition_dataset(_train(examples=30), RunConfig(), num_partitions=30, partition_id=0)


def _nine_rows() -> datasets.Dataset:
    """One row of class 0, four each of classes 1 and 2."""
    return datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(9)], "label": [0] + [1] * 4 + [2] * 4}
    )


@pytest.mark.parametrize(("cfg", "train", "hint"), [
    # Client 3 gets class 0 again, which has a single row to share.
    (RunConfig(partitioner="pathological", classes_per_client=1), _nine_rows,
     "lower `classes-per-client`"),
    (RunConfig(partitioner="dirichlet", dirichlet_alpha=0.05, seed=0), _train,
     "raise `dirichlet-alpha`"),
])
def test_partitioner_failure_is_wrapped(cfg: RunConfig, train, hint: str) -> None:
    n = 4 if cfg.partitioner == "pathological" else 10
    with pytest.raises(DataError, match=f"partitioner '{cfg.partitioner}' failed.*{hint}"):
        partition_dataset(train(), cfg, num_partitions=n, partition_id=0)
    assert not data._PARTITIONER_CACHE  # the half-built partitioner is not kept


def test_partitioner_is_cached_per_setting() -> None:
    train = _train()
    cfg = RunConfig(partitioner="dirichlet")

    partition_dataset(train, cfg, num_partitions=4, partition_id=0)
    partition_dataset(train, cfg, num_partitions=4, partition_id=1)
    assert len(data._PARTITIONER_CACHE) == 1
    partition_dataset(train, cfg.replace(dirichlet_alpha=1.0), num_partitions=4, partition_id=0)
    assert len(data._PARTITIONER_CACHE) == 2


# --- local eval split and site data ----------------------------------------------------


def test_local_eval_split_is_seeded_and_disjoint() -> None:
    partition = datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)],
                                            "label": [i % 2 for i in range(10)]})

    train, held_out = split_for_local_eval(partition, fraction=0.2, seed=4)
    train_again, held_out_again = split_for_local_eval(partition, fraction=0.2, seed=4)

    assert (train.num_rows, held_out.num_rows) == (8, 2)
    assert list(held_out["text"]) == list(held_out_again["text"])
    assert list(train["text"]) == list(train_again["text"])
    assert sorted(list(train["text"]) + list(held_out["text"])) == sorted(partition["text"])


@pytest.mark.parametrize(("rows", "fraction", "expected"), [(5, 0.0, (5, 0)), (3, 0.2, (3, 0)),
                                                            (1, 0.9, (1, 0)), (2, 0.9, (1, 1))])
def test_local_eval_split_keeps_a_training_row(
    rows: int, fraction: float, expected: tuple[int, int]
) -> None:
    partition = datasets.Dataset.from_dict({"text": ["t"] * rows, "label": [0] * rows})

    train, held_out = split_for_local_eval(partition, fraction=fraction, seed=0)

    assert (train.num_rows, held_out.num_rows) == expected


def test_site_data_uses_the_federation_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.jsonl", ROWS)

    site = load_site_data(str(path), RunConfig(), ["neg", "pos"])

    assert site.column_names == ["text", "label"]
    assert list(site["label"]) == [1, 0, 1, 0]


def test_site_data_with_unknown_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.jsonl", ROWS)

    with pytest.raises(DataError, match=r"site\.jsonl: labels 'pos' not seen in training"):
        load_site_data(str(path), RunConfig(), ["neg", "neutral"])


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

    with caplog.at_level(logging.WARNING, logger="common.data"):
        frame = _read(path)

    assert list(frame["label"]) == ["pos", "pos", "neg", "neg"]
    assert build_label_names(frame["label"], source="s") == ["neg", "pos"]
    assert "dropped 1 of 5 rows" in caplog.text


def test_case_variants_stay_apart_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\na,Pos\nb,pos\nc,neg\nd,NEG\ne,neg\n")

    with caplog.at_level(logging.WARNING, logger="common.data"):
        names = build_label_names(_read(path)["label"], source="data.csv")

    assert names == ["NEG", "Pos", "neg", "pos"]
    assert ("data.csv: labels that differ only by case: 'NEG'/'neg', 'Pos'/'pos'; set "
            "label-case-fold=true to merge them") in caplog.text


def test_case_fold_merges_case_variants(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _raw(tmp_path / "data.csv", "text,label\na,Pos\nb, pos\nc,neg\nd,NEG\n")

    with caplog.at_level(logging.WARNING, logger="common.data"):
        frame = _read(path, label_case_fold=True)
        names = build_label_names(frame["label"], source="data.csv")

    assert list(frame["label"]) == ["pos", "pos", "neg", "neg"]
    assert names == ["neg", "pos"]
    assert "differ only by case" not in caplog.text


def test_eval_and_site_data_follow_the_same_label_rule(tmp_path: Path) -> None:
    train = _labelled_csv(tmp_path / "train.csv", ["pos", "neg"] * 10)
    held_out = _raw(tmp_path / "eval.csv", "text,label\nx, POS\ny,Neg\n")
    cfg = RunConfig(dataset=str(train), eval_dataset=str(held_out))

    with pytest.raises(DataError, match=r"eval\.csv: labels 'Neg', 'POS' not seen in "
                                        r"training.*'Neg', 'POS' differ from known labels "
                                        r"only by case: set `label-case-fold`=true"):
        load_splits(cfg)
    splits = load_splits(cfg.replace(label_case_fold=True))
    site = load_site_data(str(held_out), cfg.replace(label_case_fold=True), splits.label_names)

    assert splits.label_names == ["neg", "pos"]
    assert list(splits.eval["label"]) == [1, 0]
    assert list(site["label"]) == [1, 0]


def test_labels_key_follows_the_label_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held_out = _raw(tmp_path / "eval.csv", "text,label\nx,POS \ny,neg\n")
    cfg = RunConfig(labels=" Neg, pos", eval_dataset=str(held_out), label_case_fold=True)

    names, eval_set = load_server_eval(cfg)
    with caplog.at_level(logging.WARNING, logger="common.data"):
        load_server_eval(RunConfig(labels="Pos,pos"))

    assert names == ["neg", "pos"]
    assert eval_set is not None and list(eval_set["label"]) == [1, 0]
    assert "`labels`: labels that differ only by case: 'Pos'/'pos'" in caplog.text


# --- the partition plan ----------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "num_partitions", "message"), [
    (RunConfig(partitioner="column:site"), 3,
     r"partition column 'site' not found; columns: 'text', 'label', 'domain'"),
    (RunConfig(partitioner="column:domain"), 10,
     r"column 'domain' has 3 distinct values but the simulation has 10 clients"),
    (RunConfig(partitioner="pathological", classes_per_client=4), 5,
     r"`classes-per-client` is 4 but the training data has only 3 classes: lower it to "
     r"at most 3"),
    (RunConfig(), 300, r"300 clients but only 270 training rows"),
])
def test_an_infeasible_plan_is_refused(
    cfg: RunConfig, num_partitions: int, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        check_partition_plan(_train(), cfg, num_partitions=num_partitions)


def test_a_plan_with_an_empty_partition_is_refused_like_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without the resampling that keeps every Dirichlet partition non-empty, this alpha
    # and seed leave client 8 of 10 with no rows.
    monkeypatch.setattr(data, "_DIRICHLET_MIN_PARTITION_SIZE", 0)
    cfg = RunConfig(partitioner="dirichlet", dirichlet_alpha=0.1, seed=0)
    message = (r"partitioner 'dirichlet' gives 1 of 10 clients no training rows \(client 8\)"
               r": raise `dirichlet-alpha`")
    train = _train()

    with pytest.raises(DataError, match=message):
        check_partition_plan(train, cfg, num_partitions=10)
    with pytest.raises(DataError, match=message):
        partition_dataset(train, cfg, num_partitions=10, partition_id=8)
    assert partition_dataset(train, cfg, num_partitions=10, partition_id=0).num_rows > 0


def test_a_feasible_plan_counts_rows_and_labels() -> None:
    train = _train()  # 270 rows, 90 per class

    plan = check_partition_plan(train, RunConfig(partitioner="iid"), num_partitions=4)

    assert isinstance(plan, PartitionPlan) and plan.num_partitions == 4
    assert plan.rows == (68, 68, 67, 67) and sum(plan.rows) == train.num_rows
    assert [sum(counts) for counts in plan.label_counts] == list(plan.rows)
    assert [sum(column) for column in zip(*plan.label_counts, strict=True)] == [90, 90, 90]
    assert plan.classes_per_partition == (3, 3, 3, 3)
    assert plan.local_eval_rows == (13, 13, 13, 13)  # int(0.2 * 68), int(0.2 * 67)


@pytest.mark.parametrize("partitioner", ["dirichlet", "pathological", "column:domain"])
def test_the_plan_is_what_the_clients_get(partitioner: str) -> None:
    cfg = RunConfig(partitioner=partitioner, classes_per_client=1, seed=3)
    n = 3 if partitioner.startswith("column:") else 6

    plan = check_partition_plan(_train(), cfg, num_partitions=n)
    clear_caches()  # the clients rebuild the partitioner in their own process
    parts = _partitions(cfg, _train(), n)

    assert plan.rows == tuple(p.num_rows for p in parts)
    assert sum(plan.rows) == 270
    if partitioner == "pathological":
        assert plan.classes_per_partition == (1,) * n


def test_a_plan_from_a_frame() -> None:
    frame = _train().to_pandas()

    plan = check_partition_plan(frame, RunConfig(), num_partitions=3)

    assert plan.rows == (90, 90, 90)


def test_validation_is_held_out_of_the_training_rows_only() -> None:
    base = RunConfig(dataset="builtin", builtin_examples=300, eval_fraction=0.2, seed=5)
    plain = load_splits(base)
    splits = load_splits(base.replace(validation_fraction=0.25))

    assert plain.validation is None
    # The test set is untouched; the validation rows leave the training rows.
    assert list(splits.eval["text"]) == list(plain.eval["text"])
    train, validation = set(splits.train["text"]), set(splits.validation["text"])
    assert not train & validation and not validation & set(splits.eval["text"])
    assert train | validation == set(plain.train["text"])
    assert (splits.train.num_rows, splits.validation.num_rows) == (180, 60)
    assert np.bincount(list(splits.validation["label"])).tolist() == [20, 20, 20]
    # Clients partition `train`: no client ever trains on a validation row.
    cfg = base.replace(validation_fraction=0.25)
    parts = [partition_dataset(load_splits(cfg).train, cfg, num_partitions=3, partition_id=i)
             for i in range(3)]
    assert not set().union(*(set(p["text"]) for p in parts)) & validation
