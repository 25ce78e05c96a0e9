"""communication: bytes per round and accuracy of full vs LoRA fp32 / fp16 / int8 uplinks.

Target: LoRA with the int8 uplink within 0.5 accuracy points of LoRA fp32.
"""

from __future__ import annotations

from typing import Any

from simulations.benchmarks.harness import Bench, central_metrics, data_text, sst2_config, target

DESCRIPTION = (
    "Full fine-tuning vs LoRA with fp32, fp16 and int8 update encodings on {data}: bytes "
    "per round and final central accuracy. Target: int8 within 0.5 accuracy points of fp32."
)
SIZES = {  # clients, rounds, local steps
    "quick": (2, 2, 2),
    "default": (5, 5, 20),
    "full": (10, 8, 20),
}
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (  # name, overrides
    ("full", {"method": "full", "learning-rate": 1e-4}),
    ("lora-fp32", {}),
    ("lora-fp16", {"update-encoding": "fp16"}),
    ("lora-int8", {"update-encoding": "int8"}),
)
# Quick mode (--quick) checks that the benchmark runs, not the numbers: fp16 goes
# through the same code as int8, so quick mode leaves it out (one simulation less).
QUICK_VARIANTS = ("full", "lora-fp32", "lora-int8")


def run(bench: Bench) -> dict[str, Any]:
    """Run the variants (three in quick mode); see the module docstring."""
    clients, rounds, steps = SIZES[bench.mode]
    data = {} if bench.mode == "quick" else sst2_config()
    common = {**bench.base(), **data, "num-server-rounds": rounds, "local-steps": steps,
              "fraction-train": 1.0, "min-nodes": clients}
    if bench.mode != "quick":
        common["learning-rate"] = 0.003  # LoRA on SST-2 learns within these few rounds
    results: dict[str, dict[str, float]] = {}
    configs: dict[str, dict[str, Any]] = {}
    variants = [(n, o) for n, o in VARIANTS if bench.mode != "quick" or n in QUICK_VARIANTS]
    for name, overrides in variants:
        configs[name] = {**common, **overrides}
        fed = bench.fedsft(f"communication-{name}", configs[name], num_supernodes=clients)
        up, down = fed.mean_bytes("up"), fed.mean_bytes("down")
        results[name] = {
            "bytes_up_per_round": up, "bytes_down_per_round": down,
            "bytes_up_per_client_round": up / clients, "bytes_per_round": up + down,
            **fed.outcome(),
            "final_f1_macro": float(central_metrics(fed.rows[-1], fed.run_dir)["f1_macro"]),
            "mean_round_seconds": fed.mean_round_seconds(),
        }
    full_bytes = results["full"]["bytes_per_round"]
    fp32_acc = results["lora-fp32"]["final_accuracy"]
    rows = []
    for name, r in results.items():
        r["bytes_vs_full"] = r["bytes_per_round"] / full_bytes
        r["accuracy_gap_vs_lora_fp32_points"] = (r["final_accuracy"] - fp32_acc) * 100
        rows.append([name, r["bytes_up_per_round"], r["bytes_down_per_round"],
                     r["bytes_up_per_client_round"], r["bytes_vs_full"], r["final_accuracy"],
                     r["accuracy_gap_vs_lora_fp32_points"], r["mean_round_seconds"]])
    int8_gap = abs(results["lora-int8"]["accuracy_gap_vs_lora_fp32_points"])
    targets = [target("|accuracy(lora-int8) - accuracy(lora-fp32)|", measured=int8_gap,
                      limit=0.5, kind="max", unit="points")]
    if "lora-fp16" in results:
        targets.append(target(
            "|accuracy(lora-fp16) - accuracy(lora-fp32)| (informational, same bound)",
            measured=abs(results["lora-fp16"]["accuracy_gap_vs_lora_fp32_points"]),
            limit=0.5, kind="max", unit="points"))
    eval_examples = results["lora-fp32"]["eval_examples"]
    eval_rows = f"{'SST-2 dev' if data else 'the held-out split'} ({eval_examples} rows)"
    return {
        "description": DESCRIPTION.format(data=data_text(data)),
        "config": {"common run-config": common,
                   "variants": {name: overrides for name, overrides in variants},
                   "num-supernodes": clients, "client-resources-num-cpus": 1},
        "numbers": results,
        "table": {
            "columns": ["variant", "bytes up / round", "bytes down / round",
                        "bytes up / client / round", "bytes vs full", "final accuracy",
                        "acc. vs lora-fp32 (points)", "mean round s"],
            "rows": rows,
        },
        "targets": targets,
        "notes": [
            "Accuracy before training -> after the last round: " + ", ".join(
                f"{name} {r['initial_accuracy']:.4f} -> {r['final_accuracy']:.4f}"
                for name, r in results.items()) + " (a comparison of encodings only means "
            "something if lora-fp32 learned).",
            f"Accuracy is the server's central evaluation after the last round on {eval_rows};"
            f" one example is {100 / eval_examples:.2g} points.",
            "fp16/int8 encode only the uplink (client -> server, as deltas); the downlink "
            "stays fp32, so 'bytes down' is the same for the three LoRA variants.",
        ],
    }
