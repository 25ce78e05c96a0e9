"""Reports of finished runs: ``report.html`` per run and ``compare.html`` across runs.

Figures and tables follow the run's task (``config.json`` ``task``; runs from before
the task layer are classification): its metrics (``TASK_METRICS``) each get a final
value, the headline (the first) a best round, bounded ones share a 0-1 figure and the
forgetting monitor (``retention``) gets its change since round 0. A task with classes
also gets each class's recall (``recall_<k>``, ``recall_min`` the worst class) per round
and in the summary, named from ``label_map.json``.

A run report reads what a run folder holds (``results.jsonl``, ``config.json``,
``label_map.json`` and, for harness runs, ``simulation.json``), draws one PNG per
figure into ``<run>/report/`` and writes ``<run>/report.html`` with the same figures
embedded as base64 data URIs, so the HTML file opens offline on its own. The label
distribution per client is recomputed from the config with the app's own data code
(``load_splits`` + ``partition_dataset``); it needs the number of virtual clients,
which only ``simulation.json`` records (deployment runs get a note instead).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.tasks import DEFAULT_TASK, TASK_METRICS, MetricInfo, task_info
from server.results import ResultsError, ResultsRow, SiteData, read_results
from simulations import plots

SIMULATION_FILE = "simulation.json"
REPORT_FILE = "report.html"
REPORT_DIR = "report"
COMPARE_FILE = "compare.html"
MAX_CLIENTS_SHOWN = 50  # label-distribution bars beyond this are unreadable
_NAN = float("nan")


class ReportError(ValueError):
    """A folder is not a run folder (no results.jsonl / config.json) or has no rows."""


@dataclass(frozen=True)
class RunData:
    """What a report reads from one run folder."""

    run_dir: Path
    name: str
    rows: list[ResultsRow]
    config: dict[str, Any]
    simulation: dict[str, Any] | None
    label_names: list[str]

    @property
    def task(self) -> str:
        """The run's task (``config.json`` ``task``; older runs: the default task)."""
        return str(self.config.get("task") or DEFAULT_TASK)

    @property
    def metrics(self) -> tuple[MetricInfo, ...]:
        """The task's metrics, headline first."""
        return TASK_METRICS[self.task]

    @property
    def has_classes(self) -> bool:
        """Whether the run's task has classes (class-distribution figures)."""
        return task_info(self.task).has_classes


def load_run(run_dir: Path | str) -> RunData:
    """Read a run folder.

    Raises
    ------
    ReportError
        If ``results.jsonl`` or ``config.json`` is missing, there is no results row, or
        ``config.json`` names a task this version does not know.
    """
    run_dir = Path(run_dir).resolve()
    results, config = run_dir / "results.jsonl", run_dir / "config.json"
    for path in (results, config):
        if not path.is_file():
            raise ReportError(f"{run_dir} is not a fedsft run folder: {path.name} is missing")
    try:
        rows = read_results(results)
    except ResultsError as exc:
        raise ReportError(f"{results}: {exc}") from exc
    if not rows:
        raise ReportError(f"{results} has no results rows yet")
    simulation = None
    if (run_dir / SIMULATION_FILE).is_file():
        simulation = json.loads((run_dir / SIMULATION_FILE).read_text(encoding="utf-8"))
    label_names: list[str] = []
    if (run_dir / "label_map.json").is_file():
        label_map = json.loads((run_dir / "label_map.json").read_text(encoding="utf-8"))
        label_names = [str(label_map[k]) for k in sorted(label_map, key=int)]
    run = RunData(
        run_dir=run_dir, name=run_dir.name, rows=rows,
        config=json.loads(config.read_text(encoding="utf-8")),
        simulation=simulation, label_names=label_names,
    )
    if run.task not in TASK_METRICS:
        raise ReportError(f"{config}: unknown task {run.task!r}; known: "
                          f"{', '.join(TASK_METRICS)}")
    return run


def write_simulation_file(
    run_dir: Path, *, scenario: str, num_supernodes: int, num_cpus: float, num_gpus: float,
    overrides: dict[str, Any] | None = None, scenario_file: str = "",
) -> Path:
    """Record how a run was simulated (``simulation.json``): reports need the client count."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / SIMULATION_FILE
    path.write_text(json.dumps({
        "scenario": scenario,
        "scenario-file": scenario_file,
        "num-supernodes": num_supernodes,
        "resources": {"num-cpus": num_cpus, "num-gpus": num_gpus},
        "overrides": overrides or {},
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


# --- numbers from the rows ----------------------------------------------------------------


def _num(value: object) -> float:
    """A reported number as a float, NaN when absent, null or not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _NAN
    return float(value)


