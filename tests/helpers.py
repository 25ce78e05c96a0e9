"""Test helpers that other tests and scripts can import (no fixtures here).

The tiny model builder is product code (quick benchmarks use it too); it is re-exported
here so tests keep one import place.
"""

from __future__ import annotations

from simulations.benchmarks.tiny_model import write_tiny_bert

__all__ = ["write_tiny_bert"]
