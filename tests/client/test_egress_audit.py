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
        (_reply(STATE, {"num-examples": 4, "train-loss": [0.1, 0.2]}), "not a scalar"),
        # A row smuggled in a metric name: the name is refused (and not repeated).
        (_reply(STATE, {"num-examples": 4, "patient 17 has fever": 1.0}),
         "not an allowed train metric name"),
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


def test_the_site_node_config_turns_the_audit_on_whatever_the_run_config_says():
    from client.egress_audit import egress_required

    assert egress_required({"audit-egress": False}, {"audit-egress": True})
    assert egress_required({"audit-egress": True}, {"audit-egress": False})
    assert not egress_required({}, {})
    from common.config import ConfigError
    with pytest.raises(ConfigError, match="audit-egress"):
        egress_required({}, {"audit-egress": "yes"})
    context = Context(run_id=1, node_id=7, node_config={"audit-egress": True},
                      state=RecordDict(), run_config={"audit-egress": False})
    leaky = _reply({**STATE, "labels": np.array([0, 1, 1])})
    with pytest.raises(EgressViolation, match="labels"):
        egress_audit_mod(_train_msg(), context, lambda m, c: leaky)


def test_metric_names_are_an_allow_list_per_message_type():
    sent = _message("evaluate", {"config": ConfigRecord({})})
    ok = _message("evaluate", {"metrics": MetricRecord(
        {"num-examples": 3, "eval-accuracy": 0.5, "eval-f1-macro": 0.4, "eval-seconds": 1.0})})
    assert egress_problems(sent, ok, allowed_array_names=None) == []
    # A train metric name is not an evaluate one.
    bad = _message("evaluate", {"metrics": MetricRecord({"train-loss": 0.5})})
    assert any("not an allowed evaluate metric name" in p
               for p in egress_problems(sent, bad, allowed_array_names=None))


def test_query_replies_carry_only_protocol_keys_and_the_sites_own_key():
    sent = _message("query", {"config": ConfigRecord({})})
    own = _message("query", {"config": ConfigRecord({"client-key": "site-a"})})
    assert egress_problems(sent, own, allowed_array_names=None, own_key="site-a") == []
    other = _message("query", {"config": ConfigRecord({"client-key": "row: fever"})})
    assert any("carries a string" in p for p in
               egress_problems(sent, other, allowed_array_names=None, own_key="site-a"))
    extra = _message("query", {"config": ConfigRecord({"note": b"x"})})
    assert any("not a protocol key" in p for p in
               egress_problems(sent, extra, allowed_array_names=None, own_key="site-a"))


def test_error_messages_leave_the_site_only_from_fedsfts_own_errors():
    from common.data import DataError

    context = Context(run_id=1, node_id=7, node_config={"audit-egress": True},
                      state=RecordDict(), run_config={})

    def parser_error(m, c):
        raise ValueError("could not parse row 'Jane Doe, 1970-01-01, HIV+'")

    with pytest.raises(EgressViolation) as refused:
        egress_audit_mod(_train_msg(), context, parser_error)
    assert "Jane" not in str(refused.value) and "ValueError" in str(refused.value)

    def missing(m, c):
        raise DataError("data file not found: /data/a.csv")

    with pytest.raises(EgressViolation, match="DataError: data file not found: /data/a.csv"):
        egress_audit_mod(_train_msg(), context, missing)
    context.node_config["audit-egress"] = False  # audit off: the error passes unchanged
    with pytest.raises(ValueError, match="Jane"):
        egress_audit_mod(_train_msg(), context, parser_error)


