"""The round that ends the run is evaluated as the final one, whatever ends it.

A made-up task scores each round from a fixed loss sequence and, like sft, adds its
expensive "final" metric (here exact match) only when ``EvalContext.final`` is set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import RunConfig
from common.model import get_exchanged_state
from server.recorder import EarlyStop, RoundRecorder
from server.run_outputs import RunOutputs


class ScriptedTask:
    """Loss per round from ``losses``; exact match only in a final evaluation."""

    def __init__(self, losses: dict[int, float]) -> None:
        self.losses = losses
        self.calls: list[tuple[int, bool]] = []

    def eval_spec(self, cfg):  # noqa: ANN001, ANN201
        return None

    def evaluate(self, model, tokenizer, examples, ctx):  # noqa: ANN001, ANN201
        self.calls.append((ctx.server_round, ctx.final))
        metrics = {"loss": self.losses[ctx.server_round], "num_examples": len(examples)}
        if ctx.final:
            metrics["exact_match"] = 0.5
        return metrics


class NoStatsStrategy:
    """What the recorder asks of ``TrackedStrategy``: no replies, no state."""

    def to_round(self, server_round: int) -> int:
        return server_round

    def take_round_stats(self, rnd: int) -> None:
        return None

    def inner_state(self) -> dict:
        return {}


def _recorder(tmp_path, task: ScriptedTask, *, patience: int, last_round: int | None = None,
              total_rounds: int = 10) -> tuple[RoundRecorder, RunOutputs, ArrayRecord]:
    cfg = RunConfig(task="sft", num_server_rounds=total_rounds,
                    early_stopping_patience=patience, output_dir=str(tmp_path)
                    ).replace(generate_every=0)
    model = torch.nn.Linear(2, 1)
    outputs = RunOutputs(tmp_path / "run", keep_checkpoints=0)
    outputs.start(cfg, [])
    recorder = RoundRecorder(
        cfg=cfg, task=task, model=model, tokenizer=None, eval_data=[1, 2, 3],
        device=torch.device("cpu"), strategy=NoStatsStrategy(), outputs=outputs,
        total_rounds=total_rounds, last_round=last_round)
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in get_exchanged_state(model).items()})
    return recorder, outputs, arrays


def test_the_round_early_stopping_ends_the_run_with_is_evaluated_as_final(tmp_path):
    # Round 2 does not improve on round 1: patience 1 ends the run after round 2 of 10.
    task = ScriptedTask({0: 2.0, 1: 1.5, 2: 1.6})
    recorder, outputs, arrays = _recorder(tmp_path, task, patience=1)

    recorder(0, arrays)
    recorder(1, arrays)
    with pytest.raises(EarlyStop, match="stopped after round 2 of 10"):
        recorder(2, arrays)

    assert task.calls == [(0, False), (1, False), (2, False), (2, True)]
    rows = outputs.read_results()
    assert [row.round for row in rows] == [0, 1, 2]
    assert rows[-1].central is not None and rows[-1].central["exact_match"] == 0.5
    assert all("exact_match" not in (row.central or {}) for row in rows[:-1])


def test_the_last_planned_round_is_final_without_a_second_evaluation(tmp_path):
    # The privacy budget (say) ends a 10-round run after round 2; no patience.
    task = ScriptedTask({0: 2.0, 1: 1.5, 2: 1.6})
    recorder, outputs, arrays = _recorder(tmp_path, task, patience=0, last_round=2)

    for server_round in range(3):
        recorder(server_round, arrays)

    assert task.calls == [(0, False), (1, False), (2, True)]
    assert outputs.read_results()[-1].central["exact_match"] == 0.5


def test_an_improving_round_is_not_final(tmp_path):
    task = ScriptedTask({0: 2.0, 1: 1.5, 2: 1.4})
    recorder, _, arrays = _recorder(tmp_path, task, patience=1)

    for server_round in range(3):
        recorder(server_round, arrays)

    assert task.calls == [(0, False), (1, False), (2, False)]
