"""Optional experiment tracking: each results row also logged to TensorBoard or MLflow.

``open_sinks(["tensorboard", "mlflow"], run_dir, run_name, config)`` returns one sink
per name; the server calls ``sink.log_round(row)`` with every results row (after it is
written to ``results.jsonl``) and ``sink.close()`` at the end. A row's numeric fields
become scalar metrics named by their path (``central/accuracy``,
``clients/eval_headline_spread/min``, ``bytes/up_total``, ...) at ``step = round``.

Both packages are optional (``pip install -e ".[tracking]"``) and imported only when a
sink is opened. Everything stays local: TensorBoard writes event files to
``<run_dir>/tensorboard/``; MLflow logs to the file store ``<run_dir>/mlruns`` unless
``MLFLOW_TRACKING_URI`` is set (then to that store or server). ``mlflow ui
--backend-store-uri <run_dir>/mlruns`` and ``tensorboard --logdir <run_dir>/tensorboard``
show them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from server.results import ResultsRow

SINK_NAMES = ("tensorboard", "mlflow")
_EXTRA_HINT = 'pip install -e ".[tracking]"'
_SKIPPED_FIELDS = frozenset({"round", "time"})  # the step itself and a wall-clock stamp
_MLFLOW_BATCH = 1000  # MLflow's limit of metrics per log_batch call
_MLFLOW_PARAMS_BATCH = 100  # ... and of params per call
_MLFLOW_PARAM_CHARS = 6000  # longest param value MLflow stores


class MetricSinkError(RuntimeError):
    """A sink cannot be opened: unknown name or its package is not installed."""


class MetricSink(Protocol):
    """Receives every results row of a run."""

    def log_round(self, row: ResultsRow) -> None:
        """Log the numeric fields of one results row at ``step = row.round``."""

    def close(self) -> None:
        """Flush and release; the sink is not used afterwards."""


def flatten_metrics(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a results row as ``{"a/b": value}``.

    Booleans count as 0/1 (``clients/skipped``); lists, strings, nulls and non-finite
    numbers are left out, as are the top-level ``round`` (the step) and ``time``.
    """
    flat: dict[str, float] = {}
    for key, value in row.items():
        if not prefix and key in _SKIPPED_FIELDS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            flat[name] = float(value)
    return flat


def open_sinks(
    names: list[str], run_dir: Path, run_name: str, config: Mapping[str, Any]
) -> list[MetricSink]:
    """Open one sink per name (``"tensorboard"``, ``"mlflow"``), in order.

    Parameters
    ----------
    names
        Sinks to open; an empty list opens none.
    run_dir
        The run folder: TensorBoard writes ``run_dir/tensorboard``; MLflow's default
        store is ``file:run_dir/mlruns``.
    run_name
        Name of the MLflow run (the run folder's name, usually).
    config
        The resolved run config (dashed keys), logged as MLflow params and as a
        TensorBoard text summary.

    Raises
    ------
    MetricSinkError
        If a name is unknown or its package is missing (the message names the pip extra).
    """
    unknown = [n for n in names if n not in SINK_NAMES]
    if unknown:
        raise MetricSinkError(
            f"unknown metric sink(s) {unknown}; allowed: {', '.join(SINK_NAMES)}"
        )
    sinks: list[MetricSink] = []
    try:
        for name in dict.fromkeys(names):  # once each, in the given order
            if name == "tensorboard":
                sinks.append(TensorBoardSink(Path(run_dir), config))
            else:
                sinks.append(MLflowSink(Path(run_dir), run_name, config))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


class TensorBoardSink:
    """Scalars to TensorBoard event files in ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise MetricSinkError(
                f"log-to=tensorboard needs the tensorboard package: {_EXTRA_HINT} "
                f"(or pip install tensorboard); import failed: {error}"
            ) from error
        self.log_dir = run_dir / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(config.items()))
        self._writer.add_text("config", f"| key | value |\n| --- | --- |\n{table}", 0)

    def log_round(self, row: ResultsRow) -> None:
        step = row.round
        for name, value in flatten_metrics(row.to_json()).items():
            self._writer.add_scalar(name, value, global_step=step)
        self._writer.flush()  # a live `tensorboard --logdir` sees each round at once

    def close(self) -> None:
        self._writer.close()


class MLflowSink:
    """Metrics and params to an MLflow run (local file store under the run by default).

    MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; the sink sets
    that variable while it is open (only when it uses its own default store and the
    variable is unset) and restores the environment on ``close``.
    """

    def __init__(self, run_dir: Path, run_name: str, config: Mapping[str, Any]) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise MetricSinkError(
                f"log-to=mlflow needs the mlflow package: {_EXTRA_HINT} "
                f"(or pip install mlflow-skinny); import failed: {error}"
            ) from error
        self._restore_env: str | None = None
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not uri:
            uri = f"file:{(run_dir / 'mlruns').resolve()}"
            if "MLFLOW_ALLOW_FILE_STORE" not in os.environ:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
                self._restore_env = "MLFLOW_ALLOW_FILE_STORE"
        self.tracking_uri = uri
        self._client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedsft")
        found = self._client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self._client.create_experiment(experiment))
        self.run_id = self._resumed_run(experiment_id, run_dir) or self._client.create_run(
            experiment_id, run_name=run_name,
            tags={"fedsft.run_dir": str(run_dir.resolve())},
        ).info.run_id
        self._log_params(config)
        self._closed = False

    def _resumed_run(self, experiment_id: str, run_dir: Path) -> str | None:
        """The MLflow run of an earlier (interrupted) attempt of this run folder."""
        runs = self._client.search_runs(
            [experiment_id],
            filter_string=f"tags.`fedsft.run_dir` = '{run_dir.resolve()}'",
            max_results=1,
        )
        if not runs:
            return None
        self._client.update_run(runs[0].info.run_id, status="RUNNING")
        return str(runs[0].info.run_id)

    def _log_params(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        params = []
        for key, value in sorted(config.items()):
            text = value if isinstance(value, str) else json.dumps(value)
            text = text[:_MLFLOW_PARAM_CHARS]
            if key not in existing:  # MLflow params are write-once (resume keeps them)
                params.append(Param(key, text))
        for i in range(0, len(params), _MLFLOW_PARAMS_BATCH):
            self._client.log_batch(self.run_id, params=params[i:i + _MLFLOW_PARAMS_BATCH])

    def log_round(self, row: ResultsRow) -> None:
        from mlflow.entities import Metric

        step = row.round
        stamp = int(float(row.time or time.time()) * 1000)
        metrics = [Metric(name, value, stamp, step)
                   for name, value in flatten_metrics(row.to_json()).items()]
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_BATCH])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._client.set_terminated(self.run_id, status="FINISHED")
        finally:
            if self._restore_env is not None:
                os.environ.pop(self._restore_env, None)
