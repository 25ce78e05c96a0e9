"""Duplicates of a site's data, as the site checks count them (no torch, no pandas).

Shared by the classification check (texts, ``classification_check``) and the SFT check
(conversations, ``sft.SftTask.check_site``), so that both tasks call the same two texts
duplicates. ``fedsft check-data`` loads this module on every SuperNode start: it must
stay light.

- **Normalized text**: case-folded, every run of whitespace collapsed to one space,
  then punctuation (Unicode category ``P*``) and whitespace stripped at both ends.
  ``"Great  product!"`` and ``"great product"`` are one text; inner punctuation counts.
- **Repeats**: items that equal an earlier item (items minus distinct items).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Hashable, Iterable

_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The text duplicates are compared by (module docstring: normalized text)."""
    text = _SPACES.sub(" ", text.casefold())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def repeats(items: Iterable[Hashable]) -> int:
    """How many items equal an earlier one: ``[a, b, a, a]`` has 2."""
    listed = list(items)
    return len(listed) - len(set(listed))


def _is_edge(char: str) -> bool:
    """Stripped at the ends of a normalized text: whitespace or punctuation."""
    return char.isspace() or unicodedata.category(char).startswith("P")
