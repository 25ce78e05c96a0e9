"""Rows of a chat SFT table as conversations: three input formats, one canonical form.

A conversation is a list of messages, each exactly ``{"role": ..., "content": ...}``
(two ``str`` keys, in that order, so a column of them stores in a ``datasets.Dataset``
as ``list<struct<role, content>>``). Roles are ``system``, ``user`` and ``assistant``.

Input formats (``fmt``):

- ``messages``: a column holding the conversation as a list of ``{role, content}``
  objects (multi-turn allowed); in CSV / TSV a cell may hold it as a JSON string, and
  Parquet's list arrays are accepted. Other keys of a message are ignored.
- ``alpaca``: ``instruction``, optional ``input`` and ``output`` columns; the user turn
  is the instruction, followed by a blank line and the input when the input is not
  blank; the assistant turn is the output.
- ``prompt-response``: ``prompt`` (the user turn) and ``response`` (the assistant turn).
- ``auto`` (default): ``messages`` if its column exists, else ``alpaca`` if the
  instruction and output columns exist, else ``prompt-response`` if the prompt and
  response columns exist.

A conversation is refused (not dropped) with a ``DataError`` naming the source, the
1-based row, the column and what is allowed when: a message is not an object with
string ``role`` and ``content``, a role is not one of ``ROLES``, a ``system`` message is
not the first, a user or assistant message is blank, it has no assistant message or does
not end with one (the last assistant message is the answer evaluation generates), a
messages cell is missing, not a list, or a JSON string that does not decode to one.
In the column formats, a missing or non-string instruction / prompt / output /
response (or a non-string input) is refused likewise. A file read as CSV should be read
with string columns (``dtype=str``) so a numeric answer stays text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from common.data import DataError

ROLES = ("system", "user", "assistant")
FORMATS = ("auto", "messages", "alpaca", "prompt-response")
MESSAGES_COLUMN = "messages"  # the canonical column of ``chat_frame``

Message = dict[str, str]
Conversation = list[Message]


def detect_format(
    columns: Sequence[str],
    *,
    source: str,
    messages_column: str = "messages",
    instruction_column: str = "instruction",
    output_column: str = "output",
    prompt_column: str = "prompt",
    response_column: str = "response",
) -> str:
    """The format ``auto`` picks for a table with ``columns`` (module doc).

    Raises
    ------
    DataError
        If no format's columns are all present; the message lists what was looked for
        and the columns found.
    """
    present = set(map(str, columns))
    if messages_column in present:
        return "messages"
    if {instruction_column, output_column} <= present:
        return "alpaca"
    if {prompt_column, response_column} <= present:
        return "prompt-response"
    found = ", ".join(map(repr, map(str, columns))) or "none"
    raise DataError(
        f"{source}: no chat columns: looked for {messages_column!r} (messages format), "
        f"{instruction_column!r} + {output_column!r} (Alpaca format) and {prompt_column!r} "
        f"+ {response_column!r} (prompt/response format); columns found: {found}"
    )


def conversations_from_frame(
    frame: pd.DataFrame,
    *,
    source: str,
    fmt: str = "auto",
    messages_column: str = "messages",
    instruction_column: str = "instruction",
    input_column: str = "input",
    output_column: str = "output",
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_prompt: str = "",
) -> list[Conversation]:
    """Each row of ``frame`` as a validated conversation (module doc for the formats).

    Parameters
    ----------
    frame
        The table as read from ``source``; not changed.
    source
        The data source's name, for error messages (a file path, ``builtin``).
    fmt
        One of ``FORMATS``.
    messages_column, instruction_column, input_column, output_column, prompt_column, \
