"""Test helpers that other tests and scripts can import (no fixtures here).

The tiny model builders are product code (quick benchmarks use it too); it is re-exported
here so tests keep one import place.
"""

from __future__ import annotations

from pathlib import Path

from simulations.benchmarks.tiny_model import (
    CHATML_TEMPLATE,
    tiny_chat_tokenizer,
    write_tiny_bert,
    write_tiny_llama,
)

__all__ = ["CHATML_TEMPLATE", "classify_eval", "tiny_chat_tokenizer", "write_tiny_bert",
           "write_tiny_llama"]


def classify_eval(model, data, *, batch_size, device, pad_token_id,  # type: ignore[no-untyped-def]
                  precision="fp32"):
    """The classification task's evaluation, with its metrics as attributes."""
    from types import SimpleNamespace

    from common.tasks.base import EvalContext
    from common.tasks.classification import TASK

    metrics = TASK.evaluate(model, SimpleNamespace(pad_token_id=pad_token_id), data,
                            EvalContext(batch_size=batch_size, device=device,
                                        precision=precision))
    return SimpleNamespace(**metrics)


def write_tiny_scenario(path: Path, model_dir: Path, *, rounds: int) -> Path:
    """A scenario file for the harness's end-to-end tests: the tiny BERT, 2 clients."""
    path.write_text(f"""
description = "tiny BERT, 2 clients, {rounds} round{'s' if rounds != 1 else ''}"
num-supernodes = 2
[resources]
num-cpus = 1
[run-config]
model = "{model_dir}"
num-server-rounds = {rounds}
builtin-examples = 200
max-length = 24
batch-size = 4
local-steps = 2
fraction-evaluate = 1.0
node-wait-timeout = 60
""")
    return path
