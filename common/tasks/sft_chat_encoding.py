"""Conversations as token ids with the loss on the assistant turns only, and SFT metrics.

``encode_conversation`` renders a conversation with the tokenizer's chat template (or a
given one) and tokenizes the rendered text once, so training sees exactly the tokens
inference sees. Which characters are trained on is found by rendering prefixes:
message ``i``'s text is ``render(messages[:i+1])`` minus ``render(messages[:i])`` (the
template must render each prefix as the start of the next, which ChatML-style templates
do; the concatenation of these pieces is then the full render, checked). Of an
assistant message's piece, the role header (what ``add_generation_prompt=True`` appends
to ``render(messages[:i])``) is masked, and the rest — the content and the template's
end-of-turn token, e.g. ``Hello!<|im_end|>`` — is trained on; whitespace after it
(ChatML's newline) is template glue and masked, since generation stops at the
end-of-turn token. A token is trained on when any of its characters is (offsets of a
fast tokenizer). Labels are not shifted: transformers' causal LM loss shifts them.

With ``train_on="all"`` every token is trained on (system, user and headers too).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.data import DataError
from common.tasks.sft_chat_data import Conversation

IGNORE_INDEX = -100  # labels transformers' cross-entropy skips
TRAIN_ON = ("assistant", "all")
OVERFLOW = ("truncate", "drop")


class ChatTemplateError(DataError):
    """No chat template, or one that cannot render a conversation as this module needs."""


@dataclass(frozen=True)
class EncodedChat:
    """One tokenized conversation.

    ``input_ids`` and ``labels`` have the same length (<= ``max_length``); ``labels[i]``
    is ``input_ids[i]`` where the token is trained on and ``IGNORE_INDEX`` elsewhere, at
    least one token is trained on. ``truncated``: the render was longer than
    ``max_length`` and its end was cut off.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_trained(self) -> int:
        """How many tokens carry a label (the assistant tokens the loss averages over)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class EncodeStats:
    """What ``encode_conversations`` did with its input.

    ``total`` = ``len(kept)`` + ``dropped_too_long`` + ``dropped_no_trained``.
    ``kept``: the input positions of the returned examples, in order.
    ``dropped_too_long``: longer than ``max_length`` with ``overflow="drop"``.
    ``dropped_no_trained``: truncation left no trained token (``overflow="truncate"``).
    ``truncated``: kept, with their end cut off. ``tokens`` / ``trained_tokens``: sums
    over the kept examples of ``len(input_ids)`` / ``num_trained``.
    """

    total: int
    kept: tuple[int, ...]
    dropped_too_long: int
    dropped_no_trained: int
    truncated: int
    tokens: int
    trained_tokens: int

    @property
    def dropped(self) -> int:
        """All dropped conversations."""
        return self.dropped_too_long + self.dropped_no_trained


def resolve_chat_template(tokenizer: Any, chat_template: str | None = None) -> str:
    """The template to render with: ``chat_template`` if given, else the tokenizer's.

    Raises
    ------
    ChatTemplateError
        If neither exists.
    """
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the tokenizer of {name!r} has no chat template, and none was configured: "
            f"give a Jinja chat template (e.g. ChatML: '<|im_start|>role\\ncontent"
            f"<|im_end|>\\n' per message) or use a chat/instruct model"
        )
    if not isinstance(template, str):  # a dict of named templates (tool use, ...)
        raise ChatTemplateError(
            f"the tokenizer has several named chat templates ({', '.join(template)}); "
            f"configure the one to use as a Jinja string"
        )
    return template


def render_pieces(
    tokenizer: Any, messages: Conversation, *, chat_template: str | None = None
) -> list[tuple[str, bool]]:
    """The full render of ``messages`` as consecutive ``(text, trained)`` pieces.

    ``"".join(text for text, _ in pieces)`` is the full render; ``trained`` marks the
    assistant answers and their end-of-turn token (module doc).

    Raises
    ------
    ChatTemplateError
        If there is no template, it fails on the conversation (e.g. a template that
        requires alternating user / assistant turns), or it does not render a prefix
        of the conversation as the start of the whole.
    """
    template = resolve_chat_template(tokenizer, chat_template)
    pieces: list[tuple[str, bool]] = []
    previous = ""  # render(messages[:0]); templates may fail on an empty conversation
    for i, message in enumerate(messages):
        text = _render(tokenizer, messages[: i + 1], template, generation_prompt=False)
        if not text.startswith(previous):
            raise ChatTemplateError(
                f"the chat template renders messages 1..{i} differently once message "
                f"{i + 1} follows, so the prompt tokens cannot be told apart; use a "
                f"template whose render of a conversation starts with the render of its "
                f"first messages (e.g. ChatML)"
            )
        piece = text[len(previous):]
        if message["role"] != "assistant":
            pieces.append((piece, False))
        else:
            header_len = _header_length(tokenizer, messages[:i], template, previous,
                                        text, message["content"])
            body = piece[header_len:]
            answer = body.rstrip()
            pieces += [(piece[:header_len], False), (answer, True),
                       (body[len(answer):], False)]
        previous = text
    assert "".join(text for text, _ in pieces) == previous  # the pieces tile the render
    return [(text, trained) for text, trained in pieces if text]


def encode_conversation(
    tokenizer: Any,
    messages: Conversation,
    *,
    max_length: int,
    train_on: str = "assistant",
    overflow: str = "truncate",
    chat_template: str | None = None,
) -> EncodedChat | None:
    """Tokenize one conversation with labels on the trained tokens (module doc).

    Parameters
    ----------
    tokenizer
        A fast Hugging Face tokenizer (character offsets are needed).
    messages
        A conversation as ``common.tasks.sft_chat_data`` validates it.
    max_length
        The most tokens kept (>= 1).
    train_on
        ``"assistant"``: only the assistant answers and their end-of-turn tokens carry
        labels; ``"all"``: every token does.
    overflow
        For a render longer than ``max_length``: ``"truncate"`` keeps its first
        ``max_length`` tokens (and returns None when none of them is trained on, e.g. a
        long prompt whose answer was cut off); ``"drop"`` returns None.
    chat_template
        A Jinja template used instead of the tokenizer's.

    Returns
    -------
    EncodedChat or None
        None when the conversation is dropped (``overflow`` above).

    Raises
    ------
    ValueError
        If ``max_length`` < 1, or ``train_on`` / ``overflow`` is not an allowed value.
    ChatTemplateError
        As ``render_pieces``, or if the tokenizer is not a fast one.
    """
    _check_choice("train_on", train_on, TRAIN_ON)
    _check_choice("overflow", overflow, OVERFLOW)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatTemplateError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: the assistant tokens "
            f"are found by character offsets, which need a fast (Rust) tokenizer"
        )
    pieces = render_pieces(tokenizer, messages, chat_template=chat_template)
    text = "".join(piece for piece, _ in pieces)
    trained_chars = bytearray(len(text) + 1)  # 1 where the character is trained on
    position = 0
    for piece, trained in pieces:
        if trained:
            trained_chars[position:position + len(piece)] = b"\x01" * len(piece)
        position += len(piece)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    if train_on == "all":
        labels = list(input_ids)
    else:
        labels = [
            token if any(trained_chars[start:max(end, start + 1)]) else IGNORE_INDEX
            for token, (start, end) in zip(input_ids, encoding["offset_mapping"],
                                           strict=True)
        ]
    truncated = len(input_ids) > max_length
    if truncated:
        if overflow == "drop":
            return None
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return EncodedChat(input_ids=input_ids, labels=labels, truncated=truncated)


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Conversation],
    *,
    max_length: int,
    train_on: str = "assistant",
    overflow: str = "truncate",
    chat_template: str | None = None,
) -> tuple[list[EncodedChat], EncodeStats]:
    """``encode_conversation`` over many conversations, with what was dropped or cut.

    Returns the kept examples in input order and an ``EncodeStats``. Raises as
    ``encode_conversation`` does; a template error names the conversation (1-based).
    """
    examples: list[EncodedChat] = []
    kept: list[int] = []
    too_long = no_trained = truncated = 0
    template = resolve_chat_template(tokenizer, chat_template)
    for index, messages in enumerate(conversations):
        try:
            example = encode_conversation(
                tokenizer, messages, max_length=max_length, train_on=train_on,
                overflow=overflow, chat_template=template,
            )
        except ChatTemplateError as error:
            raise ChatTemplateError(f"conversation {index + 1}: {error}") from error
        if example is None:
            if overflow == "drop":
                too_long += 1
            else:
                no_trained += 1
            continue
        examples.append(example)
        kept.append(index)
        truncated += example.truncated
    stats = EncodeStats(
        total=len(conversations), kept=tuple(kept), dropped_too_long=too_long,
        dropped_no_trained=no_trained, truncated=truncated,
        tokens=sum(len(e.input_ids) for e in examples),
        trained_tokens=sum(e.num_trained for e in examples),
    )
    return examples, stats


def split_for_generation(messages: Conversation) -> tuple[Conversation, str]:
    """A conversation as (the messages before its last answer, that answer)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation must end with an assistant message")
    return list(messages[:-1]), messages[-1]["content"]


