"""The model: loading, the fine-tuning method, the exchanged state, device and precision.

``build_model`` turns a ``ModelSpec`` into the task's model (the task, in
``common/tasks/``, says which model class and head) whose *trainable* parameters are
exactly what the method says (LoRA adapters + head, the head alone, the upper layers,
or everything). Only those trainable tensors ever cross the wire,
through ``get_exchanged_state`` / ``set_exchanged_state``; the frozen rest is rebuilt
identically on the server and on every client from the same checkpoint and seed.
With ``lora-aggregation`` fedsa (FedSA-LoRA) the LoRA B matrices train but stay at
their site: they are the *site state* (``get_site_state`` / ``set_site_state``), kept
by the client between rounds, and the exchanged state is the rest (A and the head).

Which model a name points to, and whether ``max-length`` fits it, is checked without
loading anything in ``common/model_source.py``; ``build_model`` uses the same checks.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from common.config import ConfigError
from common.model_source import check_max_length, max_positions
from common.specs import ModelSpec

# Encoder layer indices in parameter names: BERT/RoBERTa/DistilBERT use ".layer.<i>.",
# most decoder-style and newer encoders ".layers.<i>.".
_LAYER_INDEX = re.compile(r"\.layers?\.(\d+)\.")
# peft's down-projection matrices: lora_A of Linear layers, lora_embedding_A of embeddings.
_LORA_A = re.compile(r"\.lora_(?:embedding_)?A\.")
# ... and their up-projections, which FedSA-LoRA keeps at each site.
_LORA_B = re.compile(r"\.lora_(?:embedding_)?B\.")
# The attribute of a fedsa model holding the initial values of its site-local tensors
# (every LoRA B), by name, taken when it was built: on the model itself, so it lives and
# dies with it (no module-level registry). Other models have none: no site state.
_SITE_INIT_ATTR = "fedsft_site_init"


def build_model(spec: ModelSpec) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load the task's pretrained model and apply the fine-tuning method of ``spec``.

    Construction runs right after ``torch.manual_seed(spec.seed)``, so every process
    builds bit-identical initial weights, including a fresh head, any other weight
    missing from the checkpoint and the LoRA matrices.

    Parameters
    ----------
    spec
        The model spec: task (which model class and head), resolved path, method,
        LoRA settings (``lora_aggregation`` ffa freezes A), freeze layers, seed and
        the class names (index = label id; empty for a task without classes).

    Returns
    -------
    tuple
        The model in eval mode (on CPU) and the tokenizer from the same path.

    Raises
    ------
    ConfigError
        For a model that cannot be loaded, LoRA target modules the model does not
        have, or more ``freeze-layers`` than the model has layers.
    """
    from common.tasks import get_task

    task = get_task(spec.task)
    torch.manual_seed(spec.seed)
    try:
        pretrained = task.load_model(spec.model_path, label_names=spec.label_names,
                                     seed=spec.seed)
    except OSError as error:  # a download that failed, a corrupt or partial folder
        raise ConfigError(
            f"`model` {spec.model_path!r} could not be loaded: {error}") from error
    # peft wraps ``pretrained`` in place (the adapters go into its layers), so the
    # transformers calls below act on ``pretrained`` whatever the method.
    model: torch.nn.Module = pretrained
    if spec.method == "lora":
        model = _apply_lora(model, spec, task_type=task.peft_task_type,
                            default_targets=task.lora_targets)
    elif spec.method == "full":
        model.requires_grad_(True)
    elif spec.method == "head":
        body = pretrained.base_model_prefix + "."
        for name, param in model.named_parameters():
            param.requires_grad_(not name.startswith(body))
    elif spec.method == "freeze":
        _freeze_bottom_layers(model, spec.freeze_layers, model_name=spec.model_path)
    else:  # RunConfig validates `method`; reaching this is a programming error
        raise AssertionError(f"unhandled method {spec.method!r}")
    if spec.gradient_checkpointing:
        # Recompute activations in the backward pass; with frozen embeddings (LoRA) the
        # inputs must require grad for the checkpointed blocks to get gradients. A peft
        # wrapper defines neither method: it forwards both to ``pretrained``.
        pretrained.gradient_checkpointing_enable()
        pretrained.enable_input_require_grads()
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    except OSError as error:  # e.g. a model folder saved without its tokenizer
        raise ConfigError(
            f"`model` {spec.model_path!r}: could not load its tokenizer: {error}"
        ) from error
    return model, tokenizer


