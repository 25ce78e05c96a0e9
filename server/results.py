"""The results row: one typed record per round, one writer and one reader of results.jsonl.

``results.jsonl`` holds one JSON object per round (round 0 = the initial model); the
README's Outputs section documents the fields. :class:`ResultsRow` is that object,
typed: ``to_json`` writes exactly the field names and nesting the file has always had,
``ResultsRow.from_json`` reads them back, and :func:`read_results` reads a whole file.
Every reader of a run (the server on resume, the harness, the reports, the benchmarks,
the metric sinks, the export's model card) goes through them.

The evaluation parts (``central``, ``validation``, ``retention``, ``federated``,
``train``) are
task-agnostic: a mapping of metric name -> number (classification writes accuracy,
f1_macro, loss, num_examples; another task writes its own names).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError

Metrics = Mapping[str, float]


class ResultsError(ConfigError):
    """A results line is not a results row (a field is missing or has the wrong type), or
    the file is damaged: a bad input for a resume or a report, refused like a bad config
    (``resume-from`` checks and ``resumable_round`` treat it as one)."""


@dataclass(frozen=True)
class Clients:
    """Who took part in the round and what went wrong (``clients``)."""

    sampled: int = 0
    replies: int = 0
    aggregated: int = 0
    failures: int = 0
    timeouts: int = 0
    invalid: int = 0
    skipped: bool = False
    problems: tuple[str, ...] = ()
    # Per-client federated evaluation of the task's headline metric (classification:
    # accuracy), sorted, and its min, p10 and median.
    eval_headline: tuple[float, ...] = ()
    eval_headline_spread: Metrics = field(default_factory=dict)
    # Site name -> the training examples it reported this round (aggregate counts only).
    examples: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Bytes:
    """Serialized array bytes of the round and of the run so far (``bytes``)."""

    up: int = 0
    down: int = 0
    up_total: int = 0
    down_total: int = 0


@dataclass(frozen=True)
class Seconds:
    """Where the round's wall time went (``seconds``)."""

    round: float = 0.0
    wait: float = 0.0
    client_train_max: float = 0.0
    client_train_mean: float = 0.0
    aggregate: float = 0.0
    central_eval: float = 0.0


@dataclass(frozen=True)
class Memory:
    """Peak resident memory in MiB (``memory_mb``); client 0 when none reported it."""

    server_peak: float = 0.0
    client_peak: float = 0.0


@dataclass(frozen=True)
class Privacy:
    """Client-level DP spent so far (``privacy``; only with client-level DP)."""

    epsilon: float
    delta: float
    noise_multiplier: float
    clipping_norm: float
    clipping: str
    side: str
    sampling_rate: float
    accountant: str


