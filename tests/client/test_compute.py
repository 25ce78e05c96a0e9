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


def _cuda_without_a_gpu(monkeypatch, utilization):
    """torch.cuda as a CUDA run sees it: 3 MiB peak, and NVML read or not."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "utilization", utilization)


def test_on_cuda_without_nvml_utilization_is_left_out_and_memory_still_sent(monkeypatch,
                                                                             caplog):
    def no_pynvml(device):
        # What torch.cuda.utilization raises without the `pynvml` module (fedsft[gpu]).
        raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")
    _cuda_without_a_gpu(monkeypatch, no_pynvml)

    with caplog.at_level("INFO", logger="client.compute"):
        metrics = gpu_metrics(torch.device("cuda"))

    assert metrics == {"gpu-peak-memory-mb": 3.0}
    assert "GPU utilization not measured" in caplog.text and "fedsft[gpu]" in caplog.text


def test_on_cuda_with_nvml_utilization_is_sent(monkeypatch):
    _cuda_without_a_gpu(monkeypatch, lambda device: 37)

    assert gpu_metrics(torch.device("cuda")) == {"gpu-peak-memory-mb": 3.0,
                                                 "gpu-utilization": 37.0}
