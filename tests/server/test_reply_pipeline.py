"""The reply pipeline with hand-made arrays: no Flower messages."""

import re

import numpy as np
import pytest

from common.encoding import UpdateEncoding, encode_update
from server.reply_pipeline import (
    Reply,
    RoundSetup,
    Update,
    ValidatedAggregation,
    client_measurements,
    content_digest,
    decode_reply,
    in_digest_order,
    prepare_updates,
    restore_dtypes,
    with_common_metrics,
)

SPEC = {"w": ((2,), np.dtype("float32"))}
SENT = {"w": np.array([1.0, 1.0], np.float32)}
FP32 = UpdateEncoding()


def _reply(node, *values, **metrics):
    return Reply(node=node, arrays={"w": np.asarray(values, np.float32)},
                 metrics={"num-examples": 1, **metrics})


def _mean(rnd, updates):
    """Weighted mean by num-examples: the rule FedAvg applies."""
    weights = np.array([u.metrics["num-examples"] for u in updates], np.float64)
    stacked = np.stack([u.arrays["w"] for u in updates]).astype(np.float64)
    return {"w": (weights @ stacked) / weights.sum()}, {"rounds": rnd}


def test_an_int8_delta_is_decoded_against_the_state_that_was_sent():
    enc = UpdateEncoding("int8", block_size=0)
    payload, _ = encode_update({"w": np.array([3.0, -1.0], np.float32)}, SENT, enc)
    update, problem = decode_reply(Reply(node=1, arrays=payload, metrics={"num-examples": 2}),
                                   sent=SENT, spec=SPEC, encoding=enc)
    assert problem is None
    np.testing.assert_allclose(update.arrays["w"], [3.0, -1.0], atol=0.02)


def test_invalid_replies_are_dropped_with_their_reason_in_arrival_order():
    prepared = prepare_updates([
        _reply(1, 2.0, 2.0),
        Reply(node=2, error="CUDA out of memory"),
        _reply(3, np.nan, 0.0),
        Reply(node=4, metrics={"num-examples": 1}, problem="expected exactly one ArrayRecord"),
        _reply(5, 10.0, 1.0),  # norm of (9, 0) exceeds 5
    ], sent=SENT, spec=SPEC, encoding=FP32, max_update_norm=5.0)
    assert [u.node for u in prepared.updates] == [1]
    assert (prepared.failures, prepared.invalid) == (1, 3)
    assert [p.split(":")[0] for p in prepared.problems] == ["node 2", "node 3", "node 4",
                                                            "node 5"]
    assert "exceeds `max-update-norm` 5" in prepared.problems[-1]


def test_uniform_weights_count_every_update_as_one_example():
    prepared = prepare_updates([_reply(1, 1.0, 1.0, **{"num-examples": 40})], sent=SENT,
                               spec=SPEC, encoding=FP32, uniform_weights=True)
    assert prepared.updates[0].metrics["num-examples"] == 1


def test_metrics_not_shared_by_all_updates_as_finite_numbers_are_left_out():
    updates = [Update(node=1, arrays={}, metrics={"num-examples": 1, "loss": 0.5, "x": 1.0}),
               Update(node=2, arrays={}, metrics={"num-examples": 1, "loss": float("nan")})]
    assert [dict(u.metrics) for u in with_common_metrics(updates)] == [
        {"num-examples": 1}, {"num-examples": 1}]


def test_digest_order_does_not_depend_on_arrival_order():
    updates = [Update(node=n, arrays={"w": np.full(2, n, np.float32)}, metrics={})
               for n in range(5)]
    assert ([u.node for u in in_digest_order(updates)]
            == [u.node for u in in_digest_order(updates[::-1])])
    assert content_digest({"w": np.zeros(2, np.float32)}) != content_digest(
        {"w": np.zeros(2, np.float64)})


def test_restore_dtypes_casts_float64_back_to_the_exchanged_dtype():
    restored = restore_dtypes({"w": np.array([0.5, 1.5])}, SPEC)
    assert restored["w"].dtype == np.float32 and restored["w"].tolist() == [0.5, 1.5]


def test_the_validated_step_aggregates_the_valid_updates_by_weight():
    step = ValidatedAggregation(rule=_mean, spec=SPEC, encoding=FP32, min_replies=1)
    result = step(3, [_reply(1, 1.0, 0.0), _reply(2, 4.0, 8.0, **{"num-examples": 3}),
                      _reply(3, np.inf, 0.0)], SENT)
    # (1*1 + 3*4) / 4 = 3.25 ; (0 + 3*8) / 4 = 6
    assert result.arrays["w"].tolist() == [3.25, 6.0] and result.arrays["w"].dtype == np.float32
    assert (result.aggregated, result.invalid, result.failures) == (2, 1, 0)
    assert result.metrics == {"rounds": 3} == result.train_metrics


def test_the_validated_step_skips_a_round_with_too_few_updates_or_a_failing_rule():
    few = ValidatedAggregation(rule=_mean, spec=SPEC, encoding=FP32, min_replies=2)
    result = few(1, [_reply(1, 1.0, 1.0), Reply(node=2, error="boom")], SENT)
    assert result.arrays is None and result.aggregated == 0 and result.failures == 1

    def broken(rnd, updates):
        raise ZeroDivisionError("float division by zero")

    result = ValidatedAggregation(rule=broken, spec=SPEC, encoding=FP32, min_replies=1)(
        1, [_reply(1, 1.0, 1.0)], SENT)
    assert result.arrays is None
    assert result.problems[-1] == "aggregation failed: ZeroDivisionError: float division by zero"

    empty = ValidatedAggregation(rule=lambda rnd, u: (None, None), spec=SPEC, encoding=FP32,
                                 min_replies=1, why_no_model=lambda n: f"no model from {n}")
    assert empty(1, [_reply(1, 1.0, 1.0)], SENT).problems == ("no model from 1",)


