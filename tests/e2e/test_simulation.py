"""End to end through Flower's Simulation Engine (`flwr run` on a private SuperLink).

The tiny randomly initialised BERT keeps most of these fast; one test fine-tunes the
real packaged MiniLM on a sample of SST-2 and must beat chance clearly.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from simulations.runner import ATTEMPT_PREFIX, run_app

pytestmark = pytest.mark.e2e

SST2 = Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2"

TINY = {
    "dataset": "builtin",
    "builtin-examples": 400,
    "max-length": 32,
    "batch-size": 8,
    "local-steps": 4,
    "learning-rate": 0.005,
    "fraction-evaluate": 1.0,
    "node-wait-timeout": 60.0,
    "round-timeout": 300.0,
}


def _run(tmp_path: Path, model_dir: Path, name: str, nodes: int = 3, **overrides):
    run_config = {**TINY, "model": str(model_dir), "output-dir": str(tmp_path),
                  "run-name": name, **overrides}
    return run_app(run_config, num_supernodes=nodes, timeout=600, quiet=True)


def _results(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _final_checkpoint(run_dir: Path) -> dict[str, np.ndarray]:
    last = sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]
    return load_file(str(last))


# One run that four tests read (each Flower start-up costs ~45 s): the egress audit,
# class weights from the federation's counts with focal loss and augmentation, and
# FFA-LoRA compose, and each test asserts its own part of the run; it is also the
# plaintext reference of the secure-aggregation run.
SHARED_NODES = 3
SHARED = {"num-server-rounds": 2, "audit-egress": True,
          "class-weighting": "inverse-frequency", "class-weighting-source": "global",
          "focal-gamma": 1.0, "augment": "both", "lora-aggregation": "ffa"}


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_model_dir):
    result = _run(tmp_path_factory.mktemp("shared"), tiny_model_dir, "shared",
                  nodes=SHARED_NODES, **SHARED)
    log = result.log_path.read_text()
    assert result.returncode == 0, log[-3000:]
    return result, log


def test_tiny_bert_three_clients_two_rounds(shared_run, tiny_model_dir):
    result, log = shared_run
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert set(row["central"]) >= {"accuracy", "f1_macro", "loss"}
        assert 0.0 <= row["central"]["accuracy"] <= 1.0
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == 3 and row["clients"]["failures"] == 0
        assert row["bytes"]["up"] > 0 and row["bytes"]["down"] > row["bytes"]["up"] / 3
        assert row["federated"]["eval_accuracy"] >= 0.0
        assert row["train"]["train_loss"] > 0
        # Every train reply passed the egress audit (only tensors + scalar metrics left).
        assert row["train"]["egress_audited"] == 1
    assert "[fedsft] round 2/2" in log
    # Each partition shared its data statistics once (round 1), through the reply path a
    # deployment uses; every round records each site's training cost (no GPU on CPU).
    from server.results import read_results

    typed = read_results(result.run_dir / "results.jsonl")
    assert [len(r.site_data) for r in typed] == [0, 3, 0]
    assert all(sum(d.label_counts) == d.rows > 0 for d in typed[1].site_data.values())
    for row in typed[1:]:
        assert len(row.site_compute) == 3
        for cost in row.site_compute.values():
            assert cost.examples and cost.tokens and cost.tokens >= cost.examples
            assert cost.train_seconds > 0 and cost.gpu_peak_mb is None
    from simulations.report import write_report

    html = write_report(result.run_dir).read_text()
    assert "<h2>Sites</h2>" in html and "<td>not shared</td>" not in html
    assert (result.run_dir / "report" / "site_labels.png").exists()

    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["model"] == str(tiny_model_dir) and config["num-server-rounds"] == 2
    assert {k: config[k] for k in SHARED} == SHARED
    labels = json.loads((result.run_dir / "label_map.json").read_text())
    assert labels == {"0": "negative", "1": "neutral", "2": "positive"}

    # The final model: an adapter peft loads and a merged standalone model.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(result.run_dir / "final/model")
    assert merged.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    adapted = PeftModel.from_pretrained(base, result.run_dir / "final/adapter")
    assert any("lora_A" in name for name, _ in adapted.named_parameters())
    # Only the trainable tensors crossed the wire: the checkpointed state is LoRA + head.
    state = _final_checkpoint(result.run_dir)
    assert all("lora_" in k or "classifier" in k for k in state)


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(
    tmp_path, tiny_model_dir
):
    # fraction-train < 1 also checks that client sampling is reproducible. The sampler
    # draws from the connected nodes: min-nodes = all 3, or a resumed run's first round
    # may start (and sample) before the third node connects on a loaded machine.
    common = {"fraction-train": 0.67, "fraction-evaluate": 0.0, "strategy": "fedadam",
              "server-learning-rate": 0.01, "min-nodes": 3, "num-server-rounds": 3}
    full = _run(tmp_path, tiny_model_dir, "full", nodes=3, **common)
    assert full.returncode == 0, full.log_path.read_text()[-3000:]
    # The interrupted run is a copy of the uninterrupted one as a stop during round 3
    # leaves it (one Flower start-up fewer than running two rounds apart): results
    # lines 0-2, round 2's checkpoint, no round-3 checkpoint, no final model or outcome.
    # (Resuming a finished run with more rounds: tests/e2e/test_sft.py.)
    cut = tmp_path / "cut"
    shutil.copytree(full.run_dir, cut)
    lines = (cut / "results.jsonl").read_text().splitlines(keepends=True)
    (cut / "results.jsonl").write_text("".join(lines[:3]))
    (cut / "checkpoints" / "round-0003.safetensors").unlink()
    assert (cut / "checkpoints" / "round-0002.safetensors").is_file()
    shutil.rmtree(cut / "final")
    (cut / "outcome.json").unlink()
    resumed = _run(tmp_path, tiny_model_dir, "cut", nodes=3, **common,
                   **{"resume-from": str(cut)})
    log = resumed.log_path.read_text()
    assert resumed.returncode == 0, log[-3000:]
    assert f"[fedsft] resuming {cut} after round 2" in log.rpartition(ATTEMPT_PREFIX)[2]

    assert [r["round"] for r in _results(cut)] == [0, 1, 2, 3]
    for row in _results(full.run_dir)[1:] + _results(cut)[1:]:
        assert row["clients"]["aggregated"] == row["clients"]["sampled"] == 2, row["clients"]
    a, b = _final_checkpoint(full.run_dir), _final_checkpoint(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    # Identical accuracy trajectory too (same sampling, same seeds per round and client).
    assert [r["central"] for r in _results(full.run_dir)] == [
        r["central"] for r in _results(cut)]
    assert (cut / "final" / "model" / "config.json").is_file()


def test_missing_nodes_stop_the_run_with_a_clear_error(tmp_path, tiny_model_dir):
    result = _run(tmp_path, tiny_model_dir, "wait", nodes=2,
                  **{"min-nodes": 5, "node-wait-timeout": 3.0, "num-server-rounds": 1})
    log = result.log_path.read_text()
    assert "only 2 node(s) connected after waiting 3 s" in log
    assert not (result.run_dir / "final").exists()


@pytest.mark.skipif(not SST2.exists(), reason="needs ../shared/data/sst2")
def test_minilm_on_sst2_sample_beats_chance(tmp_path):
    import pandas as pd

    # Two rounds of 30 local steps (the same number of local steps as three of 20, one
    # central evaluation fewer; FedAvg averages at other points, so not the same
    # training), evaluated on half of the dev set (a central evaluation of MiniLM costs
    # as much as a round's training): 436 rows still measure accuracy to ~0.02.
    train = pd.read_csv(SST2 / "train.tsv", sep="\t", quoting=3).sample(2400, random_state=0)
    train.to_csv(tmp_path / "train.tsv", sep="\t", index=False)
    dev = pd.read_csv(SST2 / "dev.tsv", sep="\t", quoting=3).sample(436, random_state=0)
    dev.to_csv(tmp_path / "dev.tsv", sep="\t", index=False)
    result = run_app({
        "model": "minilm", "dataset": str(tmp_path / "train.tsv"),
        "eval-dataset": str(tmp_path / "dev.tsv"), "text-column": "sentence",
        "num-server-rounds": 2, "local-steps": 30, "batch-size": 16, "max-length": 64,
        "learning-rate": 0.003, "fraction-evaluate": 0.0,
        "output-dir": str(tmp_path), "run-name": "sst2",
    }, num_supernodes=4, timeout=900, quiet=True)
    assert result.returncode == 0, result.log_path.read_text()[-3000:]
    rows = _results(result.run_dir)
    assert rows[0]["central"]["num_examples"] == 436
    assert rows[-1]["central"]["accuracy"] >= 0.70, [r["central"] for r in rows]
    assert rows[-1]["central"]["accuracy"] > rows[0]["central"]["accuracy"] + 0.1


def test_dp_run_reports_epsilon_and_stops_at_the_budget(tmp_path, tiny_model_dir):
    # z = 1, all 3 clients sampled: epsilon is ~4.8 after one round and ~7.0 after two.
    result = _run(tmp_path, tiny_model_dir, "dp", **{
        "num-server-rounds": 3, "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.5,
        "dp-target-epsilon": 6.0, "fraction-evaluate": 0.0})
    log = result.log_path.read_text()
    assert result.returncode == 0, log[-3000:]
    assert "stopping after round 1" in log
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert 0 < rows[1]["privacy"]["epsilon"] <= 6.0
    assert rows[1]["privacy"]["sampling_rate"] == 1.0
    assert rows[1]["clients"]["aggregated"] == 3
    assert (result.run_dir / "final" / "model" / "config.json").exists()


# One DP-SGD run that two tests read (one Flower start-up fewer): each site calibrates
# its noise to the target epsilon once and its accountant carries across the rounds.
DP_SGD_NODES = 2
DP_SGD_TARGET = 3.0


@pytest.fixture(scope="module")
def dp_sgd_run(tmp_path_factory, tiny_model_dir):
    result = _run(tmp_path_factory.mktemp("dpsgd"), tiny_model_dir, "dpsgd",
                  nodes=DP_SGD_NODES, **{
                      "num-server-rounds": 2, "dp-sgd-target-epsilon": DP_SGD_TARGET,
                      "fraction-evaluate": 0.0, "audit-egress": True})
    log = result.log_path.read_text()
    assert result.returncode == 0, log[-3000:]
    return result, log


def test_dp_sgd_clients_account_across_rounds_and_the_card_says_so(dp_sgd_run, tmp_path):
    from deployment.export import export_run

    result, _ = dp_sgd_run
    rows = _results(result.run_dir)
    first, second = rows[1]["dp_sgd"]["epsilon_max"], rows[2]["dp_sgd"]["epsilon_max"]
    # The node state carries each client's accountant from round 1 into round 2.
    assert 0 < first < second
    assert rows[2]["train"]["dp_sgd_steps"] == pytest.approx(2 * TINY["local-steps"])
    # Every train reply passed the egress audit (the DP-SGD metrics are allowed scalars).
    assert all(row["train"]["egress_audited"] == 1 for row in rows[1:])
    exported = export_run(result.run_dir, tmp_path / "export")
    card = (exported / "README.md").read_text()
    assert ("sample-level DP-SGD (any one training record, at every site): "
            f"epsilon = {second:.4g}") in card


def test_ffa_lora_sends_only_b_and_the_head(shared_run, tiny_model_dir):
    from flwr.app import Array

    from common.config import RunConfig
    from common.model import build_model, get_exchanged_state
    from common.specs import ModelSpec

    result, _ = shared_run  # lora-aggregation = ffa
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    labels = list(json.loads((result.run_dir / "label_map.json").read_text()).values())

    def reply_bytes(**changes: object) -> int:
        """What one train reply of this run's model carries on the wire."""
        cfg = RunConfig(model=str(tiny_model_dir), **changes)  # type: ignore[arg-type]
        model, _ = build_model(ModelSpec.of(cfg, labels))
        return sum(len(Array(a).data) for a in get_exchanged_state(model).values())

    ffa, fedavg = reply_bytes(lora_aggregation="ffa"), reply_bytes()
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == SHARED_NODES and row["clients"]["failures"] == 0
        assert row["bytes"]["up"] == SHARED_NODES * ffa < SHARED_NODES * fedavg
    state = _final_checkpoint(result.run_dir)
    assert state and not any("lora_A" in k for k in state)
    assert any("lora_B" in k for k in state)
    # The exported adapter holds A at the seeded init every process built, never sent.
    adapter = load_file(str(result.run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    fresh, _ = build_model(
        ModelSpec.of(RunConfig(model=str(tiny_model_dir), lora_aggregation="ffa"), labels))
    init = {k: p.detach().numpy() for k, p in fresh.named_parameters() if ".lora_A." in k}
    exported = {k: v for k, v in adapter.items() if ".lora_A." in k}
    assert len(exported) == len(init) > 0
    for key, value in exported.items():  # peft drops the adapter name when saving
        np.testing.assert_array_equal(value, init[key.replace(".weight", ".default.weight")])


def test_dp_sgd_target_epsilon_calibrates_each_site_within_its_budget(dp_sgd_run,
                                                                       tmp_path):
    from deployment.export import export_run

    result, log = dp_sgd_run  # dp-sgd-target-epsilon = 3, two sites
    assert log.count("[fedsft] DP-SGD: noise multiplier") == DP_SGD_NODES  # each site, once
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == DP_SGD_NODES and row["clients"]["failures"] == 0
        sites = row["dp_sgd"]["sites"]
        assert len(sites) == DP_SGD_NODES
        assert all(0 < site["epsilon"] <= DP_SGD_TARGET for site in sites.values())
        assert all(site["noise_multiplier"] > 0 for site in sites.values())
    # After the last planned round each site has spent nearly all of its budget.
    assert all(site["epsilon"] > DP_SGD_TARGET - 0.05
               for site in rows[2]["dp_sgd"]["sites"].values())
    card = (export_run(result.run_dir, tmp_path / "export") / "README.md").read_text()
    assert "`dp-sgd-noise-multiplier` = calibrated per site" in card
    assert card.count("  - site `") == DP_SGD_NODES


def test_class_weights_from_federation_counts_and_augmentation_complete(shared_run):
    result, log = shared_run  # class weights (global counts), focal loss, augmentation
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:  # per-class recall next to the headline metrics
        assert {"accuracy", "f1_macro", "recall_min", "recall_0"} <= set(row["central"])
        assert row["central"]["recall_min"] <= row["central"]["recall_0"]
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == SHARED_NODES and row["clients"]["failures"] == 0
        # Every site reported their label counts (the round's metrics hold their mean).
        assert row["train"]["label_count_0"] > 0
    assert "[fedsft] round 2/2" in log


def test_fedsa_lora_shares_a_and_evaluates_each_sites_own_model(tmp_path, tiny_model_dir):
    from flwr.app import Array

    from common.config import RunConfig
    from common.model import build_model, get_exchanged_state, get_site_state
    from common.specs import ModelSpec

    nodes = 3
    result = _run(tmp_path, tiny_model_dir, "fedsa", nodes=nodes, **{
        "num-server-rounds": 2, "lora-aggregation": "fedsa", "audit-egress": True})
    assert result.returncode == 0, result.log_path.read_text()[-3000:]
    rows = _results(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    labels = list(json.loads((result.run_dir / "label_map.json").read_text()).values())
    model, _ = build_model(ModelSpec.of(
        RunConfig(model=str(tiny_model_dir), lora_aggregation="fedsa"), labels))
    shared = sum(len(Array(a).data) for a in get_exchanged_state(model).values())
    kept = sum(len(Array(a).data) for a in get_site_state(model).values())
    assert kept > 0
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == nodes and row["clients"]["failures"] == 0
        assert row["train"]["egress_audited"] == 1
        # Each train reply carried A and the head only: no site's B crossed the wire.
        assert row["bytes"]["up"] == nodes * shared
        # Every site evaluated its own model (global A and head, its own B) on its own
        # eval split: one headline value per site, and their spread.
        per_site = row["clients"]["eval_headline"]
        assert len(per_site) == nodes and all(0.0 <= v <= 1.0 for v in per_site)
        assert row["clients"]["eval_headline_spread"]["min"] == min(per_site)
    state = _final_checkpoint(result.run_dir)
    assert any("lora_A" in k for k in state) and not any("lora_B" in k for k in state)
    # The server has no site's B: its model (and the exported one) keeps B at zero.
    adapter = load_file(str(result.run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in adapter.items() if ".lora_B." in k]
    assert b and not any(v.any() for v in b)


def test_secure_aggregation_matches_the_shared_plaintext_run_and_sums_the_label_counts(
    shared_run, tmp_path, tiny_model_dir
):
    """The shared run again with secure aggregation: the server unmasks only the sums of
    the updates and of the sites' label counts (class weights from the federation's
    counts travel inside the masked vector), and gets the plaintext run's model."""
    plain, plain_log = shared_run
    secure = _run(tmp_path, tiny_model_dir, "secure", nodes=SHARED_NODES,
                  **{**SHARED, "secure-aggregation": True})
    log = secure.log_path.read_text()
    assert secure.returncode == 0, log[-3000:]
    rows = _results(secure.run_dir)
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == SHARED_NODES and not row["clients"]["skipped"]
        assert row["train"]["egress_audited"] == 1  # masked arrays, weight and sums only
        assert not any(name.startswith("label_count") for name in row["train"])  # not in clear
    # Masked uplink is the size of the update (uint32) plus the protocol's messages.
    plain_up = _results(plain.run_dir)[1]["bytes"]["up"]
    assert plain_up < rows[1]["bytes"]["up"] < 1.5 * plain_up
    # Round 2's config carries the federation's counts: the secure sum equals the sum
    # of the counts the plaintext run's sites sent in clear (round 1 knows none yet).
    pattern = r"\[fedsft\] round (\d+) config: label-counts=\[([\d, ]+)\]"
    sent, sent_plain = re.findall(pattern, log), re.findall(pattern, plain_log)
    assert [rnd for rnd, _ in sent] == ["2"] and sent == sent_plain, (sent, sent_plain)
    assert sum(int(c) for c in sent[0][1].split(",")) > 0
    # Same model as plaintext FedAvg, up to the quantization error (2^-frac_bits per value).
    a, b = _final_checkpoint(plain.run_dir), _final_checkpoint(secure.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5, err_msg=key)

