"""What a round of local training cost this site, as reply metrics (compute monitoring).

The server records them per site and round (``site_compute`` in results.jsonl) and the
run report tabulates and plots them. GPU numbers are sent only from a CUDA device:
off a GPU there is nothing to measure, and the report shows "no GPU" instead.
"""

from __future__ import annotations

import logging
import resource
import sys

import torch

from common.training import TrainResult

log = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def start_gpu_measurement(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter, so the round's peak is this round's alone
    (a simulation worker process trains many virtual clients); a no-op off CUDA."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_metrics(device: torch.device) -> dict[str, float]:
    """``gpu-peak-memory-mb`` (``torch.cuda.max_memory_allocated`` since
    ``start_gpu_measurement``) and ``gpu-utilization`` (percent, NVML's sample of the
    last moments of training) on CUDA; {} elsewhere. Utilization is left out where NVML
    cannot be read: no ``pynvml`` module (package ``nvidia-ml-py``, the optional extra
    ``fedsft[gpu]``), no driver access."""
    if device.type != "cuda":
        return {}
    metrics = {"gpu-peak-memory-mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        metrics["gpu-utilization"] = float(torch.cuda.utilization(device))
    except Exception as error:  # pynvml missing, or NVML's own error classes
        log.info("GPU utilization not measured (NVML not readable; without the pynvml "
                 "module, install the fedsft[gpu] extra): %s", error)
    return metrics


def compute_metrics(result: TrainResult, device: torch.device) -> dict[str, int | float]:
    """The training-cost reply metrics of one round: ``train-seconds``, ``peak-rss-mb``,
    ``train-examples-seen`` and ``train-tokens`` (when the loop counted them) and the
    GPU metrics of ``gpu_metrics``."""
    metrics: dict[str, int | float] = {"train-seconds": result.seconds,
                                       "peak-rss-mb": peak_rss_mb()}
    if result.examples_seen is not None:
        metrics["train-examples-seen"] = result.examples_seen
    if result.tokens is not None:
        metrics["train-tokens"] = result.tokens
    return {**metrics, **gpu_metrics(device)}
