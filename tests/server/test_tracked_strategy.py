import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Bulyan, FedAdam, FedAvg, FedMedian

from common.encoding import UpdateEncoding, encode_update
from server.results import summarize_spread
from server.tracked_strategy import FP32, TrackedStrategy
from tests.server.messages import NodesGrid, error_reply, eval_reply, send_round, train_reply

ZERO = {"w": np.zeros(2, np.float32)}
pytestmark = pytest.mark.usefixtures("task_identity")


def _tracked(inner=None, *, min_replies=1, round_offset=0, encoding=FP32, rounds=(1,)):
    """A strategy that sent ZERO to 6 sampled nodes in each of ``rounds``."""
    strategy = TrackedStrategy(
        inner or FedAvg(), exchanged_spec={"w": ((2,), np.dtype("float32"))}, seed=0,
        encoding=encoding, min_replies=min_replies, round_offset=round_offset,
    )
    for rnd in rounds:
        send_round(strategy, rnd, ZERO)
    return strategy


def _reply_problems(stats):
    """The round's problems but the nodes that sent nothing (``_tracked`` sends to 6)."""
    return [p for p in stats.problems if "no reply within round-timeout" not in p]


def _w(*values):
    return {"w": np.asarray(values, dtype=np.float32)}


def test_weighted_by_num_examples():
    strategy = _tracked()
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 0.0), **{"num-examples": 1}),
        train_reply(2, _w(4.0, 8.0), **{"num-examples": 3}),
    ])
    # (1*1 + 3*4)/4 = 3.25 ; (1*0 + 3*8)/4 = 6
    np.testing.assert_allclose(arrays["w"].numpy(), [3.25, 6.0])


def test_failed_and_invalid_replies_are_dropped_and_counted():
    strategy = _tracked()  # 6 sampled, 5 replies: one timed out
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, _w(2.0, 2.0), **{"num-examples": 2}),
        train_reply(2, _w(np.nan, 0.0), **{"num-examples": 2}),
        train_reply(3, _w(1e9, 1e9), **{"num-examples": -4}),
        train_reply(4, {"w": np.zeros(3, np.float32)}, **{"num-examples": 2}),
        error_reply(5, "CUDA out of memory"),
    ])
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 2.0])
    stats = strategy.take_round_stats(1)
    assert (stats.failures, stats.invalid, stats.timeouts, stats.aggregated) == (1, 3, 1, 1)
    assert any("CUDA out of memory" in p for p in stats.problems)
    assert any("non-finite" in p for p in stats.problems)


def test_silent_problems_name_each_silent_node_once():
    from server.reply_pipeline import silent_problems

    assert silent_problems([1, 2, 3, 3], [1]) == [
        "node 2: no reply within round-timeout (the node left or was too slow)",
        "node 3: no reply within round-timeout (the node left or was too slow)"]
    assert silent_problems([1], [1]) == []
    # An unknown node (NodeWaitingGrid's fallback key) is named by its id only.
    assert silent_problems([7], [], site_key=lambda n: f"node-{n}")[0].startswith("node 7:")


def test_who_names_a_site_by_its_name_and_a_nameless_one_by_its_node():
    from server.reply_pipeline import Reply, error_problems, who

    assert who(Reply(node=3, site="hospital-a")) == "hospital-a (node 3)"
    assert who(Reply(node=7, site="node-7")) == "node 7"  # the key of a site without a name
    assert who(Reply(node=7, site="node-8")) == "node-8 (node 7)"  # a name, however odd
    assert error_problems([Reply(node=7, site="node-7", error="boom")]) == [
        "node 7: error: boom"]


def test_too_few_valid_replies_skip_the_round():
    strategy = _tracked(min_replies=2, rounds=(3,))
    arrays, metrics = strategy.aggregate_train(3, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 2}), error_reply(2),
    ])
    assert arrays is None and metrics is None
    assert strategy.take_round_stats(3).skipped


def test_bulyan_with_too_few_replies_skips_the_round_and_says_why():
    strategy = _tracked(Bulyan(num_malicious_nodes=1))
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(n, _w(float(n), 0.0), **{"num-examples": 1}) for n in range(1, 6)
    ])
    stats = strategy.take_round_stats(1)
    assert arrays is None and stats.skipped
    assert "needs at least 4 * num-malicious + 3 = 7 valid replies, got 5" in stats.problems[-1]


