"""Typed reads of Flower message records.

A ``RecordDict`` holds three kinds of record under string keys, and a ``ConfigRecord``
value may be any of a dozen types. These readers return the one type the fedsft
protocol puts there, or raise ``RecordError`` naming the key and what was found, so a
malformed message fails where it is read instead of somewhere later (and is never
silently converted).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict


class RecordError(ValueError):
    """A message record or value is missing or is not of the type the protocol says."""


def _found(value: object) -> str:
    return "nothing" if value is None else f"a {type(value).__name__}"


def array_record(content: RecordDict, key: str) -> ArrayRecord:
    """``content[key]`` as an ``ArrayRecord``."""
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"message record `{key}` must be an ArrayRecord, "
                          f"found {_found(record)}")
    return record


def config_record(content: RecordDict, key: str) -> ConfigRecord:
    """``content[key]`` as a ``ConfigRecord``."""
    record = content.get(key)
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"message record `{key}` must be a ConfigRecord, "
                          f"found {_found(record)}")
    return record


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of ``record`` as numpy arrays, by name."""
    return {name: array.numpy() for name, array in record.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def config_float(config: Mapping[str, object], key: str) -> float:
    """``config[key]`` as a float (an int is accepted; a bool is not)."""
    value = config.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RecordError(f"config `{key}` must be a number, found {_found(value)}")
    return float(value)


def config_floats(config: Mapping[str, object], key: str) -> list[float]:
    """``config[key]`` as a list of floats (ints accepted; an empty list is fine)."""
    value = config.get(key)
    if not isinstance(value, list) or not all(_is_number(v) for v in value):
        raise RecordError(f"config `{key}` must be a list of numbers, found {_found(value)}")
    return [float(v) for v in value]


def config_ints(config: Mapping[str, object], key: str) -> list[int]:
    """``config[key]`` as a list of ints (an empty list is fine)."""
    value = config.get(key)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RecordError(f"config `{key}` must be a list of ints, found {_found(value)}")
    return [int(v) for v in value]


def config_strs(config: Mapping[str, object], key: str) -> list[str]:
    """``config[key]`` as a list of strings (an empty list is fine)."""
    value = config.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"config `{key}` must be a list of strings, found {_found(value)}")
    return [str(v) for v in value]
