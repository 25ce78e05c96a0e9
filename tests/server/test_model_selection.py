"""Best-round selection and early stopping on made-up metric sequences."""

from __future__ import annotations

import math

import pytest

from common.config import RunConfig, selection_metrics
from common.tasks import MetricInfo, TaskInfo, task_names, task_registered
from server.model_selection import (
    best_round,
    early_stop_reason,
    metric_mode,
    rounds_without_improvement,
    select_round,
    should_stop,
)
from server.results import ResultsRow


def _rows(values, *, split="validation", metric="accuracy", skipped=()):
    """Results rows for rounds 0..n: round r gets values[r] (None: no metrics)."""
    rows = []
    for rnd, value in enumerate(values):
        block = None if value is None else {metric: value}
        rows.append(ResultsRow.from_json({
            "round": rnd, split: block,
            "clients": {"aggregated": 0 if rnd == 0 or rnd in skipped else 2,
                        "skipped": rnd in skipped}}))
    return rows


def test_every_selection_metric_has_a_direction():
    for task in task_names():
        named = set(selection_metrics(task)) - {"auto"}
        assert {metric_mode(task, m) for m in named} <= {"max", "min"}
        metric_mode(task, RunConfig(task=task).selection_metric_name)  # resolves
    assert metric_mode("classification", "loss") == metric_mode("sft", "loss") == "min"
    assert metric_mode("sft", "perplexity") == "min"
    assert metric_mode("sft", "exact_match") == metric_mode("sft", "token_f1") == "max"
    with pytest.raises(ValueError, match="no metric 'auto'"):
        metric_mode("classification", "auto")


def test_a_task_registered_after_import_gets_its_directions():
    # The directions are read from the registry when asked, not copied at import.
    info = TaskInfo(module="unused", default_model="minilm", metrics=(
        MetricInfo("bleu", "BLEU", higher_is_better=True),
        MetricInfo("loss", "loss", higher_is_better=False, bounded=False)))
    with task_registered("translation", info):
        assert metric_mode("translation", "bleu") == "max"
        assert metric_mode("translation", "loss") == "min"
    with pytest.raises(ValueError, match="unknown task 'translation'"):
        metric_mode("translation", "bleu")


def test_best_round_maximises_accuracy_and_minimises_loss():
    assert best_round({1: 0.6, 2: 0.8, 3: 0.7}, mode="max") == 2
    assert best_round({1: 0.9, 2: 0.4, 3: 0.5}, mode="min") == 2


def test_ties_go_to_the_earliest_round():
    # Same score with fewer rounds of training; a skipped round re-evaluates the
    # previous model and must not take its credit.
    assert best_round({1: 0.5, 2: 0.8, 3: 0.8, 4: 0.8}, mode="max") == 2
    assert best_round({3: 0.2, 1: 0.3, 2: 0.2}, mode="min") == 2  # order by round, not key


def test_nan_and_missing_metrics_are_ignored():
    assert best_round({1: 0.6, 2: math.nan, 3: None, 4: math.inf}, mode="max") == 1
    assert best_round({1: None, 2: math.nan}, mode="max") is None
    assert best_round({}, mode="min") is None


def test_min_delta_makes_small_gains_no_improvement():
    values = {1: 0.70, 2: 0.705, 3: 0.72}
    assert best_round(values, mode="max", min_delta=0.01) == 3
    assert best_round({1: 0.70, 2: 0.705}, mode="max", min_delta=0.01) == 1


def test_patience_counts_rounds_since_the_best_with_min_delta():
    history = [0.5, 0.6, 0.605, 0.59]
    assert rounds_without_improvement(history, mode="max") == 1  # 0.605 improved
    assert rounds_without_improvement(history, mode="max", min_delta=0.01) == 2
    assert rounds_without_improvement([0.9, 0.8, 0.85], mode="min") == 1
    assert rounds_without_improvement([0.9, 0.85, 0.8], mode="min") == 0
    # NaN after a best is a round without improvement; before any value, nothing counts.
    assert rounds_without_improvement([None, math.nan, 0.5, math.nan], mode="max") == 1
    assert rounds_without_improvement([None, None], mode="max") == 0


def test_stops_after_exactly_patience_rounds_without_improvement():
    history = [0.5, 0.7, 0.7, 0.69, 0.7]
    stops = [should_stop(history[:n], patience=3, min_delta=0.0, mode="max")
             for n in range(1, len(history) + 1)]
    assert stops == [False, False, False, False, True]
    assert not should_stop(history, patience=0, min_delta=0.0, mode="max")  # off
    assert should_stop([0.5, 0.505], patience=1, min_delta=0.01, mode="max")
    assert not should_stop([0.5, 0.52], patience=1, min_delta=0.01, mode="max")
    with pytest.raises(ValueError, match="patience must be >= 0"):
        should_stop([], patience=-1, min_delta=0.0, mode="max")


