"""common/records.py: typed reads of message records fail naming the key."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.records import (
    RecordError,
    array_record,
    config_float,
    config_floats,
    config_ints,
    config_record,
    config_strs,
    numpy_arrays,
)


def _content() -> RecordDict:
    return RecordDict({
        "arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))}),
        "config": ConfigRecord({"norm": 2, "names": ["a", "b"], "steps": [1, 2],
                                "rates": [0.5, 0.25], "flag": True, "empty": []}),
        "metrics": MetricRecord({"loss": 1.0}),
    })


def test_records_of_the_right_kind_are_returned() -> None:
    content = _content()
    assert numpy_arrays(array_record(content, "arrays"))["w"].tolist() == [0.0, 1.0, 2.0]
    config = config_record(content, "config")
    assert config_float(config, "norm") == 2.0
    assert isinstance(config_float(config, "norm"), float)
    assert config_strs(config, "names") == ["a", "b"]
    assert config_ints(config, "steps") == [1, 2]
    assert config_floats(config, "rates") == [0.5, 0.25]
    assert config_floats(config, "steps") == [1.0, 2.0]
    assert config_strs(config, "empty") == []


@pytest.mark.parametrize(("key", "found"), [("metrics", "a MetricRecord"),
                                            ("missing", "nothing")])
def test_a_record_of_another_kind_or_none_is_refused(key: str, found: str) -> None:
    with pytest.raises(RecordError, match=f"`{key}` must be an ArrayRecord, found {found}"):
        array_record(_content(), key)
    with pytest.raises(RecordError, match=f"`{key}` must be a ConfigRecord"):
        config_record(_content(), key)


@pytest.mark.parametrize(("reader", "key"), [
    (config_float, "flag"),  # a bool is not a number here
    (config_float, "names"),
    (config_floats, "names"),
    (config_ints, "rates"),
    (config_strs, "steps"),
    (config_strs, "missing"),
])
def test_a_value_of_the_wrong_type_is_refused(
    reader: Callable[[ConfigRecord, str], object], key: str,
) -> None:
    config = config_record(_content(), "config")
    with pytest.raises(RecordError, match=f"config `{key}` must be"):
        reader(config, key)
