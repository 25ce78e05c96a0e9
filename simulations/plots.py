"""The figures of run and comparison reports: one PNG per function.

Each function takes plain data and a path, draws one figure and saves it. Figures are
built with matplotlib's object API on an Agg canvas (``Figure`` + ``FigureCanvasAgg``):
no pyplot, so no global backend or figure registry is touched and nothing needs a
display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_SIZE = (8.0, 4.5)  # inches; 880 x 495 pixels at _DPI
_DPI = 110
_NAN = float("nan")


def _figure(size: tuple[float, float] = _SIZE) -> Any:
    """A new figure on an Agg canvas (the Agg backend, set per figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _round_axis(ax: Any, rounds: Sequence[int] = ()) -> None:
    """Label the x axis as rounds, with integer ticks (every round when there are few)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ticks = sorted(set(rounds))
    if 0 < len(ticks) <= 25:
        ax.set_xticks(ticks)
        ax.set_xlim(ticks[0] - 0.5, ticks[-1] + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def byte_unit(max_bytes: float) -> tuple[float, str]:
    """Divisor and unit that keep ``max_bytes`` readable (kB, MB or GB)."""
    for scale, unit in ((1e9, "GB"), (1e6, "MB")):
        if max_bytes >= scale:
            return scale, unit
    return 1e3, "kB"


def _has_values(values: Sequence[float]) -> bool:
    return any(np.isfinite(v) for v in values)


def _empty_note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


# --- single run -------------------------------------------------------------------------


def _measured(x: Sequence[float], y: Sequence[float]) -> tuple[list[float], list[float]]:
    """The points of a series whose value is finite: a metric measured only in some rounds
    (sft's exact match) is drawn as one line through those rounds, not as lone dots."""
    points = [(a, b) for a, b in zip(x, y, strict=True) if np.isfinite(b)]
    return [a for a, _ in points], [b for _, b in points]


def plot_scores(
    path: Path, *, rounds: Sequence[int], central: Mapping[str, Sequence[float]],
    federated: Mapping[str, Sequence[float]], title: str,
) -> Path:
    """Bounded (0-1) metrics per round: the central ones (solid; e.g. accuracy and
    macro-F1) and the clients' weighted ones (dashed), each through the rounds that
    measured it."""
    fig = _figure()
    ax = fig.add_subplot()
    markers = "osD^v<>"
    for i, (label, values) in enumerate(central.items()):
        if _has_values(values):
            ax.plot(*_measured(rounds, values), marker=markers[i % len(markers)], label=label)
    for label, values in federated.items():
        if _has_values(values):
            ax.plot(*_measured(rounds, values), marker=".", linestyle="--", label=label)
    _finish_score_axis(ax, rounds, title=title, ylabel="score (0-1)",
                       empty="no evaluation results")
    return _save(fig, path)


def _finish_score_axis(ax: Any, rounds: Sequence[int], *, title: str, ylabel: str,
                       empty: str, **legend: Any) -> None:
    """A 0-1 score per round: the note when nothing was drawn, the axes, the legend."""
    if not ax.lines:
        _empty_note(ax, empty)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _round_axis(ax, rounds)
    if ax.lines:
        ax.legend(loc="lower right", **legend)


def plot_class_recall(
    path: Path, *, rounds: Sequence[int], recalls: Mapping[str, Sequence[float]],
    worst: Sequence[float], title: str,
) -> Path:
    """Each class's recall per round (one line per class, named) and the worst class's
    (black, dashed: ``recall_min``), each through the rounds that measured it."""
    fig = _figure()
    ax = fig.add_subplot()
    for color, (name, values) in zip(_colors(len(recalls)), recalls.items(), strict=True):
        if _has_values(values):
            ax.plot(*_measured(rounds, values), marker="o", color=color, label=f"recall {name}")
    if _has_values(worst):
        ax.plot(*_measured(rounds, worst), color="black", linestyle="--", linewidth=2.5,
                label="worst class (recall_min)")
    _finish_score_axis(ax, rounds, title=title, ylabel="recall (0-1)",
                       empty="no per-class recall", fontsize="small",
                       ncol=1 + len(ax.lines) // 12)
    return _save(fig, path)


def plot_metric(
    path: Path, *, rounds: Sequence[int], central: Sequence[float],
    federated: Sequence[float], label: str, title: str,
) -> Path:
    """One unbounded metric per round (e.g. perplexity): central and federated."""
    fig = _figure()
    ax = fig.add_subplot()
    if _has_values(central):
        ax.plot(*_measured(rounds, central), marker="o", label=f"central {label}")
    if _has_values(federated):
        ax.plot(*_measured(rounds, federated), marker=".", linestyle="--",
                label=f"federated {label} (weighted)")
    ax.set_ylabel(label)
    ax.set_title(title)
    _round_axis(ax, rounds)
    if ax.lines:
        ax.legend(loc="upper right")
    else:
        _empty_note(ax, f"no {label} recorded")
    return _save(fig, path)


def plot_retention(
    path: Path, *, rounds: Sequence[int], metrics: Mapping[str, Sequence[float]], title: str,
) -> Path:
    """The forgetting monitor: one panel per metric (label -> values per round), with its
    first measured value (round 0: the pretrained model) as a dashed reference line and
    the change since then in the panel's title."""
    columns = 2 if len(metrics) > 1 else 1
    grid_rows = max(1, -(-len(metrics) // columns))
    fig = _figure((_SIZE[0], max(_SIZE[1], 2.6 * grid_rows)))
    fig.suptitle(title)
    for i, (label, values) in enumerate(metrics.items()):
        ax = fig.add_subplot(grid_rows, columns, i + 1)
        x, y = _measured(rounds, values)
        if y:
            ax.plot(x, y, marker="o", color=f"C{i}")
            ax.axhline(y[0], color="0.5", linestyle="--", linewidth=1)
            ax.set_title(f"{label}: {y[-1] - y[0]:+.4f} since round {x[0]:g}",
                         fontsize="medium")
        else:
            _empty_note(ax, f"no {label} recorded")
            ax.set_title(label, fontsize="medium")
        _round_axis(ax, rounds)
    return _save(fig, path)


def plot_loss(
    path: Path, *, rounds: Sequence[int], central: Sequence[float],
    federated: Sequence[float], train: Sequence[float], title: str,
) -> Path:
    """Central, federated-evaluation and training loss per round."""
    fig = _figure()
    ax = fig.add_subplot()
    for values, label, style in (
        (central, "central eval loss", "-"),
        (federated, "federated eval loss (weighted)", "--"),
        (train, "client training loss (weighted)", ":"),
    ):
        if _has_values(values):
            ax.plot(rounds, values, marker="o", linestyle=style, label=label)
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    _round_axis(ax, rounds)
    if ax.lines:
        ax.legend(loc="upper right")
    else:
        _empty_note(ax, "no loss recorded")
    return _save(fig, path)


def plot_client_spread(
    path: Path, *, rounds: Sequence[int], minimum: Sequence[float], p10: Sequence[float],
    median: Sequence[float], central: Sequence[float], title: str, metric: str = "accuracy",
    bounded: bool = True,
) -> Path:
    """Spread of the clients' local ``metric`` (the task's headline, its label) per round:
    min, 10th percentile, median; ``bounded``: on a 0-1 axis."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.fill_between(rounds, minimum, median, alpha=0.15, color="C0")
    ax.plot(rounds, median, marker="o", color="C0", label="median client")
    ax.plot(rounds, p10, marker="v", color="C1", label="10th percentile client")
    ax.plot(rounds, minimum, marker="x", color="C3", label="worst client (min)")
    if _has_values(central):
        ax.plot(rounds, central, color="0.5", linestyle="--", label=f"central {metric}")
    if bounded:
        ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"local eval {metric}" + (" (0-1)" if bounded else ""))
    ax.set_title(title)
    _round_axis(ax, rounds)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_label_distribution(
    path: Path, *, counts: np.ndarray, label_names: Sequence[str],
    client_ids: Sequence[int | str], title: str, share: bool = False,
    xlabel: str = "client (partition id)",
) -> Path:
    """Stacked bars: examples of each class per client (``share``: as fractions)."""
    if share:
        totals = counts.sum(axis=1, keepdims=True)
        counts = counts / np.maximum(totals, 1)
    width = min(max(_SIZE[0], 0.22 * len(client_ids) + 2.5), 16.0)
    fig = _figure((width, _SIZE[1]))
    ax = fig.add_subplot()
    x = np.arange(len(client_ids))
    bottom = np.zeros(len(client_ids))
    colors = _colors(len(label_names))
    for k, name in enumerate(label_names):
        ax.bar(x, counts[:, k], bottom=bottom, color=colors[k], label=str(name), width=0.8)
        bottom += counts[:, k]
    step = max(1, int(np.ceil(len(client_ids) / 40)))
    ax.set_xticks(x[::step], [str(c) for c in client_ids[::step]],
                  rotation=90 if len(client_ids) > 20 else 0)
    ax.set_xlim(-0.6, len(client_ids) - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of the client's examples" if share else "training examples")
    if share:
        ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize="small", ncols=1 if len(label_names) <= 15 else 2)
    return _save(fig, path)


def plot_bytes(
    path: Path, *, rounds: Sequence[int], up_total: Sequence[float],
    down_total: Sequence[float], title: str,
) -> Path:
    """Cumulative bytes sent by the clients (up) and by the server (down)."""
    scale, unit = byte_unit(max([*up_total, *down_total, 1.0]))
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(rounds, np.asarray(down_total) / scale, marker="o",
            label="down (server -> clients)")
    ax.plot(rounds, np.asarray(up_total) / scale, marker="s", label="up (clients -> server)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"cumulative {unit} (serialized arrays)")
    ax.set_title(title)
    _round_axis(ax, rounds)
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_round_time(
    path: Path, *, rounds: Sequence[int], parts: Mapping[str, Sequence[float]], title: str,
) -> Path:
    """Stacked bars: where each round's wall time went."""
    fig = _figure()
    ax = fig.add_subplot()
    bottom = np.zeros(len(rounds))
    for i, (label, values) in enumerate(parts.items()):
        ax.bar(rounds, values, bottom=bottom, label=label, color=f"C{i}", width=0.7)
        bottom += np.asarray(values, dtype=float)
    ax.set_ylabel("seconds")
    ax.set_title(title)
    _round_axis(ax, rounds)
    ax.grid(False, axis="x")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
    return _save(fig, path)


def plot_memory(
    path: Path, *, rounds: Sequence[int], server: Sequence[float], client: Sequence[float],
    title: str,
) -> Path:
    """Peak resident memory of the server process and of the client processes."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(rounds, server, marker="o", label="server process (peak RSS)")
    if _has_values(client):
        ax.plot(rounds, client, marker="s", label="client process, largest (peak RSS)")
    top = np.nanmax([*server, *client, 1.0])
    ax.set_ylim(0, top * 1.15)
    ax.set_ylabel("MiB")
    ax.set_title(title)
    _round_axis(ax, rounds)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_site_times(
    path: Path, *, rounds: Sequence[int], seconds: Mapping[str, Sequence[float]], title: str,
) -> Path:
    """Local training seconds per round, one line per site (NaN: not trained that round)."""
    fig = _figure()
    ax = fig.add_subplot()
    for color, (site, values) in zip(_colors(len(seconds)), seconds.items(), strict=True):
        x, y = _measured(rounds, values)
        ax.plot(x, y, marker="o", color=color, label=site)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("training seconds")
    ax.set_title(title)
    _round_axis(ax, rounds)
    if len(seconds) <= 15:
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    return _save(fig, path)


# --- comparison -------------------------------------------------------------------------


def plot_overlay(
    path: Path, *, series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str, ylabel: str, title: str, ylim: tuple[float, float] | None = None,
    rounds_axis: bool = True,
) -> Path:
    """One line per run (legend = run name) on shared axes."""
    height = _SIZE[1] + 0.22 * len(series)
    fig = _figure((_SIZE[0], height))
    ax = fig.add_subplot()
    for color, (name, (x, y)) in zip(_colors(len(series)), series.items(), strict=True):
        marker = "o" if len(x) <= 30 else None
        ax.plot(*_measured(x, y), marker=marker, markersize=4, color=color, label=name)
    if rounds_axis:
        _round_axis(ax, [int(v) for x, _ in series.values() for v in x])
    else:
        ax.grid(True, alpha=0.3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    if series:
        fig.legend(loc="outside lower center", ncols=1 if len(series) <= 8 else 2,
                   fontsize="small")
    return _save(fig, path)
