"""The data layer: read a source, hold out an eval split, partition clients.

Every source is one of ``"builtin"`` (the task's built-in data, ``Task.builtin_rows``),
``hf:<name>[:<split>]`` (a Hugging Face data set) or a file (``.csv``, ``.tsv``,
``.jsonl``, ``.json``, ``.parquet``). The task (``common/tasks/``) turns a raw table
into its canonical rows (``Task.prepare``: for classification the cleaning and label
rules of ``common/tasks/classification_data.py``); nothing here knows a task's columns
or labels beyond the canonical ``label`` column that stratified splits and label-skew
partitioners share rows by. Problems with the data raise ``DataError``, whose message
names the source and the problem.

The server and every client compute the same splits and partitions independently from
the same config, so everything here is deterministic under its ``seed``; the functions
take the frozen specs of ``common/specs.py`` (``DataSpec``, ``PartitionSpec``). Two
explicit per-process caches (``_SPLITS_CACHE``, ``_PARTITIONER_CACHE``) avoid redoing
that work: Flower's simulation runs many virtual clients in one worker process. Their
keys hold every argument that changes the result; ``clear_caches`` empties them.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common.config import RunConfig
from common.specs import DataSpec, PartitionSpec
from common.tasks import get_task

# `datasets` and sklearn load in the functions that use them (seconds of imports):
# `fedsft check-data` reads and cleans a table through this module without them.
if TYPE_CHECKING:
    import datasets
    from flwr_datasets.partitioner import Partitioner

FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
# Dirichlet partitions smaller than this are resampled (at most 10 times, then it fails):
# a client needs one row to train on. 2 (a row for local eval too) fails far more often
# at small alpha, and split_for_local_eval copes with a one-row partition.
_DIRICHLET_MIN_PARTITION_SIZE = 1
_PARTITIONER_HINTS = MappingProxyType({  # read-only: the only module dicts are caches
    "dirichlet": "raise `dirichlet-alpha`, change `seed` or use fewer clients",
    "pathological": "lower `classes-per-client` or use fewer clients",
})
_MAX_LISTED = 5  # clients quoted in an error message

# Per-process caches (see the module docstring), keyed by the frozen specs of
# common/specs.py (every config field that changes the result).
_SPLITS_CACHE: dict[DataSpec, Splits] = {}
_PARTITIONER_CACHE: dict[tuple[Any, ...], Partitioner] = {}


class DataError(ValueError):
    """A data source is missing, unreadable or unusable; the message names the source."""


@dataclass(frozen=True)
class Splits:
    """The server's view of the data: training rows, held-out rows, class names.

    The data sets have the task's canonical columns (``Task.columns``; classification:
    ``text`` and ``label``, an int64 index into ``label_names``, which is [] for a task
    without classes), plus any other column of the source. ``validation`` (only
    with ``validation-fraction`` > 0) is held out of the training rows, so ``train``
    lacks them: the model is selected on it, and ``eval`` stays the test set. Shared
    through a per-process cache: do not mutate ``label_names``.
    """

    train: datasets.Dataset
    eval: datasets.Dataset
    label_names: list[str]
    validation: datasets.Dataset | None = None


# --- reading ---------------------------------------------------------------------------


def read_source(source: str, *, text_column: str, all_text: bool = False) -> pd.DataFrame:
    """The raw table of a ``hf:`` source or a data file (``"builtin"`` is the task's).

    Files are read by their extension (UTF-8; TSV without quote handling, as SST-2
    needs); CSV / TSV cells of ``text_column`` are read as strings, every cell with
    ``all_text``. A blank CSV / TSV field is missing; "NA" or "null" stay text.

    Raises
    ------
    DataError
        If the source is missing or a directory, has an unknown format, cannot be
        decoded, loaded or parsed (a tab-separated ``.csv`` included) or is empty.
    """
    if source.startswith("hf:"):
        return _read_hf(source)
    return _read_file(source, text_column=text_column, all_text=all_text)


def _read_hf(source: str) -> pd.DataFrame:
    """Load ``hf:<name>[:<split>]`` through ``datasets.load_dataset``."""
    name, _, split = source[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"{source}: expected hf:<name> or hf:<name>:<split>")
    import datasets

    try:
        frame = datasets.load_dataset(name, split=split or "train").to_pandas()
    except Exception as error:  # the hub, the cache and the builders raise many types
        raise DataError(f"{source}: could not load the data set: {error}") from error
    assert isinstance(frame, pd.DataFrame)  # to_pandas gives batches only when asked
    return frame


def _read_file(source: str, *, text_column: str, all_text: bool = False) -> pd.DataFrame:
    """Read a data file by its extension (CSV/TSV cells all as strings with ``all_text``)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(f"data file {source} is a directory, not a file")
    if not path.is_file():
        raise DataError(f"data file not found: {source}")
    if suffix not in FORMATS:
        raise DataError(
            f"{source}: unknown data format {path.suffix!r}; allowed: {', '.join(FORMATS)}"
        )
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        raw = path.read_bytes()
        try:
            content = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{source}: not valid UTF-8 at byte {error.start} ({error.reason})"
            ) from error
        if not content.strip():
            raise DataError(f"{source}: the file is empty")
        if suffix == ".csv":
            _check_comma_separated(content, source=source)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(
                io.StringIO(content),
                sep="\t" if suffix == ".tsv" else ",",
                # SST-2 style TSVs hold unbalanced quotes inside sentences.
                quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                dtype=str if all_text else {text_column: str},
                # Only a blank field is missing: "NA" or "null" may be real text/labels.
                keep_default_na=False,
                na_values=[""],
            )
        if suffix == ".jsonl":
            return _read_json_lines(content, source=source)
        return _read_json(content, source=source)
    except DataError:
        raise
    except Exception as error:  # pandas / pyarrow parse errors have many types
        # pandas names the line itself ("Expected 2 fields in line 3, saw 4").
        raise DataError(f"{source}: could not parse the file: {error}") from error


