"""ResultsRow: written then read gives the same record; the file keeps its field names."""

import json

import pytest

from common.config import ConfigError
from server.results import (
    Bytes,
    Clients,
    DpSgd,
    Memory,
    ResultsError,
    ResultsRow,
    Seconds,
    SiteCompute,
    SiteData,
    read_results,
)

ROW = ResultsRow(
    round=2, central={"accuracy": 0.75, "f1_macro": 0.7, "loss": 0.5, "num_examples": 40},
    federated={"eval_accuracy": 0.5}, train={"train_loss": 0.25},
    clients=Clients(sampled=3, replies=3, aggregated=2, invalid=1,
                    problems=("node 4: invalid update: x",), eval_headline=(0.4, 0.6),
                    eval_headline_spread={"min": 0.4, "p10": 0.42, "median": 0.5}),
    bytes=Bytes(up=100, down=200, up_total=300, down_total=400),
    seconds=Seconds(round=10.0, wait=6.0, client_train_max=4.0, client_train_mean=3.0,
                    aggregate=0.1, central_eval=1.0),
    memory_mb=Memory(server_peak=900.0, client_peak=400.0), time=1.7e9,
    validation={"loss": 2.1, "perplexity": 8.2, "exact_match": 0.1, "token_f1": 0.3,
                "num_examples": 12},
    dp_sgd=DpSgd(epsilon_max=3.0, delta=1e-5),
)


def test_a_row_written_then_read_is_the_same_record(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(ROW.to_line() + ResultsRow(round=3).to_line() + '{"round": 4, "to')

    rows = read_results(path)

    assert rows == [ROW, ResultsRow(round=3)]  # the torn last line is left out
    assert rows[1].central is None and rows[1].validation is None and rows[1].privacy is None


def test_a_line_that_is_not_json_with_rows_after_it_is_an_error_not_the_end(tmp_path):
    # Only the last line can be torn; reading up to a damaged middle line would let a
    # resume rewrite the file without the rounds after it.
    path = tmp_path / "results.jsonl"
    path.write_text(ROW.to_line() + '{"round": 2, "to\n' + ResultsRow(round=3).to_line())

    with pytest.raises(ResultsError, match=r"results.jsonl: line 2 is not JSON .* 1 line"):
        read_results(path)
    # a bad input, refused like a bad config: a resume check says "nothing to resume"
    from server.run_outputs import resumable_round

    assert issubclass(ResultsError, ConfigError)
    assert resumable_round(tmp_path) is None


def test_the_json_keeps_the_documented_names_and_nesting():
    obj = json.loads(ROW.to_line())
    assert sorted(obj) == ["bytes", "central", "clients", "dp_sgd", "federated", "memory_mb",
                           "round", "seconds", "time", "train", "validation"]  # no privacy
    assert obj["clients"]["problems"] == ["node 4: invalid update: x"]
    assert obj["seconds"]["client_train_mean"] == 3.0 and obj["bytes"]["up_total"] == 300
    assert obj["validation"]["perplexity"] == 8.2  # any task's metric names
    assert ResultsRow.from_json(obj) == ROW


def test_a_row_of_the_accuracy_named_spread_reads_as_the_headline_spread():
    # Rows written before the spread was keyed on the task's headline metric.
    row = ResultsRow.from_json({"round": 2, "clients": {
        "eval_accuracy": [0.4, 0.6], "eval_accuracy_spread": {"min": 0.4, "median": 0.5}}})
    assert row.clients.eval_headline == (0.4, 0.6)
    assert row.clients.eval_headline_spread == {"min": 0.4, "median": 0.5}
    assert "eval_accuracy" not in row.to_json()["clients"]


def test_a_row_without_optional_parts_reads_with_defaults_and_a_bad_line_is_an_error(tmp_path):
    row = ResultsRow.from_json({"round": 1, "central": None, "seconds": {"round": 2.0}})
    assert row.seconds.round == 2.0 and row.clients.aggregated == 0 and row.dp_sgd is None
    assert row.metrics("central") is None
    path = tmp_path / "results.jsonl"
    path.write_text('{"round": 1}\n[1, 2]\n{"round": 3}\n')
    with pytest.raises(ResultsError, match="numeric 'round'"):
        read_results(path)
    assert read_results(tmp_path / "missing.jsonl") == []


def test_retention_is_written_only_when_set_and_read_back_as_none_when_absent(tmp_path):
    retention = {"loss": 1.4, "perplexity": 4.06, "exact_match": 0.25, "num_examples": 8}
    row = ResultsRow(round=1, central={"loss": 1.2}, retention=retention)
    path = tmp_path / "results.jsonl"
    path.write_text(row.to_line() + ResultsRow(round=2).to_line())

    rows = read_results(path)

    assert rows == [row, ResultsRow(round=2)]
    assert rows[0].metrics("retention") == retention
    assert rows[1].retention is None and rows[1].metrics("retention") is None
    assert json.loads(row.to_line())["retention"] == retention
    assert "retention" not in json.loads(ResultsRow(round=2).to_line())


def test_per_site_data_and_compute_round_trip_and_are_written_only_when_set(tmp_path):
    data = SiteData(rows=10, rows_read=12, dropped=2, label_counts=(7, 2), duplicate_share=0.1,
                    short_share=0.0, truncated_share=0.3)
    cost = SiteCompute(train_seconds=2.0, examples=40, tokens=900, peak_rss_mb=512.0)
    row = ResultsRow(round=1, site_data={"clinic-a": data},
                     site_compute={"clinic-a": cost, "clinic-b": SiteCompute(4.0)})
    path = tmp_path / "results.jsonl"
    path.write_text(row.to_line() + ResultsRow(round=2).to_line())

    rows = read_results(path)

    assert rows == [row, ResultsRow(round=2)]
    assert rows[0].site_data["clinic-a"].label_counts == (7, 2)  # a tuple again
    obj = json.loads(row.to_line())
    assert obj["site_data"]["clinic-a"]["label_counts"] == [7, 2]
    assert obj["site_compute"]["clinic-b"]["gpu_peak_mb"] is None  # not measured, not 0
    assert "site_data" not in json.loads(ResultsRow(round=2).to_line())
    with pytest.raises(ResultsError, match="per-site part"):
        ResultsRow.from_json({"round": 1, "site_compute": {"a": 3.0}})
