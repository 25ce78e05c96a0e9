"""run_federation end to end on a fake grid (no SuperLink): how a run ends on disk."""

from __future__ import annotations

import json
from collections.abc import Iterable

import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.config import RunConfig
from server.run import run_federation
from server.run_outputs import RunFailed, read_outcome
from tests.server.messages import error_reply


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
