"""Compute-monitoring reply metrics: what is counted is sent, nothing is made up."""

import torch

from client.compute import compute_metrics, gpu_metrics
from common.training import TrainResult


def _result(**counts) -> TrainResult:
    return TrainResult(num_examples=8, train_loss=0.5, steps=2, seconds=4.0, first_loss=0.7,
                       **counts)


def test_off_a_gpu_no_gpu_metric_is_sent():
    assert gpu_metrics(torch.device("cpu")) == {}


def test_counts_are_sent_when_the_loop_counted_them_and_left_out_otherwise():
    counted = compute_metrics(_result(examples_seen=8, tokens=50), torch.device("cpu"))
    uncounted = compute_metrics(_result(), torch.device("cpu"))  # e.g. DP-SGD's loop

    assert counted["train-examples-seen"] == 8 and counted["train-tokens"] == 50
    assert counted["train-seconds"] == 4.0 and counted["peak-rss-mb"] > 0
    assert set(uncounted) == {"train-seconds", "peak-rss-mb"}