@dataclass(frozen=True)
class DpSgd:
    """Sample-level DP-SGD: the largest epsilon a client reported (``dp_sgd``)."""

    epsilon_max: float
    delta: float
    # Per site (client key): {"epsilon": ..., "noise_multiplier": ...} of its last reply.
    sites: Mapping[str, Mapping[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteData:
    """A site's aggregate data statistics, from its ``data-*`` reply metrics.

    Only counts and shares, as ``DataReport.aggregate_stats`` (classification) or the
    sft site report sends them; a field is None when the site's task does not send it.
    ``label_counts[i]`` counts class index ``i`` of the federation's labels.
    """

    rows: int  # rows (sft: conversations) kept after cleaning / encoding
    rows_read: int | None = None  # classification: rows in the file
    dropped: int | None = None  # rows read minus kept (sft: conversations dropped)
    label_counts: tuple[int, ...] = ()
    duplicate_share: float | None = None  # normalized duplicates / rows
    short_share: float | None = None
    truncated_share: float | None = None  # longer than max-length / rows
    truncated: int | None = None  # sft: conversations truncated
    median_tokens: float | None = None  # sft

    @property
    def imbalance_ratio(self) -> float | None:
        """Largest / smallest count of the classes present; None without counts."""
        present = [count for count in self.label_counts if count > 0]
        return max(present) / min(present) if present else None


@dataclass(frozen=True)
class SiteCompute:
    """What one site's local training cost in one round (its reply metrics).

    ``examples`` and ``tokens`` count what the loop processed (repeats included; tokens
    without padding); None when the loop did not count them (DP-SGD). The GPU fields
    are None off a GPU, and ``gpu_utilization`` also where NVML cannot be read.
    """

    train_seconds: float
    examples: int | None = None
    tokens: int | None = None
    peak_rss_mb: float | None = None  # the client process's peak resident memory
    gpu_peak_mb: float | None = None  # torch.cuda.max_memory_allocated in the round
    gpu_utilization: float | None = None  # percent, sampled at the end of training

    @property
    def examples_per_second(self) -> float | None:
        """Examples processed per second of training; None when not counted."""
        return _rate(self.examples, self.train_seconds)

    @property
    def tokens_per_second(self) -> float | None:
        """Non-padding tokens processed per second of training; None when not counted."""
        return _rate(self.tokens, self.train_seconds)


def _rate(count: int | None, seconds: float) -> float | None:
    return None if count is None or seconds <= 0 else count / seconds


@dataclass(frozen=True)
class ResultsRow:
    """One round of results.jsonl (see the module docstring)."""

    round: int
    central: Metrics | None = None  # server-side evaluation; None without eval data
    federated: Metrics = field(default_factory=dict)  # averaged client evaluation
    train: Metrics = field(default_factory=dict)  # averaged client training metrics
    clients: Clients = field(default_factory=Clients)
    bytes: Bytes = field(default_factory=Bytes)
    seconds: Seconds = field(default_factory=Seconds)
    memory_mb: Memory = field(default_factory=Memory)
    time: float = 0.0
    validation: Metrics | None = None  # the validation split; None when none is held out
    privacy: Privacy | None = None
    dp_sgd: DpSgd | None = None
    # The forgetting monitor (`retention-dataset`); None (and no key written) when off.
    retention: Metrics | None = None
    # Site -> its data statistics, in the first round it reported them (opt-in sites).
    site_data: Mapping[str, SiteData] = field(default_factory=dict)
    # Site -> what its training cost this round.
    site_compute: Mapping[str, SiteCompute] = field(default_factory=dict)

    def metrics(self, split: str) -> Metrics | None:
        """The evaluation part named ``split`` (central, validation, retention, federated,
        train)."""
        if split not in ("central", "validation", "retention", "federated", "train"):
            raise ValueError(f"no evaluation part {split!r} in a results row")
        value: Metrics | None = getattr(self, split)
        return value

    def to_json(self) -> dict[str, Any]:
        """The row as written to results.jsonl (``privacy``, ``dp_sgd``, ``retention``,
        ``site_data`` and ``site_compute`` only when set)."""
        out: dict[str, Any] = {
            "round": self.round,
            "central": None if self.central is None else dict(self.central),
            "federated": dict(self.federated),
            "train": dict(self.train),
            "clients": {**asdict(self.clients), "problems": list(self.clients.problems),
                        "eval_headline": list(self.clients.eval_headline),
                        "eval_headline_spread": dict(self.clients.eval_headline_spread),
                        "examples": dict(self.clients.examples)},
            "bytes": asdict(self.bytes),
            "seconds": asdict(self.seconds),
            "memory_mb": asdict(self.memory_mb),
            "time": self.time,
            "validation": None if self.validation is None else dict(self.validation),
        }
        if self.privacy is not None:
            out["privacy"] = asdict(self.privacy)
        if self.dp_sgd is not None:
            out["dp_sgd"] = asdict(self.dp_sgd)
        if self.retention is not None:
            out["retention"] = dict(self.retention)
        if self.site_data:
            out["site_data"] = {site: {**asdict(d), "label_counts": list(d.label_counts)}
                                for site, d in self.site_data.items()}
        if self.site_compute:
            out["site_compute"] = {site: asdict(c) for site, c in self.site_compute.items()}
        return out

    def to_line(self) -> str:
        """One results.jsonl line (with its newline)."""
        return json.dumps(self.to_json(), sort_keys=True, allow_nan=True) + "\n"

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ResultsRow:
        """A row from its JSON object; missing parts read as empty, optional ones as None.

        Raises
        ------
        ResultsError
            ``obj`` is not an object with an integer ``round``, or a part has fields of
            the wrong kind.
        """
        if not isinstance(obj, Mapping) or isinstance(obj.get("round"), bool) or not (
                isinstance(obj.get("round"), (int, float))):
            raise ResultsError(f"a results row needs a numeric 'round', got {obj!r:.200}")
        try:
            clients = dict(obj.get("clients") or {})
            clients["problems"] = tuple(clients.get("problems", ()))
            # Rows written before the spread was keyed on the headline metric name it
            # by accuracy, the headline of the only task there was.
            for old, new in (("eval_accuracy", "eval_headline"),
                             ("eval_accuracy_spread", "eval_headline_spread")):
                if old in clients:
                    clients.setdefault(new, clients.pop(old))
            clients["eval_headline"] = tuple(clients.get("eval_headline", ()))
            return cls(
                round=int(obj["round"]),
                central=_metrics_or_none(obj.get("central")),
                federated=dict(obj.get("federated") or {}),
                train=dict(obj.get("train") or {}),
                clients=_part(Clients, clients),
                bytes=_part(Bytes, obj.get("bytes") or {}),
                seconds=_part(Seconds, obj.get("seconds") or {}),
                memory_mb=_part(Memory, obj.get("memory_mb") or {}),
                time=float(obj.get("time", 0.0)),
                validation=_metrics_or_none(obj.get("validation")),
                privacy=None if obj.get("privacy") is None else _part(Privacy, obj["privacy"]),
                dp_sgd=None if obj.get("dp_sgd") is None else _part(DpSgd, obj["dp_sgd"]),
                retention=_metrics_or_none(obj.get("retention")),
                site_data={str(site): _part(SiteData, {
                    **d, "label_counts": tuple(int(n) for n in d.get("label_counts", ()))})
                    for site, d in _mapping(obj.get("site_data")).items()},
                site_compute={str(site): _part(SiteCompute, c)
                              for site, c in _mapping(obj.get("site_compute")).items()},
            )
        except (TypeError, ValueError) as exc:
            raise ResultsError(f"results row of round {obj.get('round')}: {exc}") from exc


def _metrics_or_none(value: object) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"an evaluation part must be an object, got {value!r:.80}")
    return dict(value)


def _mapping(value: object) -> Mapping[str, Any]:
    """A per-site part: an object of objects ({} when absent)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping)
                                                 for v in value.values()):
        raise TypeError(f"a per-site part must be an object of objects, got {value!r:.80}")
    return value


def _part(kind: type, value: Mapping[str, Any]) -> Any:
    """A part from its JSON object; unknown keys (a newer writer's) are left out."""
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in value.items() if k in names})


def read_results(path: Path) -> list[ResultsRow]:
    """The rows of a results.jsonl, in file order; [] when the file does not exist.

    A torn last line (a crash mid-write) is left out: lines are fsynced one by one, so
    only the last can be partial.

    Raises
    ------
    ResultsError
        A complete line is not a results row, or a line that is not JSON has rows after
        it (a damaged file, not a torn write: resuming would rewrite it without them).
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = [(n, line) for n, line in
             enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(lines) - 1:
                break  # the torn last line
            raise ResultsError(
                f"{path}: line {number} is not JSON ({error.msg}) and {len(lines) - 1 - position} "
                "line(s) follow it: the file is damaged, not torn by a crash; repair or "
                "remove that line"
            ) from error
        rows.append(ResultsRow.from_json(obj))
    return rows


def summarize_spread(values: list[float] | tuple[float, ...]) -> dict[str, float]:
    """Min, 10th percentile and median of a per-client metric (fairness under skew)."""
    if not values:
        return {}
    array = np.asarray(values, dtype=np.float64)
    return {
        "min": float(array.min()),
        "p10": float(np.percentile(array, 10)),
        "median": float(np.median(array)),
    }
