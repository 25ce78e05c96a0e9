"""Tests for common/tasks/sft_chat_data.py: the three formats, auto detection, every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from common.data import DataError
from common.tasks.sft_chat_data import chat_frame, conversations_from_frame, detect_format

HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_messages_format_accepts_lists_json_strings_and_multi_turn() -> None:
    multi = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6", "name": "bot"},  # extra keys are ignored
    ]
    frame = pd.DataFrame({"messages": [HI, json.dumps(multi)]})

    conversations = conversations_from_frame(frame, source="t.csv", fmt="messages")

    assert conversations[0] == HI
    assert conversations[1] == [{k: m[k] for k in ("role", "content")} for m in multi]
    assert conversations[0] is not frame["messages"][0]  # a copy, not the input


def test_messages_from_a_parquet_file_arrive_as_arrays_and_are_accepted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [HI, HI], "site": ["a", "b"]}).to_parquet(path)
    frame = pd.read_parquet(path)
    assert isinstance(frame["messages"][0], np.ndarray)  # why arrays must be accepted

    assert conversations_from_frame(frame, source=str(path)) == [HI, HI]


def test_alpaca_format_joins_a_non_blank_input_to_the_instruction() -> None:
    frame = pd.DataFrame({
        "instruction": ["Translate to French.", "Say hi.", "Say bye."],
        "input": ["cat", "  ", None],
        "output": ["chat", "hi", "bye"],
    })

    conversations = conversations_from_frame(frame, source="a.json", fmt="alpaca")

    assert conversations == [
        [{"role": "user", "content": "Translate to French.\n\ncat"},
         {"role": "assistant", "content": "chat"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "Say bye."}, {"role": "assistant", "content": "bye"}],
    ]


def test_alpaca_without_an_input_column_and_prompt_response_format() -> None:
    alpaca = pd.DataFrame({"instruction": ["Hi"], "output": ["Hello!"]})
    pairs = pd.DataFrame({"prompt": ["Hi"], "response": ["Hello!"]})

    assert conversations_from_frame(alpaca, source="a", fmt="alpaca") == [HI]
    assert conversations_from_frame(pairs, source="p", fmt="prompt-response") == [HI]


@pytest.mark.parametrize(("columns", "expected"), [
    (["messages", "instruction", "output"], "messages"),  # messages wins
    (["instruction", "input", "output", "prompt", "response"], "alpaca"),
    (["prompt", "response", "task"], "prompt-response"),
])
def test_auto_picks_the_format_by_the_columns_present(
    columns: list[str], expected: str
) -> None:
    assert detect_format(columns, source="d") == expected


def test_auto_names_what_it_looked_for_when_nothing_fits() -> None:
    with pytest.raises(DataError) as caught:
        conversations_from_frame(pd.DataFrame({"question": ["q"], "answer": ["a"]}),
                                 source="gsm8k.jsonl")

    message = str(caught.value)
    assert message.startswith("gsm8k.jsonl: no chat columns")
    for name in ("'messages'", "'instruction' + 'output'", "'prompt' + 'response'",
                 "columns found: 'question', 'answer'"):
        assert name in message


def test_configured_column_names_are_used_in_auto_detection() -> None:
    frame = pd.DataFrame({"question": ["Hi"], "answer": ["Hello!"]})

    conversations = conversations_from_frame(
        frame, source="gsm8k.jsonl", prompt_column="question", response_column="answer"
    )

    assert conversations == [HI]


def test_system_prompt_is_added_only_where_there_is_no_system_message() -> None:
    own = [{"role": "system", "content": "Mine."}, *HI]
    frame = pd.DataFrame({"messages": [HI, own]})

    conversations = conversations_from_frame(frame, source="s", system_prompt="Be brief.")

    assert conversations[0] == [{"role": "system", "content": "Be brief."}, *HI]
    assert conversations[1] == own


def test_chat_frame_puts_messages_first_keeps_other_columns_and_fits_a_dataset() -> None:
    frame = pd.DataFrame({
        "task": ["t1", "t2"], "instruction": ["Hi", "Yo"], "input": ["", "x"],
        "output": ["Hello!", "Hey"], "site": [3, 4],
    }, index=[10, 11])

    canonical = chat_frame(frame, source="a.csv")

    assert list(canonical.columns) == ["messages", "task", "site"]
    assert canonical["messages"][0] == HI
    assert canonical["task"].tolist() == ["t1", "t2"]
    assert list(frame.columns) == ["task", "instruction", "input", "output", "site"]
    dataset = datasets.Dataset.from_pandas(canonical, preserve_index=False)
    assert dataset.column_names == ["messages", "task", "site"]
    assert dataset[0]["messages"] == HI
    assert dataset[1]["messages"][0] == {"role": "user", "content": "Yo\n\nx"}


def test_chat_frame_replaces_the_source_messages_column_of_another_name() -> None:
    frame = pd.DataFrame({"conversation": [json.dumps(HI)], "domain": ["retail"]})

    canonical = chat_frame(frame, source="c.csv", messages_column="conversation")

    assert list(canonical.columns) == ["messages", "domain"]
    assert canonical["messages"][0] == HI


def _one(column: str, value: object) -> pd.DataFrame:
    """A one-row frame (a dict of one-element lists keeps list values as cells)."""
    frame = pd.DataFrame({column: [None]}, dtype=object)
    frame.at[0, column] = value
    return frame


BAD_INPUTS = [
    # (frame, fmt, fragments of the message)
    (pd.DataFrame({"messages": []}), "auto", ["no data rows"]),
    (pd.DataFrame({"text": ["x"]}), "messages",
     ["missing column 'messages' (needed by the messages format)", "found: 'text'"]),
    (pd.DataFrame({"instruction": ["x"]}), "alpaca", ["missing column 'output'"]),
    (pd.DataFrame({"prompt": ["x"]}), "prompt-response", ["missing column 'response'"]),
    (pd.DataFrame({"messages": [HI]}), "sharegpt",
     ["unknown chat data format 'sharegpt'", "auto, messages, alpaca, prompt-response"]),
    (pd.DataFrame({"messages": ["[{'role': 'user'"]}), "messages",
     ["row 1, column 'messages': the messages cell is not valid JSON"]),
    (pd.DataFrame({"messages": ['{"role": "user"}']}), "messages",
     ["row 1, column 'messages': expected a list", "got dict"]),
    (_one("messages", 7), "messages", ["expected a list", "got int"]),
    (pd.DataFrame({"messages": [None]}), "messages", ["row 1", "missing value"]),
    (_one("messages", []), "messages", ["the conversation has no messages"]),
    (_one("messages", ["Hi"]), "messages",
     ["message 1: expected an object with 'role' and 'content', got str"]),
    (_one("messages", [{"role": "human", "content": "Hi"}, HI[1]]), "messages",
     ["message 1: unknown role 'human'; allowed: system, user, assistant"]),
    (_one("messages", [{"content": "Hi"}, HI[1]]), "messages", ["unknown role None"]),
    (_one("messages", [HI[0], {"role": "assistant", "content": 4}]), "messages",
     ["message 2: the content must be a string, got int"]),
    (_one("messages", [HI[0], {"role": "assistant", "content": "  "}]), "messages",
     ["message 2: the assistant answer is empty"]),
    (_one("messages", [{"role": "user", "content": ""}, HI[1]]), "messages",
     ["message 1: the user message is empty"]),
    (_one("messages", [HI[0]]), "messages",
     ["no assistant message (nothing to train on); roles found: user"]),
    (_one("messages", [*HI, {"role": "user", "content": "and?"}]), "messages",
     ["must end with an assistant message", "ends with a user message"]),
    (_one("messages", [*HI, {"role": "system", "content": "x"}, HI[1]]), "messages",
     ["message 3: a system message is allowed only as the first message"]),
    (pd.DataFrame({"instruction": ["Hi", None], "output": ["a", "b"]}), "alpaca",
     ["row 2, column 'instruction': missing value"]),
    (pd.DataFrame({"instruction": ["Hi"], "output": [""]}), "alpaca",
     ["row 1, column 'output': the assistant answer is empty"]),
    (pd.DataFrame({"instruction": ["Hi"], "output": [42]}), "alpaca",
     ["row 1, column 'output': the assistant answer must be text, got int 42"]),
    (pd.DataFrame({"instruction": ["Hi"], "input": [3.5], "output": ["a"]}), "alpaca",
     ["column 'input': the input must be text, got float"]),
    (pd.DataFrame({"prompt": [" "], "response": ["a"]}), "prompt-response",
     ["row 1, column 'prompt': the prompt is empty"]),
    (pd.DataFrame({"prompt": ["q"], "response": [float("nan")]}), "prompt-response",
     ["row 1, column 'response': missing value"]),
]


@pytest.mark.parametrize(("frame", "fmt", "fragments"), BAD_INPUTS)
def test_bad_input_is_refused_naming_source_row_column_and_rule(
    frame: pd.DataFrame, fmt: str, fragments: list[str]
) -> None:
    with pytest.raises(DataError) as caught:
        conversations_from_frame(frame, source="data/notes.jsonl", fmt=fmt)

    message = str(caught.value)
    assert message.startswith("data/notes.jsonl: ")
    for fragment in fragments:
        assert fragment in message


def test_the_row_number_counts_from_one_in_the_table() -> None:
    frame = pd.DataFrame({"messages": [HI, HI, json.dumps([HI[0]])]})

    with pytest.raises(DataError, match=r"row 3, column 'messages'"):
        conversations_from_frame(frame, source="x.jsonl")
