"""The one JSON codec of relaybus: what the gateway, the worker and the client read and write.

Strict because what comes in must be sendable on: JSON crosses the gateway in both directions,
and a value one side accepts but cannot encode again (NaN, Infinity, numbers beyond a 64-bit
float) would fail a request half-way instead of at the door. Bytes must be strict UTF-8 (plain
json.loads of bytes lets UTF-8-encoded surrogates through), and nesting past the recursion
limit is a ValueError, not a crash. Encoding raises ValueError for whatever JSON cannot carry
(NaN, Infinity, lone surrogates, deep nesting).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

_LARGEST_FLOAT = int(sys.float_info.max)


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finiteFloat(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _floatSizedInt(text: str) -> int:
    number = int(text)
    if abs(number) > _LARGEST_FLOAT:
        raise ValueError(f"{text[:20]}... is out of range")
    return number


# One decoder and one encoder for the process: json.loads / json.dumps with options build a
# new one on every call, about a third of the cost of a small frame.
_DECODER = json.JSONDecoder(parse_constant=_rejectConstant, parse_float=_finiteFloat,
                            parse_int=_floatSizedInt)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def decodeJSON(data: bytes | str) -> Any:
    """Strict JSON: strict UTF-8, no NaN/Infinity or overflowing numbers (they could not be
    sent on), and deep nesting is an error rather than a crash."""
    if isinstance(data, bytes):
        data = data.decode("utf-8")  # json.loads would let UTF-8-encoded surrogates through
    try:
        return _DECODER.decode(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def encodeJSON(value: Any) -> bytes:
    """Compact UTF-8 (not ASCII-escaped); NaN, Infinity and deep nesting are ValueError."""
    try:
        return _ENCODER.encode(value).encode("utf-8")
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