def _metric(row: ResultsRow, split: str, name: str) -> float:
    """Metric ``name`` of the row's evaluation part ``split``, NaN when absent."""
    block = row.metrics(split)
    return _NAN if block is None else _num(block.get(name))


def _metrics(rows: Sequence[ResultsRow], split: str, name: str) -> list[float]:
    return [_metric(row, split, name) for row in rows]


def _series(rows: Sequence[ResultsRow], pick: Callable[[ResultsRow], object]) -> list[float]:
    return [_num(pick(row)) for row in rows]


def _nanlast(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return finite[-1] if finite else _NAN


_RECALL_KEY = re.compile(r"recall_(\d+)")
RECALL_PREFIX = "final recall "  # summary keys of the classes' recall: ``final recall <name>``
WORST_RECALL = "final worst-class recall"


def class_recalls(rows: Sequence[ResultsRow], split: str = "central") -> dict[int, list[float]]:
    """Each class's recall per row (``recall_<k>`` of evaluation part ``split``), by class
    index; NaN in a row that did not measure it (no eval example of the class there).
    Empty for rows without per-class recall (sft, runs from before it was recorded)."""
    classes = sorted({int(match.group(1)) for row in rows for key in (row.metrics(split) or {})
                      if (match := _RECALL_KEY.fullmatch(key))})
    return {k: _metrics(rows, split, f"recall_{k}") for k in classes}


def class_name(label_names: Sequence[str], index: int) -> str:
    """Class ``index``'s name from the run's label map, ``class <index>`` past it."""
    return label_names[index] if index < len(label_names) else f"class {index}"


def time_split(row: ResultsRow) -> dict[str, float]:
    """One round's wall time split into parts that add up to ``seconds.round``.

    Client compute is the slowest client's training (``client_train_max``); the rest of
    the wait for replies is communication, serialization and queueing; ``other`` is what
    the round spent outside those (federated evaluation, sampling, checkpointing).
    """
    s = row.seconds
    train = float(s.client_train_max or 0.0)
    comm = max(float(s.wait or 0.0) - train, 0.0)
    aggregate = float(s.aggregate or 0.0)
    central = float(s.central_eval or 0.0)
    other = max(float(s.round or 0.0) - train - comm - aggregate - central, 0.0)
    return {"client compute (slowest client)": train,
            "communication + serialization + waiting": comm,
            "aggregation": aggregate, "central evaluation": central,
            "other (federated eval, sampling, checkpoint)": other}


def retention_change(rows: Sequence[ResultsRow], name: str) -> float:
    """The change of retention metric ``name`` from round 0 to the last round that
    measured it (forgetting: a loss that rose); NaN without a round-0 value."""
    values = {r.round: _metric(r, "retention", name) for r in rows}
    last = _nanlast([values[r] for r in sorted(values)])
    return last - values.get(0, _NAN)


def summarize(run: RunData) -> dict[str, Any]:
    """Final metrics and totals of a run (the report's summary table).

    Every metric of the task gets ``final <label>`` (its last measured value), the
    headline metric ``best <label>`` and ``best round`` (in its direction), the clients'
    ``final federated <label>``; with a retention set, ``retention <label> since round 0``
    is each retention metric's change. A task with classes whose rows hold per-class
    recall adds ``final recall <class name>`` per class and ``final worst-class recall``
    (``recall_min``), each its last measured central value.
    """
    rows = run.rows
    trained = [r for r in rows if r.round > 0]
    headline = run.metrics[0]
    values = _metrics(rows, "central", headline.name)
    finite = [(v if headline.higher_is_better else -v, r.round, v)
              for v, r in zip(values, rows, strict=True) if math.isfinite(v)]
    best = (max(finite)[2], max(finite)[1]) if finite else (_NAN, None)
    last = rows[-1]
    clients = [r.clients for r in trained]
    summary: dict[str, Any] = {"rounds": last.round}
    for info in run.metrics:
        summary[f"final {info.label}"] = _nanlast(_metrics(rows, "central", info.name))
    summary[f"best {headline.label}"] = best[0]
    summary["best round"] = best[1]
    summary[f"final federated {headline.label}"] = _nanlast(
        _metrics(rows, "federated", f"eval_{headline.name}"))
    # The clients' spread is of the headline metric (server/tracked_strategy.py).
    summary[f"final worst-client {headline.label}"] = _nanlast(
        _series(rows, lambda r: r.clients.eval_headline_spread.get("min")))
    recalls = class_recalls(rows) if run.has_classes else {}
    for k, values in recalls.items():
        summary[RECALL_PREFIX + class_name(run.label_names, k)] = _nanlast(values)
    if recalls:
        summary[WORST_RECALL] = _nanlast(_metrics(rows, "central", "recall_min"))
    if any(r.retention for r in rows):
        for info in run.metrics:
            summary[f"retention {info.label} since round 0"] = retention_change(
                rows, info.name)
    summary.update({
        "bytes up": _num(last.bytes.up_total),
        "bytes down": _num(last.bytes.down_total),
        "mean round seconds": float(np.mean(_series(trained, lambda r: r.seconds.round)))
        if trained else _NAN,
        "failures": sum(c.failures for c in clients),
        "timeouts": sum(c.timeouts for c in clients),
        "invalid": sum(c.invalid for c in clients),
        "skipped rounds": sum(1 for c in clients if c.skipped),
        "server peak MiB": float(np.nanmax(
            _series(rows, lambda r: r.memory_mb.server_peak) + [0.0])),
        "client peak MiB": float(np.nanmax(
            _series(rows, lambda r: r.memory_mb.client_peak) + [0.0])),
    })
    return summary


# --- label distribution -------------------------------------------------------------------


def label_distribution(
    config: dict[str, Any], *, num_partitions: int, max_clients: int = MAX_CLIENTS_SHOWN,
) -> tuple[np.ndarray, list[str], list[int]]:
    """Class counts of each client's training partition, recomputed from the config.

    Uses the app's own ``load_splits`` and ``partition_dataset`` with the run's seed, so
    the partitions are the ones the clients trained on (before each client's local eval
    hold-out). Only the first ``max_clients`` clients are computed.

    Returns
    -------
    tuple
        ``(counts, label_names, client_ids)``: ``counts[i, k]`` is the number of rows of
        class ``k`` in client ``client_ids[i]``'s partition.
    """
    from common.config import RunConfig, key_types
    from common.data import load_splits, partition_dataset
    from common.specs import DataSpec, PartitionSpec

    known = key_types()
    cfg = RunConfig.from_flower({k: v for k, v in config.items() if k in known})
    splits = load_splits(DataSpec.of(cfg))
    client_ids = list(range(min(num_partitions, max_clients)))
    counts = np.zeros((len(client_ids), len(splits.label_names)), dtype=np.int64)
    for i in client_ids:
        part = partition_dataset(splits.train, PartitionSpec.of(cfg), source=cfg.dataset,
                                 num_partitions=num_partitions, partition_id=i)
        counts[i] = np.bincount(np.asarray(part["label"], dtype=np.int64),
                                minlength=len(splits.label_names))
    return counts, list(splits.label_names), client_ids


# --- per-site tables ------------------------------------------------------------------------
NOT_SHARED = "not shared"
NO_GPU = "no GPU"


def _sites(rows: Sequence[ResultsRow]) -> list[str]:
    """Every site the rows name (examples, data statistics or compute), sorted."""
    return sorted({site for r in rows
                   for site in (*r.clients.examples, *r.site_data, *r.site_compute)})


def first_site_data(rows: Sequence[ResultsRow]) -> dict[str, SiteData]:
    """Each site's data statistics from the first row that has them."""
    found: dict[str, SiteData] = {}
    for row in rows:
        for site, data in row.site_data.items():
            found.setdefault(site, data)
    return found


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _int(value: int | None) -> str:
    return "-" if value is None else str(value)


def site_data_table(
    rows: Sequence[ResultsRow], label_names: Sequence[str],
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-site data table: what each site's data check sent,
    ``not shared`` for a site that did not allow it. Columns no site sent are left out;
    a class column per label (``class i`` past ``label_names``)."""
    data = first_site_data(rows)
    classes = max((len(d.label_counts) for d in data.values()), default=0)
    names = [label_names[i] if i < len(label_names) else f"class {i}" for i in range(classes)]
    columns: list[tuple[str, Callable[[SiteData], str]]] = [
        ("rows read", lambda d: _int(d.rows_read)), ("rows kept", lambda d: str(d.rows)),
        ("dropped", lambda d: _int(d.dropped)),
        *[(f"label {name}", lambda d, i=i: _int(d.label_counts[i])
           if i < len(d.label_counts) else "-") for i, name in enumerate(names)],
        ("imbalance ratio", lambda d: "-" if d.imbalance_ratio is None
         else f"{d.imbalance_ratio:.3g}:1"),
        ("duplicates", lambda d: _share(d.duplicate_share)),
        ("short texts", lambda d: _share(d.short_share)),
        ("over max-length", lambda d: _share(d.truncated_share)),
        ("truncated", lambda d: _int(d.truncated)),
        ("median tokens", lambda d: "-" if d.median_tokens is None else f"{d.median_tokens:g}"),
    ]
    kept = [(title, cell) for title, cell in columns
            if any(cell(d) != "-" for d in data.values())]
    table = [[site, *([cell(data[site]) for _, cell in kept] if site in data
                      else [NOT_SHARED] * len(kept))] for site in _sites(rows)]
    return ["site", *(title for title, _ in kept)], table


def site_compute_table(rows: Sequence[ResultsRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-site compute table over the run: rounds trained, mean
    training seconds per round, examples and tokens per second (totals over total
    seconds), the largest peak RSS and GPU memory, the mean GPU utilization. A site
    that measured no GPU shows ``no GPU``; a number it did not send, ``-``."""
    header = ["site", "rounds", "train s / round", "examples / s", "tokens / s",
              "peak RSS MiB", "peak GPU MiB", "GPU util %"]
    table = []
    for site in _sites(rows):
        costs = [r.site_compute[site] for r in rows if site in r.site_compute]
        if not costs:
            table.append([site, "0", *["-"] * (len(header) - 2)])
            continue
        seconds = sum(c.train_seconds for c in costs)

        def rate(counts: list[int | None], total: float = seconds) -> str:
            if any(n is None for n in counts) or total <= 0:
                return "-"
            return f"{sum(n for n in counts if n is not None) / total:.4g}"

        rss = [c.peak_rss_mb for c in costs if c.peak_rss_mb is not None]
        gpu = [c.gpu_peak_mb for c in costs if c.gpu_peak_mb is not None]
        util = [c.gpu_utilization for c in costs if c.gpu_utilization is not None]
        table.append([
            site, str(len(costs)), f"{seconds / len(costs):.3g}",
            rate([c.examples for c in costs]), rate([c.tokens for c in costs]),
            f"{max(rss):.0f}" if rss else "-",
            f"{max(gpu):.0f}" if gpu else NO_GPU,
            f"{np.mean(util):.0f}" if util else (NO_GPU if not gpu else "-"),
        ])
    return header, table


def _site_figures(run: RunData, out: Path) -> list[tuple[str, Path]]:
    """The label distribution the sites reported and the training time per site."""
    rows, figs = run.rows, []
    data = first_site_data(rows)
    counted = {site: d for site, d in data.items() if d.label_counts}
    if counted:
        sites = sorted(counted)[:MAX_CLIENTS_SHOWN]
        classes = max(len(counted[s].label_counts) for s in sites)
        counts = np.zeros((len(sites), classes), dtype=np.int64)
        for i, site in enumerate(sites):
            counts[i, :len(counted[site].label_counts)] = counted[site].label_counts
        names = [run.label_names[k] if k < len(run.label_names) else f"class {k}"
                 for k in range(classes)]
        shown = "" if len(sites) == len(counted) else f" (first {len(sites)} sites)"
        figs.append((f"Training rows per class, as each site's data check reported them "
                     f"(sites that share their statistics){shown}",
                     plots.plot_label_distribution(
                         out / "site_labels.png", counts=counts, label_names=names,
                         client_ids=sites, xlabel="site",
                         title=f"Label distribution per site (reported){shown} - {run.name}")))
    trained = [r for r in rows if r.site_compute]
    if trained:
        sites = sorted({s for r in trained for s in r.site_compute})[:MAX_CLIENTS_SHOWN]
        figs.append(("Local training time per round and site (the sites' own clocks)",
                     plots.plot_site_times(
                         out / "site_train_time.png", rounds=[r.round for r in trained],
                         seconds={site: [r.site_compute[site].train_seconds
                                         if site in r.site_compute else _NAN
                                         for r in trained] for site in sites},
                         title=f"Training time per round and site - {run.name}")))
    return figs


# --- single-run report --------------------------------------------------------------------


def _figures(run: RunData, out: Path, *, num_supernodes: int | None) -> tuple[
        list[tuple[str, Path]], list[str]]:
    """Draw the run's figures; returns ``[(caption, png)]`` and notes for the report."""
    rows, name = run.rows, run.name
    rounds = [r.round for r in rows]
    notes: list[str] = []
    figs: list[tuple[str, Path]] = []
    figs += _metric_figures(run, out)
    figs += _recall_figures(run, out)
    if any(r.retention for r in rows):
        figs.append(("Forgetting monitor: the retention set's metrics per round, against "
                     "round 0 (the model before fine-tuning)", plots.plot_retention(
                         out / "retention.png", rounds=rounds,
                         metrics={info.label: _metrics(rows, "retention", info.name)
                                  for info in run.metrics
                                  if any(info.name in (r.retention or {}) for r in rows)},
                         title=f"Retention set per round - {name}")))

    head = run.metrics[0]  # the clients' spread is of the headline metric
    spread_rows = [r for r in rows if r.clients.eval_headline_spread]
    if spread_rows:
        figs.append((
            f"Fairness: spread of the sampled clients' {head.label} on their own local eval "
            "split",
            plots.plot_client_spread(
                out / "client_spread.png", rounds=[r.round for r in spread_rows],
                minimum=_series(spread_rows, lambda r: r.clients.eval_headline_spread.get("min")),
                p10=_series(spread_rows, lambda r: r.clients.eval_headline_spread.get("p10")),
                median=_series(spread_rows, lambda r: r.clients.eval_headline_spread.get("median")),
                central=_metrics(spread_rows, "central", head.name),
                title=f"Per-client {head.label} spread - {name}", metric=head.label,
                bounded=head.bounded)))
    else:
        notes.append(f"No per-client {head.label} spread: no round had federated "
                     "evaluation (`fraction-evaluate` = 0?).")

    nodes = num_supernodes or (run.simulation or {}).get("num-supernodes")
    # `labels` first: a deployment's sites hold the data, whatever the client count (the
    # Sites section shows what they reported).
    if run.config.get("labels"):
        notes.append("Label distribution per client skipped: the server had no training "
                     "data (`labels` set: the sites hold it).")
    elif not nodes:
        notes.append("Label distribution per client skipped: this run has no "
                     f"{SIMULATION_FILE} (not started by the simulation harness), so the "
                     "number of clients is unknown. "
                     "`python -m simulations report RUN --num-supernodes N` recomputes it.")
    elif not run.has_classes:
        notes.append(f"Label distribution per client skipped: task {run.task} has no "
                     "classes.")
    else:
        try:
            counts, label_names, ids = label_distribution(run.config, num_partitions=nodes)
        except Exception as error:  # data missing or unreadable now: report, go on
            notes.append(f"Label distribution per client could not be recomputed: {error}")
        else:
            shown = "" if len(ids) == nodes else f" (first {len(ids)} of {nodes} clients)"
            part = run.config.get("partitioner", "?")
            if part == "dirichlet":
                part += f", alpha={run.config.get('dirichlet-alpha')}"
            figs.append((f"Training examples per class and client: the partition ({part})"
                         f"{shown}", plots.plot_label_distribution(
                out / "label_distribution.png", counts=counts,
                label_names=run.label_names or label_names, client_ids=ids,
                title=f"Label distribution per client{shown}, partitioner {part}")))
            figs.append(("Class shares per client: the label skew, whatever the client's size",
                         plots.plot_label_distribution(
                out / "label_share.png", counts=counts,
                label_names=run.label_names or label_names, client_ids=ids, share=True,
                title=f"Class shares per client{shown}, partitioner {part}")))

    figs += _site_figures(run, out)
    figs.append(("Communication: cumulative serialized bytes", plots.plot_bytes(
        out / "bytes.png", rounds=rounds, up_total=_series(rows, lambda r: r.bytes.up_total),
        down_total=_series(rows, lambda r: r.bytes.down_total),
        title=f"Cumulative bytes up / down - {name}")))
    trained = [r for r in rows if r.round > 0] or rows
    splits = [time_split(r) for r in trained]
    figs.append(("Round time split: the stacked parts add up to the round's wall time",
                 plots.plot_round_time(
                     out / "round_time.png", rounds=[r.round for r in trained],
                     parts={k: [s[k] for s in splits] for k in splits[0]},
                     title=f"Where each round's time went - {name}")))
    client_mem = [v if v > 0 else _NAN for v in _series(rows, lambda r: r.memory_mb.client_peak)]
    figs.append(("Peak memory (resident set size) of the server and client processes",
                 plots.plot_memory(
                     out / "memory.png", rounds=rounds,
                     server=_series(rows, lambda r: r.memory_mb.server_peak), client=client_mem,
                     title=f"Peak memory per round - {name}")))
    return figs, notes


def _metric_figures(run: RunData, out: Path) -> list[tuple[str, Path]]:
    """The task's metric figures: its bounded metrics together on a 0-1 axis (named after
    the headline: accuracy.png), the losses, each other unbounded metric on its own."""
    rows, name = run.rows, run.name
    rounds = [r.round for r in rows]
    figs: list[tuple[str, Path]] = []
    bounded = [m for m in run.metrics if m.bounded]
    if bounded:
        head = bounded[0]
        central = {f"central {m.label}": _metrics(rows, "central", m.name) for m in bounded}
        some = any(math.isfinite(v) for values in central.values() for v in values)
        central_title = "" if some else " (no central evaluation data)"
        partial = any(not math.isfinite(v) for values in central.values() for v in values)
        labels = " and ".join(m.label for m in bounded)
        figs.append((f"Central evaluation: {labels} on the server's held-out data"
                     + (" (in the rounds that measured them)" if some and partial else ""),
                     plots.plot_scores(
                         out / f"{head.name}.png", rounds=rounds, central=central,
                         federated={
                             f"federated {head.label} (clients' local eval, weighted)":
                             _metrics(rows, "federated", f"eval_{head.name}")},
                         title=f"{_capital(head.label)} per round{central_title} - {name}")))
    figs.append(("Loss per round", plots.plot_loss(
        out / "loss.png", rounds=rounds, central=_metrics(rows, "central", "loss"),
        federated=_metrics(rows, "federated", "eval_loss"),
        train=_metrics(rows, "train", "train_loss"), title=f"Loss per round - {name}")))
    for m in run.metrics:
        if not m.bounded and m.name != "loss":
            figs.append((f"Central {m.label} per round", plots.plot_metric(
                out / f"{m.name}.png", rounds=rounds,
                central=_metrics(rows, "central", m.name),
                federated=_metrics(rows, "federated", f"eval_{m.name}"), label=m.label,
                title=f"{_capital(m.label)} per round - {name}")))
    return figs


def _recall_figures(run: RunData, out: Path) -> list[tuple[str, Path]]:
    """Each class's central recall per round and the worst class's (``recall_min``);
    nothing for a task without classes or rows without per-class recall."""
    recalls = class_recalls(run.rows) if run.has_classes else {}
    if not recalls:
        return []
    return [("Per-class recall on the server's held-out data (the dashed line: the worst "
             "class, recall_min): what class weighting or focal loss should lift",
             plots.plot_class_recall(
                 out / "class_recall.png", rounds=[r.round for r in run.rows],
                 recalls={class_name(run.label_names, k): values
                          for k, values in recalls.items()},
                 worst=_metrics(run.rows, "central", "recall_min"),
                 title=f"Recall per class and round - {run.name}"))]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_report(run_dir: Path | str, *, num_supernodes: int | None = None) -> Path:
    """Write ``<run>/report.html`` and its PNGs in ``<run>/report/``; returns the HTML path.

    ``num_supernodes`` overrides the client count of ``simulation.json`` (needed for the
    label distribution of runs the harness did not start).
    """
    run = load_run(run_dir)
    out = run.run_dir / REPORT_DIR
    figs, notes = _figures(run, out, num_supernodes=num_supernodes)
    summary = summarize(run)
    body = [f"<h1>fedsft run report: {_esc(run.name)}</h1>",
            f"<p class='meta'>{_esc(str(run.run_dir))} &middot; written "
            f"{_esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>"]
    if run.simulation:
        sim = run.simulation
        res = sim.get("resources", {})
        body.append(f"<p>Scenario <b>{_esc(str(sim.get('scenario', '')))}</b>: "
                    f"{_esc(str(sim.get('num-supernodes')))} virtual clients, "
                    f"{_esc(str(res.get('num-cpus')))} CPU / {_esc(str(res.get('num-gpus')))} "
                    "GPU per client.</p>")
    body.append("<h2>Summary</h2>")
    body.append(_table(["metric", "value"], [[k, _fmt_summary(k, v)]
                                             for k, v in summary.items()]))
    for note in notes:
        body.append(f"<p class='note'>{_esc(note)}</p>")
    if _sites(run.rows):
        body.append("<h2>Sites</h2>")
        body.append("<p>Data: what each site's data check sent (counts and shares; "
                    f"&ldquo;{NOT_SHARED}&rdquo;: the site did not allow it).</p>")
        body.append(_table(*site_data_table(run.rows, run.label_names)))
        body.append("<p>Compute: each site's local training over the run, as it measured "
                    "it (tokens without padding).</p>")
        body.append(_table(*site_compute_table(run.rows)))
    body.append("<h2>Figures</h2>")
    for caption, png in figs:
        body.append(_figure_html(caption, png))
    body.append("<h2>Resolved config</h2>")
    body.append(_table(["key", "value"], [[k, _fmt(v)] for k, v in sorted(run.config.items())]))
    if run.simulation:
        body.append("<h2>Simulation</h2>")
        body.append(f"<pre>{_esc(json.dumps(run.simulation, indent=2, sort_keys=True))}</pre>")
    path = run.run_dir / REPORT_FILE
    path.write_text(_page(f"fedsft report - {run.name}", body), encoding="utf-8")
    return path


# --- comparison -----------------------------------------------------------------------


def _cumulative_bytes(run: RunData) -> list[float]:
    return [a + b for a, b in zip(_series(run.rows, lambda r: r.bytes.up_total),
                                  _series(run.rows, lambda r: r.bytes.down_total), strict=True)]


def seed_group(name: str) -> str:
    """A run name without its ``-seed=<n>`` suffix (runs differing only in seed)."""
    return re.sub(r"-seed=\d+$", "", name)


def write_comparison(
    run_dirs: Sequence[Path | str], output_dir: Path | str, *, title: str = "",
) -> Path:
    """Overlay runs on shared axes: ``<output>/compare.html`` + ``<output>/compare/*.png``.

    Runs are named by their folder name in legends and tables. Runs whose names differ
    only in a ``-seed=<n>`` suffix are also summarised as mean and standard deviation.

    Raises
    ------
    ReportError
        If a folder is not a run folder or two runs have the same folder name.
    """
    runs = [load_run(d) for d in run_dirs]
    if not runs:
        raise ReportError("nothing to compare: no run folders given")
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ReportError(f"runs to compare must have distinct folder names, got {names}")
    output_dir = Path(output_dir).resolve()
    out = output_dir / "compare"
    title = title or f"comparison of {len(runs)} runs"

    def rounds(run: RunData, rows: Sequence[ResultsRow] | None = None) -> list[int]:
        return [r.round for r in (run.rows if rows is None else rows)]

    tasks = sorted({r.task for r in runs})
    if len(tasks) > 1:
        raise ReportError(f"runs to compare must be of one task, got {', '.join(tasks)}: "
                          "their metrics differ")
    metrics = runs[0].metrics
    head = metrics[0]
    max_bytes = max((max(_cumulative_bytes(r) + [1.0]) for r in runs), default=1.0)
    scale, unit = plots.byte_unit(max_bytes)
    figs = []
    for m in metrics:
        ylabel = ("central cross-entropy loss" if m.name == "loss"
                  else f"central {m.label} (0-1)" if m.bounded else f"central {m.label}")
        figs.append((f"Central {m.label} per round", plots.plot_overlay(
            out / f"{m.name}.png",
            series={r.name: (rounds(r), _metrics(r.rows, "central", m.name)) for r in runs},
            xlabel="round", ylabel=ylabel, ylim=(0, 1.02) if m.bounded else None,
            title=f"Central {m.label} per round")))
    figs += [
        ("Cumulative bytes (up + down) per round", plots.plot_overlay(
            out / "bytes.png", series={r.name: (rounds(r),
                                                [b / scale for b in _cumulative_bytes(r)])
                                       for r in runs},
            xlabel="round", ylabel=f"cumulative {unit} (up + down)",
            title="Communication: cumulative bytes up + down")),
        (f"{_capital(head.label)} against communication: which run reaches an "
         f"{head.label} with fewer bytes",
         plots.plot_overlay(
             out / f"{head.name}_vs_bytes.png",
             series={r.name: ([b / scale for b in _cumulative_bytes(r)],
                              _metrics(r.rows, "central", head.name)) for r in runs},
             xlabel=f"cumulative {unit} (up + down)",
             ylabel=f"central {head.label}" + (" (0-1)" if head.bounded else ""),
             ylim=(0, 1.02) if head.bounded else None, rounds_axis=False,
             title=f"Central {head.label} vs bytes exchanged")),
    ]
    if any(row.retention for r in runs for row in r.rows):
        figs.append(("Forgetting monitor: retention loss per round", plots.plot_overlay(
            out / "retention_loss.png",
            series={r.name: (rounds(r), _metrics(r.rows, "retention", "loss")) for r in runs},
            xlabel="round", ylabel="retention-set loss",
            title="Retention-set loss per round (higher: more forgetting)")))
    figs.append(("Round wall time", plots.plot_overlay(
        out / "round_time.png",
        series={r.name: (rounds(r, [x for x in r.rows if x.round > 0]),
                         _series([x for x in r.rows if x.round > 0], lambda r: r.seconds.round))
                for r in runs},
        xlabel="round", ylabel="seconds", title="Round wall time")))
    summaries = {r.name: summarize(r) for r in runs}
    finals = [f"final {m.label}" for m in metrics]
    columns = ["rounds", *finals, f"best {head.label}"]
    columns.append(f"final worst-client {head.label}")
    # Per-class recall (classification runs that recorded it), in class order, then the
    # worst class; a run without it shows "-".
    columns += list(dict.fromkeys(k for summary in summaries.values() for k in summary
                                  if k.startswith(RECALL_PREFIX) or k == WORST_RECALL))
    columns += sorted({k for summary in summaries.values() for k in summary
                       if k.startswith("retention ")})
    columns += ["bytes up", "bytes down", "mean round seconds", "failures"]
    body = [f"<h1>fedsft: {_esc(title)}</h1>",
            f"<p class='meta'>written {_esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</p>",
            "<h2>Final metrics</h2>",
            _table(["run", *columns],
                   [[_run_link(r, output_dir), *[_fmt_summary(c, summaries[r.name].get(c))
                                                 for c in columns]] for r in runs],
                   raw_first=True)]
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(seed_group(name), []).append(name)
    if any(len(members) > 1 for members in groups.values()):
        stat_cols = [*finals, "mean round seconds"]
        table_rows = []
        for group, members in groups.items():
            cells = [_esc(group), str(len(members))]
            for col in stat_cols:
                values = np.array([summaries[m][col] for m in members], dtype=float)
                cells.append(f"{np.nanmean(values):.4f} &plusmn; {np.nanstd(values):.4f}"
                             if np.isfinite(values).any() else "-")
            table_rows.append(cells)
        body += ["<h2>Mean &plusmn; standard deviation over seeds</h2>",
                 _table(["runs (seed removed)", "seeds", *stat_cols], table_rows,
                        raw_cells=True)]
    body.append("<h2>Figures</h2>")
    for caption, png in figs:
        body.append(_figure_html(caption, png))
    path = output_dir / COMPARE_FILE
    path.write_text(_page(f"fedsft - {title}", body), encoding="utf-8")
    return path


# --- HTML ------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0; } figcaption { color: #444; font-size: 0.95em; }
img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #666; font-size: 0.9em; } .note { color: #8a5a00; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def _figure_html(caption: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f"<figure><img alt='{_esc(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_esc(caption)} <span class='meta'>({_esc(png.name)})</span>"
            "</figcaption></figure>")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.4e}"
    return str(value)


