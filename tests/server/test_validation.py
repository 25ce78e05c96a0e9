import numpy as np
import pytest

from server.validation import (
    CHECKED_METRICS,
    MAX_NUM_EXAMPLES,
    array_specs,
    metrics_problem,
    unreadable_metrics,
    update_problem,
)

GOOD = {"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float32)}
SPEC = array_specs(GOOD)


def test_a_matching_finite_update_passes():
    assert update_problem(GOOD, expected=SPEC, num_examples=10) is None


@pytest.mark.parametrize(
    "num_examples, fragment",
    [(0, "in [1,"), (-5, "in [1,"), (MAX_NUM_EXAMPLES + 1, "in [1,"), (2.5, "whole"),
     (float("nan"), "whole"), (True, "number"), ("7", "number"), (None, "number")],
)
def test_bad_example_counts_are_rejected(num_examples, fragment):
    assert fragment in update_problem(GOOD, expected=SPEC, num_examples=num_examples)


def test_missing_and_unexpected_names_are_named():
    problem = update_problem({"a": GOOD["a"], "c": GOOD["b"]}, expected=SPEC, num_examples=1)
    assert "missing ['b']" in problem and "unexpected ['c']" in problem


def test_wrong_shape_and_dtype_are_rejected():
    assert "expected float32[2, 3]" in update_problem(
        {**GOOD, "a": np.zeros((3, 2), np.float32)}, expected=SPEC, num_examples=1)
    assert "float64" in update_problem(
        {**GOOD, "a": np.zeros((2, 3), np.float64)}, expected=SPEC, num_examples=1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    b = GOOD["b"].copy()
    b[2] = bad
    assert "non-finite" in update_problem({**GOOD, "b": b}, expected=SPEC, num_examples=1)


def test_update_norm_bound():
    base = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    update = {"a": np.full((2, 3), 1.0, np.float32), "b": np.zeros(4, np.float32)}  # norm √6
    assert update_problem(update, expected=SPEC, num_examples=1, base=base, max_norm=2.5) is None
    problem = update_problem(update, expected=SPEC, num_examples=1, base=base, max_norm=2.0)
    assert "update norm 2.449 exceeds `max-update-norm` 2" in problem
    assert update_problem(update, expected=SPEC, num_examples=1, base=base) is None  # off


def test_the_checked_metrics_are_those_that_steer_aggregation_or_privacy_reports():
    assert set(CHECKED_METRICS) == {"num-examples", "norm_bit", "dp-sgd-epsilon"}


@pytest.mark.parametrize("name", sorted(CHECKED_METRICS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, "1", True, [1.0]])
def test_a_checked_metric_that_is_not_a_finite_number_drops_the_reply(name, bad):
    problem = metrics_problem({"num-examples": 3, name: bad})
    assert problem is not None and f"metric {name!r}" in problem
    assert unreadable_metrics({name: bad}) == []  # never merely left out


def test_informational_metrics_never_drop_a_reply():
    metrics = {"num-examples": 3, "norm_bit": 1, "dp-sgd-epsilon": 0.5,
               "train-loss": np.nan, "train-first-loss": -np.inf, "train-steps": 4,
               "note": "text"}
    assert metrics_problem(metrics) is None
    assert unreadable_metrics(metrics) == ["note", "train-first-loss", "train-loss"]
    assert metrics_problem({"num-examples": 3}) is None  # checked keys are optional
