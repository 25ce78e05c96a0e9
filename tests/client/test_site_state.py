"""FedSA-LoRA at the ClientApp: each site's B is kept in its node state across rounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import client.app
from client.app import evaluate_global, train
from client.site_state import SITE_STATE_KEY
from common.config import RunConfig
from common.model import build_model, get_exchanged_state, get_site_state
from common.records import array_record, numpy_arrays
from common.specs import ModelSpec
from tests.client.test_client_app import LABELS, _message


def _run_config(model_dir) -> dict:
    return RunConfig(
        model=str(model_dir), builtin_examples=120, max_length=24, batch_size=4,
        local_steps=3, learning_rate=1e-2, lora_aggregation="fedsa",
    ).to_flower()


def _context(model_dir, partition: int) -> Context:
    return Context(run_id=1, node_id=7 + partition,
                   node_config={"partition-id": partition, "num-partitions": 3},
                   state=RecordDict(), run_config=_run_config(model_dir))


def _kept(context: Context) -> dict[str, np.ndarray]:
    return numpy_arrays(array_record(context.state, SITE_STATE_KEY))


@pytest.fixture
def global_state(tiny_model_dir):
    cfg = RunConfig.from_flower(_run_config(tiny_model_dir))
    model, _ = build_model(ModelSpec.of(cfg, LABELS))
    return get_exchanged_state(model)


def test_each_site_keeps_its_own_b_across_rounds_and_sends_only_a_and_the_head(
    tiny_model_dir, global_state, monkeypatch
):
    started_with: list[dict[str, np.ndarray]] = []
    real_train_local = client.app.train_local

    def spy(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        started_with.append(get_site_state(model))  # the B local training starts from
        return real_train_local(model, *args, **kwargs)

    monkeypatch.setattr(client.app, "train_local", spy)
    one, two = _context(tiny_model_dir, 0), _context(tiny_model_dir, 1)

    # Round 1, two sites on one process (one cached model).
    reply = train(_message("train", global_state, round_=1), one)
    train(_message("train", global_state, round_=1), two)

    arrays = reply.content["arrays"]
    assert set(arrays) == set(global_state)  # A and the head only
    assert not any(".lora_B." in name for name in arrays)
    assert any(".lora_A." in name for name in arrays)
    b_one, b_two = _kept(one), _kept(two)
    assert b_one and all(".lora_B." in name for name in b_one)
    assert all(b_one[n].any() for n in b_one)  # trained away from its zero init
    assert any(not np.array_equal(b_one[n], b_two[n]) for n in b_one)  # per site
    # Both sites started from B = 0: site one's training did not leak into site two.
    assert all(not v.any() for start in started_with for v in start.values())

    # Round 2: a new global state; each site starts from the B it kept in round 1.
    aggregated = {n: v + 0.01 for n, v in global_state.items()}
    train(_message("train", aggregated, round_=2), two)
    train(_message("train", aggregated, round_=2), one)

    assert all(np.array_equal(started_with[2][n], b_two[n]) for n in b_two)
    assert all(np.array_equal(started_with[3][n], b_one[n]) for n in b_one)
    assert any(not np.array_equal(_kept(one)[n], b_one[n]) for n in b_one)  # and moved on


def test_federated_evaluation_uses_the_sites_own_b(tiny_model_dir, global_state):
    site, fresh = _context(tiny_model_dir, 0), _context(tiny_model_dir, 0)
    train(_message("train", global_state, round_=1), site)

    personal = evaluate_global(_message("evaluate", global_state), site).content["metrics"]
    shared = evaluate_global(_message("evaluate", global_state), fresh).content["metrics"]
    again = evaluate_global(_message("evaluate", global_state), site).content["metrics"]

    # Same global A and head, same eval split: only the site's own B differs.
    assert personal["num-examples"] == shared["num-examples"] > 0
    assert personal["eval-loss"] != shared["eval-loss"]
    assert personal["eval-loss"] == again["eval-loss"]  # evaluation does not change B
    assert SITE_STATE_KEY not in fresh.state  # evaluating stores nothing
