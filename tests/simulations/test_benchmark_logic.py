"""The arithmetic of the benchmarks that only run fedsft, against a fake runner instead
of Flower.

``communication``, ``vs-centralized``, ``robustness``, ``dp-accuracy``,
``secure-aggregation`` and ``scale`` are loops over run-config variants of the fedsft app
and arithmetic on the rows. Their simulations prove nothing the e2e tests do not (secure
vs plaintext fedavg: tests/e2e/test_simulation.py; client sampling: its resume test;
the recorded peak memory: the smoke test's shared quick run), so the benchmark smoke
test leaves them out and
this module runs them in quick mode with ``Bench.runner`` replaced by ``FakeFedsft``:
it validates each run config as ``python -m simulations run`` does before Flower starts
(Flower's TOML round trip over the app's pyproject defaults, ``RunConfig.from_flower``,
``server.preflight``), then writes the run folder with the server's own writers, with
numbers this module chooses so that every gap, ratio and verdict is checked by hand.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from common.config import ConfigError, RunConfig
from common.data import load_server_eval
from server.preflight import preflight
from server.privacy import PrivacyReport, client_level_epsilon, sampled_per_round
from server.results import Bytes, Clients, Memory, ResultsRow, Seconds
from server.run_outputs import RunOutputs, run_folder
from simulations.benchmarks import (
    communication,
    dp_accuracy,
    dp_sgd,
    imbalance,
    robustness,
    scale,
    secure_aggregation,
    vs_centralized,
)
from simulations.benchmarks.harness import Bench
from simulations.runner import APP_DIR, SimulationResult

# The benchmarks this module checks; the smoke test runs the others for real.
LOGIC_TESTED = ("communication", "vs-centralized", "robustness", "dp-accuracy",
                "secure-aggregation", "imbalance", "scale", "dp-sgd")
APP_DEFAULTS = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))[
    "tool"]["flwr"]["app"]["config"]
WALL_SECONDS = 50.0  # what the fake says each `flwr run` took
ROUND_SECONDS = 2.0
TRAINABLE_VALUES = 10_000  # in the fake's checkpoint: sqrt = 100


@dataclass(frozen=True)
class Planned:
    """What one fake run records: central accuracy before / after, bytes and seconds per
    round."""

    initial_accuracy: float
    final_accuracy: float
    bytes_up: int = 1000
    bytes_down: int = 1000
    round_seconds: float = ROUND_SECONDS
    # Peak MiB (server, client) in round 1, and what each later round adds to both.
    memory_mb: tuple[float, float] = (400.0, 300.0)
    memory_growth_mb: float = 0.0
    sampled: int | None = None  # clients sampled per round; None: as the strategy samples


def central(accuracy: float, num_examples: int) -> dict[str, float]:
    """A classification central evaluation whose other metrics follow from accuracy."""
    return {"accuracy": accuracy, "f1_macro": accuracy - 0.1, "loss": 1.0 - accuracy,
            "num_examples": num_examples}


@dataclass(frozen=True)
class Validated:
    """One run config the fake accepted, as the app would build it."""

    run_name: str
    cfg: RunConfig
    num_supernodes: int


class FakeFedsft:
    """Stands in for ``run_app``: validate the config, then write a finished run folder."""

    def __init__(self, plan: Callable[[RunConfig], Planned]) -> None:
        self.plan = plan
        self.validated: list[Validated] = []
        self.eval_examples: set[int] = set()

    def __call__(self, run_config: Mapping[str, Any], *, num_supernodes: int,
                 num_cpus: float, app_dir: Path, timeout: float | None,
                 quiet: bool) -> SimulationResult:
        assert app_dir == APP_DIR and num_cpus == 1 and quiet
        # What the ServerApp receives: run_app's TOML file over the pyproject defaults.
        overrides = tomllib.loads(tomli_w.dumps(dict(run_config)))
        cfg = RunConfig.from_flower({**APP_DEFAULTS, **overrides})
        preflight(cfg, num_partitions=num_supernodes)
        self.validated.append(Validated(cfg.run_name, cfg, num_supernodes))

        planned = self.plan(cfg)
        label_names, eval_set = load_server_eval(cfg)
        assert eval_set is not None
        self.eval_examples.add(len(eval_set))
        outputs = RunOutputs(run_folder(cfg), keep_checkpoints=cfg.keep_checkpoints)
        outputs.start(cfg, label_names)
        sampled = planned.sampled or sampled_per_round(num_supernodes, cfg.fraction_train)
        privacy = (PrivacyReport(cfg, sampling_rate=sampled / num_supernodes)
                   if cfg.dp_noise_multiplier > 0 else None)
        rounds = cfg.num_server_rounds
        outputs.append_result(ResultsRow(
            round=0, central=central(planned.initial_accuracy, len(eval_set))))
        for r in range(1, rounds + 1):
            accuracy = planned.final_accuracy if r == rounds else planned.initial_accuracy + (
                planned.final_accuracy - planned.initial_accuracy) * r / rounds
            outputs.append_result(ResultsRow(
                round=r, central=central(accuracy, len(eval_set)),
                clients=Clients(sampled=sampled, replies=sampled, aggregated=sampled),
                bytes=Bytes(up=planned.bytes_up, down=planned.bytes_down,
                            up_total=planned.bytes_up * r, down_total=planned.bytes_down * r),
                seconds=Seconds(round=planned.round_seconds),
                memory_mb=Memory(
                    server_peak=planned.memory_mb[0] + planned.memory_growth_mb * (r - 1),
                    client_peak=planned.memory_mb[1] + planned.memory_growth_mb * (r - 1)),
                privacy=None if privacy is None else privacy.row(r)))
        outputs.save_checkpoint(rounds, {"lora": np.zeros(TRAINABLE_VALUES, np.float32)}, {})
        log = outputs.folder / "flwr.log"
        log.write_text("fake run: no Flower\n", encoding="utf-8")
        return SimulationResult(run_dir=outputs.folder, returncode=0, log_path=log,
                                seconds=WALL_SECONDS)


def quick_bench(tmp_path: Path, model_dir: Path, fake: FakeFedsft) -> Bench:
    return Bench(mode="quick", model=str(model_dir), runs_dir=tmp_path / "runs",
                 parallel_workers=1, runner=fake)


def one_eval_size(fake: FakeFedsft) -> int:
    (size,) = fake.eval_examples  # every run evaluates on the same held-out split
    assert size > 0
    return size


def test_every_benchmark_is_smoke_tested_or_logic_tested():
    from simulations.benchmarks.__main__ import BENCHMARKS
    from tests.simulations.test_benchmarks_smoke import SMOKE_TESTED

    assert sorted(SMOKE_TESTED + LOGIC_TESTED) == sorted(BENCHMARKS)


# --- communication ---------------------------------------------------------------------


@pytest.mark.parametrize("int8_accuracy, gap_points, met", [(0.797, -0.3, True),
                                                            (0.79, -1.0, False)])
def test_communication_compares_bytes_and_accuracy_with_lora_fp32(
        tmp_path, tiny_model_dir, int8_accuracy, gap_points, met):
    def plan(cfg: RunConfig) -> Planned:
        if cfg.method == "full":
            return Planned(0.6, 0.7, bytes_up=2_000_000, bytes_down=2_000_000)
        if cfg.update_encoding == "int8":
            return Planned(0.5, int8_accuracy, bytes_up=20_000, bytes_down=80_000)
        return Planned(0.5, 0.8, bytes_up=80_000, bytes_down=80_000)

    fake = FakeFedsft(plan)
    result = communication.run(quick_bench(tmp_path, tiny_model_dir, fake))

    # Every planned variant was validated, each once, on the quick sizes.
    assert [(v.cfg.method, v.cfg.update_encoding) for v in fake.validated] == [
        ("full", "fp32"), ("lora", "fp32"), ("lora", "int8")]
    assert [v.run_name for v in fake.validated] == [
        "communication-full-00", "communication-lora-fp32-01", "communication-lora-int8-02"]
    assert {(v.num_supernodes, v.cfg.num_server_rounds, v.cfg.local_steps)
            for v in fake.validated} == {(2, 2, 2)}
    assert fake.validated[0].cfg.learning_rate == 1e-4

    numbers = result["numbers"]
    assert list(numbers) == ["full", "lora-fp32", "lora-int8"]  # fp16 only outside quick
    int8 = numbers["lora-int8"]
    assert int8["bytes_up_per_round"] == 20_000 and int8["bytes_down_per_round"] == 80_000
    assert int8["bytes_up_per_client_round"] == 10_000  # 2 clients
    assert int8["bytes_per_round"] == 100_000
    assert int8["bytes_vs_full"] == pytest.approx(100_000 / 4_000_000)
    assert int8["accuracy_gap_vs_lora_fp32_points"] == pytest.approx(gap_points)
    assert int8["final_f1_macro"] == pytest.approx(int8_accuracy - 0.1)
    assert (int8["initial_accuracy"], int8["wall_seconds"]) == (0.5, WALL_SECONDS)
    assert int8["eval_examples"] == one_eval_size(fake)
    assert numbers["full"]["bytes_vs_full"] == 1.0
    assert numbers["lora-fp32"]["accuracy_gap_vs_lora_fp32_points"] == 0.0

    rows = result["table"]["rows"]
    assert len(rows) == 3
    assert rows[2] == ["lora-int8", 20_000, 80_000, 10_000, pytest.approx(0.025),
                       int8_accuracy, pytest.approx(gap_points), ROUND_SECONDS]
    (check,) = result["targets"]
    assert (check["measured"], check["limit"], check["kind"]) == (
        pytest.approx(abs(gap_points)), 0.5, "max")
    assert check["met"] is met


def test_a_variant_the_app_would_refuse_fails_before_any_run(
        tmp_path, tiny_model_dir, monkeypatch):
    variants = (*communication.VARIANTS[:3], ("lora-int8", {"update-encodng": "int8"}))
    monkeypatch.setattr(communication, "VARIANTS", variants)
    fake = FakeFedsft(lambda cfg: Planned(0.5, 0.8))
    with pytest.raises(ConfigError, match="update-encodng"):
        communication.run(quick_bench(tmp_path, tiny_model_dir, fake))
    monkeypatch.setattr(communication, "VARIANTS", (
        *communication.VARIANTS[:3], ("lora-int8", {"update-encoding": "int4"})))
    with pytest.raises(ConfigError, match="int4"):
        communication.run(quick_bench(tmp_path / "again", tiny_model_dir, fake))


# --- vs-centralized --------------------------------------------------------------------


def test_vs_centralized_gaps_are_centralized_minus_federated(
        tmp_path, tiny_model_dir, monkeypatch):
    calls = []

    def train_in_process(overrides: Mapping[str, Any], *, num_clients: int,
                         total_steps: int) -> dict[str, float]:
        # The real one builds its RunConfig so, and trains total_steps steps.
        cfg = RunConfig.from_flower({**overrides, "local-steps": total_steps})
        calls.append((cfg, num_clients))
        return {"examples_available": 500, "steps": total_steps,
                "examples_seen": total_steps * cfg.batch_size, "torch_threads": 1,
                "prepare_seconds": 1.0, "train_seconds": 2.0, "eval_seconds": 0.5,
                "total_seconds": 3.5, "accuracy": 0.8, "f1_macro": 0.78, "loss": 0.5}

    monkeypatch.setattr(vs_centralized, "train_in_process", train_in_process)
    fake = FakeFedsft(lambda cfg: Planned(0.5, 0.795 if cfg.partitioner == "iid" else 0.76))
    result = vs_centralized.run(quick_bench(tmp_path, tiny_model_dir, fake))

    # Centralized: the clients x rounds x steps budget (2 x 2 x 2) on the IID shares.
    ((cfg, clients),) = calls
    assert (clients, cfg.local_steps, cfg.partitioner, cfg.seed) == (2, 8, "iid", 0)
    assert [(v.cfg.partitioner, v.cfg.dirichlet_alpha, v.cfg.seed, v.num_supernodes)
            for v in fake.validated] == [("iid", 0.5, 0, 2), ("dirichlet", 0.1, 0, 2)]

    numbers = result["numbers"]
    assert numbers["examples_budget"] == 8 * 8  # steps x batch size 8
    # 2 rounds x 2 aggregated clients x 2 local steps x batch 8
    assert numbers["iid"]["examples_seen"] == numbers["dirichlet-0.1"]["examples_seen"] == 64
    assert numbers["iid"]["gap_points"] == pytest.approx(0.5)
    assert numbers["dirichlet-0.1"]["gap_points"] == pytest.approx(4.0)
    assert numbers["dirichlet-0.1"]["final_f1_macro"] == pytest.approx(0.66)
    assert numbers["iid"]["failed_clients"] == 0
    assert "dirichlet-1.0" not in numbers  # quick runs one alpha
    assert result["table"]["rows"] == [
        ["centralized (in-process)", 64, 0.8, 0.78, 0.0],
        ["federated, iid", 64, 0.795, pytest.approx(0.695), pytest.approx(0.5)],
        ["federated, dirichlet-0.1", 64, 0.76, pytest.approx(0.66), pytest.approx(4.0)]]
    assert [(t["limit"], t["met"]) for t in result["targets"]] == [(1.0, True), (3.5, False)]
    assert f"({one_eval_size(fake)} rows)" in result["notes"][1]


# --- robustness ------------------------------------------------------------------------


def test_robustness_drop_is_no_attack_minus_attacked_accuracy(tmp_path, tiny_model_dir):
    def plan(cfg: RunConfig) -> Planned:
        return Planned(0.5, 0.7 if cfg.attack == "none" else 0.685)

    fake = FakeFedsft(plan)
    result = robustness.run(quick_bench(tmp_path, tiny_model_dir, fake))

    assert [(v.cfg.strategy, v.cfg.attack, v.cfg.attack_fraction, v.cfg.attack_scale,
             v.cfg.num_malicious, v.num_supernodes) for v in fake.validated] == [
        ("fedmedian", "none", 0.0, 1.0, 0, 5), ("fedmedian", "sign-flip", 0.2, 4.0, 0, 5)]
    numbers = result["numbers"]
    assert list(numbers) == ["fedmedian"]
    attacked = numbers["fedmedian"]["sign-flip-20pct"]
    assert attacked["attackers"] == 1  # one of 5 clients attacks at 20 %
    assert attacked["aggregated_last_round"] == 5
    assert attacked["drop_points"] == pytest.approx(1.5)
    assert numbers["fedmedian"]["no-attack"]["drop_points"] == 0.0
    assert result["table"]["columns"] == [
        "strategy", "no-attack", "sign-flip-20%", "drop at 20% sign-flip (points)"]
    assert result["table"]["rows"] == [["fedmedian", 0.7, 0.685, pytest.approx(1.5)]]
    (check,) = result["targets"]
    assert check["what"].startswith("fedmedian: accuracy drop at 20% sign-flip")
    assert (check["measured"], check["limit"], check["met"]) == (
        pytest.approx(1.5), 2.0, True)


# --- dp-accuracy -----------------------------------------------------------------------


def test_dp_accuracy_reports_the_recorded_epsilon_and_the_drop(tmp_path, tiny_model_dir):
    fake = FakeFedsft(lambda cfg: Planned(0.5, 0.6 if cfg.dp_noise_multiplier else 0.65))
    result = dp_accuracy.run(quick_bench(tmp_path, tiny_model_dir, fake))

    no_dp, dp = fake.validated
    assert (no_dp.cfg.dp_noise_multiplier, no_dp.cfg.fraction_train, no_dp.num_supernodes) == (
        0.0, 0.5, 2)
    assert (dp.cfg.dp_clipping, dp.cfg.dp_side, dp.cfg.dp_delta, dp.cfg.dp_clipping_norm) == (
        "fixed", "server", 1e-5, 1.0)
    z = dp.cfg.dp_noise_multiplier  # bisected for q = 1 of 2 clients, 2 rounds
    assert result["config"]["noise multipliers"] == {"no-dp": 0.0, "eps-8": z} and z > 0

    numbers = result["numbers"]
    assert (numbers["sampling_rate"], numbers["sampled_per_round"]) == (0.5, 1)
    eps8 = numbers["eps-8"]
    # The noise multiplier is rounded up: the recorded epsilon is at most the target.
    assert eps8["epsilon"] == client_level_epsilon(noise_multiplier=z, sampling_rate=0.5,
                                                   rounds=2, delta=1e-5)
    assert 0.95 * 8 < eps8["epsilon"] <= 8 * 1.001
    assert (eps8["noise_multiplier"], eps8["target_epsilon"]) == (z, 8.0)
    assert eps8["accuracy_drop_points"] == pytest.approx(5.0)
    assert eps8["recorded_sampling_rate"] == 0.5 and eps8["sampled_per_round"] == 1
    assert numbers["no-dp"]["epsilon"] == math.inf
    assert numbers["no-dp"]["recorded_sampling_rate"] is None
    assert result["table"]["rows"] == [
        ["no-dp", "-", "-", "-", 0.5, 0.65, 0.0],
        ["eps-8", 8.0, z, eps8["epsilon"], 0.5, 0.6, pytest.approx(5.0)]]
    assert result["targets"] == []  # the issue sets no target: numbers only
    # Noise norm vs the largest mean update: z x sqrt(10 000 values) / 1 sampled client.
    assert f"is eps-8 {z * 100:.3g};" in result["notes"][1]
    assert f"With {TRAINABLE_VALUES:,} trainable values" in result["notes"][1]


# --- secure-aggregation ----------------------------------------------------------------


def test_secure_aggregation_compares_secure_with_plaintext_fedavg(tmp_path, tiny_model_dir):
    def plan(cfg: RunConfig) -> Planned:
        if cfg.secure_aggregation:  # 3 clients x 42 000 B: masked words + protocol
            return Planned(0.5, 0.79, bytes_up=126_000, bytes_down=30_000, round_seconds=3.0)
        return Planned(0.5, 0.8, bytes_up=120_300, bytes_down=120_300)  # 3 x (40 000 + 100)

    fake = FakeFedsft(plan)
    result = secure_aggregation.run(quick_bench(tmp_path, tiny_model_dir, fake))

    # Quick mode: one client count, the same workload with and without the protocol.
    assert [(v.run_name, v.cfg.secure_aggregation, v.num_supernodes) for v in fake.validated] == [
        ("secagg-plain-3-00", False, 3), ("secagg-secure-3-01", True, 3)]
    assert {(v.cfg.num_server_rounds, v.cfg.local_steps, v.cfg.fraction_train,
             v.cfg.fraction_evaluate, v.cfg.min_nodes) for v in fake.validated} == {
        (2, 2, 1.0, 0.0, 3)}

    (key,) = result["numbers"]
    assert key == "clients-3"
    n = result["numbers"]["clients-3"]
    plain, secure, ratios = n["plaintext"], n["secure"], n["ratios"]
    assert n["trainable_values"] == TRAINABLE_VALUES
    assert n["int32_uplink_bytes_per_round"] == TRAINABLE_VALUES * 4 * 3
    assert n["trainable_values_from_fp32_bytes"] == pytest.approx(40_100 / 4)
    assert plain["bytes_up_per_client_round"] == pytest.approx(40_100)
    assert secure["bytes_up_per_client_round"] == pytest.approx(42_000)
    assert secure["bytes_down_per_round"] == 30_000
    assert (plain["mean_round_seconds_after_first"], secure["mean_round_seconds_after_first"],
            secure["first_round_seconds"]) == (ROUND_SECONDS, 3.0, 3.0)
    assert (secure["aggregated_min"], secure["skipped_rounds"]) == (3, 0)
    assert (secure["final_accuracy"], secure["initial_accuracy"]) == (0.79, 0.5)
    assert secure["eval_examples"] == one_eval_size(fake)
    assert ratios["round_seconds"] == pytest.approx(1.5)
    assert ratios["bytes_up_vs_int32"] == pytest.approx(126_000 / 120_000)
    assert ratios["bytes_up_vs_plaintext_fp32"] == pytest.approx(126_000 / 120_300)
    assert ratios["accuracy_difference_points"] == pytest.approx(-1.0)

    assert result["table"]["rows"] == [[
        3, ROUND_SECONDS, 3.0, pytest.approx(1.5), 40_100, 42_000, TRAINABLE_VALUES * 4,
        pytest.approx(1.05), 0.8, 0.79, pytest.approx(-1.0)]]
    assert [(t["limit"], t["kind"], t["met"]) for t in result["targets"]] == [
        (2.0, "max", True), (1.1, "max", True)]
    assert [t["measured"] for t in result["targets"]] == [pytest.approx(1.5),
                                                         pytest.approx(1.05)]
    assert f"{TRAINABLE_VALUES:,} values per client" in result["notes"][0]
    assert "Quick mode uses a tiny random BERT" in result["notes"][-1]


# --- scale -----------------------------------------------------------------------------


def test_scale_compares_many_idle_clients_with_a_small_federation(tmp_path, tiny_model_dir):
    def plan(cfg: RunConfig) -> Planned:
        if cfg.min_nodes == 100:  # 10 MiB more per round; rounds 30 % slower
            return Planned(0.5, 0.6, round_seconds=2.6, memory_mb=(420.0, 300.0),
                           memory_growth_mb=10.0)
        return Planned(0.5, 0.6)

    fake = FakeFedsft(plan)
    result = scale.run(quick_bench(tmp_path, tiny_model_dir, fake))

    # The small federation is the shared quick run; the big one samples 2 of 100.
    assert [(v.run_name, v.num_supernodes, v.cfg.min_nodes, v.cfg.fraction_train,
             v.cfg.fraction_evaluate) for v in fake.validated] == [
        ("scale-small-00", 2, 2, 1.0, 1.0), ("scale-many-01", 100, 100, 0.02, 0.02)]
    assert {v.cfg.num_server_rounds for v in fake.validated} == {2}
    small_cfg = {**quick_bench(tmp_path, tiny_model_dir, fake).base(),
                 "fraction-evaluate": 1.0}
    assert result["config"]["small run-config"] == small_cfg  # shared with the others

    numbers = result["numbers"]
    small, many, ratios = numbers["small"], numbers["many"], numbers["ratios"]
    assert (small["server_peak_mb_first_round"], small["server_peak_mb_last_round"]) == (
        400.0, 400.0)
    assert (many["server_peak_mb_first_round"], many["server_peak_mb_last_round"]) == (
        420.0, 430.0)
    assert (many["client_peak_mb_last_round"], many["client_peak_mb_max"]) == (310.0, 310.0)
    assert many["clients_sampled_per_round"] == small["clients_sampled_per_round"] == 2
    assert (many["mean_round_seconds_after_first"], many["wall_seconds"]) == (
        2.6, WALL_SECONDS)
    assert ratios == pytest.approx({
        "server_peak": 430 / 400, "client_peak": 310 / 300, "round_seconds": 1.3,
        "server_growth_many": 430 / 420, "client_growth_many": 310 / 300})
    assert result["table"]["rows"] == [
        ["2 clients in total", 400.0, 400.0, 300.0, 300.0, ROUND_SECONDS, ROUND_SECONDS,
         WALL_SECONDS],
        ["100 clients, 2 sampled", 420.0, 430.0, 300.0, 310.0, 2.6, 2.6, WALL_SECONDS]]
    assert [(t["limit"], t["met"]) for t in result["targets"]] == [
        (1.1, True), (1.1, True), (1.25, False), (1.1, True), (1.1, True)]


def test_scale_refuses_a_federation_that_sampled_another_number(tmp_path, tiny_model_dir):
    fake = FakeFedsft(lambda cfg: Planned(0.5, 0.6, sampled=3 if cfg.min_nodes == 100
                                          else None))
    with pytest.raises(RuntimeError, match=r"sampled 3.0 of 100 clients per round, "
                                           r"expected 2.0"):
        scale.run(quick_bench(tmp_path, tiny_model_dir, fake))


# --- imbalance (in process: its training is replaced, not a runner) ----------------------


def test_an_imbalanced_site_has_the_minority_share_and_is_seeded():
    import pandas as pd

    frame = pd.DataFrame({"text": [f"t{i}" for i in range(100)], "label": [0, 1] * 50})
    site = imbalance.imbalanced_site(frame, rows=20, minority=1, share=0.1, seed=3)
    again = imbalance.imbalanced_site(frame, rows=20, minority=1, share=0.1, seed=3)

    assert len(site) == 20 and (site["label"] == 1).sum() == 2
    assert site["text"].is_unique and site.equals(again)
    with pytest.raises(ValueError, match="needs 60 rows of class 1 .* has 50"):
        imbalance.imbalanced_site(frame, rows=80, minority=1, share=0.75, seed=0)


def test_imbalance_reports_the_means_per_seed_and_the_convergence_check(tmp_path,
                                                                         monkeypatch):
    macro_f1 = {"none": 0.5, "inverse-frequency": 0.7, "effective-number": 0.65}
    calls: list = []

    def fake(overrides, frame, splits, *, seed):  # numbers chosen to check by hand
        calls.append((dict(overrides), len(frame), seed))
        if overrides.get("focal-gamma"):
            f1 = 0.6
        elif "augment" in overrides:
            f1 = 0.58 if overrides["augment"] == "both" else 0.55
        else:
            f1 = macro_f1[overrides["class-weighting"]]
        half = overrides["local-steps"] < 4
        f1 += 0.01 * seed - (0.02 if half else 0.0)
        return {"f1_macro": f1, "recall_min": f1 - 0.2, "accuracy": f1 + 0.1,
                "train_seconds": 1.0}

    monkeypatch.setattr(imbalance, "_train_and_evaluate", fake)
    monkeypatch.setitem(imbalance.SIZES, "quick", imbalance.Size(
        site_rows=100, small_rows=30, steps=4, seeds=(0, 1)))
    bench = Bench(mode="quick", model="minilm", runs_dir=tmp_path, parallel_workers=1)
    result = imbalance.run(bench)

    numbers = result["numbers"]
    none = numbers["imbalance: class-weighting none"]
    assert none["f1_macro"]["per_seed"] == pytest.approx([0.5, 0.51])
    assert none["f1_macro"]["mean"] == pytest.approx(0.505)
    assert none["recall_min"]["mean"] == pytest.approx(0.305)
    assert numbers["small data: augment both"]["accuracy"]["mean"] == pytest.approx(0.685)
    # 6 settings x 2 seeds, then 2 settings at half the steps on seed 0.
    assert len(calls) == 14 and [c[1] for c in calls[:8]] == [100] * 8
    assert [c[1] for c in calls[8:12]] == [30] * 4
    assert [(c[0]["local-steps"], c[2]) for c in calls[12:]] == [(2, 0), (2, 0)]
    check = numbers["convergence_check"]["class-weighting inverse-frequency"]
    assert check["half"]["f1_macro"] == pytest.approx(0.68) and check["full"]["f1_macro"] \
        == pytest.approx(0.7)
    notes = " ".join(result["notes"])
    assert "class-weighting inverse-frequency (0.7050 vs 0.5050 unweighted" in notes
    assert "by +0.0300" in notes and "at most 0.0200 macro-F1" in notes
    assert result["targets"] == []
    rows = result["table"]["rows"]
    assert len(rows) == 8 and rows[0][5] == "0.500 / 0.510"
    assert rows[-1][1] == "class-weighting inverse-frequency, seed 0, 2 steps (vs 4)"


# --- dp-sgd (sample-level DP-SGD at each site) -------------------------------------------

# What each fake DP-SGD site reports, per target epsilon: the noise multiplier it chose and
# the epsilon it spent after the last round (chosen by hand, not by the accountant).
DP_SGD_SITES = {8.0: (0.61, 7.98), 1.0: (1.9, 0.99)}


class FakeDpSgdFedsft(FakeFedsft):
    """``FakeFedsft`` whose DP-SGD runs also record each site's ``dp_sgd`` (site ``site-i``,
    epsilon spent growing linearly to its last round, the noise multiplier it chose), and
    which writes ``outcome.json`` exporting round ``exported_round``."""

    def __init__(self, plan: Callable[[RunConfig], Planned], *, exported_round: int,
                 site_epsilon: Callable[[RunConfig, int], float] | None = None) -> None:
        super().__init__(plan)
        self.exported_round = exported_round
        self.site_epsilon = site_epsilon

    def __call__(self, run_config: Mapping[str, Any], **kwargs: Any) -> SimulationResult:
        from server.results import DpSgd, read_results
        from server.run_outputs import outcome_of, write_outcome

        result = super().__call__(run_config, **kwargs)
        cfg = self.validated[-1].cfg
        path = result.run_dir / "results.jsonl"
        rows = read_results(path)
        if cfg.dp_sgd_enabled:
            z, last = DP_SGD_SITES[cfg.dp_sgd_target_epsilon]
            rounds = cfg.num_server_rounds

            def sites(r: int) -> dict[str, dict[str, float]]:
                return {f"site-{i}": {"epsilon": (self.site_epsilon(cfg, i) if
                                                  self.site_epsilon else last) * r / rounds,
                                      "noise_multiplier": z}
                        for i in range(kwargs["num_supernodes"])}

            rows = [row if row.round == 0 else replace(row, dp_sgd=DpSgd(
                epsilon_max=max(s["epsilon"] for s in sites(row.round).values()),
                delta=cfg.dp_sgd_delta, sites=sites(row.round))) for row in rows]
            path.write_text("".join(row.to_line() for row in rows), encoding="utf-8")
        write_outcome(result.run_dir, outcome_of(
            rows, status="completed", message="fake", final_model=True,
            selection={"rule": "best", "round": self.exported_round, "split": "central"}))
        return result


def test_dp_sgd_reports_each_sites_spend_the_drop_and_the_targets(tmp_path, tiny_model_dir):
    # no DP ends at 0.80, epsilon 8 at 0.76 (4 points: met); the exported round is 1,
    # whose accuracy the fake interpolates: 0.5 + (final - 0.5) / 2.
    fake = FakeDpSgdFedsft(lambda cfg: Planned(0.5, 0.76 if cfg.dp_sgd_enabled else 0.80),
                           exported_round=1)
    result = dp_sgd.run(quick_bench(tmp_path, tiny_model_dir, fake))

    no_dp, eps8 = fake.validated  # quick mode: no DP and epsilon 8 only
    assert [v.run_name for v in fake.validated] == ["dp-sgd-no-dp-00", "dp-sgd-eps-8-01"]
    assert {(v.num_supernodes, v.cfg.min_nodes, v.cfg.fraction_train, v.cfg.seed,
             v.cfg.method, v.cfg.num_server_rounds) for v in fake.validated} == {
        (5, 5, 1.0, 0, "lora", 2)}
    assert not no_dp.cfg.dp_sgd_enabled
    # Only the budget: each site calibrates its noise multiplier.
    assert (eps8.cfg.dp_sgd_target_epsilon, eps8.cfg.dp_sgd_delta,
            eps8.cfg.dp_sgd_noise_multiplier) == (8.0, 1e-5, 0.0)
    assert eps8.cfg.dp_noise_multiplier == 0.0  # no client-level DP

    numbers = result["numbers"]
    s8 = numbers["eps-8"]
    assert s8["site_epsilon"] == {f"site-{i}": 7.98 for i in range(5)}
    assert s8["site_noise_multiplier"] == {f"site-{i}": 0.61 for i in range(5)}
    assert (s8["epsilon_max"], s8["within_budget"], s8["rounds_done"]) == (7.98, True, 2)
    assert s8["drop_points"] == pytest.approx(4.0)
    assert (s8["exported_round"], s8["exported_accuracy"]) == (1, pytest.approx(0.63))
    assert s8["exported_drop_points"] == pytest.approx(2.0)  # 0.65 - 0.63
    assert (numbers["no-dp"]["site_epsilon"], numbers["no-dp"]["within_budget"]) == ({}, None)
    assert numbers["no-dp"]["drop_points"] == 0.0
    assert result["table"]["rows"] == [
        ["no-dp", "-", "-", "-", 0.80, "0.6500 (round 1)", 0.0, 0.0, "-"],
        ["eps-8", 8.0, "0.61", "7.98", 0.76, "0.6300 (round 1)", pytest.approx(4.0),
         pytest.approx(2.0), True]]
    assert [(t["what"], t["measured"], t["limit"], t["met"]) for t in result["targets"]] == [
        ("epsilon 8: final accuracy drop vs no DP", pytest.approx(4.0), 5.0, True),
        ("eps-8: largest site epsilon spent (every site within its budget)", 7.98, 8.0,
         True)]
    assert "on the central split (the same rows" in result["notes"][1]
    assert result["config"]["set because DP-SGD refuses the default"].startswith("nothing")


def test_dp_sgd_flags_a_drop_over_5_points_and_a_site_over_its_budget(
        tmp_path, tiny_model_dir):
    # Default mode's variants (no DP, epsilon 8, epsilon 1; epsilon 3 left out) on quick
    # runs, summarized and compared as run() does. site-3 overspends epsilon 1 (1.2);
    # every other site keeps to its budget.
    fake = FakeDpSgdFedsft(
        lambda cfg: Planned(0.5, {8.0: 0.74, 1.0: 0.6}.get(cfg.dp_sgd_target_epsilon, 0.8)),
        exported_round=2,
        site_epsilon=lambda cfg, i: 1.2 if cfg.dp_sgd_target_epsilon == 1 and i == 3
        else DP_SGD_SITES[cfg.dp_sgd_target_epsilon][1])
    numbers = {}
    for name, eps in (("no-dp", None), ("eps-8", 8.0), ("eps-1", 1.0)):
        overrides = {**quick_bench(tmp_path, tiny_model_dir, fake).base(), "min-nodes": 5,
                     "num-server-rounds": 2}
        if eps is not None:
            overrides["dp-sgd-target-epsilon"] = eps
        bench = quick_bench(tmp_path / name, tiny_model_dir, fake)
        numbers[name] = dp_sgd.summarize(bench.fedsft(name, overrides, num_supernodes=5),
                                         target_epsilon=eps, sites=5)
    dp_sgd.compare(numbers)

    assert numbers["eps-8"]["drop_points"] == pytest.approx(6.0)
    assert numbers["eps-1"]["drop_points"] == pytest.approx(20.0)
    assert numbers["eps-1"]["site_epsilon"]["site-3"] == pytest.approx(1.2)
    assert (numbers["eps-1"]["epsilon_max"], numbers["eps-1"]["within_budget"]) == (
        pytest.approx(1.2), False)
    assert [(t["measured"], t["limit"], t["met"]) for t in dp_sgd.targets(numbers)] == [
        (pytest.approx(6.0), 5.0, False), (7.98, 8.0, True), (pytest.approx(1.2), 1.0, False)]


def test_dp_sgd_refuses_a_dp_run_where_a_site_reported_no_epsilon(tmp_path, tiny_model_dir):
    fake = FakeDpSgdFedsft(lambda cfg: Planned(0.5, 0.7), exported_round=2)
    bench = quick_bench(tmp_path, tiny_model_dir, fake)
    run = bench.fedsft("eps-8", {**bench.base(), "dp-sgd-target-epsilon": 8.0},
                       num_supernodes=2)  # 2 sites reported, 5 planned
    with pytest.raises(RuntimeError, match="2 of 5 sites reported a DP-SGD epsilon"):
        dp_sgd.summarize(run, target_epsilon=8.0, sites=5)


def test_dp_sgd_sets_only_what_dp_sgd_refuses_and_says_why():
    defaults = {"skew-loss": "logit-adjusted", "class-weighting": "none",
                "strategy": "fedprox", "gradient-checkpointing": False}
    needs = dp_sgd.dp_sgd_needs(defaults)
    assert {key: value for key, (value, _) in needs.items()} == {
        "skew-loss": "none", "strategy": "fedavg"}
    assert "outside the privacy accounting" in needs["skew-loss"][1]
    assert dp_sgd.dp_sgd_needs({"skew-loss": "none", "strategy": "fedavg"}) == {}
    # Every value it sets is one DP-SGD accepts: the app's config validation agrees.
    RunConfig.from_flower({**APP_DEFAULTS, **{k: v for k, (v, _) in needs.items()},
                           "dp-sgd-target-epsilon": 8.0})
    with pytest.raises(ConfigError, match="skew-loss"):
        RunConfig.from_flower({**APP_DEFAULTS, "skew-loss": "logit-adjusted",
                               "dp-sgd-target-epsilon": 8.0})


def test_dp_sgd_sample_keeps_the_header_and_chosen_lines_verbatim(tmp_path):
    source = tmp_path / "train.tsv"
    lines = [f'a "quote {i}\t{i % 2}\n' for i in range(10)]
    source.write_text("sentence\tlabel\n" + "".join(lines), encoding="utf-8")
    first = dp_sgd.sample_tsv(source, tmp_path / "a" / "s.tsv", rows=4, seed=0)
    again = dp_sgd.sample_tsv(source, tmp_path / "b" / "s.tsv", rows=4, seed=0)
    header, *kept = first.read_text(encoding="utf-8").splitlines(keepends=True)

    assert header == "sentence\tlabel\n" and len(kept) == 4
    assert kept == [line for line in lines if line in kept]  # source lines, source order
    assert len(set(kept)) == 4 and first.read_text() == again.read_text()
    assert dp_sgd.sample_tsv(source, tmp_path / "c.tsv", rows=4, seed=1).read_text() != \
        first.read_text()
    with pytest.raises(RuntimeError, match="has 10 data rows; the sample needs 11"):
        dp_sgd.sample_tsv(source, tmp_path / "d.tsv", rows=11, seed=0)
