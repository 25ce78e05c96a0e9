import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common import Metadata

from client.egress_audit import EgressViolation, egress_audit_mod, egress_problems

STATE = {"lora_A": np.zeros((2, 3), np.float32)}


def _message(message_type, content):
    metadata = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=600.0, message_type=message_type,
    )
    return make_message(metadata=metadata, content=RecordDict(content))


def _train_msg():
    return _message("train", {"arrays": ArrayRecord({k: Array(v) for k, v in STATE.items()}),
                              "config": ConfigRecord({"server-round": 1})})


def _reply(arrays=None, metrics=None, config=None):
    content = {}
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content["metrics"] = MetricRecord(metrics or {"num-examples": 4})
    if config is not None:
        content["config"] = ConfigRecord(config)
    return _message("train", content)


def test_a_clean_train_reply_passes():
    assert egress_problems(_train_msg(), _reply(STATE), allowed_array_names=set(STATE)) == []


@pytest.mark.parametrize(
    "reply, fragment",
    [
        (_reply({**STATE, "token_ids": np.arange(12, dtype=np.int64)}), "not in the exchanged"),
        (_reply(STATE, {"num-examples": 4, "losses": [0.1, 0.2]}), "not a scalar"),
        (_reply(STATE, config={"text": "patient has fever"}), "config record"),
    ],
)
def test_leaks_are_found(reply, fragment):
    problems = egress_problems(_train_msg(), reply, allowed_array_names=set(STATE))
    assert any(fragment in p for p in problems)


def test_evaluate_replies_must_not_carry_arrays():
    sent = _message("evaluate", {"config": ConfigRecord({})})
    problems = egress_problems(sent, _reply(STATE), allowed_array_names=None)
    assert any("arrays" in p for p in problems)


def test_the_mod_refuses_a_leaking_reply_and_marks_clean_ones():
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                      run_config={"audit-egress": True})
    clean = egress_audit_mod(_train_msg(), context, lambda m, c: _reply(STATE))
    assert clean.content["metrics"]["egress-audited"] == 1
    leaky = _reply({**STATE, "labels": np.array([0, 1, 1])})
    with pytest.raises(EgressViolation, match="labels"):
        egress_audit_mod(_train_msg(), context, lambda m, c: leaky)
    context.run_config["audit-egress"] = False  # off: untouched
    assert egress_audit_mod(_train_msg(), context, lambda m, c: leaky) is leaky
