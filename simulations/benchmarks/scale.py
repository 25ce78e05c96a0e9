"""scale: many idle virtual clients must not cost memory or round time.

1,000 virtual clients with 10 sampled per round against 10 clients in total, tiny
per-client work. Peak RSS (server and clients, from results.jsonl ``memory_mb``) and
round time must not grow with the number of idle clients, and memory must stay flat
over the rounds.
"""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.harness import Bench, FedRun, target

DESCRIPTION = (
    "Many virtual clients, few sampled ({many:,} clients, {sampled} per round) against "
    "{sampled} clients in total, with tiny per-client work, {rounds} rounds: peak memory of "
    "the server and the client processes and the round time must not grow with the "
    "number of idle clients, and memory must stay flat over the rounds."
)
SIZES = {  # many clients, sampled per round, rounds
    "quick": (100, 2, 2),
    "default": (1000, 10, 50),
    "full": (1000, 10, 50),
}
# Tolerances (mine, for a noisy shared machine): "does not grow" = within these.
MEMORY_TOLERANCE = 1.10
TIME_TOLERANCE = 1.25


def _summary(run: FedRun) -> dict[str, float]:
    rounds = run.rounds
    return {
        "server_peak_mb_first_round": rounds[0].memory_mb.server_peak,
        "server_peak_mb_last_round": rounds[-1].memory_mb.server_peak,
        "client_peak_mb_first_round": rounds[0].memory_mb.client_peak,
        "client_peak_mb_last_round": rounds[-1].memory_mb.client_peak,
        "client_peak_mb_max": max(r.memory_mb.client_peak for r in rounds),
        "mean_round_seconds_after_first": run.mean_round_seconds(skip_first=True),
        "first_round_seconds": rounds[0].seconds.round,
        "clients_sampled_per_round": float(rounds[-1].clients.sampled),
        "wall_seconds": run.wall_seconds,
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run both federations; see the module docstring."""
    many, sampled, rounds = SIZES[bench.mode]
    work = {**bench.base(), "num-server-rounds": rounds, "fraction-evaluate": 0.0}
    if bench.mode != "quick":
        work.update({"builtin-examples": 20000, "eval-fraction": 0.01, "local-steps": 1,
                     "batch-size": 8, "max-length": 32, "keep-checkpoints": 1})
    small_cfg = {**work, "fraction-train": 1.0, "min-nodes": sampled}
    big_cfg = {**work, "fraction-train": sampled / many, "min-nodes": many}
    if bench.mode == "quick":  # the small run is the shared quick run: both evaluate 2
        small_cfg["fraction-evaluate"] = 1.0
        big_cfg["fraction-evaluate"] = sampled / many
    small = bench.fedsft("scale-small", small_cfg, num_supernodes=sampled)
    big = bench.fedsft("scale-many", big_cfg, num_supernodes=many)
    a, b = _summary(small), _summary(big)
    if b["clients_sampled_per_round"] != a["clients_sampled_per_round"]:
        raise RuntimeError(f"sampled {b['clients_sampled_per_round']} of {many} clients per "
                           f"round, expected {a['clients_sampled_per_round']}")
    ratios = {
        "server_peak": b["server_peak_mb_last_round"] / a["server_peak_mb_last_round"],
        "client_peak": b["client_peak_mb_max"] / a["client_peak_mb_max"],
        "round_seconds": b["mean_round_seconds_after_first"]
        / a["mean_round_seconds_after_first"],
        "server_growth_many": b["server_peak_mb_last_round"] / b["server_peak_mb_first_round"],
        "client_growth_many": b["client_peak_mb_last_round"] / b["client_peak_mb_first_round"],
    }
    rows = []
    for label, s in ((f"{sampled} clients in total", a), (f"{many} clients, {sampled} sampled",
                                                          b)):
        rows.append([label, s["server_peak_mb_first_round"], s["server_peak_mb_last_round"],
                     s["client_peak_mb_first_round"], s["client_peak_mb_last_round"],
                     s["first_round_seconds"], s["mean_round_seconds_after_first"],
                     s["wall_seconds"]])
    return {
        "description": DESCRIPTION.format(many=many, sampled=sampled, rounds=rounds),
        "config": {"small run-config": small_cfg, "many run-config": big_cfg,
                   "num-supernodes": {"small": sampled, "many": many},
                   "client-resources-num-cpus": 1, "small run_dir": str(small.run_dir),
                   "many run_dir": str(big.run_dir)},
        "numbers": {"small": a, "many": b, "ratios": ratios},
        "table": {
            "columns": ["federation", "server peak MB round 1", "server peak MB last",
                        "client peak MB round 1", "client peak MB last", "round 1 s",
                        "mean round s (after round 1)", "flwr run wall s"],
            "rows": rows,
        },
        "targets": [
            target("server peak RSS, many / few clients (last round)",
                   measured=ratios["server_peak"], limit=MEMORY_TOLERANCE, kind="max",
                   unit="x"),
            target("client peak RSS, many / few clients", measured=ratios["client_peak"],
                   limit=MEMORY_TOLERANCE, kind="max", unit="x"),
            target("mean round time, many / few clients", measured=ratios["round_seconds"],
                   limit=TIME_TOLERANCE, kind="max", unit="x"),
            target(f"server peak RSS last / first round ({many} clients)",
                   measured=ratios["server_growth_many"], limit=MEMORY_TOLERANCE,
                   kind="max", unit="x"),
            target(f"client peak RSS last / first round ({many} clients)",
                   measured=ratios["client_growth_many"], limit=MEMORY_TOLERANCE,
                   kind="max", unit="x"),
        ],
        "notes": [
            f"'Does not grow' is checked with tolerances chosen for a noisy shared machine: "
            f"memory within {MEMORY_TOLERANCE:g}x, round time within {TIME_TOLERANCE:g}x.",
            "Peak RSS is `ru_maxrss` (a process's peak so far): the server's ServerApp "
            "process and the largest of the clients' worker processes that round.",
        ],
    }