def _check_comma_separated(content: str, *, source: str) -> None:
    """Refuse a ``.csv`` whose header has tabs and no comma: it is a TSV."""
    header = next((line for line in content.splitlines() if line.strip()), "")
    if "\t" in header and "," not in header:
        raise DataError(
            f"{source}: the header line has tabs and no commas, so the file is "
            f"tab-separated: rename it to .tsv (a .csv file must be comma-separated)"
        )


def _read_json_lines(content: str, *, source: str) -> pd.DataFrame:
    """One JSON object per non-blank line."""
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{source}: invalid JSON on line {number}: {error}") from error
        if not isinstance(record, dict):
            raise DataError(f"{source}: line {number} is not a JSON object")
        records.append(record)
    return pd.DataFrame.from_records(records)


def _read_json(content: str, *, source: str) -> pd.DataFrame:
    """A list of records or an object of columns; JSON Lines saved as .json also work."""
    try:
        data = json.loads(content)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines
            return _read_json_lines(content, source=source)
        raise DataError(f"{source}: invalid JSON: {error}") from error
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return pd.DataFrame.from_records(data)
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return pd.DataFrame(data)
    raise DataError(
        f"{source}: expected a JSON list of objects or an object of column lists"
    )


# --- server-side splits ----------------------------------------------------------------