def test_aggregation_does_not_depend_on_arrival_order():
    rng = np.random.default_rng(0)
    replies = [
        train_reply(i, {"w": rng.normal(size=2).astype(np.float32) * 10 ** i},
                    **{"num-examples": int(rng.integers(1, 50))})
        for i in range(6)
    ]
    forward, _ = _tracked().aggregate_train(1, replies)
    backward, _ = _tracked().aggregate_train(1, replies[::-1])
    assert forward["w"].numpy().tobytes() == backward["w"].numpy().tobytes()


def test_round_offset_numbers_the_stats():
    strategy = _tracked(round_offset=4)
    strategy.aggregate_train(1, [train_reply(1, _w(1.0, 1.0), **{"num-examples": 1})])
    assert strategy.take_round_stats(1) is None
    assert strategy.take_round_stats(5).aggregated == 1
    assert strategy.take_round_stats(5) is None  # handed over once


def test_robust_inner_strategy_receives_only_valid_replies():
    strategy = _tracked(FedMedian())
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 1}),
        train_reply(2, _w(2.0, 2.0), **{"num-examples": 1}),
        train_reply(3, _w(np.inf, 3.0), **{"num-examples": 1}),
        train_reply(4, _w(3.0, 3.0), **{"num-examples": 1}),
    ])
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 2.0])


def test_evaluation_aggregates_valid_replies_and_records_client_headline():
    strategy = _tracked()  # the headline metric defaults to accuracy
    metrics = strategy.aggregate_evaluate(2, [
        eval_reply(1, **{"num-examples": 1, "eval-accuracy": 0.5, "eval-loss": 1.0}),
        eval_reply(2, **{"num-examples": 3, "eval-accuracy": 0.9, "eval-loss": 0.2}),
        eval_reply(3, **{"num-examples": 0}),
        error_reply(4),
    ])
    assert metrics["eval-accuracy"] == pytest.approx(0.8)
    assert strategy.take_round_stats(2).client_eval_headline == (0.5, 0.9)


def test_the_client_spread_is_of_the_tasks_headline_metric():
    strategy = TrackedStrategy(FedAvg(), exchanged_spec={"w": ((2,), np.dtype("float32"))},
                               seed=0, min_replies=1, headline_metric="exact_match")
    strategy.aggregate_evaluate(1, [
        eval_reply(1, **{"num-examples": 2, "eval-exact-match": 0.75, "eval-loss": 1.0}),
        eval_reply(2, **{"num-examples": 2, "eval-exact-match": 0.25, "eval-loss": 1.0}),
    ])
    assert strategy.take_round_stats(1).client_eval_headline == (0.25, 0.75)


def test_spread():
    spread = summarize_spread([0.1, 0.2, 0.3, 0.4, 0.5])
    assert spread["min"] == 0.1 and spread["median"] == 0.3
    assert spread["p10"] == pytest.approx(0.14)
    assert summarize_spread([]) == {}


def test_float64_aggregates_are_cast_back_to_the_exchanged_dtype():
    strategy = _tracked(FedAdam(eta=0.1), rounds=(1, 2))
    for rnd in (1, 2):  # a float64 global would make every later float32 reply invalid
        arrays, _ = strategy.aggregate_train(rnd, [
            train_reply(1, _w(1.0, -1.0), **{"num-examples": 1}),
        ])
        assert arrays["w"].dtype == "float32"
        assert strategy.take_round_stats(rnd).invalid == 0


def test_compressed_updates_are_decoded_before_aggregation():
    enc = UpdateEncoding("int8", block_size=0)
    strategy = _tracked(encoding=enc)
    payload_1, _ = encode_update(_w(1.0, -2.0), ZERO, enc)
    payload_2, _ = encode_update(_w(3.0, 2.0), ZERO, enc)
    arrays, _ = strategy.aggregate_train(1, [
        train_reply(1, payload_1, **{"num-examples": 1}),
        train_reply(2, payload_2, **{"num-examples": 1}),
        train_reply(3, _w(1.0, 1.0), **{"num-examples": 1}),  # not int8-encoded
    ])
    np.testing.assert_allclose(arrays["w"].numpy(), [2.0, 0.0], atol=0.02)
    stats = strategy.take_round_stats(1)
    assert stats.invalid == 1
    assert "cannot decode the int8 update" in _reply_problems(stats)[0]


