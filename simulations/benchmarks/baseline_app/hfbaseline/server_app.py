"""Quickstart-style ServerApp (FedAvg), plus the measurements the benchmark reads.

``MeasuredFedAvg`` only counts the serialized array bytes of every message (as fedsft's
``payload_bytes`` does); ``RoundClock`` is the ``evaluate_fn`` Flower calls at the end of
every round and writes one fedsft-style row per round to
``<output-dir>/<run-name>/results.jsonl``.
"""

from __future__ import annotations

import json
import resource
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from hfbaseline.task import load_model

app = ServerApp()


def _bytes(message: Message) -> int:
    if message.has_error():
        return 0
    return sum(len(a.data) for r in message.content.array_records.values() for a in r.values())


class MeasuredFedAvg(FedAvg):
    """FedAvg that counts the bytes of what it sends and receives, per round."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.bytes: dict[int, dict[str, int]] = defaultdict(lambda: {"up": 0, "down": 0})

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.bytes[server_round]["down"] += sum(_bytes(m) for m in messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.bytes[server_round]["up"] += sum(_bytes(m) for m in replies)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.bytes[server_round]["down"] += sum(_bytes(m) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):  # type: ignore[no-untyped-def]
        replies = list(replies)
        self.bytes[server_round]["up"] += sum(_bytes(m) for m in replies)
        return super().aggregate_evaluate(server_round, replies)


class RoundClock:
    """``evaluate_fn``: one results row per round (bytes, seconds, server peak RSS)."""

    def __init__(self, path: Path, strategy: MeasuredFedAvg) -> None:
        self.path = path
        self.strategy = strategy
        self.last = time.monotonic()
        self.up_total = 0
        self.down_total = 0

    def __call__(self, server_round: int, arrays: ArrayRecord) -> None:
        now = time.monotonic()
        b = self.strategy.bytes[server_round]
        self.up_total += b["up"]
        self.down_total += b["down"]
        row = {
            "round": server_round, "central": None,
            "bytes": {"up": b["up"], "down": b["down"], "up_total": self.up_total,
                      "down_total": self.down_total},
            "seconds": {"round": now - self.last if server_round else 0.0},
            "memory_mb": {"server_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                          / 1024},
            "time": time.time(),
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.last = time.monotonic()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg on the full model for ``num-server-rounds`` rounds."""
    cfg = context.run_config
    run_dir = Path(str(cfg["output-dir"])) / str(cfg["run-name"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.jsonl").unlink(missing_ok=True)
    arrays = ArrayRecord(load_model(cfg).state_dict())
    min_nodes = int(cfg["min-nodes"])
    strategy = MeasuredFedAvg(
        fraction_train=1.0, fraction_evaluate=float(cfg["fraction-evaluate"]),
        min_available_nodes=min_nodes, min_train_nodes=min(2, min_nodes),
        min_evaluate_nodes=1,
    )
    strategy.start(
        grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
        evaluate_fn=RoundClock(run_dir / "results.jsonl", strategy),
    )
