"""The recorder's progress line, from hand-made results rows (no model, no Flower)."""

from __future__ import annotations

from common.tasks import TASK_METRICS
from server.recorder import progress_line
from server.results import Bytes, Clients, ResultsRow, Seconds

CLASSIFICATION = TASK_METRICS["classification"]
SFT = TASK_METRICS["sft"]


def _row(central, **parts) -> ResultsRow:
    return ResultsRow(round=8, central=central, bytes=Bytes(up=1_510_000, down=2_420_000),
                      seconds=Seconds(round=10.1), clients=Clients(sampled=5, aggregated=5),
                      **parts)


def test_the_classification_line_is_the_quickstarts():
    row = _row({"accuracy": 0.88333, "f1_macro": 0.88349, "loss": 0.43351,
                "num_examples": 300}, validation={"accuracy": 0.9, "loss": 0.4})

    line = progress_line(row, 8, metrics=CLASSIFICATION)

    assert line == ("[fedsft] round 8/8  acc 0.8833  f1 0.8835  loss 0.4335  |  up 1.51 MB  "
                    "down 2.42 MB  |  10.1 s  |  validation acc 0.9000  |  clients 5/5")


def test_without_central_evaluation_the_clients_accuracy_is_shown():
    row = _row(None, federated={"eval_accuracy": 0.75, "eval_loss": 0.6})

    line = progress_line(row, 8, metrics=CLASSIFICATION)

    assert line.startswith("[fedsft] round 8/8  federated acc 0.7500  |")
    assert "no central evaluation" in progress_line(_row(None), 8, metrics=CLASSIFICATION)


def test_the_sft_line_shows_the_metrics_each_round_measured():
    generated = _row({"exact_match": 0.25, "token_f1": 0.412, "loss": 1.2345,
                      "perplexity": 3.4366, "num_examples": 40},
                     validation={"exact_match": 0.3, "loss": 1.1},
                     retention={"exact_match": 0.5, "token_f1": 0.6, "loss": 1.5})
    loss_only = _row({"loss": 1.2345, "perplexity": 3.4366, "num_examples": 40},
                     validation={"loss": 1.1, "perplexity": 3.0}, retention={"loss": 1.5})

    assert progress_line(generated, 8, metrics=SFT).startswith(
        "[fedsft] round 8/8  em 0.2500  f1 0.4120  loss 1.2345  ppl 3.4366  |  up 1.51 MB")
    assert "|  validation em 0.3000  |  retention em 0.5000  |  clients 5/5" in (
        progress_line(generated, 8, metrics=SFT))
    # A round without generation: no exact match, and the headline falls back to loss.
    line = progress_line(loss_only, 8, metrics=SFT)
    assert line.startswith("[fedsft] round 8/8  loss 1.2345  ppl 3.4366  |")
    assert "|  validation loss 1.1000  |  retention loss 1.5000  |" in line
