"""Tests for common/data.py: held-out split, partitions, site and server eval data (the
classification table rules: test_classification_data.py)."""

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
    check_partition_plan,
    clear_caches,
    load_server_eval,
    load_site_data,
    load_splits,
    partition_dataset,
    split_for_local_eval,
)
from common.specs import DataSpec, PartitionSpec

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


# --- load_splits -----------------------------------------------------------------------


def test_builtin_splits_are_deterministic_disjoint_and_stratified() -> None:
    cfg = RunConfig(dataset="builtin", builtin_examples=300, eval_fraction=0.2, seed=5)

    splits = load_splits(DataSpec.of(cfg))
    clear_caches()
    again = load_splits(DataSpec.of(cfg))

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

    splits = load_splits(DataSpec.of(cfg))

    train, held_out = set(splits.train["text"]), set(splits.eval["text"])
    assert not train & held_out
    assert len(train | held_out) == 50
    assert splits.train.features["label"].dtype == "int64"


def test_other_seed_gives_other_split(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [i % 2 for i in range(40)])

    first = load_splits(DataSpec.of(RunConfig(dataset=str(path), seed=1))).eval["text"]
    second = load_splits(DataSpec.of(RunConfig(dataset=str(path), seed=2))).eval["text"]

    assert sorted(first) != sorted(second)


def test_tiny_class_falls_back_to_an_unstratified_split(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [0] * 10 + [1] * 9 + [2])

    splits = load_splits(DataSpec.of(RunConfig(dataset=str(path), eval_fraction=0.1)))

    assert (splits.train.num_rows, splits.eval.num_rows) == (18, 2)


def test_splits_are_cached_and_keyed_by_config(tmp_path: Path) -> None:
    cfg = RunConfig(dataset="builtin", builtin_examples=60)

    assert load_splits(DataSpec.of(cfg)) is load_splits(DataSpec.of(cfg))
    assert load_splits(DataSpec.of(cfg)) is not load_splits(DataSpec.of(cfg.replace(seed=43)))
    assert load_splits(DataSpec.of(cfg.replace(builtin_examples=90))).train.num_rows == 81


def test_an_edited_file_is_read_again(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "d.csv", [0, 1] * 10)
    cfg = RunConfig(dataset=str(path))
    before = load_splits(DataSpec.of(cfg))

    _labelled_csv(path, [0, 1] * 20)

    assert load_splits(DataSpec.of(cfg)) is not before
    assert load_splits(DataSpec.of(cfg)).train.num_rows == 36


def test_eval_dataset_is_used_when_set(tmp_path: Path) -> None:
    train_path = _labelled_csv(tmp_path / "train.csv", ["b"] * 10 + ["a"] * 10)
    eval_path = _labelled_csv(tmp_path / "eval.csv", ["a", "b", "b"], prefix="held")
    cfg = RunConfig(dataset=str(train_path), eval_dataset=str(eval_path), seed=3)

    splits = load_splits(DataSpec.of(cfg))

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
        load_splits(DataSpec.of(cfg))


def test_single_class_dataset(tmp_path: Path) -> None:
    path = _labelled_csv(tmp_path / "one.csv", ["x"] * 5)

    with pytest.raises(DataError, match=r"only one class 'x' found in .*one\.csv"):
        load_splits(DataSpec.of(RunConfig(dataset=str(path))))


# --- partitions ------------------------------------------------------------------------


def _train(seed: int = 0, examples: int = 300) -> datasets.Dataset:
    return load_splits(DataSpec.of(RunConfig(builtin_examples=examples, seed=seed))).train


def _partitions(cfg: RunConfig, train: datasets.Dataset, n: int) -> list[datasets.Dataset]:
    return [partition_dataset(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=n,
                              partition_id=i) for i in range(n)]


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
        partition_dataset(_train(), PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=10,
                          partition_id=0)


def test_column_partitioner_missing_column() -> None:
    cfg = RunConfig(partitioner="column:site")

    with pytest.raises(DataError, match=r"partition column 'site' not found; columns: "
                                        r"'text', 'label', 'domain'"):
        partition_dataset(_train(), PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=3,
                          partition_id=0)


@pytest.mark.parametrize(("num_partitions", "partition_id"), [(3, 3), (3, -1), (0, 0)])
def test_partition_id_out_of_range(num_partitions: int, partition_id: int) -> None:
    with pytest.raises(DataError, match="num_partitions|partition_id"):
        partition_dataset(
            _train(), PartitionSpec.of(RunConfig()), source="builtin",
            num_partitions=num_partitions, partition_id=partition_id
        )


