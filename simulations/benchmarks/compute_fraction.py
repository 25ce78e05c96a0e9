"""compute-fraction: how much of a federated run's wall time is client compute.

A federated LoRA run (N clients, all sampled, R rounds x S local steps) against the same
N*R*S optimizer steps of ``train_local`` in one plain process on the union of the
clients' data (same model, batch size and learning rate). Target: the federated run
takes at most 10 % longer.
"""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.harness import Bench, target, train_in_process

DESCRIPTION = (
    "Wall time of a federated LoRA run (all clients sampled every round) against the same "
    "number of optimizer steps of `common.training.train_local` in one plain process on "
    "the union of the clients' data. Target: federated overhead at most 10 %."
)
SIZES = {  # clients, rounds, local steps
    "quick": (2, 2, 2),
    "default": (10, 4, 15),
    "full": (10, 5, 20),
}


def run(bench: Bench) -> dict[str, Any]:
    """Measure both setups; see the module docstring."""
    clients, rounds, steps = SIZES[bench.mode]
    overrides = {**bench.base(), "num-server-rounds": rounds, "local-steps": steps,
                 "fraction-train": 1.0, "min-nodes": clients}
    if bench.mode != "quick":
        overrides["fraction-evaluate"] = 0.0  # training only: no federated evaluation
    fed = bench.fedsft("compute-fraction", overrides, num_supernodes=clients)
    plain = train_in_process(overrides, num_clients=clients, total_steps=clients * rounds * steps)

    workers = min(bench.parallel_workers, clients)
    rounds_seconds = sum(r.seconds.round for r in fed.rounds)
    client_train = sum(r.seconds.client_train_mean * r.clients.aggregated
                       for r in fed.rounds)
    overhead_total = fed.wall_seconds / plain["total_seconds"] - 1
    overhead_rounds = rounds_seconds / plain["train_seconds"] - 1
    numbers = {
        "clients": clients, "rounds": rounds, "local_steps": steps,
        "optimizer_steps": clients * rounds * steps, "parallel_workers": workers,
        "federated_wall_seconds": fed.wall_seconds,
        "federated_rounds_seconds": rounds_seconds,
        "federated_startup_and_rest_seconds": fed.wall_seconds - rounds_seconds,
        "client_train_seconds_sum": client_train,
        "client_compute_share_of_wall": client_train / (fed.wall_seconds * workers),
        "client_compute_share_of_rounds": client_train / (rounds_seconds * workers),
        "plain_total_seconds": plain["total_seconds"],
        "plain_train_seconds": plain["train_seconds"],
        "plain_prepare_seconds": plain["prepare_seconds"],
        "plain_torch_threads": plain["torch_threads"],
        "overhead_end_to_end": overhead_total,
        "overhead_rounds_vs_training": overhead_rounds,
        "federated_accuracy": fed.final_accuracy(),
        "plain_accuracy": plain["accuracy"],
    }
    return {
        "description": DESCRIPTION,
        "config": {"run-config": overrides, "num-supernodes": clients,
                   "client-resources-num-cpus": 1, "run_dir": str(fed.run_dir)},
        "numbers": numbers,
        "table": {
            "columns": ["setup", "wall s", "training part s", "client compute share",
                        "accuracy"],
            "rows": [
                ["federated (flwr run, end to end)", fed.wall_seconds, rounds_seconds,
                 numbers["client_compute_share_of_wall"], numbers["federated_accuracy"]],
                ["plain process (train_local)", plain["total_seconds"],
                 plain["train_seconds"], 1.0, plain["accuracy"]],
            ],
        },
        "targets": [
            target("federated overhead, end to end (flwr run incl. start-up vs plain "
                   "process incl. model load + tokenization)",
                   measured=overhead_total * 100, limit=10.0, kind="max", unit="%"),
            target("federated overhead, rounds only (sum of round times vs train_local "
                   "loop)", measured=overhead_rounds * 100, limit=10.0, kind="max", unit="%"),
        ],
        "notes": [
            f"client compute share = sum of client train seconds / (wall x {workers} "
            "parallel workers); 'training part' is the sum of the rounds' `seconds.round` "
            "for the federated run (includes central evaluation each round) and the "
            "train_local loop for the plain process.",
            f"The plain process uses {plain['torch_threads']} torch threads; the federated "
            f"run has {workers} virtual clients running at once with 1 CPU each.",
            f"Outside its rounds the federated run spent "
            f"{numbers['federated_startup_and_rest_seconds']:.1f} s: starting the local "
            "SuperLink, the simulation runtime and its workers, loading the server's model "
            "and evaluation data, the round-0 evaluation, writing the final model, and "
            "shutting down. That cost is per run, not per round, so the end-to-end "
            f"overhead falls as runs get longer; this run trained for {rounds_seconds:.0f} s.",
        ],
    }