def test_an_aggregation_error_skips_the_round_instead_of_crashing_the_run():
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise ZeroDivisionError("float division by zero")

    strategy = _tracked(Broken())
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, _w(1.0, 1.0), **{"num-examples": 1})])
    stats = strategy.take_round_stats(1)
    assert arrays is None and stats.skipped
    assert "ZeroDivisionError" in stats.problems[-1]


def test_bad_or_extra_metrics_do_not_break_the_round():
    strategy = _tracked()
    arrays, metrics = strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 1, "train-loss": 0.5}),
        train_reply(2, _w(3.0, 3.0), **{"num-examples": 1, "train-loss": 0.7, "extra": 1.0}),
        train_reply(3, _w(9.0, 9.0), **{"num-examples": 1, "dp-sgd-epsilon": float("nan")}),
    ])
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 2.0])
    assert metrics["train-loss"] == pytest.approx(0.6) and "extra" not in metrics
    stats = strategy.take_round_stats(1)
    assert stats.invalid == 1 and "dp-sgd-epsilon" in _reply_problems(stats)[0]


def test_a_nan_informational_metric_keeps_the_update_but_leaves_the_round_metrics():
    # A DP-SGD round whose Poisson batches were all empty computed no loss: its update
    # (noise steps) is valid and counts; only the NaN loss stays out of the average.
    strategy = _tracked()
    arrays, metrics = strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 1, "train-loss": 0.5,
                                        "train-steps": 2}),
        train_reply(2, _w(3.0, 3.0), **{"num-examples": 1, "train-loss": float("nan"),
                                        "train-steps": 4}),
    ])
    np.testing.assert_array_equal(arrays["w"].numpy(), [2.0, 2.0])
    assert metrics == {"train-steps": pytest.approx(3.0)}
    stats = strategy.take_round_stats(1)
    assert (stats.invalid, stats.aggregated) == (0, 2)
    assert _reply_problems(stats) == ["node 2: metric 'train-loss' is not a finite number; "
                                      "left out of the round's metrics"]
    evaluated = strategy.aggregate_evaluate(1, [
        eval_reply(1, **{"num-examples": 1, "eval-accuracy": 0.5}),
        eval_reply(2, **{"num-examples": 1, "eval-accuracy": 0.7, "eval-extra": 2.0}),
    ])
    assert evaluated["eval-accuracy"] == pytest.approx(0.6)


def test_each_sites_epsilon_and_noise_multiplier_are_kept(task_identity):
    strategy = _tracked()
    strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 1, "dp-sgd-epsilon": 2.5,
                                        "dp-sgd-noise-multiplier": 0.9}),
        train_reply(2, _w(3.0, 3.0), **{"num-examples": 1, "dp-sgd-epsilon": 4.0,
                                        "dp-sgd-noise-multiplier": 0.7}),
    ])
    stats = strategy.take_round_stats(1)
    assert stats.dp_sgd_epsilon == 4.0
    # Without a key-learning grid (no client_key) a site is named by its node.
    assert stats.dp_sgd_sites == {"node-1": {"epsilon": 2.5, "noise_multiplier": 0.9},
                                  "node-2": {"epsilon": 4.0, "noise_multiplier": 0.7}}


class KeyedGrid(NodesGrid):
    """Connected nodes 1..n whose site names the grid learned (NodeWaitingGrid's role)."""

    def client_key(self, node_id: int) -> str:
        return f"site-{node_id}"


def test_a_dead_site_is_recorded_under_its_site_name_not_the_superlinks_node_id():
    from flwr.app import ConfigRecord, Error
    from flwr.app.message.message import make_message
    from flwr.common import Metadata
    from flwr.common.constant import SUPERLINK_NODE_ID

    strategy = _tracked(rounds=())
    arrays = ArrayRecord({"w": Array(ZERO["w"])})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({}), KeyedGrid(3)))
    for m in sent:  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = f"ins-{m.metadata.dst_node_id}"
    # Node 3 stopped sending heartbeats: the SuperLink answers for it, as itself.
    unavailable = make_message(
        metadata=Metadata(run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID,
                          dst_node_id=SUPERLINK_NODE_ID, reply_to_message_id="ins-3",
                          group_id="1", created_at=0.0, ttl=60.0, message_type="train"),
        error=Error(code=5, reason="Error: Node Unavailable"))

    strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 1.0), **{"num-examples": 1}),
        train_reply(2, _w(3.0, 3.0), **{"num-examples": 1}),
        unavailable,
    ])

    stats = strategy.take_round_stats(1)
    assert stats.failures == 1
    assert stats.problems == ("site-3 (node 3): error: Error: Node Unavailable",)
    assert stats.site_examples == {"site-1": 1, "site-2": 1}  # reported by the live ones


