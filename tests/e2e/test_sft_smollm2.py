"""The real default chat model: a few LoRA steps of SmolLM2-135M-Instruct on a GSM8K
sample lower its assistant-token loss on held-out problems (read as a user's own file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.config import RunConfig
from common.data import load_site_data
from common.model import build_model
from common.specs import DataSpec, EncodeSpec, ModelSpec, TrainSpec
from common.tasks import get_task
from common.tasks.base import EvalContext
from common.training import train_local

pytestmark = pytest.mark.e2e

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K.exists(), reason="needs ../shared/data/gsm8k")
def test_a_few_steps_lower_the_assistant_token_loss_on_gsm8k(tmp_path):
    pytest.importorskip("gguf")
    # The shortest problems of the first 200 (a training step of a 135 M model costs
    # seconds per hundred tokens on a CPU), written as the user's own file.
    lines = sorted(GSM8K.read_text(encoding="utf-8").splitlines()[:200], key=len)[:32]
    train_file, eval_file = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    for path, part in ((train_file, lines[::4] + lines[1::4] + lines[2::4]),
                       (eval_file, lines[3::4])):
        path.write_text("\n".join(
            json.dumps({"prompt": (row := json.loads(line))["question"],
                        "response": row["answer"]}) for line in part) + "\n")
    cfg = RunConfig(task="sft", model="smollm2", max_length=192, batch_size=2,
                    local_steps=6, learning_rate=2e-3, precision="fp32")
    task = get_task("sft")
    model, tokenizer = build_model(ModelSpec.of(cfg, []))
    encoding = EncodeSpec.of(cfg, tokenizer.name_or_path)
    train = task.encode(load_site_data(str(train_file), DataSpec.of(cfg), []), tokenizer,
                        spec=encoding)
    held_out = task.encode(load_site_data(str(eval_file), DataSpec.of(cfg), []), tokenizer,
                           spec=encoding)
    ctx = EvalContext(batch_size=8, device=torch.device("cpu"), precision="fp32",
                      server_round=1, spec=task.eval_spec(cfg))  # round 1: loss only, no generation

    before = task.evaluate(model, tokenizer, held_out, ctx)["loss"]
    result = train_local(model, train, TrainSpec.of(cfg), task=task,
                         loss_spec=task.loss_spec(cfg), seed=0, device=torch.device("cpu"),
                         pad_token_id=tokenizer.pad_token_id)
    after = task.evaluate(model, tokenizer, held_out, ctx)["loss"]

    assert len(train) == 24 and len(held_out) == 8 and result.steps == 6
    assert after < before - 0.02, (before, after)
