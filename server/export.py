"""Save the final global model in Hugging Face layout."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


def export_final_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> dict[str, str]:
    """Write ``folder/model`` (standalone, LoRA merged) and, for peft models, ``folder/adapter``.

    The model must already hold the final global state. It is not modified: merging
    happens on a copy, so the caller's (cached) model stays usable.
    Returns the written paths by name.
    """
    paths: dict[str, str] = {}
    standalone = model
    if hasattr(model, "merge_and_unload"):  # a peft model
        adapter_dir = folder / "adapter"
        model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        paths["adapter"] = str(adapter_dir)
        standalone = copy.deepcopy(model).merge_and_unload()
    model_dir = folder / "model"
    standalone.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    paths["model"] = str(model_dir)
    return paths
