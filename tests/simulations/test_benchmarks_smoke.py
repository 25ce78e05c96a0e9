"""Smoke test of the benchmark suite: the benchmarks with machinery of their own in
--quick mode, into a tmp folder.

``communication``, ``at-convergence``, ``robustness``, ``dp-accuracy``,
``secure-aggregation`` and ``scale`` only loop over run-config variants of fedsft and
compute on the rows: test_benchmark_logic.py runs them against a fake runner (no
Flower), which saves the 11 simulations they would add here (secure vs plaintext fedavg
runs for real in tests/e2e/test_simulation.py; the peak memory scale reads is checked
on the shared run here). The four simulations left: the shared quick fedsft run
(compute-fraction and baseline-app), the quickstart-style baseline app, and sft's two
federations.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {  # benchmark -> numeric fields (dotted paths into "numbers")
    "compute-fraction": ["federated_wall_seconds", "plain_train_seconds",
                         "client_compute_share_of_wall", "overhead_end_to_end",
                         "overhead_rounds_vs_training"],
    "baseline-app": ["fedsft.round_seconds", "baseline.round_seconds",
                     "fedsft.bytes_per_round", "baseline.bytes_per_round",
                     "round_speedup", "bytes_ratio"],
    "sft": ["throughput.ratio", "throughput.fedsft.trained_tokens_per_second",
            "throughput.plain.trained_tokens_per_second",
            "bytes.lora-r8.bytes_up_per_client", "bytes.lora-r16.bytes_up_per_client",
            "bytes.full.bytes_up_per_client", "memory.lora-r8.peak_mb",
            "centralized.loss", "centralized.exact_match"] + [
        f"{s}.{f}" for s in ("iid", "by-task")
        for f in ("loss", "exact_match", "token_f1", "gap_exact_match", "gap_token_f1")],
}
SMOKE_TESTED = tuple(EXPECTED)  # test_benchmark_logic.py checks that the two cover all


def _get(numbers: dict, path: str) -> float:
    head, _, rest = path.partition(".")
    if head not in numbers:  # names like "dirichlet-1.0" contain a dot
        for key in numbers:
            if path.startswith(key + "."):
                head, rest = key, path[len(key) + 1:]
    value = numbers[head]
    return _get(value, rest) if rest else value


def test_quick_suite_writes_every_smoke_tested_benchmark(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.benchmarks", "--quick", "--only",
         ",".join(SMOKE_TESTED), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=2400,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    report = (out / "RESULTS.md").read_text()
    for name, fields in EXPECTED.items():
        result = json.loads((out / "results" / f"{name}.json").read_text())
        assert result["status"] == "ok", result.get("error")
        assert f"## {name}" in report
        for field in fields:
            value = _get(result["numbers"], field)
            assert isinstance(value, (int, float)) and math.isfinite(value), (name, field)
        assert all(isinstance(t["met"], bool) for t in result["targets"])
        assert result["targets"], name  # each of these has targets
    # Bytes are measured, never zero; the baseline ships the full model.
    baseline = json.loads((out / "results" / "baseline-app.json").read_text())["numbers"]
    assert 0 < baseline["fedsft"]["bytes_per_round"] < baseline["baseline"]["bytes_per_round"]
    # The shared run recorded every round's peak memory, server and clients (what the
    # scale benchmark compares; its arithmetic: test_benchmark_logic.py).
    from server.results import read_results

    shared = Path(json.loads((out / "results" / "compute-fraction.json").read_text())[
        "config"]["run_dir"])
    rounds = [r for r in read_results(shared / "results.jsonl") if r.round >= 1]
    assert len(rounds) == 2
    assert all(r.memory_mb.server_peak > 0 and r.memory_mb.client_peak > 0 for r in rounds)
    # LoRA r=16 sends twice r=8's values; full fine-tuning sends far more.
    sft = json.loads((out / "results" / "sft.json").read_text())["numbers"]["bytes"]
    assert sft["lora-r16"]["exchanged_values"] == 2 * sft["lora-r8"]["exchanged_values"]
    assert sft["lora-r16"]["bytes_up_per_client"] < sft["full"]["bytes_up_per_client"]
    assert "Machine" in report and "cores: " in report
