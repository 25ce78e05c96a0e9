"""The site's own data, tokenized once per worker process.

In simulation a virtual client is one partition of the run's data set (``partition-id``
and ``num-partitions`` in the node config, set by Flower). In deployment a SuperNode
reads its own file from ``data-path`` in its node config (column names may be given
there too as ``text-column`` / ``label-column``). Either way the result is split into
local train and local eval parts and tokenized once; later rounds hit the cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from common.config import ConfigError, RunConfig
from common.data import load_site_data, load_splits, partition_dataset, split_for_local_eval
from common.training import EncodedData, encode


@dataclass(frozen=True)
class LocalData:
    """A client's tokenized local train and eval sets."""

    train: EncodedData
    eval: EncodedData


# Per-process cache: Flower's simulation reuses worker processes across virtual clients
# and rounds, so each (client, data, tokenizer) combination is tokenized once.
_CACHE: dict[tuple[Any, ...], LocalData] = {}
_CACHE_SIZE = 64


def client_key(node_config: Mapping[str, Any], node_id: int) -> str:
    """A stable name for this client: its partition in simulation, else its site name."""
    if "partition-id" in node_config:
        return f"partition-{int(node_config['partition-id']):06d}"
    return str(node_config.get("site-name") or f"node-{node_id}")


def load_local_data(
    cfg: RunConfig,
    node_config: Mapping[str, Any],
    label_names: list[str],
    tokenizer: PreTrainedTokenizerBase,
) -> LocalData:
    """This client's data, from the cache when the same inputs were seen before."""
    if "data-path" in node_config:
        cfg = cfg.replace(
            text_column=str(node_config.get("text-column", cfg.text_column)),
            label_column=str(node_config.get("label-column", cfg.label_column)),
        )
        source: tuple[Any, ...] = ("site", str(node_config["data-path"]))
    elif "partition-id" in node_config:
        source = ("partition", int(node_config["partition-id"]),
                  int(node_config["num-partitions"]))
    else:
        raise ConfigError(
            "this SuperNode has no `data-path` in its node config "
            "(start it with --node-config \"data-path='/path/to/site.csv'\")"
        )
    key = (source, cfg.dataset, cfg.eval_dataset, cfg.text_column, cfg.label_column,
           cfg.label_case_fold, cfg.eval_fraction, cfg.validation_fraction,
           cfg.client_eval_fraction, cfg.builtin_examples,
           cfg.partitioner, cfg.dirichlet_alpha, cfg.classes_per_client, cfg.seed,
           cfg.max_length, tuple(label_names), tokenizer.name_or_path)
    if key not in _CACHE:
        if source[0] == "site":
            dataset = load_site_data(source[1], cfg, label_names)
        else:
            splits = load_splits(cfg)
            if splits.label_names != label_names:
                raise ConfigError(
                    f"the server's labels {label_names} differ from this client's "
                    f"{splits.label_names}: both must read the same `dataset`"
                )
            dataset = partition_dataset(
                splits.train, cfg, num_partitions=source[2], partition_id=source[1]
            )
        train, local_eval = split_for_local_eval(
            dataset, fraction=cfg.client_eval_fraction, seed=cfg.seed
        )
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = LocalData(
            train=encode(train["text"], train["label"], tokenizer, max_length=cfg.max_length),
            eval=encode(
                local_eval["text"], local_eval["label"], tokenizer, max_length=cfg.max_length
            ),
        )
    return _CACHE[key]


def clear_local_data_cache() -> None:
    """Forget every cached client data set (tests)."""
    _CACHE.clear()
