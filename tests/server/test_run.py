"""run_federation end to end on a fake grid (no SuperLink): how a run ends on disk."""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

import server.run
from common.config import RunConfig
from common.model import get_exchanged_state
from server.grid import NodesUnavailableError
from server.run import run_federation
from server.run_outputs import RunFailed, RunOutputs, read_outcome
from tests.server.messages import error_reply, train_reply


class FailingGrid(Grid):
    """Two connected nodes that answer every message with the same client error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        return [error_reply(m.metadata.dst_node_id, self.reason) for m in messages]

    # Not used by the round loop.
    def set_run(self, run_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    @property
    def run(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        raise NotImplementedError


def test_a_run_in_which_no_round_aggregated_fails_without_a_final_model(
    tmp_path, tiny_model_dir, monkeypatch
):
    for attr in ("_run_id", "_node_id", "_task_id"):  # Message() needs them, as in a ServerApp
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = RunConfig(model=str(tiny_model_dir), builtin_examples=60, max_length=16,
                    num_server_rounds=2, output_dir=str(tmp_path), run_name="r",
                    node_wait_timeout=1.0, device="cpu")
    reason = "DataError: /data/site.csv does not exist"
    with pytest.raises(RunFailed, match="none of its 2 round") as err:
        run_federation(FailingGrid(reason), cfg)
    assert str(err.value).count(reason) == 1  # two nodes, two rounds: quoted once
    run = tmp_path / "r"
    assert not (run / "final").exists()
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    outcome = read_outcome(run)
    assert outcome is not None and outcome.status == "failed"
    assert (outcome.rounds_done, outcome.rounds_aggregated, outcome.final_model) == (2, 0, False)
    assert outcome.message == str(err.value)


class BrokenGrid(FailingGrid):
    """The link to the nodes breaks at the first message."""

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise ConnectionError("SuperLink went away")


def test_a_server_crash_is_recorded_as_a_failed_outcome(tmp_path, tiny_model_dir, monkeypatch):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = RunConfig(model=str(tiny_model_dir), builtin_examples=60, max_length=16,
                    num_server_rounds=1, output_dir=str(tmp_path), run_name="r",
                    device="cpu")
    with pytest.raises(ConnectionError):
        run_federation(BrokenGrid(""), cfg)
    outcome = read_outcome(tmp_path / "r")
    assert outcome is not None and outcome.status == "failed" and not outcome.final_model
    assert "ConnectionError: SuperLink went away" in outcome.message
    assert not (tmp_path / "r" / "final").exists()


class TrainingGrid(FailingGrid):
    """Two nodes that reply to training with ``update(round, arrays)`` (no evaluation)."""

    def __init__(self, update) -> None:  # type: ignore[no-untyped-def]
        self.update = update

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for m in messages:
            if m.metadata.message_type != "train":
                continue  # the grid's key queries: unanswered, as from an old client
            rnd = int(m.content["config"]["server-round"])
            arrays = {k: v.numpy() for k, v in m.content["arrays"].items()}
            replies.append(train_reply(m.metadata.dst_node_id, self.update(rnd, arrays),
                                       **{"num-examples": 5}))
        return replies


def _training_cfg(tmp_path, tiny_model_dir, **changes):
    return RunConfig(model=str(tiny_model_dir), builtin_examples=60, max_length=16,
                     output_dir=str(tmp_path), run_name="r", node_wait_timeout=1.0,
                     device="cpu", fraction_evaluate=0.0, **changes)


def _rows(run):
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_select_model_best_exports_the_best_rounds_state_and_keeps_its_checkpoint(
    tmp_path, tiny_model_dir, monkeypatch
):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    exported = {}

    def capture(model, tokenizer, folder):  # type: ignore[no-untyped-def]
        exported.update(get_exchanged_state(model))
        return {"model": folder / "model"}

    monkeypatch.setattr(server.run, "export_final_model", capture)
    rng = np.random.default_rng(0)

    def update(rnd, arrays):  # type: ignore[no-untyped-def]
        # Small steps, then a last round that wrecks the model: the last is not the best.
        scale = 100.0 if rnd == 4 else 1.0
        return {k: (v * scale + rng.normal(0, 0.05, v.shape)).astype(v.dtype)
                for k, v in arrays.items()}

    cfg = _training_cfg(tmp_path, tiny_model_dir, num_server_rounds=4, keep_checkpoints=1,
                        selection_metric="loss", validation_fraction=0.2)
    run = run_federation(TrainingGrid(update), cfg)
    rows = _rows(run)
    losses = {r["round"]: r["validation"]["loss"] for r in rows if r["round"] > 0}
    best = min(losses, key=losses.get)
    assert best != 4
    assert all(r["central"] is not None for r in rows)  # the test set is still reported
    checkpoint = RunOutputs(run, keep_checkpoints=1).load_checkpoint(best)
    assert exported.keys() == checkpoint.global_state.keys()
    for name, array in checkpoint.global_state.items():
        np.testing.assert_array_equal(exported[name], array)
    outcome = read_outcome(run)
    assert outcome is not None and outcome.status == "completed"
    assert outcome.selection["round"] == best and outcome.selection["split"] == "validation"
    assert f"at round {best} of 4" in outcome.message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(
        {f"round-{best:04d}.safetensors", "round-0004.safetensors"})


def test_early_stopping_ends_the_run_after_patience_rounds_as_a_completed_run(
    tmp_path, tiny_model_dir, monkeypatch
):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = _training_cfg(tmp_path, tiny_model_dir, num_server_rounds=8,
                        early_stopping_patience=2)
    # The clients send the model back unchanged: no round improves on round 1.
    run = run_federation(TrainingGrid(lambda rnd, arrays: arrays), cfg)
    assert [r["round"] for r in _rows(run)] == [0, 1, 2, 3]
    outcome = read_outcome(run)
    assert outcome is not None and outcome.status == "completed" and outcome.final_model
    assert outcome.stopped_early is not None
    assert "after round 3 of 8" in outcome.stopped_early
    assert outcome.selection["round"] == 1 and "optimistic" in outcome.selection["note"]
    assert (run / "final" / "model" / "config.json").is_file()


class LosingGrid(TrainingGrid):
    """Node 12 dies right after it sent its round-1 update (before evaluation)."""

    def __init__(self) -> None:
        super().__init__(lambda rnd, arrays: {k: v + 0.01 for k, v in arrays.items()})
        self.trained = False

    def get_node_ids(self) -> list[int]:
        return [11] if self.trained else [11, 12]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        self.trained = self.trained or any(m.metadata.message_type == "train"
                                           for m in messages)
        return replies


@pytest.mark.parametrize("fraction_evaluate", [0.0, 0.5])
def test_losing_a_site_before_evaluation_keeps_the_aggregated_round_then_stops(
    fraction_evaluate, tmp_path, tiny_model_dir, monkeypatch
):
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cfg = RunConfig(model=str(tiny_model_dir), builtin_examples=60, max_length=16,
                    output_dir=str(tmp_path), run_name="r", node_wait_timeout=1.0,
                    device="cpu", fraction_evaluate=fraction_evaluate, min_nodes=2,
                    num_server_rounds=3)

    with pytest.raises(NodesUnavailableError, match="only 1 node"):
        run_federation(LosingGrid(), cfg)

    run = tmp_path / "r"
    rows = _rows(run)
    assert [r["round"] for r in rows] == [0, 1]  # round 1 aggregated and is recorded
    assert rows[1]["clients"]["aggregated"] == 2
    skipped = [p for p in rows[1]["clients"]["problems"] if "evaluation skipped" in p]
    assert len(skipped) == (1 if fraction_evaluate else 0)
    assert RunOutputs(run, keep_checkpoints=1).last_checkpoint().round == 1
    outcome = read_outcome(run)
    assert outcome is not None and outcome.status == "failed" and not outcome.final_model
    assert "NodesUnavailableError: only 1 node(s) connected" in outcome.message
    assert f"continue with resume-from={run}" in outcome.message
