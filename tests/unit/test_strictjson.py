"""The strict JSON codec: what it refuses in either direction."""

from __future__ import annotations

from typing import Any

import pytest

from relaybus.strictjson import decodeJSON, encodeJSON


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_json_refuses_nan_and_infinity(value: float) -> None:
    with pytest.raises(ValueError):
        encodeJSON({"x": value})


def test_encode_json_deep_nesting_is_value_error() -> None:
    value: Any = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(ValueError, match="deep"):
        encodeJSON(value)


def test_decode_json_deep_nesting_is_value_error() -> None:
    with pytest.raises(ValueError, match="deep"):
        decodeJSON("[" * 100_000 + "]" * 100_000)


def test_decode_json_accepts_str_and_bytes() -> None:
    assert decodeJSON('{"a":1}') == decodeJSON(b'{"a":1}') == {"a": 1}
