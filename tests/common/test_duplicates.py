"""The duplicate rules both site checks share."""

import pytest

from common.tasks.duplicates import normalize_text, repeats


@pytest.mark.parametrize("items, expected", [
    ([], 0), (["a", "b"], 0), (["a", "b", "a", "a"], 2),
    ([("user", "x"), ("user", "x"), ("user", "y")], 1),
])
def test_repeats_counts_the_items_equal_to_an_earlier_one(items, expected):
    assert repeats(items) == expected
    assert repeats(iter(items)) == expected  # any iterable, read once


def test_the_classification_check_compares_texts_by_the_shared_rule():
    from common.tasks import classification_check

    assert classification_check.normalize_text is normalize_text
    assert normalize_text("  Great\tproduct!! ") == normalize_text("great product")