def _metric_labels() -> tuple[str, ...]:
    """Summary keys ending in a metric's label are metrics: shown with 4 decimals."""
    return tuple({m.label for metrics in TASK_METRICS.values() for m in metrics}
                 | {"accuracy", "F1", "loss", "recall"})


def _fmt_summary(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key.startswith("bytes") and isinstance(value, (int, float)) and math.isfinite(value):
        scale, unit = plots.byte_unit(value)
        return f"{value / scale:.2f} {unit}"
    if isinstance(value, float) and math.isfinite(value) and key.startswith("retention "):
        return f"{value:+.4f}"  # a change: the sign is the news
    if isinstance(value, float) and math.isfinite(value) and (
            key.endswith(_metric_labels()) or key.startswith(RECALL_PREFIX)):
        return f"{value:.4f}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.1f}"
    return _fmt(value)


def _run_link(run: RunData, output_dir: Path) -> str:
    """The run's name, linked to its report when one exists (relative path)."""
    report = run.run_dir / REPORT_FILE
    if not report.is_file():
        return _esc(run.name)
    href = Path(os.path.relpath(report, output_dir)).as_posix()
    return f"<a href='{_esc(href)}'>{_esc(run.name)}</a>"


def _table(header: list[str], rows: list[list[str]], *, raw_first: bool = False,
           raw_cells: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw_*`` says they are HTML already."""
    out = ["<table><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            raw = raw_cells or (raw_first and i == 0)
            text = cell if raw else _esc(cell)
            numeric = bool(re.fullmatch(r"[-+0-9.e ]+[a-zA-Z]{0,3}", cell)) and i > 0
            cells.append(f"<td class='num'>{text}</td>" if numeric else f"<td>{text}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join([*out, "</table>"])
