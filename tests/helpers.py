"""Test helpers that other tests and scripts can import (no fixtures here).

The tiny model builders are product code (quick benchmarks use it too); it is re-exported
here so tests keep one import place.
"""

from __future__ import annotations

from simulations.benchmarks.tiny_model import (
    CHATML_TEMPLATE,
    tiny_chat_tokenizer,
    write_tiny_bert,
    write_tiny_llama,
)

__all__ = ["CHATML_TEMPLATE", "tiny_chat_tokenizer", "write_tiny_bert", "write_tiny_llama"]
