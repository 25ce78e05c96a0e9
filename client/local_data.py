"""The site's own data, tokenized once per worker process.

In simulation a virtual client is one partition of the run's data set (``partition-id``
and ``num-partitions`` in the node config, set by Flower). In deployment a SuperNode
reads its own file from ``data-path`` in its node config (column names may be given
there too: the task's ``site_keys``, e.g. ``text-column`` / ``label-column``). Either way
the result is split into local train and local eval parts and tokenized once; later
rounds hit the cache.

A deployed site's file is first checked with the task's site check (``Task.check_site``,
with the model's tokenizer and the federation's labels): a blocking problem raises
``DataError`` naming the file and the problem, so the server records it as that
client's failure; warnings are logged at the site. The report is cached with the data.
With ``share-data-stats = true`` in its node config (default false) the site adds the
report's ``aggregate_stats`` (counts per label and shares, never texts) to its first
training reply's metrics (``data_stats_metrics``). In simulation the check is skipped:
a partition is a piece of the server's data, which the preflight and ``load_splits``
already checked, and its only per-partition problems (no rows, labels the server does
not know) already raise in ``partition_dataset`` and ``load_local_data``. A
classification partition still gets the check's statistics (``Task.partition_report``), and
shares them unless its node config says ``share-data-stats = false``: the server holds
that data already, so the report shows the partitions as it shows deployed sites.
Its warnings (imbalance, short or truncated texts, ...) are logged as a site's are, once
per node and run (``log_partition_warnings``, marked in ``context.state``): nothing more
is sent for them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict
from transformers import PreTrainedTokenizerBase

from common.config import ConfigError, RunConfig
from common.data import (
    DataError,
    load_site_data,
    load_splits,
    partition_dataset,
    split_for_local_eval,
)
from common.specs import DataSpec, EncodeSpec, PartitionSpec, file_stamp
from common.tasks import get_task, task_info, task_names
from common.tasks.base import Examples, SiteReport, Task

log = logging.getLogger(__name__)
SHARE_STATS_KEY = "share-data-stats"  # node config: send aggregate data stats (opt-in)
_STATS_SENT = "data-stats-sent"  # context.state record: the stats went out once
_WARNINGS_LOGGED = "data-warnings-logged"  # context.state record: logged once


@dataclass(frozen=True)
class LocalData:
    """A client's tokenized local train and eval sets (and its site file's check)."""

    train: Examples  # the task's encoded examples
    eval: Examples
    report: SiteReport | None = None  # None in simulation (module docstring)


# Per-process cache: Flower's simulation reuses worker processes across virtual clients
# and rounds, so each (client, data, tokenizer) combination is tokenized once. The key
# is the client's source (a site file: its path, resolved path and version) and the
# frozen specs of everything that changes its examples.
_CACHE: dict[tuple[Any, ...], LocalData] = {}
_CACHE_SIZE = 64


def client_key(node_config: Mapping[str, Any], node_id: int) -> str:
    """A stable name for this client: its partition in simulation, else its site name."""
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id']):06d}"
    return str(node_config.get("site-name") or f"node-{node_id}")


def load_local_data(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
) -> LocalData:
    """This client's data, from the cache when the same inputs were seen before."""
    if "data-path" in node_config:
        cfg = site_columns(cfg, node_config)
        source: tuple[Any, ...] = ("site", str(node_config["data-path"]))
    elif "partition-id" in node_config:
        source = ("partition", int(node_config["partition-id"]),
                  int(node_config["num-partitions"]))
    else:
        raise ConfigError(
            "this SuperNode has no `data-path` in its node config "
            "(start it with --node-config \"data-path='/path/to/site.csv'\")"
        )
    task = get_task(cfg.task)
    encoding = EncodeSpec.of(cfg, tokenizer_path=tokenizer.name_or_path)
    data_spec, partition_spec = DataSpec.of(cfg), PartitionSpec.of(cfg)
    key = (source, site_file_version(source), data_spec, partition_spec, encoding,
           tuple(label_names))
    if key not in _CACHE:
        report = None
        if source[0] == "site":
            report = check_site_file(source[1], cfg, label_names, tokenizer, task=task)
            dataset = load_site_data(source[1], data_spec, label_names)
        else:
            splits = load_splits(data_spec)
            if splits.label_names != label_names:
                raise ConfigError(
                    f"the server's labels {label_names} differ from this client's "
                    f"{splits.label_names}: both must read the same `dataset`"
                )
            dataset = partition_dataset(
                splits.train, partition_spec, source=cfg.dataset, num_partitions=source[2],
                partition_id=source[1]
            )
            report = task.partition_report(dataset, source=f"partition {source[1]}",
                                           encoding=encoding, label_names=label_names,
                                           tokenizer=tokenizer)
        train, local_eval = split_for_local_eval(
            dataset, fraction=cfg.client_eval_fraction, seed=cfg.seed
        )
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        encoded = LocalData(
            train=task.encode(train, tokenizer, spec=encoding),
            eval=task.encode(local_eval, tokenizer, spec=encoding),
            report=report,
        )
        if len(encoded.train) == 0:  # e.g. every example longer than max-length, dropped
            where = source[1] if source[0] == "site" else f"partition {source[1]}"
            raise DataError(
                f"{where}: no training example is left after encoding {len(train)} rows "
                f"(`max-length` {cfg.max_length}; for task sft also `overflow`); raise "
                "`max-length` or check the data")
        _CACHE[key] = encoded
    return _CACHE[key]


