"""Chat SFT's check of its own run-config values (``TaskInfo.config_check`` of sft).

Light (no torch, no transformers): ``RunConfig`` runs it for every sft config it builds,
in the coordinator's preflight and at every SuperNode too. What sft cannot take from the
generic keys (class-label partitioners, label-flip, ``method`` head, FedSA-LoRA) the
config refuses from the registry entry's ``has_classes`` and ``has_head``.
"""

from __future__ import annotations

from common.config import ConfigError, RunConfig, check_choice, check_range

CHAT_FORMATS = ("auto", "messages", "alpaca", "prompt-response")


def check_config(cfg: RunConfig) -> None:
    """Raise ``ConfigError`` for a bad sft value of ``cfg`` (run with ``task`` = sft)."""
    check_choice("chat-format", cfg.chat_format, CHAT_FORMATS)
    check_choice("train-on", cfg.train_on, ("assistant", "all"))
    check_choice("overflow", cfg.overflow, ("truncate", "drop"))
    check_range("generate-every", cfg.generate_every, low=0)
    check_range("generation-samples", cfg.generation_samples, low=1)
    check_range("max-new-tokens", cfg.max_new_tokens, low=1)
    if cfg.gradient_checkpointing and cfg.dp_sgd_enabled:
        raise ConfigError(
            "`gradient-checkpointing` and DP-SGD do not combine (Opacus needs each "
            "layer's activations for per-example gradients): turn one off")
