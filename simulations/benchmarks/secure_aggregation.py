"""secure-aggregation: what SecAgg+ costs in round time and uplink bytes, for LoRA fedavg.

The same fedavg LoRA workload (same seed, data, clients, rounds and local steps) runs
with and without ``secure-aggregation``, for a small and a larger number of clients, all
of them sampled every round. Targets: mean round time with secure aggregation at most
2x the plaintext one; uplink bytes at most 1.1x the bytes of sending every trainable
value as a 32-bit integer (secure aggregation's masked inputs are uint32 words).
"""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.harness import (
    Bench,
    BenchmarkError,
    FedRun,
    target,
    trainable_values,
)

DESCRIPTION = (
    "fedavg LoRA with and without `secure-aggregation` (SecAgg+: key advertisement, "
    "encrypted Shamir shares, masked uint32 inputs, unmasking) on the same workload "
    "({data}, {rounds} rounds, {steps} local steps, every client sampled every round), "
    "for {sizes} clients: mean round time, uplink bytes and final accuracy. Targets: "
    "round time with / without at most 2x; uplink with secure aggregation at most 1.1x "
    "the uplink of the same LoRA values sent as 32-bit integers."
)
SIZES = {  # client counts (small, larger; one in the smoke-test mode), rounds, local steps
    "quick": ((3,), 2, 2),
    "default": ((10, 30), 4, 5),
    "full": ((10, 50), 5, 10),
}
TIME_LIMIT = 2.0  # x, secure / plaintext mean round time
BYTES_LIMIT = 1.1  # x, secure uplink / (trainable values x 4 bytes x clients)


def _summary(run: FedRun, clients: int) -> dict[str, Any]:
    rounds = run.rounds
    up = run.mean_bytes("up")
    return {
        "clients": clients,
        "mean_round_seconds_after_first": run.mean_round_seconds(skip_first=True),
        "first_round_seconds": float(rounds[0].seconds.round),
        "bytes_up_per_round": up,
        "bytes_up_per_client_round": up / clients,
        "bytes_down_per_round": run.mean_bytes("down"),
        **run.outcome(),
        "aggregated_min": min(int(r.clients.aggregated) for r in rounds),
        "skipped_rounds": sum(bool(r.clients.skipped) for r in rounds),
    }


