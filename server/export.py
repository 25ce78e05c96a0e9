"""Save the final global model in Hugging Face layout."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server.run_outputs import replace_folder, staging_folder


def export_final_model(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path
) -> dict[str, str]:
    """Write ``folder/model`` (standalone, LoRA merged) and, for peft models, ``folder/adapter``.

    The model must already hold the final global state. It is not modified: merging
    happens on a copy, so the caller's (cached) model stays usable. Everything is
    written to a hidden sibling folder first and renamed to ``folder`` at the end:
    ``folder/model/config.json`` is what says "finished", so an interrupted export
    must never leave a partial ``folder`` (an earlier ``folder`` stays until then).
    Returns the written paths by name.

    Raises
    ------
    TypeError
        If ``model`` (or what merging a peft model gives) is not a transformers model:
        nothing else can be saved in Hugging Face layout.
    """
    from peft import PeftModel  # imported here, as in common/model.py: only exports need it

    staging = staging_folder(folder)
    try:
        names: dict[str, str] = {}
        standalone = model
        if isinstance(model, PeftModel):
            model.save_pretrained(str(staging / "adapter"))
            tokenizer.save_pretrained(str(staging / "adapter"))
            names["adapter"] = "adapter"
            standalone = copy.deepcopy(model).merge_and_unload()
        if not isinstance(standalone, PreTrainedModel):
            raise TypeError(f"cannot export a {type(standalone).__name__} in Hugging Face "
                            "layout: a transformers (or peft) model is needed")
        standalone.save_pretrained(str(staging / "model"))
        tokenizer.save_pretrained(str(staging / "model"))
        names["model"] = "model"
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {name: str(folder / sub) for name, sub in names.items()}
