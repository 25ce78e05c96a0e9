"""Metric sinks: flattening rows, and what TensorBoard / MLflow read back."""

from __future__ import annotations

import sys

import pytest

from server.metric_sinks import MetricSinkError, flatten_metrics, open_sinks
from server.results import ResultsRow

ROW0 = {
    "round": 0, "time": 1.7e9,
    "central": {"accuracy": 0.25, "f1_macro": 0.2, "loss": 1.5, "num_examples": 40},
    "federated": {}, "train": {},
    "clients": {"sampled": 0, "skipped": False, "eval_headline": [], "problems": [],
                "eval_headline_spread": {}},
    "bytes": {"up": 0, "down": 0, "up_total": 0, "down_total": 0},
}
ROW1 = {
    "round": 1, "time": 1.7e9 + 10,
    "central": {"accuracy": 0.75, "f1_macro": 0.7, "loss": 0.5, "num_examples": 40},
    "federated": {"eval_accuracy": 0.5},
    "train": {"train_loss": float("nan")},
    "clients": {"sampled": 2, "skipped": True, "eval_headline": [0.4, 0.6],
                "problems": ["x"], "eval_headline_spread": {"min": 0.4, "median": 0.5}},
    "bytes": {"up": 100, "down": 200, "up_total": 100, "down_total": 200},
}
CONFIG = {"strategy": "fedavg", "learning-rate": 0.002, "seed": 42}


def test_flatten_keeps_numeric_leaves_by_path():
    flat = flatten_metrics(ROW1)

    assert flat["central/accuracy"] == 0.75
    assert flat["clients/eval_headline_spread/min"] == 0.4
    assert flat["clients/skipped"] == 1.0  # booleans as 0/1
    assert flat["bytes/down_total"] == 200.0
    # The step, the wall-clock stamp, lists, strings and NaN are left out.
    assert not {"round", "time", "clients/eval_headline", "clients/problems",
                "train/train_loss"} & set(flat)
    assert flatten_metrics({"central": None, "round": 3}) == {}


def test_unknown_sink_name_is_an_error(tmp_path):
    with pytest.raises(MetricSinkError, match="unknown metric sink.*wandb.*tensorboard"):
        open_sinks(["wandb"], tmp_path, "run", CONFIG)
    assert open_sinks([], tmp_path, "run", CONFIG) == []


@pytest.mark.parametrize(("name", "module"), [("mlflow", "mlflow"),
                                              ("tensorboard", "torch.utils.tensorboard")])
def test_missing_package_names_the_pip_extra(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    if name == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)

    with pytest.raises(MetricSinkError, match=r'pip install -e "\.\[tracking\]"'):
        open_sinks([name], tmp_path, "run", CONFIG)


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [sink] = open_sinks(["tensorboard"], tmp_path, "run", CONFIG)
    sink.log_round(ResultsRow.from_json(ROW0))
    sink.log_round(ResultsRow.from_json(ROW1))
    sink.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("central/accuracy")
    assert [(e.step, e.value) for e in accuracy] == [(0, 0.25), (1, 0.75)]
    assert [(e.step, e.value) for e in events.Scalars("bytes/up_total")] == [(0, 0), (1, 100)]
    assert "train/train_loss" not in events.Tags()["scalars"]  # NaN left out


def test_mlflow_metrics_and_params_read_back_from_the_local_file_store(
    tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    [sink] = open_sinks(["mlflow"], tmp_path, "my-run", CONFIG)
    sink.log_round(ResultsRow.from_json(ROW0))
    sink.log_round(ResultsRow.from_json(ROW1))
    sink.close()

    import os

    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # restored on close
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    run = client.get_run(sink.run_id)
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert run.data.params == {"learning-rate": "0.002", "seed": "42", "strategy": "fedavg"}
    history = client.get_metric_history(sink.run_id, "central/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.25), (1, 0.75)]
    assert run.data.metrics["clients/eval_headline_spread/min"] == 0.4

    # A resumed run folder logs into the same MLflow run.
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    [again] = open_sinks(["mlflow"], tmp_path, "my-run", CONFIG)
    assert again.run_id == sink.run_id
    again.log_round(ResultsRow.from_json({**ROW1, "round": 2}))
    again.close()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    history = client.get_metric_history(sink.run_id, "central/accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
