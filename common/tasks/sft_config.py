"""Chat SFT's own run-config keys (``TaskInfo.options`` of sft) and their check
(``TaskInfo.config_check``).

Light (no torch, no transformers): ``RunConfig`` builds ``SftOptions`` and runs
``check_config`` for every sft config, in the coordinator's preflight and at every
SuperNode too. What sft cannot take from the generic keys (class-label partitioners,
label-flip, ``method`` head, FedSA-LoRA) the config refuses from the registry entry's
``has_classes`` and ``has_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import RunConfig, check_choice, check_range

CHAT_FORMATS = ("auto", "messages", "alpaca", "prompt-response")


@dataclass(frozen=True)
class SftOptions:
    """The keys only task sft reads (``chat_format`` is `chat-format`), with their
    defaults; ``pyproject.toml`` repeats them (a test checks it). ``RunConfig.task_options``
    of an sft run, and so a part of the specs that key the caches."""

    chat_format: str = "auto"  # auto | messages | alpaca | prompt-response
    messages_column: str = "messages"  # a list of {role, content} (or its JSON text)
    instruction_column: str = "instruction"  # alpaca: instruction + optional input
    input_column: str = "input"
    output_column: str = "output"
    prompt_column: str = "prompt"  # prompt-response
    response_column: str = "response"
    system_prompt: str = ""  # a system turn for conversations that have none
    chat_template: str = ""  # Jinja template (or a .jinja file) for a model without one
    train_on: str = "assistant"  # assistant: loss on the assistant turns only | all
    overflow: str = "truncate"  # examples longer than max-length: truncate | drop
    generate_every: int = 1  # greedy-generation metrics every N rounds; 0: last only
    generation_samples: int = 32  # eval examples answered by greedy generation
    max_new_tokens: int = 48  # generation length cap (eval and predict)


def check_config(cfg: RunConfig) -> None:
    """Raise ``common.config.ConfigError`` for a bad sft value of ``cfg`` (run with
    ``task`` = sft)."""
    options: SftOptions = cfg.task_options
    check_choice("chat-format", options.chat_format, CHAT_FORMATS)
    check_choice("train-on", options.train_on, ("assistant", "all"))
    check_choice("overflow", options.overflow, ("truncate", "drop"))
    check_range("generate-every", options.generate_every, low=0)
    check_range("generation-samples", options.generation_samples, low=1)
    check_range("max-new-tokens", options.max_new_tokens, low=1)