def load_splits(spec: DataSpec) -> Splits:
    """Read ``spec.dataset`` as the task's rows and hold out the server's eval split.

    The task (``spec.task``, ``common/tasks/``) turns each raw table into its canonical
    rows and, for the training data, derives the class names. With ``spec.eval_dataset``
    that file is the eval split (with the training class names) and the whole,
    seed-shuffled ``spec.dataset`` is the training split. Otherwise a stratified (when
    the rows have a ``label`` and every class has at least two rows, else plain) seeded
    ``spec.eval_fraction`` of ``spec.dataset`` is held out. With
    ``spec.validation_fraction`` > 0 that share of the training split is then held out
    the same way as ``validation``, before any client partitions ``train``; at 0 the
    splits are exactly those without it. The same config gives the same splits in every
    process (the server's and the clients'); results are cached per process, keyed by
    ``spec`` (``DataSpec.of(cfg)``: every field that changes them, and the files'
    versions).

    Raises
    ------
    DataError
        If a source cannot be read or the task refuses its rows (e.g. fewer than two
        classes, eval labels the training data lacks).
    """
    if spec not in _SPLITS_CACHE:
        _SPLITS_CACHE[spec] = _compute_splits(spec)
    return _SPLITS_CACHE[spec]


def clear_caches() -> None:
    """Forget every cached split and partitioner of this process."""
    _SPLITS_CACHE.clear()
    _PARTITIONER_CACHE.clear()


def _compute_splits(spec: DataSpec) -> Splits:
    task = get_task(spec.task)
    train_frame, label_names = task.prepare(
        read_rows(spec.dataset, spec), source=spec.dataset, spec=spec, label_names=None)
    if spec.eval_dataset:
        eval_frame, _ = task.prepare(read_rows(spec.eval_dataset, spec),
                                     source=spec.eval_dataset, spec=spec,
                                     label_names=label_names)
        # Files are often sorted by label; IID partitioning takes contiguous shards.
        order = np.random.default_rng(spec.seed).permutation(len(train_frame))
        train_frame = train_frame.iloc[order]
    else:
        train_frame, eval_frame = _hold_out(train_frame, fraction=spec.eval_fraction,
                                            seed=spec.seed)
    validation = None
    if spec.validation_fraction > 0:
        if len(train_frame) < 2:
            raise DataError(
                f"{spec.dataset}: `validation-fraction` {spec.validation_fraction:g} needs "
                f"at least 2 training rows to hold some out, got {len(train_frame)}"
            )
        train_frame, validation_frame = _hold_out(
            train_frame, fraction=spec.validation_fraction, seed=spec.seed)
        validation = _to_dataset(validation_frame, source=spec.dataset)
    return Splits(
        train=_to_dataset(train_frame, source=spec.dataset),
        eval=_to_dataset(eval_frame, source=spec.eval_dataset or spec.dataset),
        label_names=label_names,
        validation=validation,
    )


def read_rows(source: str, spec: DataSpec) -> pd.DataFrame:
    """The raw table of ``source`` (the task's built-in data for ``"builtin"``)."""
    if source == "builtin":
        frame = get_task(spec.task).builtin_rows(spec.builtin_examples, seed=spec.seed,
                                                 spec=spec)
    else:
        frame = read_source(source, text_column=spec.text_column,
                            all_text=get_task(spec.task).read_as_text)
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    return frame


