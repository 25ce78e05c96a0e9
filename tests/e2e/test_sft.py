"""Chat SFT end to end through Flower's Simulation Engine, on a tiny random Llama:
two clients, two rounds; export, reload (transformers and peft) and predict; resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from simulations.runner import run_app

pytestmark = pytest.mark.e2e

TINY_SFT = {
    "task": "sft",
    "dataset": "builtin",
    "builtin-examples": 80,
    "max-length": 384,  # the byte-level tiny tokenizer: ~260 tokens per example
    "batch-size": 4,
    "local-steps": 3,
    "learning-rate": 0.005,
    "fraction-evaluate": 0.0,
    "generation-samples": 3,
    "max-new-tokens": 6,
    "node-wait-timeout": 60.0,
    "round-timeout": 300.0,
}


def _run(tmp_path: Path, model_dir: Path, name: str, *, nodes: int = 2,  # type: ignore[no-untyped-def]
         **overrides):
    run_config = {**TINY_SFT, "model": str(model_dir), "output-dir": str(tmp_path),
                  "run-name": name, **overrides}
    return run_app(run_config, num_supernodes=nodes, timeout=600, quiet=True)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def _last_checkpoint(run_dir: Path) -> dict:
    return load_file(str(sorted((run_dir / "checkpoints").glob("round-*.safetensors"))[-1]))


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_llama_dir):
    """Two clients, two rounds: the first test's run and the resume test's reference
    (one Flower start-up, ~45 s, fewer)."""
    result = _run(tmp_path_factory.mktemp("two-rounds"), tiny_llama_dir, "sft",
                  **{"num-server-rounds": 2, "min-nodes": 2})
    assert result.returncode == 0, result.log_path.read_text()[-3000:]
    return result


def test_two_clients_two_rounds_then_export_reload_and_predict(two_rounds, tmp_path,
                                                               tiny_llama_dir):
    result = two_rounds
    rows = _rows(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert {"loss", "perplexity", "num_examples"} <= set(row["central"])
    # Generation metrics in round 0 (the baseline) and after the last round.
    assert {"exact_match", "token_f1"} <= set(rows[0]["central"])
    assert {"exact_match", "token_f1"} <= set(rows[2]["central"])
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == 2 and row["train"]["train_loss"] > 0
    assert rows[2]["central"]["loss"] < rows[0]["central"]["loss"]
    # Only LoRA tensors crossed the wire (q/k/v/o projections), no head.
    state = _last_checkpoint(result.run_dir)
    assert state and all("lora_" in name for name in state)
    assert any("o_proj" in name for name in state)

    from deployment.export import export_run
    from deployment.predict import predict_file

    exported = tmp_path / "export"
    export_run(result.run_dir, exported)
    meta = json.loads((exported / "fedsft.json").read_text())
    assert meta["task"] == "sft"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template  # the chat template travels with the model
    assert merged.config.architectures == ["LlamaForCausalLM"]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                                        result.run_dir / "final/adapter")
    assert any("lora_A" in name for name, _ in adapted.named_parameters())

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Classify the sentiment: great product"}\n'
                       '{"messages": [{"role": "user", "content": "Hello"}]}\n')
    answers = predict_file(exported, prompts, tmp_path / "answers.jsonl", progress=False)
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(lines) == 2 and all(isinstance(line["prediction"], str) for line in lines)


def test_a_resumed_sft_run_ends_with_the_same_weights(two_rounds, tmp_path, tiny_llama_dir):
    common = {"min-nodes": 2}
    full = two_rounds  # the same run config, uninterrupted
    part = _run(tmp_path, tiny_llama_dir, "part", **{"num-server-rounds": 1}, **common)
    assert part.returncode == 0, part.log_path.read_text()[-3000:]
    resumed = _run(tmp_path, tiny_llama_dir, "part", **common, **{
        "num-server-rounds": 2, "resume-from": str(part.run_dir)})
    assert resumed.returncode == 0, resumed.log_path.read_text()[-3000:]
    a, b = _last_checkpoint(full.run_dir), _last_checkpoint(part.run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].tobytes() == b[key].tobytes(), key
    assert [r["central"]["loss"] for r in _rows(full.run_dir)] == [
        r["central"]["loss"] for r in _rows(part.run_dir)]


def test_sft_with_secure_aggregation_and_fedadam_aggregates_every_site(tmp_path,
                                                                       tiny_llama_dir):
    from common.config import ConfigError, RunConfig

    # By design secure aggregation quantizes the updates itself: no update encoding.
    for encoding in ("int8", "fp16"):
        with pytest.raises(ConfigError, match="`secure-aggregation` quantizes updates "
                                              "itself: keep `update-encoding`=fp32"):
            RunConfig(task="sft", secure_aggregation=True, update_encoding=encoding)
    # FedAdam's server optimizer steps on the securely averaged update.
    result = _run(tmp_path, tiny_llama_dir, "secure-fedadam", nodes=3, **{
        "num-server-rounds": 2, "min-nodes": 3, "secure-aggregation": True,
        "strategy": "fedadam", "server-learning-rate": 0.01, "local-steps": 2,
        "builtin-examples": 60, "generate-every": 0, "generation-samples": 2})
    log = result.log_path.read_text()
    assert result.returncode == 0, log[-3000:]
    rows = _rows(result.run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["clients"]["aggregated"] == 3 and not row["clients"]["skipped"]
        assert row["clients"]["failures"] == 0
        assert math.isfinite(row["train"]["train_loss"]) and row["train"]["train_loss"] > 0
    losses = [r["central"]["loss"] for r in rows]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[2] < losses[0], losses
    outcome = json.loads((result.run_dir / "outcome.json").read_text())
    assert outcome["status"] == "completed"