def test_a_node_that_sent_no_reply_is_named_in_the_rounds_problems():
    from flwr.app import ConfigRecord

    strategy = _tracked(rounds=())
    arrays = ArrayRecord({"w": Array(ZERO["w"])})
    list(strategy.configure_train(1, arrays, ConfigRecord({}), KeyedGrid(4)))
    strategy.aggregate_train(1, [train_reply(n, _w(1.0, 1.0), **{"num-examples": 1})
                                 for n in (1, 3)])
    stats = strategy.take_round_stats(1)
    assert stats.timeouts == 2 and stats.aggregated == 2
    assert stats.problems == tuple(
        f"site-{n} (node {n}): no reply within round-timeout (the node left or was too "
        "slow)" for n in (2, 4))


class _Feedback:
    """A RoundFeedback that remembers what it got and sends a count of it."""

    def __init__(self):
        self.collected = []

    def collect(self, site, metrics):
        self.collected.append((site, dict(metrics)))

    def config_entries(self):
        return {"seen": len(self.collected)} if self.collected else {}

    def summed_keys(self, round_config):
        raise AssertionError("a plain round sums nothing securely")

    def collect_sum(self, sums):
        raise AssertionError("a plain round hands over each site's metrics, never a sum")


def test_round_feedback_collects_replies_by_site_and_feeds_later_round_configs():
    from flwr.app import ConfigRecord

    from tests.server.messages import NodesGrid

    feedback = _Feedback()
    strategy = TrackedStrategy(
        FedAvg(), exchanged_spec={"w": ((2,), np.dtype("float32"))}, seed=0, min_replies=1,
        round_feedback=feedback)

    def configs(rnd):
        arrays = ArrayRecord({"w": Array(ZERO["w"])})
        return [dict(m.content["config"]) for m in strategy.configure_train(
            rnd, arrays, ConfigRecord({"label-names": ["a", "b"]}), NodesGrid(2))]

    assert all("seen" not in c for c in configs(1))  # nothing collected yet
    strategy.aggregate_train(1, [
        train_reply(1, _w(1.0, 0.0), **{"num-examples": 4, "x": 3}),
        train_reply(2, _w(1.0, 0.0), **{"num-examples": 5}),
        error_reply(3),  # an error reply is not handed over
    ])
    assert [site for site, _ in feedback.collected] == ["node-1", "node-2"]
    assert feedback.collected[0][1]["x"] == 3
    assert all(c["seen"] == 2 and c["label-names"] == ["a", "b"] for c in configs(2))


def test_an_aborted_secure_set_up_sends_no_train_message_at_all():
    # A node whose train config lacks the secure-aggregation entries would send its
    # update in plaintext: after an aborted set-up no node may get a train message.
    from flwr.app import ConfigRecord

    from server.secure_aggregation import SecAggAbort, SecAggRoundInfo
    from tests.server.messages import NodesGrid

    class AbortingSetUp:  # the SecureAggregator surface the step uses
        def setup(self, grid, node_ids, server_round, summed_keys=()):
            raise SecAggAbort("2 of 2 nodes dropped while sharing keys")

        def round_info(self):
            return SecAggRoundInfo(round=1)

    strategy = TrackedStrategy(
        FedAvg(), exchanged_spec={"w": ((2,), np.dtype("float32"))}, seed=0, min_replies=1,
        secure=AbortingSetUp())  # type: ignore[arg-type]
    messages = list(strategy.configure_train(
        1, ArrayRecord({"w": Array(ZERO["w"])}), ConfigRecord({}), NodesGrid(2)))

    assert messages == []
    stats = strategy.take_round_stats(1)
    assert stats is not None and stats.sampled == 2
    assert any("secure aggregation set-up failed: 2 of 2 nodes dropped" in p
               for p in stats.problems)
    assert not strategy.aggregation.reads_arrays  # masked replies are only summed