def test_every_metric_a_classification_evaluation_reports_passes_the_audit():
    """The client names reply metrics "eval-" + the task's metric, dashed: per-class recall
    included (a narrower allow-list once emptied every audited run's federated metrics)."""
    from common.tasks.classification import per_class_recall

    labels, predicted = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    result = {"accuracy": 0.5, "f1_macro": 0.5, "loss": 1.0,
              **per_class_recall(labels, predicted)}
    metrics = {"num-examples": 4, "eval-seconds": 0.1,
               **{f"eval-{name.replace('_', '-')}": value for name, value in result.items()}}
    sent = _message("evaluate", {"config": ConfigRecord({"server-round": 1})})
    reply = _message("evaluate", {"metrics": MetricRecord(metrics)})
    assert egress_problems(sent, reply, allowed_array_names=None) == []
    unknown = _message("evaluate", {"metrics": MetricRecord({**metrics, "eval-text": 1.0})})
    assert egress_problems(sent, unknown, allowed_array_names=None)


def test_under_secure_aggregation_the_summed_statistics_leave_only_masked():
    from client.secagg import SUMS_KEY, WEIGHT_KEY

    sent = _message("train", {
        "arrays": ArrayRecord({k: Array(v) for k, v in STATE.items()}),
        "config": ConfigRecord({"server-round": 1, "secagg-round": 1,
                                "secagg-sum-keys": ["label-count-0", "label-count-1"]})})
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                      run_config={"audit-egress": True})
    masked = {"lora_A": np.zeros((2, 3), np.uint32), WEIGHT_KEY: np.zeros(2, np.uint32),
              SUMS_KEY: np.zeros(2, np.uint32)}
    clean = egress_audit_mod(sent, context, lambda m, c: _reply(masked, {"train-steps": 3}))
    assert clean.content["metrics"]["egress-audited"] == 1
    # the same counts in plaintext next to the masked sum: refused
    leaky = _reply(masked, {"train-steps": 3, "label-count-1": 4})
    with pytest.raises(EgressViolation, match="label-count-1 is summed securely"):
        egress_audit_mod(sent, context, lambda m, c: leaky)


def test_a_registered_tasks_declared_metrics_pass_and_no_other_task_s_do():
    """The allow-list is the machinery's names plus the run's task's own, from its
    registry entry: a task the project does not ship gets its declared metrics out."""
    from common.tasks import MetricInfo, TaskInfo, task_registered

    info = TaskInfo(module=__name__, default_model="toy-linear",  # (never imported here)
                    metrics=(MetricInfo("miss_rate", "miss rate", higher_is_better=False),
                             MetricInfo("loss", "loss", higher_is_better=False)),
                    train_reply_metrics=(r"toy-positives",),
                    eval_reply_metrics=(r"eval-miss-(first|last)",))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(),
                      run_config={"audit-egress": True, "task": "toy"})
    evaluate = _message("evaluate", {"config": ConfigRecord({"server-round": 1})})

    def evaluated(metrics):
        return lambda m, c: _message("evaluate", {"metrics": MetricRecord(metrics)})

    with task_registered("toy", info):
        clean = egress_audit_mod(_train_msg(), context, lambda m, c: _reply(
            STATE, {"num-examples": 4, "train-loss": 0.3, "toy-positives": 2}))
        assert clean.content["metrics"]["egress-audited"] == 1
        declared = {"num-examples": 4, "eval-miss-rate": 0.2, "eval-miss-first": 0.1}
        passed = egress_audit_mod(evaluate, context, evaluated(declared))
        assert dict(passed.content["metrics"]) == declared
        for undeclared in ("toy-negatives", "label-count-0"):  # the latter: classification's
            with pytest.raises(EgressViolation, match="not an allowed train metric name"):
                egress_audit_mod(_train_msg(), context, lambda m, c, name=undeclared: _reply(
                    STATE, {"num-examples": 4, name: 1}))
        for undeclared in ("eval-miss-middle", "eval-accuracy"):
            with pytest.raises(EgressViolation, match="not an allowed evaluate metric name"):
                egress_audit_mod(evaluate, context, evaluated({undeclared: 0.5}))
        # Without the run's task, every registered task's names pass.
        toy_reply = _reply(STATE, {"toy-positives": 2, "label-count-0": 3})
        assert egress_problems(_train_msg(), toy_reply, allowed_array_names=set(STATE)) == []
    assert egress_problems(_train_msg(), toy_reply, allowed_array_names=set(STATE))