def _hold_out(
    frame: pd.DataFrame, *, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded (stratified when possible) split of ``frame``: the rest and ``fraction``."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(frame))
    try:
        if "label" not in frame.columns:
            raise ValueError("no classes to stratify by")
        train_idx, eval_idx = train_test_split(
            indices, test_size=fraction, random_state=seed,
            stratify=frame["label"].to_numpy(),
        )
    except ValueError:  # a class with a single row, or fewer eval rows than classes
        train_idx, eval_idx = train_test_split(indices, test_size=fraction, random_state=seed)
    return frame.iloc[train_idx], frame.iloc[eval_idx]


def _to_dataset(frame: pd.DataFrame, *, source: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.Dataset.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    except Exception as error:  # pyarrow rejects columns of mixed types
        raise DataError(f"{source}: could not convert to a data set: {error}") from error


# --- client partitions -----------------------------------------------------------------


def partition_dataset(
    train: datasets.Dataset,
    spec: PartitionSpec,
    *,
    source: str,
    num_partitions: int,
    partition_id: int,
) -> datasets.Dataset:
    """One client's share of the training data, by ``spec.partitioner``.

    ``iid`` cuts ``train`` into contiguous, near-equal shards (``load_splits`` shuffled
    it); ``dirichlet`` draws label shares per client with ``spec.dirichlet_alpha``;
    ``pathological`` gives each client ``spec.classes_per_client`` classes (the first one
    by client id, so every class is used once there are enough clients);
    ``column:<name>`` gives each distinct value of that column to one client, in sorted
    order. All are deterministic under ``spec.seed``; the partitioner is cached per
    process, so the other clients' calls do not repartition.

    Parameters
    ----------
    train
        The training split from ``load_splits``.
    spec
        ``PartitionSpec.of(cfg)``.
    source
        The training data's name in error messages (the ``dataset`` key).
    num_partitions
        Number of clients.
    partition_id
        This client, in ``[0, num_partitions)``.

    Returns
    -------
    datasets.Dataset
        The rows of this client.

    Raises
    ------
    DataError
        If the ids are out of range, there are fewer training rows than clients, the
        partition column is missing or has a number of distinct values other than
        ``num_partitions``, ``classes-per-client`` exceeds the number of classes, the
        partitioner fails, or this client's partition would be empty.
    """
    partition = _load_partition(
        train, spec, source=source, num_partitions=num_partitions, partition_id=partition_id
    )
    if partition.num_rows == 0:
        raise _empty_partitions_error(spec, [partition_id], source=source,
                                      num_partitions=num_partitions)
    return partition


@dataclass(frozen=True)
class PartitionPlan:
    """How ``partition_dataset`` shares the training rows among the clients.

    ``rows[i]`` is the number of rows of client ``i``; ``label_counts[i][k]`` its rows of
    class ``k`` (label id, up to the largest id in the training data; empty for a task
    without class labels);
    ``local_eval_rows[i]`` how many of them ``split_for_local_eval`` holds out at
    ``client-eval-fraction``, so client ``i`` trains on ``rows[i] - local_eval_rows[i]``.
    """

    rows: tuple[int, ...]
    label_counts: tuple[tuple[int, ...], ...]
    local_eval_rows: tuple[int, ...]

    @property
    def num_partitions(self) -> int:
        """Number of clients."""
        return len(self.rows)

    @property
    def classes_per_partition(self) -> tuple[int, ...]:
        """Number of classes with at least one row, per client."""
        return tuple(sum(1 for count in counts if count) for counts in self.label_counts)


def check_partition_plan(
    train: datasets.Dataset | pd.DataFrame, spec: PartitionSpec, *, source: str,
    num_partitions: int,
) -> PartitionPlan:
    """Partition ``train`` for ``num_partitions`` clients as they will, and check it.

    Meant to run before Flower starts: the clients compute the same partitions with the
    same code (``partition_dataset``), so a plan that passes here cannot fail there, and
    one that fails here would fail in every client (every round skipped).

    Parameters
    ----------
    train
        The training split, ``load_splits(DataSpec.of(cfg)).train`` (a frame with
        ``text`` and an int ``label`` column is converted). Passing that same data set
        lets the clients of this process reuse the cached partitioner.
    spec
        ``PartitionSpec.of(cfg)`` (``partitioner`` and its settings, ``seed``,
        ``client-eval-fraction``).
    source
        The training data's name in error messages (the ``dataset`` key).
    num_partitions
        Number of clients (simulation: ``num-supernodes``).

    Returns
    -------
    PartitionPlan
        Rows and label counts per client; ``sum(rows) == train.num_rows`` for every
        partitioner.

    Raises
    ------
    DataError
        If ``partition_dataset`` would raise for some client (fewer rows than clients, a
        missing or mismatched partition column, ``classes-per-client`` above the number
        of classes, a failing partitioner) or any client would get no rows (all such
        clients are named).
    """
    if isinstance(train, pd.DataFrame):
        train = _to_dataset(train, source=source)
    # Class counts for a task with class labels (an int `label` column); a task
    # without classes (sft) gets empty counts.
    labelled = "label" in train.column_names
    num_classes = int(max(train["label"])) + 1 if labelled and train.num_rows else 0
    parts = [
        _load_partition(train, spec, source=source, num_partitions=num_partitions,
                        partition_id=i)
        for i in range(num_partitions)
    ]
    empty = [i for i, part in enumerate(parts) if part.num_rows == 0]
    if empty:
        raise _empty_partitions_error(spec, empty, source=source,
                                      num_partitions=num_partitions)
    return PartitionPlan(
        rows=tuple(part.num_rows for part in parts),
        label_counts=tuple(
            tuple(int(c) for c in np.bincount(
                np.asarray(part["label"], dtype=np.int64), minlength=num_classes
            )) if labelled else ()
            for part in parts
        ),
        local_eval_rows=tuple(
            _local_eval_rows(part.num_rows, spec.client_eval_fraction) for part in parts
        ),
    )


def _empty_partitions_error(
    spec: PartitionSpec, empty: list[int], *, source: str, num_partitions: int
) -> DataError:
    """The error for clients whose partition has no rows."""
    shown = ", ".join(map(str, empty[:_MAX_LISTED]))
    more = f" and {len(empty) - _MAX_LISTED} more" if len(empty) > _MAX_LISTED else ""
    hint = _PARTITIONER_HINTS.get(spec.partitioner, "use fewer clients")
    return DataError(
        f"{source}: partitioner {spec.partitioner!r} gives {len(empty)} of "
        f"{num_partitions} clients no training rows (client {shown}{more}): {hint}"
    )


def _load_partition(
    train: datasets.Dataset, spec: PartitionSpec, *, source: str, num_partitions: int,
    partition_id: int,
) -> datasets.Dataset:
    """``partition_dataset`` without the empty-partition check."""
    if num_partitions < 1:
        raise DataError(f"{source}: num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise DataError(
            f"{source}: partition_id must be in [0, {num_partitions}), got {partition_id}"
        )
    if num_partitions > train.num_rows:
        raise DataError(
            f"{source}: {num_partitions} clients but only {train.num_rows} training "
            f"rows: use fewer clients or more data"
        )
    key = (train._fingerprint, spec, num_partitions)
    if key not in _PARTITIONER_CACHE:
        partitioner = _build_partitioner(train, spec, source=source,
                                         num_partitions=num_partitions)
        partitioner.dataset = train
        _PARTITIONER_CACHE[key] = partitioner
    try:
        with warnings.catch_warnings():
            # Dirichlet resampling and unused pathological classes warn; failures raise.
            warnings.simplefilter("ignore", UserWarning)
            return _PARTITIONER_CACHE[key].load_partition(partition_id)
    except ValueError as error:
        del _PARTITIONER_CACHE[key]  # a failed partitioner is in a half-built state
        hint = _PARTITIONER_HINTS.get(spec.partitioner, "use fewer clients")
        raise DataError(
            f"{source}: partitioner {spec.partitioner!r} failed for {num_partitions} "
            f"clients: {error} (hint: {hint})"
        ) from error


def _build_partitioner(
    train: datasets.Dataset, spec: PartitionSpec, *, source: str, num_partitions: int
) -> Partitioner:
    # Imported here: flwr_datasets loads its plotting code (seaborn, matplotlib) on
    # import, seconds that only simulations, which partition, should pay.
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        PathologicalPartitioner,
    )

    column = spec.partition_column
    if spec.partitioner == "pathological":
        num_classes = len(train.unique("label"))
        if spec.classes_per_client > num_classes:
            raise DataError(
                f"{source}: `classes-per-client` is {spec.classes_per_client} but the "
                f"training data has only {num_classes} classes: lower it to at most "
                f"{num_classes}"
            )
    if column is not None:
        if column not in train.column_names:
            raise DataError(
                f"{source}: partition column {column!r} not found; columns: "
                f"{', '.join(map(repr, train.column_names))}"
            )
        distinct = len(train.unique(column))
        if distinct != num_partitions:
            raise DataError(
                f"{source}: column {column!r} has {distinct} distinct values but the "
                f"simulation has {num_partitions} clients: use num-supernodes={distinct}"
            )
        return NaturalIdPartitioner(partition_by=column)
    if spec.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions, partition_by="label",
            alpha=spec.dirichlet_alpha, min_partition_size=_DIRICHLET_MIN_PARTITION_SIZE,
            self_balancing=False, shuffle=True, seed=spec.seed,
        )
    assert spec.partitioner == "pathological", spec.partitioner  # RunConfig validated it
    return PathologicalPartitioner(
        num_partitions=num_partitions, partition_by="label",
        num_classes_per_partition=spec.classes_per_client,
        class_assignment_mode="first-deterministic", shuffle=True, seed=spec.seed,
    )