def prompt_for_generation(
    tokenizer: Any,
    messages: Conversation,
    *,
    chat_template: str | None = None,
    max_length: int | None = None,
) -> list[int]:
    """Token ids of ``messages`` followed by the assistant header, to generate the answer.

    ``messages`` must not end with an assistant message (see ``split_for_generation``).
    With ``max_length``, only the last ``max_length`` tokens are kept (the end of the
    prompt is what the answer follows). Raises ``ChatTemplateError`` without a template,
    ``ValueError`` for a conversation ending with an assistant message.
    """
    if messages and messages[-1]["role"] == "assistant":
        raise ValueError("the prompt ends with an assistant message; drop the answer "
                         "first (split_for_generation)")
    template = resolve_chat_template(tokenizer, chat_template)
    text = _render(tokenizer, messages, template, generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[-max_length:] if max_length is not None else ids


def collate_chat(
    examples: Sequence[EncodedChat], index: Sequence[int], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """The examples at ``index`` as one right-padded batch.

    Returns ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (1 on real
    tokens) and ``labels`` (padded with ``IGNORE_INDEX``), each int64 of shape
    ``(len(index), longest)``; ``(0, 0)`` for an empty ``index``. Padding is never
    trained on, even when ``pad_token_id`` is also the end-of-turn token.
    """
    chosen = [examples[i] for i in index]
    width = max((len(e.input_ids) for e in chosen), default=0)
    input_ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(chosen), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(chosen), width), dtype=torch.long)
    for row, example in enumerate(chosen):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --- metrics ---------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Lower case, whitespace runs as one space, no leading / trailing whitespace."""
    return " ".join(text.lower().split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 if ``pred`` and ``ref`` are equal after ``normalize_answer``, else 0.0."""
    return float(normalize_answer(pred) == normalize_answer(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style F1 of the bags of lower-cased word tokens (``\\w+``; punctuation ignored).

    1.0 when both have no tokens, 0.0 when only one has none.
    """
    pred_tokens = _WORD.findall(pred.lower())
    ref_tokens = _WORD.findall(ref.lower())
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


_WORD = re.compile(r"\w+")


def _render(tokenizer: Any, messages: Conversation, template: str, *,
            generation_prompt: bool) -> str:
    """``apply_chat_template`` as text; template failures as ``ChatTemplateError``."""
    try:
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except Exception as error:  # jinja2's TemplateError, raise_exception(), KeyError, ...
        raise ChatTemplateError(f"the chat template failed: {error}") from error
    if not isinstance(text, str):
        raise ChatTemplateError(f"the chat template rendered {type(text).__name__}, "
                                f"not text")
    return text


def _header_length(tokenizer: Any, before: Conversation, template: str, previous: str,
                   text: str, content: str) -> int:
    """Length of the role header at the start of an assistant message's piece.

    What ``add_generation_prompt=True`` appends to the render of the messages before it,
    if the full render continues with exactly that; otherwise (templates without a
    generation prompt, or one that differs) everything before the first occurrence of
    the content in the piece.
    """
    if before:
        prompt = _render(tokenizer, before, template, generation_prompt=True)
    else:  # an empty conversation: templates may fail on it
        try:
            prompt = _render(tokenizer, before, template, generation_prompt=True)
        except ChatTemplateError:
            prompt = ""
    if prompt.startswith(previous) and text.startswith(prompt) and len(prompt) > len(previous):
        return len(prompt) - len(previous)
    found = text.find(content, len(previous))
    if found < 0:
        raise ChatTemplateError("the chat template does not render the assistant's content "
                                "verbatim, so its tokens cannot be found")
    return found - len(previous)


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
