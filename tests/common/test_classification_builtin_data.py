"""Tests for common/tasks/classification_builtin_data.py: determinism, coverage, balance,
difficulty."""

from __future__ import annotations

import pandas as pd
import pytest
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from common.tasks.classification_builtin_data import DOMAINS, LABELS, generate_builtin


def test_same_seed_gives_same_frame() -> None:
    first = generate_builtin(300, seed=7)
    second = generate_builtin(300, seed=7)
    pd.testing.assert_frame_equal(first, second)


def test_different_seeds_give_different_texts() -> None:
    first = generate_builtin(300, seed=7)
    second = generate_builtin(300, seed=8)
    assert (first["text"] != second["text"]).sum() > 200


def test_columns_labels_and_domains() -> None:
    frame = generate_builtin(600, seed=0)

    assert list(frame.columns) == ["text", "label", "domain"]
    assert len(frame) == 600
    assert set(frame["label"]) == {"negative", "neutral", "positive"} == set(LABELS)
    assert set(frame["domain"]) == set(DOMAINS)
    assert len(DOMAINS) >= 3
    assert all(isinstance(text, str) for text in frame["text"])


def test_labels_and_domains_are_balanced() -> None:
    frame = generate_builtin(601, seed=3)

    # 601 = 3 * 200 + 1: every label and every domain has 200 or 201 rows.
    assert set(frame["label"].value_counts()) <= {200, 201}
    assert set(frame["domain"].value_counts()) <= {200, 201}
    # Each of the 9 (domain, label) cells holds roughly 601 / 9 = 67 rows.
    cells = frame.groupby(["domain", "label"]).size()
    assert len(cells) == 9
    assert cells.min() > 40


def test_rows_are_not_sorted_by_label() -> None:
    frame = generate_builtin(300, seed=0)

    # IID partitioning takes contiguous shards: the first third must hold every label.
    assert set(frame["label"].iloc[:100]) == set(LABELS)


def test_texts_are_short() -> None:
    frame = generate_builtin(1000, seed=1)

    words = frame["text"].str.split().str.len()
    assert words.min() >= 8
    assert words.max() <= 30


def test_texts_vary() -> None:
    frame = generate_builtin(1000, seed=1)

    assert frame["text"].nunique() > 900


def test_bag_of_words_learns_but_does_not_solve_it() -> None:
    frame = generate_builtin(3000, seed=42)
    train, test = train_test_split(frame, test_size=0.2, random_state=0)
    vectorizer = CountVectorizer(ngram_range=(1, 2))
    model = LogisticRegression(max_iter=2000)

    model.fit(vectorizer.fit_transform(train["text"]), train["label"])
    train_accuracy = model.score(vectorizer.transform(train["text"]), train["label"])
    test_accuracy = model.score(vectorizer.transform(test["text"]), test["label"])

    # Learnable (chance is 1/3) but label noise keeps even the fitted rows below 100 %.
    assert test_accuracy > 0.8
    assert train_accuracy < 0.97
    assert test_accuracy < 0.97


def test_rejects_no_examples() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        generate_builtin(0, seed=0)