def split_for_local_eval(
    partition: datasets.Dataset, *, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded train / eval split of one client's partition.

    Parameters
    ----------
    partition
        The client's rows (at least one).
    fraction
        Share of rows for evaluation, in ``[0, 1)``; rounded down, and at least one row
        always stays for training, so the eval part may be empty.
    seed
        Seed of the shuffle (derive it from the run seed and the partition id).

    Returns
    -------
    tuple[datasets.Dataset, datasets.Dataset]
        ``(train, eval)``.
    """
    if partition.num_rows == 0:
        raise DataError("the client's partition is empty: nothing to train on")
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    num_eval = _local_eval_rows(partition.num_rows, fraction)
    order = np.random.default_rng(seed).permutation(partition.num_rows)
    return partition.select(order[num_eval:]), partition.select(order[:num_eval])


def _local_eval_rows(num_rows: int, fraction: float) -> int:
    """Rows ``split_for_local_eval`` holds out: rounded down, one row stays to train."""
    return max(min(int(fraction * num_rows), num_rows - 1), 0)


# --- deployment ------------------------------------------------------------------------


def load_site_data(path: str, spec: DataSpec, label_names: list[str]) -> datasets.Dataset:
    """Read one site's data file for a deployed client, as the task's canonical rows
    (read and cleaned by ``spec``: its task, columns, case folding).

    ``label_names`` are the federation's classes, from the server (labels outside them
    are refused); [] for a task without classes.

    Raises
    ------
    DataError
        If the file cannot be read or the task refuses its rows.
    """
    task = get_task(spec.task)
    rows, _ = task.prepare(read_rows(path, spec), source=path, spec=spec,
                           label_names=label_names)
    return _to_dataset(rows[list(task.columns)], source=path)


def load_server_eval(cfg: RunConfig) -> tuple[list[str], datasets.Dataset | None]:
    """The server's class names and its evaluation data (None: no central evaluation).

    When the training data is only at the sites (``RunConfig.server_reads_dataset`` is
    false: ``labels`` set, or ``dataset`` = ``"none"``) the server never reads
    ``cfg.dataset``; it evaluates on ``cfg.eval_dataset`` when given. The names are
    ``labels`` (empty for a task without classes; ``RunConfig.label_list``), which the
    task checks as it checks class names read from data (``Task.check_label_names``).
    Otherwise both come from :func:`load_splits` (the held-out split or eval file).
    """
    spec = DataSpec.of(cfg)
    if cfg.server_reads_dataset:
        splits = load_splits(spec)
        return splits.label_names, splits.eval
    task = get_task(spec.task)
    if cfg.label_list:
        task.check_label_names(cfg.label_list, source="`labels`")
    if not cfg.eval_dataset:
        return cfg.label_list, None
    rows, _ = task.prepare(read_rows(cfg.eval_dataset, spec), source=cfg.eval_dataset,
                           spec=spec, label_names=cfg.label_list)
    return cfg.label_list, _to_dataset(rows[list(task.columns)], source=cfg.eval_dataset)