def test_more_clients_than_rows() -> None:
    with pytest.raises(DataError, match="30 clients but only 27 training rows"):
        partition_dataset(_train(examples=30), PartitionSpec.of(RunConfig()),
                          source="builtin", num_partitions=30, partition_id=0)


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
        partition_dataset(train(), PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=n,
                          partition_id=0)
    assert not data._PARTITIONER_CACHE  # the half-built partitioner is not kept


def test_partitioner_is_cached_per_setting() -> None:
    train = _train()
    cfg = RunConfig(partitioner="dirichlet")

    partition_dataset(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=4,
                      partition_id=0)
    partition_dataset(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=4,
                      partition_id=1)
    assert len(data._PARTITIONER_CACHE) == 1
    partition_dataset(train, PartitionSpec.of(cfg.replace(dirichlet_alpha=1.0)),
                      source=cfg.dataset, num_partitions=4, partition_id=0)
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

    site = load_site_data(str(path), DataSpec.of(RunConfig()), ["neg", "pos"])

    assert site.column_names == ["text", "label"]
    assert list(site["label"]) == [1, 0, 1, 0]


def test_site_data_with_unknown_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "site.jsonl", ROWS)

    with pytest.raises(DataError, match=r"site\.jsonl: labels 'pos' not seen in training"):
        load_site_data(str(path), DataSpec.of(RunConfig()), ["neg", "neutral"])


# --- the label rule through the splits, site data and `labels` ---------------------------


def _raw(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def test_eval_and_site_data_follow_the_same_label_rule(tmp_path: Path) -> None:
    train = _labelled_csv(tmp_path / "train.csv", ["pos", "neg"] * 10)
    held_out = _raw(tmp_path / "eval.csv", "text,label\nx, POS\ny,Neg\n")
    cfg = RunConfig(dataset=str(train), eval_dataset=str(held_out))

    with pytest.raises(DataError, match=r"eval\.csv: labels 'Neg', 'POS' not seen in "
                                        r"training.*'Neg', 'POS' differ from known labels "
                                        r"only by case: set `label-case-fold`=true"):
        load_splits(DataSpec.of(cfg))
    splits = load_splits(DataSpec.of(cfg.replace(label_case_fold=True)))
    site = load_site_data(str(held_out), DataSpec.of(cfg.replace(label_case_fold=True)),
                          splits.label_names)

    assert splits.label_names == ["neg", "pos"]
    assert list(splits.eval["label"]) == [1, 0]
    assert list(site["label"]) == [1, 0]


def test_labels_key_follows_the_label_rule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held_out = _raw(tmp_path / "eval.csv", "text,label\nx,POS \ny,neg\n")
    cfg = RunConfig(labels=" Neg, pos", eval_dataset=str(held_out), label_case_fold=True)

    names, eval_set = load_server_eval(cfg)
    with caplog.at_level(logging.WARNING, logger="common.tasks.classification_data"):
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
        check_partition_plan(_train(), PartitionSpec.of(cfg), source=cfg.dataset,
                             num_partitions=num_partitions)


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
        check_partition_plan(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=10)
    with pytest.raises(DataError, match=message):
        partition_dataset(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=10,
                          partition_id=8)
    assert partition_dataset(train, PartitionSpec.of(cfg), source=cfg.dataset, num_partitions=10,
                             partition_id=0).num_rows > 0


def test_a_feasible_plan_counts_rows_and_labels() -> None:
    train = _train()  # 270 rows, 90 per class

    plan = check_partition_plan(train, PartitionSpec.of(RunConfig(partitioner="iid")),
                                source="builtin", num_partitions=4)

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

    plan = check_partition_plan(_train(), PartitionSpec.of(cfg), source=cfg.dataset,
                                num_partitions=n)
    clear_caches()  # the clients rebuild the partitioner in their own process
    parts = _partitions(cfg, _train(), n)

    assert plan.rows == tuple(p.num_rows for p in parts)
    assert sum(plan.rows) == 270
    if partitioner == "pathological":
        assert plan.classes_per_partition == (1,) * n


def test_a_plan_from_a_frame() -> None:
    frame = _train().to_pandas()

    plan = check_partition_plan(frame, PartitionSpec.of(RunConfig()), source="builtin",
                                num_partitions=3)

    assert plan.rows == (90, 90, 90)


def test_validation_is_held_out_of_the_training_rows_only() -> None:
    base = RunConfig(dataset="builtin", builtin_examples=300, eval_fraction=0.2, seed=5)
    plain = load_splits(DataSpec.of(base))
    splits = load_splits(DataSpec.of(base.replace(validation_fraction=0.25)))

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
    parts = [partition_dataset(load_splits(DataSpec.of(cfg)).train, PartitionSpec.of(cfg),
                               source=cfg.dataset, num_partitions=3, partition_id=i)
             for i in range(3)]
    assert not set().union(*(set(p["text"]) for p in parts)) & validation