def _apply_lora(
    model: torch.nn.Module, spec: ModelSpec, *, task_type: str,
    default_targets: tuple[str, ...] | None = None,
) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; SEQ_CLS makes peft train the head as well."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = spec.target_modules
    if targets is None and default_targets is not None:  # the task's choice, as present
        present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
        targets = [t for t in default_targets if t in present] or None
    elif targets is not None:
        module_names = [name for name, _ in model.named_modules()]
        missing = [
            t for t in targets
            if not any(n == t or n.endswith("." + t) for n in module_names)
        ]
        if missing:
            raise _unknown_targets_error(model, missing)
    lora = LoraConfig(
        task_type=TaskType[task_type],
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=targets,  # None: peft's per-architecture default (BERT: query, value)
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:  # e.g. an architecture peft has no default targets for
        raise _unknown_targets_error(model, targets or [], cause=str(err)) from err
    if spec.lora_aggregation == "ffa":
        # FFA-LoRA: A stays at its seeded init, bit-identical in every process (built
        # right after the same manual_seed), so it never needs to cross the wire. Frozen,
        # it drops out of the exchanged state, the optimizer and DP-SGD's per-example
        # gradients; B (peft inits it to zero) and the head still train.
        for name, param in model.named_parameters():
            if _LORA_A.search(name):
                param.requires_grad_(False)
    elif spec.lora_aggregation == "fedsa":
        # FedSA-LoRA: A and B both train; B stays at the site. Its init (peft: zero for
        # Linear layers) is what a site starts from and what the server's model keeps,
        # so it is remembered here. peft inits an embedding adapter the other way round
        # (A zero, B random): the server's model would then carry B_init @ A_mean, a
        # change no site trained, so embedding targets are refused.
        embedding = sorted({name.split(".lora_embedding_B.")[0].removeprefix("base_model.model.")
                            for name, _ in model.named_parameters()
                            if ".lora_embedding_B." in name})
        if embedding:
            raise ConfigError(
                "`lora-aggregation` fedsa keeps each site's LoRA B, and the server's model "
                "keeps B at its init; for an embedding adapter peft's init of B is random, "
                "so the shared model would carry an update no site trained: drop the "
                f"embedding module(s) {', '.join(embedding)} from `lora-target-modules`, "
                "or use lora-aggregation fedavg or ffa")
        setattr(model, _SITE_INIT_ATTR, {
            name: param.detach().clone()
            for name, param in model.named_parameters() if _LORA_B.search(name)
        })
    return model


def _unknown_targets_error(
    model: torch.nn.Module, missing: list[str], *, cause: str = ""
) -> ConfigError:
    """A ConfigError that lists a few Linear module names the model does have."""
    available = sorted({
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    })
    what = f"no module named {', '.join(map(repr, missing))}" if missing else cause
    return ConfigError(
        f"`lora-target-modules`: {what} in this model; Linear modules it has include "
        f"{', '.join(available[:8])}"
    )


def _freeze_bottom_layers(model: torch.nn.Module, k: int, *, model_name: str) -> None:
    """Freeze the embeddings and encoder layers ``0 .. k-1``; train everything else."""
    indices = {
        name: int(match.group(1))
        for name, _ in model.named_parameters()
        if (match := _LAYER_INDEX.search(name))
    }
    if not indices:
        raise ConfigError(
            f"`method` freeze: found no '.layer.<i>.' or '.layers.<i>.' parameters in "
            f"{model_name}; use method lora, head or full"
        )
    num_layers = max(indices.values()) + 1
    if k > num_layers:
        raise ConfigError(
            f"`freeze-layers` must be <= {num_layers} (layers in {model_name}), got {k}"
        )
    for name, param in model.named_parameters():
        # Outside the layers only the embeddings are frozen; pooler and head train.
        frozen = indices[name] < k if name in indices else "embed" in name.lower()
        param.requires_grad_(not frozen)


# --- the wire boundary ---------------------------------------------------------------


def get_exchanged_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors that cross the wire: every trainable parameter, as float32 copies.

    Parameters
    ----------
    model
        A model from ``build_model``.

    Returns
    -------
    dict[str, numpy.ndarray]
        ``named_parameters()`` names and order, restricted to ``requires_grad`` (less
        the site-local tensors of ``get_site_state``); contiguous CPU float32 arrays
        that share no memory with the model.
    """
    local = _site_init(model)
    return {
        name: _float32_copy(param)
        for name, param in model.named_parameters()
        if param.requires_grad and name not in local
    }


def set_exchanged_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the trainable parameters of ``model`` in place with ``state``.

    The site-local tensors (fedsa: every LoRA B), which are not in ``state``, are reset
    to their initialisation, so the call fully resets a shared (cached) model whatever
    trained it last; a client then puts its own back with ``set_site_state``.

    Parameters
    ----------
    model
        A model from ``build_model`` (any device and dtype).
    state
        Exactly the names and shapes of ``get_exchanged_state(model)``; values are cast
        to each parameter's dtype and device.

    Raises
    ------
    ValueError
        On missing or unexpected names (all listed) or the first shape mismatch.
        Nothing is written in that case.
    """
    local = _site_init(model)
    params = {name: p for name, p in model.named_parameters()
              if p.requires_grad and name not in local}
    _write(params, state, what="exchanged state")
    set_site_state(model, {name: init.cpu().numpy() for name, init in local.items()})


def _site_init(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The initial site-local tensors of ``model`` by name (fedsa), else empty."""
    return model.__dict__.get(_SITE_INIT_ATTR, {})


def get_site_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The trained tensors that never leave the site: with ``lora-aggregation`` fedsa
    every LoRA B (float32 copies, ``named_parameters()`` order); empty otherwise."""
    local = _site_init(model)
    return {name: _float32_copy(param) for name, param in model.named_parameters()
            if name in local}


def set_site_state(model: torch.nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the site-local tensors of ``model`` (``get_site_state``'s names) in place.

    Raises
    ------
    ValueError
        On missing or unexpected names or a shape mismatch; nothing is written then.
    """
    local = _site_init(model)
    params = {name: p for name, p in model.named_parameters() if name in local}
    _write(params, state, what="site state")


def _float32_copy(param: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(
        param.detach().to(device="cpu", dtype=torch.float32, copy=True).numpy())


def _write(params: Mapping[str, torch.Tensor], state: Mapping[str, np.ndarray], *,
           what: str) -> None:
    """Copy ``state`` into ``params`` after checking every name and shape."""
    missing = [name for name in params if name not in state]
    unexpected = [name for name in state if name not in params]
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model's parameters: "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for name, param in params.items():
        shape = tuple(np.shape(state[name]))
        if shape != tuple(param.shape):
            raise ValueError(
                f"{what} {name!r} has shape {shape}, the model expects "
                f"{tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            # torch.tensor copies, so read-only arrays (e.g. from a message) are fine.
            param.copy_(torch.tensor(np.asarray(state[name])))


# --- device and precision ------------------------------------------------------------


def select_device(choice: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu``; ``cuda`` (checked)."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("`device` is cuda but no CUDA device is available")
        return torch.device("cuda")
    if choice == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"`device` must be one of auto, cpu, cuda, got {choice!r}")


def autocast_context(
    precision: str, device: torch.device
) -> contextlib.AbstractContextManager[object]:
    """The autocast context for forward passes at ``precision`` on ``device``.

    ``auto`` is bf16 autocast on a CUDA device that supports it and fp32 otherwise;
    ``bf16``/``fp16`` autocast on ``device``; ``fp32`` runs without autocast.

    Raises
    ------
    ConfigError
        For fp16 on a CPU, or bf16 on a CUDA device without bfloat16 support.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError(
                f"`precision` fp16 is not supported on {device.type}; use bf16 or fp32"
            )
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("`precision` is bf16 but this CUDA device does not support it")
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"`precision` must be one of auto, fp32, bf16, fp16, got {precision!r}")


# --- per-process model cache -----------------------------------------------------------

# An explicit per-process cache. Flower's simulation reuses worker processes for many
# virtual clients and rounds, so the pretrained weights are read from disk once per
# process, not once per round. The key is the model spec (every config field that
# changes the built model) and the device. A cached model is shared: callers overwrite
# its trainable parameters with `set_exchanged_state` before each use, which fully
# resets it, because training only ever changes trainable parameters. At most
# `_MODEL_CACHE_SIZE` models are kept, so a long-lived process that serves several runs
# does not accumulate models.
_MODEL_CACHE: dict[tuple[ModelSpec, str], tuple[torch.nn.Module, PreTrainedTokenizerBase]] = {}
_MODEL_CACHE_SIZE = 2


def get_model(
    spec: ModelSpec, device: torch.device, *, max_length: int
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """``build_model(spec)`` moved to ``device``, cached per process by (spec, device).

    The caller must set the exchanged state before using the model. ``max_length`` is
    checked against the model's positions (it changes no weight, so it is not in the
    key: a longer one fails here, not as an index error in the first forward pass).
    """
    key = (spec, str(device))
    if key not in _MODEL_CACHE:
        while len(_MODEL_CACHE) >= _MODEL_CACHE_SIZE:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))  # the oldest entry
        model, tokenizer = build_model(spec)
        _MODEL_CACHE[key] = (model.to(device), tokenizer)
    config: Any = _MODEL_CACHE[key][0].config  # a PretrainedConfig
    check_max_length(max_length, max_positions(config.to_dict()))
    return _MODEL_CACHE[key]


def clear_model_cache() -> None:
    """Forget every cached model (tests; freeing memory)."""
    _MODEL_CACHE.clear()


def trainable_parameter_count(model: torch.nn.Module) -> int:
    """Number of trainable scalars: the exchanged state plus the site state (fedsa)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
