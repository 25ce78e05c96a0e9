"""baseline-app: fedsft against a Flower App written the way the quickstart examples are.

The baseline (``baseline_app/``) reloads the model from disk and re-tokenizes its data
on every call, fine-tunes and exchanges the full weights both ways, and its evaluation
replies carry the weights as well. fedsft runs the same workload (same model, data,
clients, rounds, local steps, batch size, share of clients evaluating) with LoRA.
Targets: fedsft rounds at least 2x faster and at least 100x fewer bytes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from simulations.benchmarks.harness import Bench, BenchmarkError, FedRun, target

BASELINE_DIR = Path(__file__).resolve().parent / "baseline_app"
DESCRIPTION = (
    "fedsft (LoRA, cached model and tokenized data, adapters only on the wire, "
    "metrics-only evaluation replies) against a quickstart-style Flower App "
    "(`simulations/benchmarks/baseline_app/`: model reloaded from disk every call, data "
    "re-tokenized every round, full weights both ways, evaluation replies carrying the "
    "weights) on the same workload. Targets: rounds at least 2x faster, at least 100x "
    "fewer bytes per round."
)
SIZES = {  # clients, rounds, local steps, fraction-evaluate
    "quick": (2, 2, 2, 1.0),
    "default": (10, 3, 5, 0.5),
    "full": (10, 3, 10, 0.5),
}


def _summary(run: FedRun) -> dict[str, float]:
    up, down = run.mean_bytes("up"), run.mean_bytes("down")
    return {"round_seconds": run.mean_round_seconds(skip_first=True),
            "first_round_seconds": run.rounds[0].seconds.round,
            "bytes_up_per_round": up,
            "bytes_down_per_round": down, "bytes_per_round": up + down,
            "wall_seconds": run.wall_seconds,
            "server_peak_mb": max(r.memory_mb.server_peak for r in run.rows)}


def _check_fedsft_installed() -> None:
    """The baseline app reads its rows with fedsft's ``common`` package, from Flower's
    app folder: fedsft must be importable outside this checkout (``pip install -e .``)."""
    with tempfile.TemporaryDirectory() as elsewhere:
        probe = subprocess.run([sys.executable, "-c", "import common.data"], cwd=elsewhere,
                               capture_output=True, text=True)
    if probe.returncode != 0:
        raise BenchmarkError(
            "the baseline app imports fedsft's `common` package, which is not importable "
            "outside the repository; install fedsft first: pip install -e \".[dev]\""
        )


def run(bench: Bench) -> dict[str, Any]:
    """Run both apps; see the module docstring."""
    _check_fedsft_installed()
    clients, rounds, steps, fraction_evaluate = SIZES[bench.mode]
    base = bench.base()
    fedsft_config = {**base, "num-server-rounds": rounds, "local-steps": steps,
                     "fraction-train": 1.0, "fraction-evaluate": fraction_evaluate,
                     "min-nodes": clients}
    baseline_config = {
        "model": base["model"], "dataset": base["dataset"],
        "builtin-examples": base["builtin-examples"], "max-length": base["max-length"],
        "num-server-rounds": rounds, "local-steps": steps, "batch-size": base["batch-size"],
        "fraction-evaluate": fraction_evaluate, "min-nodes": clients,
        # Full fine-tuning needs a small learning rate (the quickstart's 5e-5).
        "learning-rate": 5e-5,
    }
    ours = bench.fedsft("baseline-fedsft", fedsft_config, num_supernodes=clients)
    theirs = bench.app("baseline-quickstart", baseline_config, num_supernodes=clients,
                       app_dir=BASELINE_DIR)
    a, b = _summary(ours), _summary(theirs)
    speedup = b["round_seconds"] / a["round_seconds"]
    bytes_ratio = b["bytes_per_round"] / a["bytes_per_round"] if a["bytes_per_round"] else 0.0
    return {
        "description": DESCRIPTION,
        "config": {"fedsft run-config": fedsft_config, "baseline run-config": baseline_config,
                   "num-supernodes": clients, "client-resources-num-cpus": 1,
                   "fedsft run_dir": str(ours.run_dir), "baseline run_dir": str(theirs.run_dir)},
        "numbers": {"fedsft": a, "baseline": b, "round_speedup": speedup,
                    "bytes_ratio": bytes_ratio},
        "table": {
            "columns": ["app", "round 1 s", "mean round s after round 1", "bytes up / round",
                        "bytes down / round",
                        "bytes / round", "flwr run wall s", "server peak MB"],
            "rows": [
                ["fedsft (LoRA)", a["first_round_seconds"], a["round_seconds"],
                 a["bytes_up_per_round"],
                 a["bytes_down_per_round"], a["bytes_per_round"], a["wall_seconds"],
                 a["server_peak_mb"]],
                ["quickstart-style baseline (full)", b["first_round_seconds"], b["round_seconds"],
                 b["bytes_up_per_round"], b["bytes_down_per_round"], b["bytes_per_round"],
                 b["wall_seconds"], b["server_peak_mb"]],
            ],
        },
        "targets": [
            target("round speed-up (baseline / fedsft mean round s after round 1)",
                   measured=speedup,
                   limit=2.0, kind="min", unit="x"),
            target("bytes reduction (baseline bytes / fedsft bytes per round)",
                   measured=bytes_ratio, limit=100.0, kind="min", unit="x"),
        ],
        "notes": [
            "Round 1 includes starting the simulation's worker processes (and, for fedsft, "
            "loading the model into its per-process cache), so the speed-up compares the "
            "rounds after it.",
            "Round time: fedsft's `seconds.round` (configure_train to the end of its central "
            "evaluation, which the baseline does not do); baseline: time between Flower's "
            "end-of-round `evaluate_fn` calls. Both include federated evaluation.",
            "Bytes: serialized array bytes of every train and evaluate message, both "
            "directions, counted the same way on both servers.",
        ],
    }