def run(bench: Bench) -> dict[str, Any]:
    """Run plaintext and secure fedavg for each client count; see the module docstring."""
    sizes, rounds, steps = SIZES[bench.mode]
    common = {**bench.base(), "num-server-rounds": rounds, "local-steps": steps,
              "fraction-train": 1.0, "fraction-evaluate": 0.0}
    if bench.mode != "quick":
        common["learning-rate"] = 0.006  # learns within these few short rounds
    numbers: dict[str, Any] = {}
    rows: list[list[Any]] = []
    targets: list[dict[str, Any]] = []
    notes: list[str] = []
    for clients in sizes:
        cfg = {**common, "min-nodes": clients}
        plain = bench.fedsft(f"secagg-plain-{clients}", cfg, num_supernodes=clients)
        secure = bench.fedsft(f"secagg-secure-{clients}", {**cfg, "secure-aggregation": True},
                              num_supernodes=clients)
        a, b = _summary(plain, clients), _summary(secure, clients)
        for label, s in (("plaintext", a), ("secure", b)):
            if s["skipped_rounds"] or s["aggregated_min"] < clients:
                raise BenchmarkError(
                    f"{s['run_dir']}: {label} run aggregated only {s['aggregated_min']} of "
                    f"{clients} clients in some round ({s['skipped_rounds']} skipped)")
        values = trainable_values(plain.run_dir)
        int32_reference = values * 4 * clients
        ratios = {
            "round_seconds": b["mean_round_seconds_after_first"]
            / a["mean_round_seconds_after_first"],
            "bytes_up_vs_int32": b["bytes_up_per_round"] / int32_reference,
            "bytes_up_vs_plaintext_fp32": b["bytes_up_per_round"] / a["bytes_up_per_round"],
            "accuracy_difference_points": (b["final_accuracy"] - a["final_accuracy"]) * 100,
        }
        numbers[f"clients-{clients}"] = {
            "plaintext": a, "secure": b, "ratios": ratios, "trainable_values": values,
            "trainable_values_from_fp32_bytes": a["bytes_up_per_client_round"] / 4,
            "int32_uplink_bytes_per_round": int32_reference,
        }
        rows.append([clients, a["mean_round_seconds_after_first"],
                     b["mean_round_seconds_after_first"], ratios["round_seconds"],
                     round(a["bytes_up_per_client_round"]), round(b["bytes_up_per_client_round"]),
                     values * 4, ratios["bytes_up_vs_int32"], a["final_accuracy"],
                     b["final_accuracy"], ratios["accuracy_difference_points"]])
        targets += [
            target(f"{clients} clients: mean round time, secure / plaintext (after round 1)",
                   measured=ratios["round_seconds"], limit=TIME_LIMIT, kind="max", unit="x"),
            target(f"{clients} clients: uplink bytes per round, secure / (trainable values x "
                   "4 bytes x clients)", measured=ratios["bytes_up_vs_int32"],
                   limit=BYTES_LIMIT, kind="max", unit="x"),
        ]
    first = numbers[f"clients-{sizes[0]}"]
    eval_examples = first["plaintext"]["eval_examples"]
    notes += [
        "The 32-bit reference is the number of exchanged (trainable) values, counted in the "
        f"plaintext run's checkpoint, x 4 bytes x clients: {first['trainable_values']:,} "
        "values per client (the plaintext fp32 uplink per client / 4 gives "
        f"{first['trainable_values_from_fp32_bytes']:,.0f}: each array on the wire also "
        "carries a ~128-byte header, as do the masked arrays).",
        "Secure-aggregation bytes include every protocol message of the round: the advertise "
        "and share-keys queries and replies (whole serialized message contents) and the extra "
        "train-config entries on the downlink, the masked uint32 inputs (plus the 2-word "
        "masked weight) on the uplink, and the unmask queries and replies. Plaintext bytes "
        "count only the arrays' payloads (metrics records are counted in neither).",
        "Round s: `seconds.round` (from configure_train to the end of the server's central "
        "evaluation), averaged over the rounds after round 1 (round 1 includes starting the "
        "worker processes); time ratio = secure / plaintext. The protocol's cost is nearly "
        "fixed per round while training cost grows with local steps, so the time ratio "
        "depends on the workload: "
        f"here {steps} local steps per client per round.",
        "Accuracy difference: secure minus plaintext final accuracy. Secure aggregation clips "
        "each delta value to +-`secagg-clip-range` and quantizes it, so the two runs are not "
        f"bit-identical; one evaluation example is {100 / eval_examples:.2g} points "
        f"({eval_examples} rows). Accuracy before -> after: " + "; ".join(
            f"{k} plaintext {n['plaintext']['initial_accuracy']:.4f} -> "
            f"{n['plaintext']['final_accuracy']:.4f}, secure "
            f"{n['secure']['initial_accuracy']:.4f} -> {n['secure']['final_accuracy']:.4f}"
            for k, n in numbers.items()) + ".",
    ]
    if bench.mode == "quick":
        notes.append("Quick mode uses a tiny random BERT whose LoRA state is about two "
                     "thousand values, so fixed per-message costs (headers, keys, shares) dominate "
                     "the byte ratio; only the default and full sizes say anything about it.")
    return {
        "description": DESCRIPTION.format(
            data="the built-in data", rounds=rounds, steps=steps,
            sizes=" and ".join(str(s) for s in sizes)),
        "config": {"run-config": common, "min-nodes and num-supernodes": list(sizes),
                   "secure variant adds": {"secure-aggregation": True},
                   "client-resources-num-cpus": 1,
                   "run_dirs": {k: {v: n[v]["run_dir"] for v in ("plaintext", "secure")}
                                for k, n in numbers.items()}},
        "numbers": numbers,
        "table": {
            "columns": ["clients", "round s plaintext", "round s secure", "time ratio",
                        "up B / client / round plaintext (fp32)",
                        "up B / client / round secure", "int32 reference B / client",
                        "secure up / int32 reference", "accuracy plaintext",
                        "accuracy secure", "accuracy diff (points)"],
            "rows": rows,
        },
        "targets": targets,
        "notes": notes,
    }
