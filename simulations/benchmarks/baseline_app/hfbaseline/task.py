"""Model, data and the training loop, written the way Flower's quickstart examples are.

Deliberately uncached: every call loads the model from disk and tokenizes the data
again. The rows themselves come from fedsft's data functions so that the baseline and
fedsft train on exactly the same partitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
)


def _data_config(run_config: Mapping[str, Any]):  # type: ignore[no-untyped-def]
    from common.config import RunConfig

    keys = ("dataset", "text-column", "label-column", "builtin-examples", "eval-fraction",
            "client-eval-fraction", "max-length", "seed")
    return RunConfig.from_flower({k: run_config[k] for k in keys})


def model_path(run_config: Mapping[str, Any]) -> str:
    """The model directory (``minilm``: the packaged MiniLM-L6)."""
    from common.model_source import resolve_model

    return resolve_model(str(run_config["model"] or "minilm")).path


def label_names(run_config: Mapping[str, Any]) -> list[str]:
    """The classes of the data set."""
    from common.data import load_splits
    from common.specs import DataSpec

    return load_splits(DataSpec.of(_data_config(run_config))).label_names


def load_model(run_config: Mapping[str, Any]) -> torch.nn.Module:
    """Load the pretrained model from disk (every call, as the quickstart does)."""
    torch.manual_seed(int(run_config["seed"]))
    return AutoModelForSequenceClassification.from_pretrained(
        model_path(run_config), num_labels=len(label_names(run_config))
    )


def load_data(
    partition_id: int, num_partitions: int, run_config: Mapping[str, Any]
) -> tuple[DataLoader, DataLoader, int]:
    """Tokenize this partition's train and eval rows (every call) into DataLoaders."""
    from common.data import load_splits, partition_dataset, split_for_local_eval
    from common.specs import DataSpec, PartitionSpec

    cfg = _data_config(run_config)
    part = partition_dataset(load_splits(DataSpec.of(cfg)).train, PartitionSpec.of(cfg),
                             source=cfg.dataset, num_partitions=num_partitions,
                             partition_id=partition_id)
    train, test = split_for_local_eval(part, fraction=cfg.client_eval_fraction, seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path(run_config))

    def tokenize(batch):  # type: ignore[no-untyped-def]
        return tokenizer(batch["text"], truncation=True, max_length=cfg.max_length)

    columns = [c for c in train.column_names if c != "label"]
    train = train.map(tokenize, batched=True, remove_columns=columns)
    test = test.map(tokenize, batched=True, remove_columns=columns)
    train = train.rename_column("label", "labels")
    test = test.rename_column("label", "labels")
    collator = DataCollatorWithPadding(tokenizer=tokenizer)
    batch_size = int(run_config["batch-size"])
    return (DataLoader(train, shuffle=True, batch_size=batch_size, collate_fn=collator),
            DataLoader(test, batch_size=batch_size, collate_fn=collator), len(train))


def train(model: torch.nn.Module, loader: DataLoader, *, steps: int, lr: float) -> float:
    """``steps`` AdamW steps over the loader (cycling); returns the mean loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        for batch in loader:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return sum(losses) / len(losses)


def test(model: torch.nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on the loader."""
    model.eval()
    loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            loss += out.loss.item() * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return loss / max(total, 1), correct / max(total, 1)