def test_select_round_names_the_best_round_and_why():
    rows = _rows([0.9, 0.6, 0.84, 0.8, 0.7, 0.84, 0.8, 0.7, 0.75])
    selection = select_round(rows, rule="best", metric="accuracy",
                             split="validation", task="classification")
    assert (selection.rule, selection.round, selection.last_round) == ("best", 2, 8)
    assert selection.value == 0.84
    # Round 0 (the untrained model) is never a candidate, even with the top score.
    assert selection.note == "best validation accuracy 0.8400 at round 2 of 8"
    assert selection.to_json()["round"] == 2


def test_selecting_on_the_eval_split_says_it_is_optimistic():
    rows = _rows([0.5, 0.4, 0.3, 0.35], split="central", metric="loss")
    selection = select_round(rows, rule="best", metric="loss",
                             split="central", task="classification")
    assert selection.round == 2
    assert selection.note.startswith("best eval loss 0.3000 at round 2 of 3")
    assert "optimistic" in selection.note


def test_skipped_rounds_are_not_candidates():
    rows = _rows([0.5, 0.6, 0.9, 0.7], skipped=(2,))
    assert select_round(rows, rule="best", metric="accuracy",
                        split="validation", task="classification").round == 3


def test_without_metrics_best_falls_back_to_last_with_a_note():
    rows = _rows([None, None, None])
    selection = select_round(rows, rule="best", metric="accuracy",
                             split="central", task="classification")
    assert (selection.rule, selection.round, selection.value) == ("last", 2, None)
    assert "fell back to the last round" in selection.note
    last = select_round(_rows([0.5, 0.9, 0.1]), rule="last", metric="accuracy",
                        split="validation", task="classification")
    assert (last.rule, last.round) == ("last", 2)
    assert select_round(_rows([0.5]), rule="best", metric="accuracy",
                        split="validation", task="classification") is None


def test_early_stop_reason_names_the_patience_and_the_round():
    rows = _rows([0.5, 0.6, 0.8, 0.7, 0.8])
    assert early_stop_reason(rows[:4], patience=2, min_delta=0.0, metric="accuracy",
                             split="validation", total_rounds=10, task="classification") is None
    reason = early_stop_reason(rows, patience=2, min_delta=0.0, metric="accuracy",
                               split="validation", total_rounds=10, task="classification")
    assert reason is not None
    assert "`early-stopping-patience` = 2" in reason and "after round 4 of 10" in reason


def _sft_rows(blocks):
    """sft results rows for rounds 0..n with the given validation blocks."""
    return [ResultsRow.from_json({"round": rnd, "validation": block,
                                  "clients": {"aggregated": 0 if rnd == 0 else 2}})
            for rnd, block in enumerate(blocks)]


def test_auto_selects_sft_by_the_lowest_loss_and_classification_by_accuracy():
    sft = _sft_rows([{"loss": 2.0}, {"loss": 1.5}, {"loss": 1.2}, {"loss": 1.3}])
    metric = RunConfig(task="sft").selection_metric_name
    selection = select_round(sft, rule="best", metric=metric, split="validation", task="sft")
    assert (selection.metric, selection.round) == ("loss", 2)
    assert selection.note == "best validation assistant-token loss 1.2000 at round 2 of 3"
    classification = _rows([0.3, 0.6, 0.8, 0.7])
    metric = RunConfig().selection_metric_name
    selection = select_round(classification, rule="best", metric=metric,
                             split="validation", task="classification")
    assert (selection.metric, selection.round) == ("accuracy", 2)
    assert selection.note == "best validation accuracy 0.8000 at round 2 of 3"


def test_exact_match_rounds_without_generation_are_neither_candidates_nor_patience():
    # generate-every = 2: exact match in rounds 0, 2, 4 and 6 only; loss every round.
    sft = _sft_rows([{"loss": 2.0, "exact_match": 0.0}, {"loss": 1.8},
                     {"loss": 1.6, "exact_match": 0.4}, {"loss": 1.5},
                     {"loss": 1.4, "exact_match": 0.3}, {"loss": 1.3},
                     {"loss": 1.2, "exact_match": 0.35}])
    selection = select_round(sft, rule="best", metric="exact_match", split="validation",
                             task="sft")
    assert (selection.round, selection.value) == (2, 0.4)
    assert "validation exact match 0.4000 at round 2 of 6" in selection.note

    def reason(rows, patience):
        return early_stop_reason(rows, patience=patience, min_delta=0.0,
                                 metric="exact_match", split="validation",
                                 total_rounds=10, task="sft")

    # After round 5, only round 4 measured it without improving: patience 2 waits on.
    assert reason(sft[:6], 2) is None
    # Round 6 is the second measured round without improvement on 0.4.
    assert "after round 6 of 10" in reason(sft, 2)
    assert "validation exact match did not improve" in reason(sft, 2)
    # Counted by rounds, the unmeasured ones would have stopped it after round 4.
    assert reason(sft[:5], 2) is None


def test_a_measured_nan_still_counts_as_a_round_without_improvement():
    sft = _sft_rows([{"loss": 2.0}, {"loss": 1.0}, {"loss": math.nan}, {}])
    reason = early_stop_reason(sft, patience=1, min_delta=0.0, metric="loss",
                               split="validation", total_rounds=5, task="sft")
    assert reason is not None and "after round 3 of 5" in reason