response_column
        The column names of the formats.
    system_prompt
        If not empty, a ``system`` message with this content is put first in every
        conversation that does not start with a system message of its own.

    Returns
    -------
    list of Conversation
        One per row, in row order; fresh lists and dicts (nothing shared with ``frame``).

    Raises
    ------
    DataError
        If ``frame`` has no rows, ``fmt`` is unknown, a column the format needs is
        missing, or a row breaks a rule of the module doc; the message names ``source``,
        the 1-based row, the column and what is allowed.
    """
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown chat data format {fmt!r}; allowed: "
                        f"{', '.join(FORMATS)}")
    if frame.empty:
        raise DataError(f"{source}: no data rows")
    if fmt == "auto":
        fmt = detect_format(
            list(frame.columns), source=source, messages_column=messages_column,
            instruction_column=instruction_column, output_column=output_column,
            prompt_column=prompt_column, response_column=response_column,
        )
    if fmt == "messages":
        _require_columns(frame, [messages_column], source=source, fmt=fmt)
        conversations = [
            _parse_messages(value, where=f"{source}: row {row}, column {messages_column!r}")
            for row, value in enumerate(frame[messages_column], start=1)
        ]
    elif fmt == "alpaca":
        _require_columns(frame, [instruction_column, output_column], source=source, fmt=fmt)
        inputs = (frame[input_column] if input_column in frame.columns
                  else [None] * len(frame))
        conversations = []
        for row, (instruction, extra, output) in enumerate(
            zip(frame[instruction_column], inputs, frame[output_column], strict=True),
            start=1,
        ):
            user = _text_cell(instruction, what="instruction", where=f"{source}: row "
                              f"{row}, column {instruction_column!r}")
            if not _is_missing(extra):
                extra = _text_cell(extra, what="input", where=f"{source}: row {row}, "
                                   f"column {input_column!r}", blank_ok=True)
                if extra.strip():
                    user = f"{user}\n\n{extra}"
            answer = _text_cell(output, what="assistant answer", where=f"{source}: "
                                f"row {row}, column {output_column!r}")
            conversations.append(_pair(user, answer))
    else:
        _require_columns(frame, [prompt_column, response_column], source=source, fmt=fmt)
        conversations = [
            _pair(
                _text_cell(prompt, what="prompt",
                           where=f"{source}: row {row}, column {prompt_column!r}"),
                _text_cell(response, what="assistant answer",
                           where=f"{source}: row {row}, column {response_column!r}"),
            )
            for row, (prompt, response) in enumerate(
                zip(frame[prompt_column], frame[response_column], strict=True), start=1
            )
        ]
    if system_prompt:
        conversations = [
            c if c[0]["role"] == "system"
            else [{"role": "system", "content": system_prompt}, *c]
            for c in conversations
        ]
    return conversations


def chat_frame(
    frame: pd.DataFrame,
    *,
    source: str,
    fmt: str = "auto",
    messages_column: str = "messages",
    instruction_column: str = "instruction",
    input_column: str = "input",
    output_column: str = "output",
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_prompt: str = "",
) -> pd.DataFrame:
    """``frame`` with a canonical ``messages`` column first and its other columns after.

    Takes the arguments of ``conversations_from_frame`` and raises as it does. The
    columns the format read (the messages column, or instruction / input / output, or
    prompt / response) are replaced by ``messages`` (a ``Conversation`` per row); any
    other column (``task``, ``domain``, a site id) is kept unchanged, in order, for
    partitioning; a kept column named ``messages`` would clash and is replaced. The
    index is reset to 0..n-1; ``frame`` is not changed. The result goes through
    ``datasets.Dataset.from_pandas`` with ``messages`` as ``list<struct<role,
    content>>``.
    """
    names = {"messages_column": messages_column, "instruction_column": instruction_column,
             "output_column": output_column, "prompt_column": prompt_column,
             "response_column": response_column}
    conversations = conversations_from_frame(
        frame, source=source, fmt=fmt, input_column=input_column,
        system_prompt=system_prompt, **names,
    )
    if fmt == "auto":  # cannot fail now: conversations_from_frame detected it
        fmt = detect_format(list(frame.columns), source=source, **names)
    used = {
        "messages": {messages_column},
        "alpaca": {instruction_column, input_column, output_column},
        "prompt-response": {prompt_column, response_column},
    }[fmt] | {MESSAGES_COLUMN}
    out = frame.drop(columns=[c for c in frame.columns if str(c) in used])
    out = out.reset_index(drop=True)
    out.insert(0, MESSAGES_COLUMN, pd.Series(conversations, dtype=object))
    return out


def check_conversation(messages: Any, *, where: str) -> Conversation:
    """``messages`` validated and copied into the canonical form (module doc rules).

    ``where`` starts every error message (e.g. ``"notes.jsonl: row 3, column
    'messages'"``). Accepts a list, tuple or 1-D numpy array of mappings.

    Raises
    ------
    DataError
        If a rule of the module doc is broken.
    """
    if isinstance(messages, np.ndarray) and messages.ndim == 1:
        messages = list(messages)  # Parquet / Arrow list columns arrive as arrays
    if not isinstance(messages, list | tuple):
        raise DataError(f"{where}: expected a list of {{role, content}} messages, got "
                        f"{type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: the conversation has no messages")
    out: Conversation = []
    for number, message in enumerate(messages, start=1):
        at = f"{where}, message {number}"
        if not isinstance(message, Mapping):
            raise DataError(f"{at}: expected an object with 'role' and 'content', got "
                            f"{type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:  # also a missing or non-string role
            raise DataError(f"{at}: unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: the content must be a string, got "
                            f"{type(content).__name__}")
        if role == "system" and number != 1:
            raise DataError(f"{at}: a system message is allowed only as the first message")
        if role != "system" and not content.strip():
            what = "assistant answer" if role == "assistant" else "user message"
            raise DataError(f"{at}: the {what} is empty")
        out.append({"role": str(role), "content": str(content)})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the conversation has no assistant message (nothing to "
                        f"train on); roles found: {', '.join(m['role'] for m in out)}")
    if out[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant message "
                        f"(the answer), but ends with a {out[-1]['role']} message")
    return out


def _parse_messages(value: Any, *, where: str) -> Conversation:
    """A messages cell (a list, an array or a JSON string of a list) as a conversation."""
    if _is_missing(value):
        raise DataError(f"{where}: missing value; expected a list of {{role, content}} "
                        f"messages")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: the messages cell is not valid JSON ({error}); "
                            f"expected a JSON list of {{role, content}} objects") from error
    return check_conversation(value, where=where)


def _text_cell(value: Any, *, what: str, where: str, blank_ok: bool = False) -> str:
    """A cell that must hold text, the ``what`` of a turn (blank refused unless ``blank_ok``)."""
    if _is_missing(value):
        raise DataError(f"{where}: missing value; expected text")
    if not isinstance(value, str):
        raise DataError(f"{where}: the {what} must be text, got {type(value).__name__} "
                        f"{value!r}")
    if not blank_ok and not value.strip():
        raise DataError(f"{where}: the {what} is empty")
    return str(value)


def _pair(user: str, answer: str) -> Conversation:
    """A one-turn conversation."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _is_missing(value: Any) -> bool:
    """None or a scalar NaN / NA (pandas' missing markers); lists are never missing."""
    if value is None:
        return True
    if isinstance(value, list | tuple | np.ndarray | Mapping | str):
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _require_columns(frame: pd.DataFrame, names: Sequence[str], *, source: str,
                     fmt: str) -> None:
    """Raise ``DataError`` if a column the format ``fmt`` reads is missing."""
    for name in names:
        if name not in frame.columns:
            found = ", ".join(map(repr, map(str, frame.columns)))
            raise DataError(f"{source}: missing column {name!r} (needed by the {fmt} "
                            f"format); columns found: {found}")
