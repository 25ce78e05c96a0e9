"""Run and comparison reports from synthetic run folders (no Flower)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import RunConfig
from server.results import ResultsRow, SiteCompute, SiteData
from simulations.report import (
    ReportError,
    class_recalls,
    label_distribution,
    load_run,
    site_compute_table,
    site_data_table,
    summarize,
    time_split,
    write_comparison,
    write_report,
    write_simulation_file,
)

TINY_DATA = {"dataset": "builtin", "builtin-examples": 200, "seed": 3}


def _row(rnd: int, *, acc: float, up: int = 1000, failures: int = 0) -> dict:
    trained = rnd > 0
    spread = {"min": acc - 0.2, "p10": acc - 0.1, "median": acc} if trained else {}
    return {
        "round": rnd,
        "central": {"accuracy": acc, "f1_macro": acc - 0.05, "loss": 1.0 - acc / 2,
                    "num_examples": 20},
        "federated": {"eval_accuracy": acc - 0.02, "eval_loss": 0.9} if trained else {},
        "train": {"train_loss": 1.1 - acc / 2} if trained else {},
        "clients": {"sampled": 2 * trained, "replies": 2 * trained,
                    "aggregated": 2 * trained - failures, "failures": failures,
                    "timeouts": 0, "invalid": 0, "skipped": False, "problems": [],
                    "eval_accuracy": [acc - 0.2, acc] if trained else [],
                    "eval_accuracy_spread": spread},
        "bytes": {"up": up * trained, "down": 2 * up * trained, "up_total": up * rnd,
                  "down_total": 2 * up * rnd},
        "seconds": {"round": 10.0 * trained, "wait": 6.0 * trained,
                    "client_train_max": 4.0 * trained, "client_train_mean": 3.0 * trained,
                    "aggregate": 0.5 * trained, "central_eval": 1.0},
        "memory_mb": {"server_peak": 800.0 + rnd, "client_peak": 900.0 * trained},
        "time": 1.7e9 + 10 * rnd,
    }


def make_run(folder: Path, *, accs=(0.3, 0.5, 0.7, 0.8), nodes: int | None = 4,
             failures: int = 0, **config) -> Path:
    """A run folder as the app leaves it: config.json, label_map.json, results.jsonl."""
    folder.mkdir(parents=True)
    cfg = RunConfig.from_flower({**TINY_DATA, **config}).to_flower()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "label_map.json").write_text(
        json.dumps({"0": "negative", "1": "neutral", "2": "positive"}))
    rows = [_row(i, acc=a, failures=failures if i == 1 else 0) for i, a in enumerate(accs)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if nodes:
        write_simulation_file(folder, scenario="synthetic", num_supernodes=nodes,
                              num_cpus=1, num_gpus=0.0)
    return folder


def assert_self_contained(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    sources = re.findall(r"src=['\"]([^'\"]*)['\"]", html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)


def assert_pngs(folder: Path, names: set[str]) -> None:
    assert {p.name for p in folder.glob("*.png")} == names
    for png in folder.glob("*.png"):
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 300


def test_run_report_writes_self_contained_html_and_every_figure(tmp_path):
    run = make_run(tmp_path / "run-a", failures=1)

    path = write_report(run)

    assert path == run / "report.html"
    html = path.read_text()
    assert_self_contained(html)
    assert_pngs(run / "report", {"accuracy.png", "loss.png", "client_spread.png",
                                 "label_distribution.png", "label_share.png", "bytes.png",
                                 "round_time.png", "memory.png"})
    assert html.count("<img") == 8
    # Summary table and resolved config.
    assert "final accuracy</td><td class='num'>0.8000" in html
    assert "3.00 kB" in html  # bytes up total: 1000 B x 3 rounds
    assert "<td>builtin-examples</td><td class='num'>200</td>" in html
    assert "synthetic" in html  # the scenario from simulation.json
    assert "final recall" not in html and "worst-class recall" not in html  # none recorded


def test_report_without_simulation_file_skips_the_label_distribution_with_a_note(tmp_path):
    run = make_run(tmp_path / "deployed", nodes=None)

    html = write_report(run).read_text()

    assert "Label distribution per client skipped" in html
    assert not (run / "report" / "label_distribution.png").exists()
    # Given the client count on the command line, it is recomputed.
    write_report(run, num_supernodes=2)
    assert (run / "report" / "label_distribution.png").exists()


def test_report_copes_with_runs_without_central_evaluation(tmp_path):
    run = make_run(tmp_path / "no-central")
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row["central"] = None
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows)
                                       + '{"round": 4, "torn')  # a crash mid-write

    html = write_report(run).read_text()

    assert load_run(run).rows[-1].round == 3  # the torn line is ignored
    assert "final accuracy</td><td class='num'>-</td>" in html
    assert summarize(load_run(run))["final federated accuracy"] == pytest.approx(0.78)


def test_a_folder_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="results.jsonl is missing"):
        write_report(tmp_path)


def test_summary_totals_by_hand(tmp_path):
    run = load_run(make_run(tmp_path / "r", failures=1))

    summary = summarize(run)

    assert summary["rounds"] == 3
    assert summary["best accuracy"] == 0.8 and summary["best round"] == 3
    assert summary["bytes up"] == 3000 and summary["bytes down"] == 6000
    assert summary["mean round seconds"] == 10.0  # round 0 is not a training round
    assert summary["failures"] == 1
    assert summary["final worst-client accuracy"] == pytest.approx(0.6)


def test_time_split_adds_up_to_the_round_time():
    parts = time_split(ResultsRow.from_json(_row(1, acc=0.5)))

    assert parts["client compute (slowest client)"] == 4.0
    assert parts["communication + serialization + waiting"] == 2.0  # wait 6 - train 4
    assert sum(parts.values()) == pytest.approx(10.0)
    # Waiting shorter than the slowest client's reported time: communication floors at 0.
    row = _row(1, acc=0.5)
    row["seconds"]["wait"] = 3.0
    assert time_split(ResultsRow.from_json(row))["communication + serialization + waiting"] == 0.0


def test_label_distribution_recomputes_the_partitions(tmp_path):
    config = RunConfig.from_flower({**TINY_DATA, "partitioner": "pathological",
                                    "classes-per-client": 1}).to_flower()

    counts, names, ids = label_distribution(config, num_partitions=3)

    assert names == ["negative", "neutral", "positive"] and ids == [0, 1, 2]
    # builtin-examples 200, 10 % held out for the server: 180 training rows in all.
    assert counts.sum() == 180
    # One class per client, each class to one client.
    assert ((counts > 0).sum(axis=1) == 1).all()
    assert sorted(np.argmax(counts, axis=1)) == [0, 1, 2]


def test_label_distribution_shows_at_most_max_clients(tmp_path):
    config = RunConfig.from_flower(TINY_DATA).to_flower()

    counts, _, ids = label_distribution(config, num_partitions=30, max_clients=5)

    assert ids == [0, 1, 2, 3, 4] and counts.shape == (5, 3)
    assert counts.sum(axis=1).tolist() == [6, 6, 6, 6, 6]  # 180 rows over 30 clients


def test_compare_overlays_runs_with_a_final_metrics_table(tmp_path):
    a = make_run(tmp_path / "runs" / "sweep-seed=1", accs=(0.3, 0.6, 0.8))
    b = make_run(tmp_path / "runs" / "sweep-seed=2", accs=(0.3, 0.5, 0.6))
    write_report(a)

    path = write_comparison([a, b], tmp_path / "cmp", title="two runs")

    html = path.read_text()
    assert path == tmp_path / "cmp" / "compare.html"
    assert_self_contained(html)
    assert_pngs(tmp_path / "cmp" / "compare", {
        "accuracy.png", "f1_macro.png", "loss.png", "bytes.png", "accuracy_vs_bytes.png",
        "round_time.png"})
    assert "sweep-seed=1" in html and "sweep-seed=2" in html
    assert "0.8000" in html and "0.6000" in html  # final accuracies
    # Run a has a report: linked relatively. The two seeds are also averaged.
    assert "href='../runs/sweep-seed=1/report.html'" in html
    assert "sweep-seed=2/report.html" not in html
    assert "Mean &plusmn; standard deviation over seeds" in html
    assert "0.7000 &plusmn; 0.1000" in html


def _with_recall(run: Path) -> Path:
    """The run's rows with per-class recall as the server records it: positive (class 2)
    lags, neutral (class 1) has no eval example in round 0."""
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for row in rows:
        rnd = row["round"]
        recalls = {"recall_0": 0.5 + 0.1 * rnd, "recall_2": 0.1 * rnd,
                   **({"recall_1": 0.4 + 0.1 * rnd} if rnd else {})}
        row["central"].update(recalls, recall_min=min(recalls.values()))
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_the_report_shows_each_classs_recall_by_its_name(tmp_path):
    run = _with_recall(make_run(tmp_path / "imbalanced"))

    html = write_report(run).read_text()

    assert (run / "report" / "class_recall.png").is_file()
    assert html.count("<img") == 9
    # The last round's (round 3) recall per class, named from label_map.json.
    assert "final recall negative</td><td class='num'>0.8000" in html
    assert "final recall neutral</td><td class='num'>0.7000" in html
    assert "final recall positive</td><td class='num'>0.3000" in html
    assert "final worst-class recall</td><td class='num'>0.3000" in html
    recalls = class_recalls(load_run(run).rows)
    assert list(recalls) == [0, 1, 2] and recalls[1][0] != recalls[1][0]  # NaN: unmeasured
    assert recalls[2] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_compare_lists_the_recall_per_class_and_a_dash_for_a_run_without(tmp_path):
    a = _with_recall(make_run(tmp_path / "runs" / "weighted"))
    b = make_run(tmp_path / "runs" / "older")

    html = write_comparison([a, b], tmp_path / "cmp").read_text()

    assert ("<th>final recall negative</th><th>final recall neutral</th>"
            "<th>final recall positive</th><th>final worst-class recall</th>") in html
    older = html[html.index("<td>older</td>"):]
    assert older.split("</tr>")[0].count("<td class='num'>-</td>") == 4


def test_compare_refuses_runs_with_the_same_name(tmp_path):
    a = make_run(tmp_path / "x" / "same")
    b = make_run(tmp_path / "y" / "same")
    with pytest.raises(ReportError, match="distinct folder names"):
        write_comparison([a, b], tmp_path / "cmp")


def _sft_row(rnd: int, *, loss: float, em: float | None, retention_loss: float) -> dict:
    """An sft results row: exact match / token F1 only in rounds that generated."""
    row = _row(rnd, acc=0.5)
    generated = {} if em is None else {"exact_match": em, "token_f1": em + 0.1}
    row["central"] = {"loss": loss, "perplexity": float(np.exp(loss)), "num_examples": 20,
                      **generated}
    row["federated"] = {"eval_loss": loss + 0.1} if rnd > 0 else {}
    row["clients"]["eval_accuracy"] = []
    row["clients"]["eval_accuracy_spread"] = {}
    row["retention"] = {"loss": retention_loss, "perplexity": float(np.exp(retention_loss)),
                        "num_examples": 8, **({} if em is None else {"exact_match": 0.5})}
    return row


def make_sft_run(folder: Path, *, losses=(2.0, 1.6, 1.3, 1.2, 1.1), nodes: int | None = 2
                 ) -> Path:
    """An sft run folder (generate-every = 2: exact match in rounds 0, 2 and 4)."""
    folder.mkdir(parents=True)
    cfg = RunConfig.from_flower({"task": "sft", "builtin-examples": 60, "generate-every": 2,
                                 "retention-dataset": "general.jsonl"}).to_flower()
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "label_map.json").write_text("{}")
    rows = [_sft_row(i, loss=loss, em=0.1 * i if i % 2 == 0 else None,
                     retention_loss=1.5 + 0.03 * i) for i, loss in enumerate(losses)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if nodes:
        write_simulation_file(folder, scenario="sft-synthetic", num_supernodes=nodes,
                              num_cpus=1, num_gpus=0.0)
    return folder


def test_an_sft_report_draws_the_tasks_metrics_and_the_forgetting_monitor(tmp_path):
    run = make_sft_run(tmp_path / "sft")

    html = write_report(run).read_text()

    assert_self_contained(html)
    assert_pngs(run / "report", {"exact_match.png", "loss.png", "perplexity.png",
                                 "retention.png", "bytes.png", "round_time.png",
                                 "memory.png"})
    assert html.count("<img") == 7
    assert "exact match and token F1 on the server&#x27;s held-out data (in the rounds" in html
    assert "final exact match</td><td class='num'>0.4000" in html  # round 4's
    assert "final assistant-token loss</td><td class='num'>1.1000" in html
    assert "best exact match</td><td class='num'>0.4000" in html
    # Retention loss 1.50 at round 0, 1.62 at round 4: forgetting shows as a rise.
    assert ("retention assistant-token loss since round 0</td><td class='num'>+0.1200"
            in html)
    assert "retention exact match since round 0</td><td class='num'>+0.0000" in html
    assert "task sft has no classes" in html
    # The clients' spread is of the headline metric (none here: no federated spread).
    assert "per-client accuracy spread" not in html
    assert "No per-client exact match spread" in html


def test_the_sft_summary_by_hand(tmp_path):
    summary = summarize(load_run(make_sft_run(tmp_path / "sft")))

    assert summary["best exact match"] == pytest.approx(0.4) and summary["best round"] == 4
    assert summary["final token F1"] == pytest.approx(0.5)
    assert summary["final perplexity"] == pytest.approx(np.exp(1.1))
    assert summary["final federated exact match"] != summary["final federated exact match"]
    assert summary["retention perplexity since round 0"] == pytest.approx(
        np.exp(1.62) - np.exp(1.5))
    assert "final worst-client accuracy" not in summary
    worst = summary["final worst-client exact match"]
    assert worst != worst  # NaN: no round had a clients' spread


def test_the_clients_spread_is_of_the_tasks_headline_metric(tmp_path):
    run = make_sft_run(tmp_path / "sft")
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    for row in rows[1:]:  # the clients' exact match in every trained round
        row["clients"]["eval_accuracy_spread"] = {"min": 0.1, "p10": 0.15, "median": 0.3}
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    html = write_report(run).read_text()

    assert "spread of the sampled clients&#x27; exact match on their own" in html
    assert (run / "report" / "client_spread.png").is_file()
    assert "accuracy" not in html
    assert summarize(load_run(run))["final worst-client exact match"] == pytest.approx(0.1)


def test_compare_of_sft_runs_overlays_their_metrics_and_refuses_mixed_tasks(tmp_path):
    a = make_sft_run(tmp_path / "runs" / "lora-r8")
    b = make_sft_run(tmp_path / "runs" / "lora-r16", losses=(2.0, 1.5, 1.2, 1.0, 0.9))

    html = write_comparison([a, b], tmp_path / "cmp").read_text()

    assert_pngs(tmp_path / "cmp" / "compare", {
        "exact_match.png", "token_f1.png", "loss.png", "perplexity.png", "bytes.png",
        "exact_match_vs_bytes.png", "retention_loss.png", "round_time.png"})
    assert "<th>final exact match</th>" in html and "<th>best exact match</th>" in html
    assert "<td class='num'>0.9000</td>" in html  # run b's final loss
    assert "+0.1200" in html  # retention loss change
    with pytest.raises(ReportError, match="one task, got classification, sft"):
        write_comparison([a, make_run(tmp_path / "runs" / "cls")], tmp_path / "cmp2")


# --- per-site data and compute ---------------------------------------------------------------
CLINIC_A = SiteData(rows=10, rows_read=12, dropped=2, label_counts=(6, 3, 1),
                    duplicate_share=0.1, short_share=0.0, truncated_share=0.25)


def _site_rows() -> list[ResultsRow]:
    """Two rounds of two sites: clinic-a shares its data statistics, clinic-b does not;
    clinic-b trained on a GPU in round 2 only, without a readable utilization."""
    return [
        ResultsRow(round=0),
        ResultsRow(round=1, site_data={"clinic-a": CLINIC_A}, site_compute={
            "clinic-a": SiteCompute(train_seconds=2.0, examples=40, tokens=1000,
                                    peak_rss_mb=500.0),
            "clinic-b": SiteCompute(train_seconds=4.0, examples=40, tokens=800)}),
        ResultsRow(round=2, site_compute={
            "clinic-a": SiteCompute(train_seconds=3.0, examples=40, tokens=1000,
                                    peak_rss_mb=520.0),
            "clinic-b": SiteCompute(train_seconds=6.0, gpu_peak_mb=2048.0)}),
    ]


def test_the_site_data_table_shows_what_was_shared_and_not_shared_otherwise():
    header, rows = site_data_table(_site_rows(), ["negative", "neutral", "positive"])

    assert header == ["site", "rows read", "rows kept", "dropped", "label negative",
                      "label neutral", "label positive", "imbalance ratio", "duplicates",
                      "short texts", "over max-length"]  # no sft column: nobody sent one
    assert rows[0] == ["clinic-a", "12", "10", "2", "6", "3", "1", "6:1", "10.0%", "0.0%",
                       "25.0%"]
    assert rows[1] == ["clinic-b", *["not shared"] * 10]


def test_the_site_compute_table_by_hand_with_no_gpu_numbers_made_up():
    header, rows = site_compute_table(_site_rows())

    assert header[:5] == ["site", "rounds", "train s / round", "examples / s", "tokens / s"]
    # clinic-a: 80 examples and 2000 tokens in 5 s; peaks 500 and 520 MiB; CPU only.
    assert rows[0] == ["clinic-a", "2", "2.5", "16", "400", "520", "no GPU", "no GPU"]
    # clinic-b: round 2 did not count examples, so no rate; a GPU without NVML: "-".
    assert rows[1] == ["clinic-b", "2", "5", "-", "-", "-", "2048", "-"]


def _with_site_rows(run: Path) -> Path:
    """The run's three rows with ``_site_rows``'s site data and compute."""
    lines = [ResultsRow.from_json(json.loads(line)) for line in
             (run / "results.jsonl").read_text().splitlines()]
    rows = [replace(r, site_data=s.site_data, site_compute=s.site_compute)
            for r, s in zip(lines, _site_rows(), strict=True)]
    (run / "results.jsonl").write_text("".join(r.to_line() for r in rows))
    return run


def test_the_report_has_the_site_tables_and_figures(tmp_path):
    run = _with_site_rows(make_run(tmp_path / "sites", accs=(0.3, 0.5, 0.7)))

    html = write_report(run).read_text()

    assert "<h2>Sites</h2>" in html and html.count("not shared") >= 10
    assert "<td>clinic-a</td><td class='num'>12</td>" in html
    assert (run / "report" / "site_labels.png").exists()
    assert (run / "report" / "site_train_time.png").exists()


def test_a_deployment_run_folder_gets_its_report_from_the_cli(tmp_path, capsys):
    """As docs/deployment.md says: `python -m simulations report <run folder>` on the
    coordinator's run folder (no simulation.json; `labels` set, the sites hold the data)."""
    from simulations.__main__ import main

    run = _with_site_rows(make_run(tmp_path / "first", accs=(0.3, 0.5, 0.7), nodes=None,
                                   labels="negative,neutral,positive"))

    assert main(["report", str(run)]) == 0

    assert f"[fedsft] report: {run / 'report.html'}" in capsys.readouterr().out
    html = (run / "report.html").read_text()
    assert "<h2>Sites</h2>" in html and "<td>clinic-a</td><td class='num'>12</td>" in html
    assert (run / "report" / "site_labels.png").is_file()
    assert (run / "report" / "site_train_time.png").is_file()
    # No partition to recompute, and no hint to give a client count: the sites hold it.
    assert "the server had no training data" in html and "--num-supernodes" not in html
    assert not (run / "report" / "label_distribution.png").exists()