def test_client_measurements_take_the_slowest_and_the_largest():
    measured = client_measurements([
        _reply(1, 0.0, 0.0, **{"train-seconds": 2.0, "peak-rss-mb": 300.0}),
        _reply(2, 0.0, 0.0, **{"train-seconds": 4.0, "dp-sgd-epsilon": 1.5}),
        _reply(3, 0.0, 0.0, **{"train-seconds": float("nan"), "dp-sgd-epsilon": 0.5}),
        Reply(node=4, error="x", metrics={"peak-rss-mb": 1e6}),
    ])
    assert measured.train_seconds == (2.0, 4.0)
    assert measured.peak_rss_mb == 300.0 and measured.dp_sgd_epsilon == pytest.approx(1.5)


# --- per-site data statistics and compute ----------------------------------------------------
SHARED = {"data-rows-read": 12, "data-rows": 10, "data-label-count-0": 7,
          "data-label-share-0": 0.7, "data-label-count-1": 2, "data-label-share-1": 0.2,
          "data-duplicate-share": 0.1, "data-short-share": 0.0, "data-truncated-share": 0.3}


def test_a_sharing_site_gets_its_statistics_and_a_site_that_does_not_gets_none():
    sites = {1: "clinic-a", 2: "clinic-b"}
    measured = client_measurements([
        _reply(1, 0.0, 0.0, **SHARED, **{"train-seconds": 2.0, "train-examples-seen": 40,
                                          "train-tokens": 900, "peak-rss-mb": 512.0}),
        _reply(2, 0.0, 0.0, **{"train-seconds": 4.0}),  # no opt-in: no data-* metric
    ], site_key=sites.get)

    assert list(measured.site_data) == ["clinic-a"] and measured.problems == ()
    data = measured.site_data["clinic-a"]
    # 12 read, 10 kept: 2 dropped; counts 7 and 2 (one row of an unknown label left out).
    assert (data.rows_read, data.rows, data.dropped, data.label_counts) == (12, 10, 2, (7, 2))
    assert data.imbalance_ratio == 3.5 and data.truncated_share == 0.3
    a, b = measured.site_compute["clinic-a"], measured.site_compute["clinic-b"]
    assert a.examples_per_second == 20.0 and a.tokens_per_second == 450.0
    assert a.peak_rss_mb == 512.0 and a.gpu_peak_mb is None and a.gpu_utilization is None
    assert b.train_seconds == 4.0 and b.examples_per_second is None  # not counted


@pytest.mark.parametrize(("extra", "why"), [
    ({"data-text-0": 1.0}, "'data-text-0' is not an aggregate statistic"),
    ({"data-rows": 2.5}, "'data-rows' must be a non-negative integer"),
    ({"data-short-share": 1.5}, "'data-short-share' must be a share in \\[0, 1\\]"),
    ({"data-label-count-3": 1}, "classes 0..k-1, got \\[0, 1, 3\\]"),
    ({"data-rows": 8}, "add up to 9, above 'data-rows' 8"),
    ({"data-rows-read": 9}, "'data-rows' 10 is above 'data-rows-read' 9"),
])
def test_statistics_outside_the_allowed_kinds_are_refused_whole_with_the_reason(extra, why):
    measured = client_measurements([_reply(3, 0.0, 0.0, **{**SHARED, **extra})])

    assert measured.site_data == {}
    assert len(measured.problems) == 1
    assert measured.problems[0].startswith("node 3: data statistics left out: ")
    assert re.search(why, measured.problems[0])


def test_the_sft_statistics_and_gpu_metrics_are_read_and_bad_optional_ones_dropped():
    measured = client_measurements([_reply(
        1, 0.0, 0.0, **{"data-rows": 30, "data-truncated": 4, "data-dropped": 2,
                        "data-median-tokens": 118.5, "train-seconds": 10.0,
                        "train-tokens": 5000, "gpu-peak-memory-mb": 2048.0,
                        "gpu-utilization": 180.0})])

    data, cost = measured.site_data["node-1"], measured.site_compute["node-1"]
    assert (data.rows, data.truncated, data.dropped, data.median_tokens) == (30, 4, 2, 118.5)
    assert data.label_counts == () and data.imbalance_ratio is None
    assert cost.tokens_per_second == 500.0 and cost.gpu_peak_mb == 2048.0
    assert cost.gpu_utilization is None  # above 100 %: not a utilization


def test_the_plain_step_sets_nothing_up_and_hands_each_good_reply_to_the_feedback():
    class Sink:
        def __init__(self):
            self.got = []

        def collect(self, site, metrics):
            self.got.append((site, dict(metrics)))

        def summed_keys(self, round_config):
            raise AssertionError("a plain round sums nothing securely")

        def collect_sum(self, sums):
            raise AssertionError("plain replies are collected one by one")

    sink = Sink()
    step = ValidatedAggregation(rule=lambda rnd, updates: (None, None), spec={},
                                encoding=FP32, min_replies=1, feedback=sink)
    setup = step.setup(3, [1, 2], grid=None, round_config={"label-names": ["a", "b"]})
    assert setup == RoundSetup() and setup.entries is None  # messages go as sampled
    assert step.reads_arrays

    good = Reply(node=7, arrays=None, metrics={"label-count-0": 4})
    failed = Reply(node=8, arrays=None, error="boom")
    step.collect_feedback(3, [good, failed], site_key=lambda n: f"site-{n}")
    assert sink.got == [("site-7", {"label-count-0": 4})]
