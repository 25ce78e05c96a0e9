"""Tests for common/tasks/sft_builtin_data.py: determinism, balance, checkable answers."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from common.tasks.sft_builtin_data import SFT_TASKS, TASK_DOMAINS, generate_sft
from common.tasks.sft_chat_data import conversations_from_frame

ANSWER_FORMATS = {
    "triage": r"department: (cardiology|orthopedics|neurology|pulmonology); "
              r"urgency: (low|medium|high)",
    "medication": r"medication: [a-z]+; dose: \d+ (mg|g|units)",
    "ticker": r"[A-Z]{4} (up|down|flat)",
    "sentiment": r"positive|neutral|negative",
}


def test_same_seed_gives_same_frame_and_other_seeds_differ() -> None:
    first, again, other = generate_sft(200, seed=5), generate_sft(200, seed=5), \
        generate_sft(200, seed=6)

    pd.testing.assert_frame_equal(first, again)
    assert sum(a != b for a, b in zip(first["messages"], other["messages"],
                                      strict=True)) > 150


def test_columns_tasks_and_domains() -> None:
    frame = generate_sft(401, seed=0)

    assert list(frame.columns) == ["messages", "task", "domain"]
    assert len(SFT_TASKS) >= 3
    # 401 = 4 * 100 + 1: every task has 100 or 101 rows.
    assert sorted(frame["task"].value_counts()) == [100, 100, 100, 101]
    assert all(TASK_DOMAINS[t] == d for t, d in zip(frame["task"], frame["domain"],
                                                    strict=True))
    assert set(frame["domain"]) == {"clinical", "finance", "retail"}


def test_every_row_is_a_valid_one_turn_conversation() -> None:
    frame = generate_sft(100, seed=1)

    conversations = conversations_from_frame(frame, source="builtin")

    assert all([m["role"] for m in c] == ["user", "assistant"] for c in conversations)


@pytest.mark.parametrize("task", SFT_TASKS)
def test_answers_follow_the_format_the_instruction_asks_for(task: str) -> None:
    frame = generate_sft(400, seed=2)
    rows = frame[frame["task"] == task]

    answers = [messages[1]["content"] for messages in rows["messages"]]

    assert all(re.fullmatch(ANSWER_FORMATS[task], answer) for answer in answers)
    assert len(set(answers)) >= 3  # not one constant answer


def test_copied_answers_appear_in_the_text() -> None:
    frame = generate_sft(400, seed=3)

    for task, messages in zip(frame["task"], frame["messages"], strict=True):
        prompt, answer = messages[0]["content"], messages[1]["content"]
        if task == "medication":
            medication, dose = re.fullmatch(r"medication: (.+); dose: (.+)", answer).groups()
            assert f"{medication} {dose}" in prompt
        elif task == "ticker":
            assert f"{answer.split()[0]})" in prompt


def test_the_same_text_always_gets_the_same_answer() -> None:
    # No label noise: the answer is a function of the prompt.
    frame = generate_sft(2000, seed=4)
    answers: dict[str, str] = {}

    for messages in frame["messages"]:
        prompt, answer = messages[0]["content"], messages[1]["content"]
        assert answers.setdefault(prompt, answer) == answer


def test_num_examples_must_be_positive() -> None:
    with pytest.raises(ValueError, match="num_examples must be >= 1, got 0"):
        generate_sft(0, seed=0)