def site_columns(cfg: RunConfig, node_config: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with the site's own settings from its node config: the task's
    ``site_keys`` (classification: ``text-column`` / ``label-column``; sft: the columns
    of its conversations). Another task's site key set to a value of its own is refused, as
    the run's config refuses it: raises ``ConfigError`` for it or a bad value."""
    keys = dict.fromkeys(key for name in task_names() for key in task_info(name).site_keys)
    return cfg.replace(**{key.replace("-", "_"): str(node_config[key])
                          for key in keys if key in node_config})


def site_file_version(source: tuple[Any, ...]) -> tuple[str, tuple[int, int] | None] | None:
    """The site file's resolved path and version (``file_stamp``: mtime and size), for
    the cache key; None for a partition (``DataSpec`` stamps the run's ``dataset``).

    The path as given is already in the key; the resolved one tells apart equal relative
    paths read from two working directories, and the stamp a file rewritten between two
    runs that one worker process serves.
    """
    if source[0] != "site":
        return None
    path = str(source[1])
    return str(Path(path).expanduser().resolve()), file_stamp(path)


def check_site_file(
    path: str, cfg: RunConfig, label_names: list[str], tokenizer: PreTrainedTokenizerBase,
    *, task: Task,
) -> SiteReport:
    """Check a site's file with the task's site check before training; log warnings.

    Raises
    ------
    DataError
        If the file cannot be read or the check finds a blocking problem (the message
        names the file, each problem, and ``fedsft check-data`` for the full report).
    """
    report = task.check_site(path, spec=DataSpec.of(cfg),
                             encoding=EncodeSpec.of(cfg, tokenizer_path=tokenizer.name_or_path),
                             label_names=label_names, tokenizer=tokenizer)
    log_warnings(report, path)
    if report.blocking:
        problems = "; ".join(finding.message for finding in report.blocking)
        raise DataError(
            f"site data {path} cannot be used: {problems} (run `fedsft check-data "
            f"{path}` at the site for the full report)"
        )
    return report


def log_warnings(report: SiteReport, where: str) -> None:
    """Log each warning of a data report at this client (``site data <where>: ...``)."""
    for finding in report.warnings:
        log.warning("site data %s: %s", where, finding.message)


def log_partition_warnings(
    data: LocalData, node_config: Mapping[str, Any], state: RecordDict
) -> None:
    """Log a simulated partition's data warnings once per node and run.

    A deployed site's file logs them in ``check_site_file``, with its blocking check; a
    partition is not blocked (module docstring), but its warnings are as worth a look.
    Marked in ``state`` (the node's ``context.state``), so a node served by several
    worker processes logs them once; a site (no ``partition-id``) logs nothing here.
    """
    if "partition-id" not in node_config or data.report is None or _WARNINGS_LOGGED in state:
        return
    state[_WARNINGS_LOGGED] = ConfigRecord({"logged": True})
    log_warnings(data.report, f"partition {int(node_config['partition-id'])}")


def data_stats_metrics(
    data: LocalData, node_config: Mapping[str, Any], state: RecordDict
) -> dict[str, int | float]:
    """The aggregate data statistics for this training reply, or nothing.

    Only when sharing is on (``share-data-stats`` in the node config; default true for a
    simulated partition, false for a deployed site), the data has a report and this
    node has not sent them yet (marked in ``state``, the node's ``context.state``): once
    per node and run, in its first training reply.

    Raises
    ------
    ConfigError
        If ``share-data-stats`` is not a boolean.
    """
    share = node_config.get(SHARE_STATS_KEY, "partition-id" in node_config)
    if not isinstance(share, bool):
        raise ConfigError(
            f"node config `{SHARE_STATS_KEY}` must be true or false, got {share!r}"
        )
    if not share or data.report is None or _STATS_SENT in state:
        return {}
    state[_STATS_SENT] = ConfigRecord({"sent": True})
    return data.report.aggregate_stats()


def clear_local_data_cache() -> None:
    """Forget every cached client data set (tests)."""
    _CACHE.clear()
