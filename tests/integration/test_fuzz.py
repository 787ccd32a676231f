"""Property-based fuzzing of a live gateway: over 10,000 hostile frames of every family
docs/protocol.md talks about, while a well-behaved client on another connection keeps getting
correct answers.

Each frame's expected outcome comes from `ConnectionModel`, an oracle written from
docs/protocol.md sections 1 and 2 (and workers/examples.py for what the handlers answer), not
from relaybus.frames: an `error` with the documented code and requestId, the chunks and
terminal frame of an accepted request, nothing at all, or a close code. Every frame that
could be accepted carries a requestId that is fresh on its connection (a unique counter
first), so whether a request is a duplicate never depends on timing.

Hypothesis draws batches of frames (derandomized, no example database, no shrinking against a
live process: a failure shows the frame that got the wrong answer and the frames sent just
before it). A batch ends with an echo barrier and waits until every frame owed has arrived
and nothing else did; a frame that closes the connection (1009, 1007, 1002) comes last, and
the next batch reconnects. Boundaries the contract leaves open (an integer written as a
float, null for an optional field, the UTF-16 length of a requestId, the gateway's JSON
spacing) are not generated, or the oracle accepts either answer.

The RabbitMQ node is shared with other tests, and their resource alarms are node-wide: a
batch that gets `unavailable` or stalls while the gateway reports its broker out of reach is
counted as disturbed rather than failed (at most MAX_DISTURBED_SHARE of them).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
import struct
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import attrs
import pytest
from faultload import Tally, loadRunning
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from processfixtures import RECV_TIMEOUT, Client, LogMark, waitUntil

pytestmark = [pytest.mark.processes]

FRAMES_AT_LEAST = 10_000
EXAMPLES = 120  # batches; with the floods they make well over FRAMES_AT_LEAST frames
# Every so many batches also send (in this order) ...
HEAVY_EVERY = 6  # ... a message of about a MiB,
FLOOD_EVERY = 15  # ... a flood of 1000-2500 cancels,
OVERLOAD_EVERY = 40  # ... first of all, maxInFlight requests and a few more (overloaded),
CLOSER_EVERY = 3  # ... last, a frame that must close the connection.
HANDLER_TYPES = ("echo", "testRequest", "primes")
LOG_LEVELS = ("debug", "info", "warn", "error")
# Extra fields the fuzzer adds must be unknown ones.
KNOWN_FIELDS = {"type", "requestId", "requestType", "payload", "timeoutMs", "level", "message",
                "context", "timestamp", "entries"}
REQUEST_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
# C0, DEL, C1, U+2028/U+2029 and lone surrogates: never allowed in a requestId.
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LARGEST_FLOAT_INT = int(sys.float_info.max)
MAX_ERROR_MESSAGE = 1024
ID_MARK = "\u0000ID\u0000"  # in raw frame templates: where the fresh requestId goes
CLOSE_PROTOCOL_ERROR = 1002
# An accepted request with a shorter deadline may also end with `timeout` (a busy machine).
SURE_TIMEOUT_MS = 10_000
VARIANT_MAX_CHARS = 65_536  # bigger frames get no refused copy (it could be over the limit)
# What relaybus logs when its broker is out of reach or blocks it. Other tests share the
# RabbitMQ node, and a resource alarm is node-wide: `unavailable` and timeouts are then the
# documented answers, and the batch says nothing about frames.
BROKER_TROUBLE = re.compile(
    r"AMQP .*: (the broker blocks this connection|connection lost|connection failed|reconnecting)")
MAX_DISTURBED_SHARE = 0.25  # of the batches; beyond it the run has not fuzzed enough


# The oracle


class NotStrictJSON(ValueError):
    pass


def _rejectConstant(name: str) -> Any:
    raise NotStrictJSON(name)


def _finiteFloat(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotStrictJSON(f"{text[:20]} is beyond a 64-bit float")
    return number


def _floatSizedInt(text: str) -> int:
    number = int(text)  # over 4300 digits raises ValueError: beyond a float anyway
    if abs(number) > LARGEST_FLOAT_INT:
        raise NotStrictJSON(f"{text[:20]}... is beyond a 64-bit float")
    return number


def strictJSON(text: str) -> Any:
    """What the contract calls strict JSON: no NaN/Infinity, no number beyond a float."""
    try:
        return json.loads(text, parse_constant=_rejectConstant, parse_float=_finiteFloat,
                          parse_int=_floatSizedInt)
    except RecursionError:
        raise NotStrictJSON("nested too deeply") from None


def canonical(value: Any) -> str:
    """JSON values compared by type too (True is not 1, 1.0 is not 1)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=True)


def hasLoneSurrogate(value: Any) -> bool:
    """A string that cannot be encoded as UTF-8 anywhere in a JSON value."""
    if isinstance(value, str):
        return LONE_SURROGATE.search(value) is not None
    if isinstance(value, list):
        return any(hasLoneSurrogate(v) for v in value)
    if isinstance(value, dict):
        return any(hasLoneSurrogate(k) or hasLoneSurrogate(v) for k, v in value.items())
    return False


def isInt(value: Any) -> bool:
    return type(value) is int  # JSON integers; not booleans


def validRequestId(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 1 <= len(value) <= 128 and not UNSAFE.search(value)


def validRequestType(value: Any) -> bool:
    return isinstance(value, str) and REQUEST_TYPE.fullmatch(value) is not None


def primesBelow(limit: int) -> list[int]:
    return [n for n in range(2, limit) if all(n % d for d in range(2, math.isqrt(n) + 1))]


def _intField(payload: dict[str, Any], name: str, default: int, low: int,
              high: int) -> int | None:
    value = payload.get(name, default)
    return value if isInt(value) and low <= value <= high else None


def _clientLogFault(frame: dict[str, Any]) -> str | None:
    """The field of a client-log frame that breaks the contract, if one does."""
    level, message = frame.get("level"), frame.get("message")
    context, timestamp = frame.get("context"), frame.get("timestamp")
    if not isinstance(level, str) or level not in LOG_LEVELS:
        return "level"
    if not isinstance(message, str) or len(message) > 8192:
        return "message"
    if context is not None and not (isinstance(context, dict) and not hasLoneSurrogate(context)
                                    and len(json.dumps(context).encode()) <= 16384):
        return "context"
    if timestamp is not None and (isinstance(timestamp, bool)
                                  or not isinstance(timestamp, int | float)):
        return "timestamp"
    return None


Owed = tuple[str, Any]  # ("chunk", data) | ("response", data) | ("error", code) | ("echo", data)


class ConnectionModel:
    """What the gateway owes one connection's client, frame by frame (docs/protocol.md)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.maxBytes = limits["maxMessageBytes"]
        self.maxInFlight = limits["maxInFlight"]
        self.maxTimeoutMs = limits["maxTimeoutMs"]
        self.maxLogEntriesPerFrame = limits["maxLogEntriesPerFrame"]
        self.owed: dict[str, collections.deque[Owed]] = {}
        self.nullErrorsOwed = 0  # bad_request frames with requestId null
        self.inFlight: set[str] = set()
        self.slow: set[str] = set()  # accepted; they end only when cancelled
        self.mayTimeOut: set[str] = set()  # accepted with a deadline too short to promise more
        self.finished: list[str] = []
        self.logEntries = 0
        self.chunksSeen: collections.Counter[str] = collections.Counter()
        self.verdict = ""  # the last message's, for the report

    @property
    def settled(self) -> bool:
        return not self.owed and not self.nullErrorsOwed and not self.slow

    # What a message costs

    def judge(self, data: str | bytes, text: bool) -> int | None:
        """Record what the gateway owes for one message; return the close code it must end
        the connection with instead, if any."""
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        if size > self.maxBytes:
            return self._close(1009, "over maxMessageBytes")
        if not text:
            self._refuse(None, "binary")
            return None
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                return self._close(1007, "invalid UTF-8")
        try:
            frame = strictJSON(data)
        except ValueError:
            self._refuse(None, "not strict JSON")
            return None
        if not isinstance(frame, dict):
            self._refuse(None, "not an object")
        elif frame.get("type") == "request":
            self._request(frame)
        elif frame.get("type") == "cancel":
            self._cancel(frame)
        elif frame.get("type") == "client-log":
            self._clientLog(frame)
        else:
            self._refuse(None, "unknown type")
        return None

    def _close(self, code: int, why: str) -> int:
        self.verdict = f"close {code}: {why}"
        return code

    def _refuse(self, requestId: str | None, why: str, code: str = "bad_request") -> None:
        self.verdict = f"{code}: {why}"
        if requestId is None:
            self.nullErrorsOwed += 1
        else:
            self.owed.setdefault(requestId, collections.deque()).append(("error", code))

    def _request(self, frame: dict[str, Any]) -> None:
        requestId = frame.get("requestId")
        if not validRequestId(requestId):
            self._refuse(None, "request with a bad requestId")
            return
        refusal = self._requestRefusal(requestId, frame)
        if refusal is not None:
            self._refuse(requestId, *refusal)
            return
        owed = self._handled(requestId, frame["requestType"], frame.get("payload"))
        self.inFlight.add(requestId)
        timeoutMs = frame.get("timeoutMs")
        if timeoutMs is not None and timeoutMs < SURE_TIMEOUT_MS:
            self.mayTimeOut.add(requestId)
        if owed is None:
            self.slow.add(requestId)
        else:
            self.owed.setdefault(requestId, collections.deque()).extend(owed)

    def _requestRefusal(self, requestId: str, frame: dict[str, Any]) -> tuple[str, str] | None:
        """(why, error code) when a request with a readable requestId is refused at once."""
        if not validRequestType(frame.get("requestType")):
            return "bad requestType", "bad_request"
        timeoutMs = frame.get("timeoutMs")
        if timeoutMs is not None and not (isInt(timeoutMs)
                                          and 0 < timeoutMs <= self.maxTimeoutMs):
            return "bad timeoutMs", "bad_request"
        if requestId in self.inFlight:
            return "id in flight", "duplicate_request_id"
        if hasLoneSurrogate(frame.get("payload")):
            return "payload not encodable as UTF-8", "bad_request"
        if len(self.inFlight) >= self.maxInFlight:
            return "maxInFlight reached", "overloaded"
        return None

    def _handled(self, requestId: str, requestType: str, payload: Any) -> list[Owed] | None:
        """The frames an accepted request gets; None for one that runs until cancelled."""
        if requestType == "echo":
            return [self._echoed(requestId, payload)]
        if requestType not in ("testRequest", "primes"):
            self.verdict = "accepted: no_handler"
            return [("error", "no_handler")]
        payload = {} if payload is None else payload
        if not isinstance(payload, dict):
            self.verdict = f"accepted: {requestType} refuses its payload"
            return [("error", "bad_request")]
        if requestType == "testRequest":
            count = _intField(payload, "count", 5, 0, 10_000)
            delayMs = _intField(payload, "delayMs", 100, 0, 60_000)
            chunkBytes = _intField(payload, "chunkBytes", 16, 0, 256 * 1024)
            if count is None or delayMs is None or chunkBytes is None:
                self.verdict = "accepted: testRequest refuses its payload"
                return [("error", "bad_request")]
            if count and delayMs:
                self.verdict = "accepted: slow testRequest"
                return None
            self.verdict = "accepted: testRequest"
            return [*(("chunk", {"index": i, "filler": "x" * chunkBytes}) for i in range(count)),
                    ("response", {"chunks": count, "chunkBytes": chunkBytes, "delayMs": delayMs,
                                  "bytes": count * chunkBytes})]
        below = _intField(payload, "below", 1000, 2, 10_000_000)
        batch = _intField(payload, "batch", 100, 1, 10_000)
        if below is None or batch is None:
            self.verdict = "accepted: primes refuses its payload"
            return [("error", "bad_request")]
        self.verdict = "accepted: primes"
        primes = primesBelow(below)
        return [*(("chunk", {"primes": primes[i:i + batch]})
                  for i in range(0, len(primes), batch)),
                ("response", {"below": below, "count": len(primes)})]

    def _echoed(self, requestId: str, payload: Any) -> Owed:
        """The echo's response, or payload_too_large when that frame would be over the limit.
        The contract does not fix the gateway's JSON spacing or escaping, so in between the
        tightest and the loosest encoding both answers are right."""
        frame = {"type": "response", "requestId": requestId, "data": payload}
        tightest = len(json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode())
        loosest = len(json.dumps(frame, ensure_ascii=True))
        if loosest <= self.maxBytes:
            self.verdict = "accepted: echo"
            return ("response", payload)
        if tightest > self.maxBytes:
            self.verdict = "accepted: echo, its response over the limit (payload_too_large)"
            return ("error", "payload_too_large")
        self.verdict = "accepted: echo, its response about at the limit (either answer)"
        return ("echo", payload)

    def _cancel(self, frame: dict[str, Any]) -> None:
        requestId = frame.get("requestId")
        if not validRequestId(requestId):
            self._refuse(None, "cancel with a bad requestId")
        elif requestId in self.inFlight:
            assert requestId in self.slow, f"the fuzzer cancelled a fast request {requestId!r}"
            self.inFlight.discard(requestId)
            self.slow.discard(requestId)
            self._refuse(requestId, "cancel of a request in flight", "cancelled")
        else:
            self.verdict = "ignored: cancel of an unknown or finished id"

    def _clientLog(self, frame: dict[str, Any]) -> None:
        if "entries" not in frame:
            entries, wrong = [frame], _clientLogFault(frame)
        else:
            entries, wrong = frame["entries"], None
            if not (isinstance(entries, list)
                    and 1 <= len(entries) <= self.maxLogEntriesPerFrame):
                wrong = f"entries: not a list of 1..{self.maxLogEntriesPerFrame}"
            elif not all(isinstance(entry, dict) for entry in entries):
                wrong = "entries: not all objects"
            else:
                wrong = next(filter(None, map(_clientLogFault, entries)), None)
        if wrong is not None:
            self._refuse(None, f"client-log {wrong}")
        else:
            self.logEntries += len(entries)
            self.verdict = f"recorded: client-log{' batch' if 'entries' in frame else ''}"

    # What arrives

    def arrived(self, frame: dict[str, Any]) -> str | None:
        """Check one gateway frame against what is owed; a description of what is wrong."""
        kind, requestId = frame.get("type"), frame.get("requestId")
        if kind == "error":
            error = frame.get("error")
            if not (isinstance(error, dict) and isinstance(error.get("code"), str)
                    and isinstance(error.get("message"), str)
                    and len(error["message"]) <= MAX_ERROR_MESSAGE):
                return "a malformed error frame"
        if requestId is None:
            if kind == "error" and frame["error"]["code"] == "bad_request" \
                    and self.nullErrorsOwed:
                self.nullErrorsOwed -= 1
                return None
            return "a frame with requestId null that nothing owed"
        queue = self.owed.get(requestId)
        if not queue:
            return "a frame for a requestId that is owed nothing"
        want, value = queue[0]
        got = frame["error"]["code"] if kind == "error" else frame.get(
            "seq" if kind == "chunk" else "data")
        if (kind, got) == ("error", "timeout") and requestId in self.mayTimeOut:
            ok = True
            queue.clear()
        elif kind == "chunk":
            ok = (want == "chunk" and got == self.chunksSeen[requestId]
                  and canonical(frame.get("data")) == canonical(value))
            self.chunksSeen[requestId] += 1
        elif kind == "response":
            ok = want in ("response", "echo") and canonical(got) == canonical(value)
        elif kind == "error":
            ok = (want, value) == ("error", got) or (want == "echo"
                                                     and got == "payload_too_large")
        else:
            ok = False
        if not ok:
            return f"expected {_short((want, value))}, got {kind} {_short(got)}"
        if queue:
            queue.popleft()
        if not queue:
            del self.owed[requestId]
            self.chunksSeen.pop(requestId, None)
            self.mayTimeOut.discard(requestId)
            if requestId not in self.slow:
                self.inFlight.discard(requestId)
                self.finished.append(requestId)
        return None


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# Frames, as hypothesis draws them


@attrs.frozen
class FreshId:
    """A requestId never used on its connection: a unique counter, then `suffix`."""

    suffix: str


@attrs.frozen
class FinishedId:
    """The requestId of a request on this connection that has ended (or a fresh one)."""

    index: int


@attrs.frozen
class JSONFrame:
    family: str
    value: Any
    ascii: bool = False
    spaced: bool = False
    cuts: tuple[int, ...] = ()  # fragment boundaries, in bytes (modulo the message size)
    variant: str | None = None  # also send a refused copy of it: see Fuzzer.sendText


@attrs.frozen
class Repeated:
    """lead + open * count + middle + close * count: a big text built only when sent, so the
    example hypothesis prints stays short."""

    open: str
    count: int
    middle: str = ""
    close: str = ""
    lead: str = ""

    def __str__(self) -> str:
        return self.lead + self.open * self.count + self.middle + self.close * self.count


@attrs.frozen
class RawText:
    """Text sent as it is, but for ID_MARK, which becomes a fresh requestId (as JSON), and
    "%s", which becomes `token`."""

    family: str
    template: str
    cuts: tuple[int, ...] = ()
    token: Repeated | str | None = None
    variant: str | None = None

    def text(self, requestId: str) -> str:
        text = self.template if self.token is None else self.template.replace(
            "%s", str(self.token))
        return text.replace(ID_MARK, json.dumps(requestId))


@attrs.frozen
class Binary:
    family: str
    data: bytes
    cuts: tuple[int, ...] = ()


@attrs.frozen
class ZeroBytes:
    """A binary message of `size` zero bytes."""

    size: int


@attrs.frozen
class SizedEcho:
    """An echo request whose message is exactly `size` bytes."""

    family: str
    size: int
    cuts: tuple[int, ...] = ()


@attrs.frozen
class CancelFlood:
    """`count` cancels: for ids never used, or (`invalid`) with a bad requestId each."""

    count: int
    invalid: bool


@attrs.frozen
class DuplicateIds:
    """A request that runs until cancelled, `copies` requests reusing its id, the cancel."""

    copies: tuple[Any, ...]


@attrs.frozen
class Overload:
    """maxInFlight requests that run until cancelled, `extra` more (overloaded), cancels."""

    extra: int


@attrs.frozen
class InvalidUTF8:
    data: bytes
    cuts: tuple[int, ...] = ()


@attrs.frozen
class Violation:
    """A raw WebSocket frame that breaks RFC 6455: the gateway must close with 1002."""

    name: str


@attrs.frozen
class Batch:
    """The frames of one example. The costly extras are drawn for every batch but sent on a
    fixed share of them (Fuzzer.run), so the run time does not hang on hypothesis's choices."""

    steps: tuple[Any, ...]
    heavy: SizedEcho | RawText  # a message of about a MiB
    closer: Any  # a frame that must close the connection
    flood: CancelFlood
    overload: Overload


def _weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of `choices`, each in proportion to its weight (hypothesis favours the first
    entry of sampled_from a little: put the common case first)."""
    strategies = [strategy for _, strategy in choices]
    table = [i for i, (weight, _) in enumerate(choices) for _ in range(weight)]
    return st.sampled_from(table).flatmap(lambda i: strategies[i])


SAFE_CHARS = st.characters(exclude_categories=("Cs", "Cc"),
                           exclude_characters="\u2028\u2029")
SENDABLE_CHARS = st.characters(exclude_categories=("Cs",))  # control characters too
UNSAFE_CHARS = st.sampled_from([*map(chr, range(0x20)), "\x7f", *map(chr, range(0x80, 0xA0)),
                                "\u2028", "\u2029", "\ud800", "\udbff", "\udc00", "\udfff"])


def _jsonValues(chars: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(chars, max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(chars, max_size=6), inner, max_size=4),
                        max_leaves=10)


JSON_VALUES = _jsonValues(SENDABLE_CHARS)
NON_STRINGS = JSON_VALUES.filter(lambda v: not isinstance(v, str))
NOT_OBJECTS = JSON_VALUES.filter(lambda v: not isinstance(v, dict))
EXTRA_FIELDS = st.dictionaries(st.text(SAFE_CHARS, max_size=8).filter(
    lambda k: k not in KNOWN_FIELDS), JSON_VALUES, max_size=2)
CUTS = st.lists(st.integers(0, 2**24), max_size=3).map(tuple) | st.just(())

FRESH_IDS = st.builds(FreshId, st.text(SAFE_CHARS, max_size=16) | st.just("L" * 140))
BAD_IDS = st.one_of(
    st.just(""),
    st.integers(129, 400).map(lambda n: "r" * n),
    st.tuples(st.text(SAFE_CHARS, max_size=8), UNSAFE_CHARS,
              st.text(SAFE_CHARS, max_size=8)).map("".join),
    NON_STRINGS)
VALID_TYPES = st.one_of(
    st.sampled_from(HANDLER_TYPES), st.sampled_from(HANDLER_TYPES), st.just("n" * 128),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,20}", fullmatch=True).filter(
        lambda t: t not in HANDLER_TYPES))
BAD_TYPES = st.one_of(
    st.just(""), st.just("e" * 129),
    st.tuples(st.sampled_from(["_", "-", ".", ":"]), VALID_TYPES).map("".join),
    st.tuples(VALID_TYPES, st.sampled_from([" ", "/", "*", "#", "\u00e9", "\n", "\x00", "\t"]),
              st.text("abc", max_size=3)).map("".join),
    NON_STRINGS)
FRACTIONS = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: not f.is_integer())  # an integer written as a float: the contract is silent
VALID_TIMEOUTS = st.integers(10_000, 300_000) | st.just(300_000)
BAD_TIMEOUTS = st.one_of(st.integers(max_value=0), st.integers(300_001, 10**30), FRACTIONS,
                         st.text(max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _badInt(low: int, high: int) -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1),
                     FRACTIONS, st.text(max_size=3), st.booleans())


NON_NULL_NOT_OBJECTS = NOT_OBJECTS.filter(lambda v: v is not None)


def _handlerPayloads(fields: dict[str, tuple[int, int]],
                     fast: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A payload the handler serves at once, or one it refuses (never one it would run for
    a while: nothing would cancel it)."""
    valid = {name: st.integers(low, high) for name, (low, high) in fields.items()}
    bad = {name: _badInt(low, high) for name, (low, high) in fields.items()}
    badFields = st.sets(st.sampled_from(sorted(fields)), min_size=1)

    def refused(names: set[str]) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({name: (bad if name in names else valid)[name]
                                      for name in fields})

    return _weighted((2, fast), (1, NON_NULL_NOT_OBJECTS), (1, badFields.flatmap(refused)))


def _nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"n": value}
    return value


@st.composite
def _encoded(draw: st.DrawFn, family: str, value: Any) -> JSONFrame:
    if isinstance(value, dict) and value:
        keys = list(value)
        turn = draw(ROTATIONS) % len(keys)
        value = {key: value[key] for key in keys[turn:] + keys[:turn]}
    return JSONFrame(family, value, draw(st.booleans()), draw(st.booleans()), draw(CUTS),
                     draw(VARIANTS))


ROTATIONS = st.integers(0, 7)
VARIANTS = _weighted((1, st.none()), (2, st.sampled_from(["binary copy", "inside an array",
                                                           "twice in one message"])))
TEST_REQUEST_PAYLOADS = _handlerPayloads(
    {"count": (0, 10_000), "delayMs": (0, 60_000), "chunkBytes": (0, 262_144)},
    st.fixed_dictionaries({"count": st.integers(0, 4), "delayMs": st.just(0),
                           "chunkBytes": st.integers(0, 40)})
    | st.fixed_dictionaries({"count": st.just(0)}, optional={
        "delayMs": st.integers(0, 60_000), "chunkBytes": st.integers(0, 262_144)}))
PRIMES_PAYLOADS = _handlerPayloads(
    {"below": (2, 10_000_000), "batch": (1, 10_000)},
    st.none() | st.fixed_dictionaries({"below": st.integers(2, 600),
                                       "batch": st.integers(1, 60)}))
ECHO_PAYLOADS = _weighted(
    (6, JSON_VALUES),
    (1, st.integers(1, 50).map(_nested)),
    (1, st.integers(1_000, 3_000).map(lambda n: list(range(n)))),
    (1, st.integers(1, 30).map(lambda n: "\U0001f680\u0000\u2028" * n)),
    # A lone surrogate (as a JSON escape) cannot be encoded as UTF-8, so it is refused.
    (1, st.tuples(st.text(SAFE_CHARS, max_size=4), st.sampled_from(["\ud800", "\udfff"]))
     .map("".join)),
    (1, st.just([10**300, -(10**300), 5e-324, -0.0, 1.7976931348623157e308])))
PAYLOADS = {"echo": ECHO_PAYLOADS, "testRequest": TEST_REQUEST_PAYLOADS,
            "primes": PRIMES_PAYLOADS}
BROKEN_FIELDS = _weighted((1, st.just(frozenset())), (1, st.frozensets(
    st.sampled_from(["type", "requestId", "requestType", "timeoutMs"]), min_size=1,
    max_size=2)))
UNKNOWN_TYPES = st.one_of(
    st.text(SAFE_CHARS, max_size=10).filter(lambda t: t not in ("request", "cancel",
                                                                 "client-log")),
    NON_STRINGS, st.sampled_from(["Request", "request ", "requests", "cancel\x00"]))


@st.composite
def requests(draw: st.DrawFn) -> JSONFrame:
    """A request with each field valid, wrong, or missing."""
    broken = draw(BROKEN_FIELDS)
    frame: dict[str, Any] = {}
    if "type" not in broken:
        frame["type"] = "request"
    elif draw(st.booleans()):
        frame["type"] = draw(UNKNOWN_TYPES)
    if "requestId" not in broken:
        frame["requestId"] = draw(FRESH_IDS)
    elif draw(st.booleans()):
        frame["requestId"] = draw(BAD_IDS)
    requestType = draw(BAD_TYPES if "requestType" in broken else VALID_TYPES)
    if "requestType" not in broken or draw(st.booleans()):
        frame["requestType"] = requestType
    if requestType != "primes" or draw(st.booleans()):  # absent: null, i.e. the defaults
        frame["payload"] = draw(PAYLOADS.get(str(requestType), JSON_VALUES))
    if "timeoutMs" in broken:
        frame["timeoutMs"] = draw(BAD_TIMEOUTS)
    elif draw(st.booleans()):
        frame["timeoutMs"] = draw(VALID_TIMEOUTS)
    frame.update(draw(EXTRA_FIELDS))
    return draw(_encoded("request", frame))


CANCEL_IDS = _weighted((3, FRESH_IDS), (2, st.builds(FinishedId, st.integers(0, 10**6))),
                       (2, BAD_IDS), (1, st.none()))


@st.composite
def cancels(draw: st.DrawFn) -> JSONFrame:
    requestId = draw(CANCEL_IDS)
    frame = {"type": "cancel"} if requestId is None else {"type": "cancel",
                                                          "requestId": requestId}
    frame.update(draw(EXTRA_FIELDS))
    return draw(_encoded("cancel", frame))


CLIENT_LOG_FIELDS = {
    "level": _weighted((4, st.sampled_from(LOG_LEVELS)), (1, st.one_of(
        st.sampled_from(["WARN", "warning", "fatal", ""]), NON_STRINGS))),
    "message": _weighted(
        (4, st.text(SENDABLE_CHARS, max_size=40)),
        (1, st.tuples(st.text(max_size=5), UNSAFE_CHARS).map("".join)),  # escaped in the log
        (1, st.just("m" * 8192)), (1, st.integers(8193, 9000).map(lambda n: "m" * n)),
        (1, NON_STRINGS)),
    "context": st.one_of(
        st.dictionaries(st.text(SENDABLE_CHARS, max_size=6), JSON_VALUES, max_size=4),
        st.integers(17_000, 20_000).map(lambda n: {"big": "v" * n}), NON_NULL_NOT_OBJECTS),
    "timestamp": st.one_of(
        st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=4), st.booleans(), st.lists(st.integers(), max_size=2)),
}
REQUIRED_LOG_FIELD = _weighted((9, st.none()), (1, st.sampled_from(["level", "message"])))


@st.composite
def _logEntries(draw: st.DrawFn) -> dict[str, Any]:
    """One client-log entry, each field valid, wrong or missing."""
    entry: dict[str, Any] = {}
    for name, values in CLIENT_LOG_FIELDS.items():
        if name in ("level", "message") or draw(st.booleans()):
            entry[name] = draw(values)
    missing = draw(REQUIRED_LOG_FIELD)
    if missing is not None:
        del entry[missing]
    return entry


VALID_LOG_ENTRIES = st.fixed_dictionaries(
    {"level": st.sampled_from(LOG_LEVELS), "message": st.text(SENDABLE_CHARS, max_size=20)},
    optional={"timestamp": st.integers(0, 2**45),
              "context": st.dictionaries(st.text(SAFE_CHARS, max_size=4), st.integers(),
                                         max_size=2)})
LOG_BATCHES = _weighted(
    (3, st.lists(VALID_LOG_ENTRIES, min_size=1, max_size=6)),
    # One entry that may be malformed: a batch is all or nothing.
    (3, st.tuples(st.lists(VALID_LOG_ENTRIES, max_size=4), _logEntries(), st.integers(0, 4))
     .map(lambda t: [*t[0][:t[2]], t[1], *t[0][t[2]:]])),
    # Around maxLogEntriesPerFrame (50), and none at all.
    (2, st.tuples(VALID_LOG_ENTRIES, st.sampled_from([49, 50, 51, 64, 0]))
     .map(lambda t: [t[0]] * t[1])),
    (1, NON_NULL_NOT_OBJECTS.filter(lambda v: not isinstance(v, list))),
    (1, st.lists(NON_NULL_NOT_OBJECTS, min_size=1, max_size=3)))


@st.composite
def clientLogs(draw: st.DrawFn) -> JSONFrame:
    """A single entry, or (documented with the rate limit) a batch of them in `entries`."""
    frame: dict[str, Any] = {"type": "client-log"}
    if draw(st.booleans()):
        frame.update(draw(_logEntries()))
    else:
        frame["entries"] = draw(LOG_BATCHES)
    frame.update(draw(EXTRA_FIELDS))
    return draw(_encoded("client-log", frame))


# Raw text: strictness, nesting, numbers, syntax

REQUEST_TEMPLATE = ('{"type":"request","requestId":' + ID_MARK
                    + ',"requestType":"echo","payload":%s}')
STRICTNESS_SLOTS = st.sampled_from([
    REQUEST_TEMPLATE,
    '{"type":"request","requestId":' + ID_MARK + ',"requestType":"echo","payload":{"v":[1,%s]}}',
    '{"type":"request","requestId":' + ID_MARK + ',"requestType":"echo","payload":1,'
    '"timeoutMs":%s}',
    '{"type":"client-log","level":"info","message":"m","timestamp":%s}',
    '{"type":"client-log","level":"info","message":"m","context":{"k":%s}}',
    '{"type":"cancel","requestId":%s}',
    "%s",
])
STRICTNESS_TOKENS = st.one_of(
    st.sampled_from(["NaN", "-NaN", "Infinity", "-Infinity", "1e309", "-1e400", "1E+999",
                     "1e-400", "2.5e-320", "-0", "-0.0", "123456789012345678901234567890",
                     "1.7976931348623157e308", "1.8e308"]),
    st.builds(Repeated, st.just("9"), st.integers(1, 300)),  # inside a float's range
    st.builds(Repeated, st.just("9"), st.integers(310, 400)),  # beyond it
    st.builds(Repeated, st.just("7"), st.integers(4301, 6000), lead=st.just("-")),
    st.builds(Repeated, st.just("["), st.integers(1, 50), close=st.just("]")),
    st.builds(Repeated, st.just("["), st.integers(10_000, 200_000), close=st.just("]")),
    st.builds(Repeated, st.just('{"a":'), st.integers(10_000, 100_000), middle=st.just("0"),
              close=st.just("}")))


def strictness() -> st.SearchStrategy[RawText]:
    """NaN, Infinity, numbers beyond a float (and some just inside), deep nesting."""
    return st.builds(RawText, st.just("strictness"), STRICTNESS_SLOTS, CUTS, STRICTNESS_TOKENS,
                     VARIANTS)


SYNTAX_CLASSICS = st.sampled_from([
    "", " ", "\n", "{", "}", "{}", "[]", "null", "true", '"request"', "{'type': 'cancel'}",
    '{"type":"cancel","requestId":' + ID_MARK + ",}",
    '{"type":"cancel","requestId":' + ID_MARK + "} {}",
    '/* c */{"type":"cancel","requestId":' + ID_MARK + "}",
    '\ufeff{"type":"cancel","requestId":' + ID_MARK + "}",
    '{"type":"cancel" "requestId":' + ID_MARK + "}",
    '{type:"cancel",requestId:' + ID_MARK + "}",
    '{"type":"cancel","requestId":' + ID_MARK + "}\x00",
    ' \t\r\n{"type":"cancel","requestId":' + ID_MARK + "}\n ",
    '{"type":"request","type":"cancel","requestId":' + ID_MARK + "}",
    '{"type":"client-log","level":"info","message":"raw \x01 control"}',
    REQUEST_TEMPLATE.replace("%s", '"tab\tinside"'),
    REQUEST_TEMPLATE.replace("%s", '"\\ud83d\\ude80 pair, \\ud83d lone"'),
    REQUEST_TEMPLATE.replace("%s", '{"k":1,"k":2}'),
    REQUEST_TEMPLATE.replace("%s", "01"),
    REQUEST_TEMPLATE.replace("%s", ".5"),
    REQUEST_TEMPLATE.replace("%s", "+1"),
    REQUEST_TEMPLATE.replace("%s", "0x10"),
    REQUEST_TEMPLATE.replace("%s", "undefined"),
    REQUEST_TEMPLATE.replace("%s", '"\\x41"'),
])
SYNTAX_BASES = st.sampled_from([
    REQUEST_TEMPLATE.replace("%s", '{"a":[1,2.5,"s",null,true]}'),
    '{"type":"cancel","requestId":' + ID_MARK + "}",
    '{"type":"client-log","level":"warn","message":"m","context":{"a":[1]}}'])
EDITS = st.lists(st.tuples(
    st.integers(0, 200), st.sampled_from(["insert", "delete", "replace", "truncate"]),
    st.sampled_from(['"', "{", "}", "[", "]", ",", ":", "\\", " ", "x", "0", "\n", "\x00",
                     "\u00e9"])), min_size=1, max_size=3)


def _edited(base: str, edits: list[tuple[int, str, str]]) -> str:
    """`base` with characters inserted, deleted, replaced or cut off, but never inside the
    requestId's mark (so an accepted frame's requestId is still fresh)."""
    text = base
    for position, edit, char in edits:
        at = position % (len(text) + 1)
        mark = text.find(ID_MARK)
        if mark >= 0 and mark < at < mark + len(ID_MARK) + (edit != "insert"):
            continue
        if edit == "insert":
            text = text[:at] + char + text[at:]
        elif edit == "truncate":
            text = text[:at]
        elif at < len(text) and not (mark >= 0 and at == mark):
            text = text[:at] + (char if edit == "replace" else "") + text[at + 1:]
    return text


def syntax() -> st.SearchStrategy[RawText]:
    """Invalid (and a few valid) JSON: classics, and frames with characters edited."""
    return st.one_of(
        st.builds(RawText, st.just("syntax"), SYNTAX_CLASSICS, CUTS, variant=VARIANTS),
        st.builds(RawText, st.just("syntax"), st.builds(_edited, SYNTAX_BASES, EDITS), CUTS,
                  variant=VARIANTS))


def garbage() -> st.SearchStrategy[RawText]:
    return st.builds(RawText, st.just("garbage"), st.text(SENDABLE_CHARS, max_size=60), CUTS,
                     variant=VARIANTS)


def nonObjects() -> st.SearchStrategy[JSONFrame]:
    return NOT_OBJECTS.flatmap(lambda v: _encoded("non-object", v))


def binaries() -> st.SearchStrategy[Binary]:
    frameBytes = st.sampled_from([
        b'{"type":"request","requestId":"b","requestType":"echo","payload":1}',
        b'{"type":"cancel","requestId":"b"}', b"", b"\xff\xfe\x00"])
    return st.builds(Binary, st.just("binary"), st.binary(max_size=200) | frameBytes, CUTS)


def sizedEchoes(low: int, high: int, family: str) -> st.SearchStrategy[SizedEcho]:
    return st.builds(SizedEcho, st.just(family), st.integers(low, high), CUTS)


def duplicateIds() -> st.SearchStrategy[DuplicateIds]:
    copy = st.one_of(
        st.fixed_dictionaries({"requestType": st.just("echo"), "payload": JSON_VALUES}),
        st.fixed_dictionaries({"requestType": st.just("testRequest"),
                               "payload": TEST_REQUEST_PAYLOADS}),
        st.fixed_dictionaries({"requestType": VALID_TYPES, "timeoutMs": VALID_TIMEOUTS}))
    return st.builds(DuplicateIds, st.lists(copy, min_size=1, max_size=3).map(tuple))


VIOLATIONS = ("reserved opcode 3", "reserved control opcode 11", "RSV1 without extension",
              "RSV3 without extension", "unmasked frame", "ping over 125 bytes",
              "fragmented ping", "continuation without a start",
              "text frame inside a fragmented message")
INVALID_SEQUENCES = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                     b"\xe2\x82(", b"\x80", b"\xf8\x88\x80\x80\x80"]


@st.composite
def invalidUTF8(draw: st.DrawFn) -> InvalidUTF8:
    base = '{"type":"client-log","level":"info","message":"za\u017c\u00f3\u0142\u0107"}'.encode()
    at = draw(st.integers(0, len(base)))
    data = base[:at] + draw(st.sampled_from(INVALID_SEQUENCES)) + base[at:]
    if draw(st.booleans()):
        data = base[:-1] + "\u0142".encode()[:1]  # ends inside a character
    return InvalidUTF8(data, draw(CUTS))


def closers(maxBytes: int) -> st.SearchStrategy[Any]:
    return _weighted(
        (3, invalidUTF8()),
        (2, st.builds(Violation, st.sampled_from(VIOLATIONS))),
        (1, sizedEchoes(maxBytes + 1, maxBytes + 70_000, "oversize")),
        (1, st.builds(ZeroBytes, st.integers(maxBytes + 1, maxBytes + 10_000))),
        (1, sizedEchoes(maxBytes + 1, maxBytes + 70_000, "oversize").map(
            lambda s: attrs.evolve(s, cuts=(100_000, 400_000, 900_000)))))


def batches(maxBytes: int) -> st.SearchStrategy[Batch]:
    step = _weighted(
        (30, requests()), (10, cancels()), (8, clientLogs()), (10, strictness()),
        (10, syntax()), (4, garbage()), (4, nonObjects()), (5, binaries()),
        (3, duplicateIds()), (2, sizedEchoes(100, 100_000, "big echo")))
    heavy = st.one_of(
        sizedEchoes(maxBytes - 4096, maxBytes, "echo near maxMessageBytes"),
        # 1e2 comes back as 100.0: the response is half as big again as the request.
        st.integers(150_000, 260_000).map(lambda n: RawText(
            "growing echo", REQUEST_TEMPLATE, token=Repeated("1e2,", n, "1e2]", lead="["))))
    return st.builds(
        Batch, st.lists(step, min_size=30, max_size=60).map(tuple), heavy, closers(maxBytes),
        st.builds(CancelFlood, st.integers(1000, 2500), st.booleans()),
        st.builds(Overload, st.integers(1, 3)))


# Sending them


def _rawFrame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
              masked: bool = True) -> bytes:
    """One client frame, masked with an all-zero key (so the payload goes as it is)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask = 0x80 if masked else 0
    if len(payload) < 126:
        head += bytes([mask | len(payload)])
    else:
        head += bytes([mask | 126]) + struct.pack("!H", len(payload))
    return head + (b"\0\0\0\0" if masked else b"") + payload


VIOLATION_BYTES = {
    "reserved opcode 3": _rawFrame(3, b"x"),
    "reserved control opcode 11": _rawFrame(0xB, b""),
    "RSV1 without extension": _rawFrame(1, b"{}", rsv=4),
    "RSV3 without extension": _rawFrame(1, b"{}", rsv=1),
    "unmasked frame": _rawFrame(1, b"{}", masked=False),
    "ping over 125 bytes": _rawFrame(9, b"p" * 126),
    "fragmented ping": _rawFrame(9, b"p", fin=False),
    "continuation without a start": _rawFrame(0, b"x"),
    "text frame inside a fragmented message": _rawFrame(1, b"[", fin=False) + _rawFrame(1, b"]"),
}


def _fragments(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


class BrokerDisturbed(Exception):
    """The broker was unreachable or blocked (by another test) while a batch ran."""


def _logEntriesIn(step: Any) -> int:
    """At most how many client-log entries the gateway records for `step`."""
    if isinstance(step, JSONFrame) and step.family == "client-log":
        entries = step.value.get("entries", [step.value])
        return len(entries) if isinstance(entries, list) else 0
    return int(isinstance(step, RawText) and "client-log" in step.template)


class Fuzzer:
    """One hostile connection at a time, its ConnectionModel, and what was sent."""

    def __init__(self, stack: Any, connect: Callable[[Any], Client]) -> None:
        self.stack = stack
        self.connect = connect
        self.counter = itertools.count()
        self.batches = itertools.count(1)
        self.sent: collections.Counter[str] = collections.Counter()
        self.verdicts: collections.Counter[tuple[str, str]] = collections.Counter()  # by family
        self.barriers = 0
        self.connections = 0
        self.recent: collections.deque[str] = collections.deque(maxlen=8)
        self.client: Client
        self.model: ConnectionModel
        self.clean = True  # False while a batch runs: after a failure, start afresh
        self.disturbed = 0  # batches the broker got in the way of
        self.startMark = self.lastMark = self.batchMark = stack.mark()
        self._open()

    @property
    def frames(self) -> int:
        return sum(self.sent.values())

    def _open(self) -> None:
        self.client = self.connect(self.stack)
        self.connections += 1
        self.model = ConnectionModel(self.client.hello["limits"])
        # client-log entries have a rate limit (a token bucket per connection): stay within
        # the burst, so every valid entry is recorded and no `overloaded` notice comes.
        self.logBudget = self.client.hello["limits"]["clientLogBurst"]

    def freshId(self, suffix: str = "") -> str:
        requestId = f"{next(self.counter)}~{suffix}"[:128]
        while len(requestId.encode("utf-16-le")) > 256:  # 128 UTF-16 units too (JavaScript)
            requestId = requestId[:-1]
        return requestId

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, FreshId):
            return self.freshId(value.suffix)
        if isinstance(value, FinishedId):
            finished = self.model.finished
            return finished[value.index % len(finished)] if finished else self.freshId()
        return value

    def send(self, family: str, data: str | bytes, text: bool = True,
             cuts: Iterable[int] = ()) -> int | None:
        """Send one message (in fragments when `cuts`); the close code it must cause."""
        close = self.model.judge(data, text)
        self.verdicts[family, self.model.verdict] += 1
        raw = data.encode("utf-8") if isinstance(data, str) else data
        pieces = _fragments(raw, cuts)
        self.recent.append(f"{family}: {_short(data, 200)}")
        try:
            self.client.ws.send(pieces if len(pieces) > 1 else raw, text=text)
        except ConnectionClosed as e:
            if close is None:
                raise AssertionError(f"the gateway closed the connection ({e}) on "
                                     f"{self._context()}") from None
        self.sent[family] += 1
        return close

    def encode(self, value: Any, ascii: bool = False, spaced: bool = False) -> str:
        if isinstance(value, dict):
            value = {key: self._resolve(v) for key, v in value.items()}
        ascii = ascii or hasLoneSurrogate(value)  # a lone surrogate only goes as an escape
        return json.dumps(value, ensure_ascii=ascii, allow_nan=False,
                          separators=None if spaced else (",", ":"))

    def sendJSON(self, family: str, value: Any) -> None:
        assert self.send(family, self.encode(value)) is None

    def sendText(self, family: str, text: str, cuts: Iterable[int],
                 variant: str | None) -> int | None:
        """Send `text`, then (unless it is big) a copy that is refused whatever `text` is:
        the same bytes in a binary frame, wrapped in a JSON array, or twice in a row."""
        close = self.send(family, text, cuts=cuts)
        if variant is None or close is not None or len(text) > VARIANT_MAX_CHARS:
            return close
        if variant == "binary copy":
            return self.send(variant, text.encode(), text=False)
        copy = {"inside an array": f"[{text}]", "twice in one message": text + text}[variant]
        return self.send(variant, copy)

    def sizedEcho(self, size: int) -> str:
        head = json.dumps({"type": "request", "requestId": self.freshId("sized"),
                           "requestType": "echo", "timeoutMs": 60_000, "payload": ""},
                          separators=(",", ":"))
        padding = size - len(head.encode())
        assert padding >= 0
        text = head[:-3] + '"' + "p" * padding + '"}'
        assert len(text.encode()) == size
        return text

    def step(self, step: Any) -> int | None:
        match step:
            case JSONFrame():
                return self.sendText(step.family, self.encode(step.value, step.ascii,
                                                              step.spaced),
                                     step.cuts, step.variant)
            case RawText():
                return self.sendText(step.family, step.text(self.freshId("raw")), step.cuts,
                                     step.variant)
            case Binary():
                return self.send(step.family, step.data, text=False, cuts=step.cuts)
            case ZeroBytes():
                return self.send("oversize binary", b"\0" * step.size, text=False)
            case SizedEcho():
                return self.send(step.family, self.sizedEcho(step.size), cuts=step.cuts)
            case InvalidUTF8():
                return self.send("invalid UTF-8", step.data, cuts=step.cuts)
            case CancelFlood(count=count, invalid=invalid):
                for n in range(count):
                    requestId = ["", n, f"bad\n{n}", "x" * 129][n % 4] if invalid \
                        else self.freshId("flood")
                    self.sendJSON("cancel flood", {"type": "cancel", "requestId": requestId})
            case DuplicateIds(copies=copies):
                slowId = self._slowRequest("duplicate id")
                for copy in copies:
                    self.sendJSON("duplicate id", {"type": "request", "requestId": slowId,
                                                   **copy})
                self.sendJSON("duplicate id", {"type": "cancel", "requestId": slowId})
            case Overload(extra=extra):
                slowIds = [self._slowRequest("overload") for _ in range(self.model.maxInFlight)]
                for _ in range(extra):
                    self.sendJSON("overload", {"type": "request", "requestId": self.freshId(),
                                               "requestType": "echo", "payload": "over"})
                for slowId in slowIds:
                    self.sendJSON("overload", {"type": "cancel", "requestId": slowId})
            case _:
                raise AssertionError(f"unknown step {step!r}")
        return None

    def _slowRequest(self, family: str) -> str:
        requestId = self.freshId("slow")
        self.sendJSON(family, {"type": "request", "requestId": requestId,
                               "requestType": "testRequest", "timeoutMs": 120_000,
                               "payload": {"count": 1, "delayMs": 60_000}})
        return requestId

    def settle(self) -> None:
        """An echo barrier, then every frame owed and nothing else (each wait bounded)."""
        barrier = self.freshId("barrier")
        self.client.request("echo", {"barrier": barrier}, barrier, timeoutMs=60_000)
        self.model.owed.setdefault(barrier, collections.deque()).append(
            ("response", {"barrier": barrier}))
        self.model.inFlight.add(barrier)
        self.barriers += 1
        assert not self.model.slow, f"requests left running: {self.model.slow}"
        # Reading a frame must stay cheap: a client that spends tens of milliseconds on each
        # (printing a big echo's expected payload) drains a flood's answers so slowly that
        # the gateway's auto-ping waits behind them for longer than its timeout, and the
        # gateway rightly drops the connection. So what is owed is printed only on failure.
        while not self.model.settled:
            try:
                frame = self.client.next(lambda f: True, "the frames owed")
            except AssertionError as e:
                self.blameBroker(e)
                raise AssertionError(f"{e}\n{self._owedReport()}\nafter {self._context()}") \
                    from None
            problem = self.model.arrived(frame)
            if problem:
                failure = AssertionError(f"{problem}: {_short(frame, 600)}\nafter "
                                         f"{self._context()}")
                if frame.get("type") == "error" and frame["error"]["code"] in (
                        "unavailable", "timeout", "worker_lost"):
                    self.blameBroker(failure)
                raise failure

    def _owedReport(self) -> str:
        owed = {k: list(v)[:2] for k, v in itertools.islice(self.model.owed.items(), 5)}
        return f"still owed: {_short(owed)} and {self.model.nullErrorsOwed} null errors"

    def brokerTrouble(self, since: LogMark | None = None) -> bool:
        """Whether the broker was out of reach or blocked since `since` (by default: since
        the previous batch began) or is now."""
        if not self.stack.rabbitmq:
            return False
        mark = since or self.lastMark
        logs = "".join(mark.since(p) for p in [*self.stack.gateways, *self.stack.workers])
        return bool(BROKER_TROUBLE.search(logs)) or self.stack.gateway.httpStatus(
            "/readyz") != 200

    def blameBroker(self, failure: AssertionError) -> None:
        if self.brokerTrouble():
            raise BrokerDisturbed(str(failure)[:2000]) from failure

    def recover(self) -> None:
        """After a disturbed batch: wait (bounded) until the gateway is ready, start afresh."""
        self.disturbed += 1
        waitUntil(lambda: self.stack.gateway.httpStatus("/readyz") == 200,
                  "the gateway to be ready again", 60)
        self.clean = False

    def close(self, closer: Any) -> None:
        """Send a frame that must close the connection, check its close code, reconnect."""
        if isinstance(closer, Violation):
            family = f"protocol violation: {closer.name}"
            self.client.ws.socket.sendall(VIOLATION_BYTES[closer.name])
            self.sent[family] += 1
            self.verdicts[family, "close 1002: WebSocket protocol violation"] += 1
            self.recent.append(family)
            code: int | None = CLOSE_PROTOCOL_ERROR
        else:
            code = self.step(closer)
        assert code is not None, f"{closer!r} should have closed the connection"
        got = self.client.waitClosed()
        assert got == code, f"close code {got}, expected {code}, after {self._context()}"
        assert self.client.unread == [], f"frames before the close: {self.client.unread}"
        self._open()

    def run(self, batch: Batch) -> None:
        if not self.clean:
            self._open()
        self.clean = False
        self.lastMark, self.batchMark = self.batchMark, self.stack.mark()
        number = next(self.batches)
        steps = batch.steps
        if number % HEAVY_EVERY == 0:
            steps += (batch.heavy,)
        if number % FLOOD_EVERY == 0:
            steps += (batch.flood,)
        if number % OVERLOAD_EVERY == 0:
            steps = (batch.overload, *steps)  # first: nothing else may be in flight
        for step in steps:
            if self.model.logEntries + _logEntriesIn(step) > self.logBudget:
                self.settle()  # client-log entries have a rate limit: a new connection
                self._open()
            assert self.step(step) is None, f"{step!r} closed the connection"
        self.settle()
        self.client.received.clear()  # keep memory flat: big echoes are a MiB each
        if number % CLOSER_EVERY == 0:
            self.close(batch.closer)
        self.clean = True

    def _context(self) -> str:
        return "the last frames sent:\n  " + "\n  ".join(self.recent)

    def report(self) -> str:
        lines = [f"{self.frames} frames on {self.connections} connections (+{self.barriers} "
                 f"echo barriers; {self.disturbed} batches disturbed by the broker); by family, "
                 "what the oracle expected:"]
        for family, count in self.sent.most_common():
            verdicts = sorted(((n, v) for (f, v), n in self.verdicts.items() if f == family),
                              reverse=True)
            lines.append(f"  {family} {count}: " + ", ".join(f"{v} {n}" for n, v in verdicts))
        return "\n".join(lines)


# The well-behaved client


def wellBehavedRequest(n: int) -> tuple[str, Any]:
    if n % 3 == 2:
        return "testRequest", {"count": 2, "delayMs": 0, "chunkBytes": n % 7}
    return "echo", {"n": n, "text": "za\u017c\u00f3\u0142\u0107 \U0001f680", "list": [n, None]}


def checkWellBehavedReplies(client: Client, requestIds: list[str]) -> collections.Counter[str]:
    """Every response carries exactly the data its request asked for; the outcomes."""
    byId = collections.defaultdict(list)
    for frame in client.received[1:]:
        byId[frame.get("requestId")].append(frame)
    outcomes: collections.Counter[str] = collections.Counter()
    for requestId in requestIds:
        n = int(requestId.rsplit("-", 1)[1])
        requestType, payload = wellBehavedRequest(n)
        frames = byId[requestId]
        if frames and frames[-1]["type"] == "error":  # checked by Tally: only when allowed
            outcomes[frames[-1]["error"]["code"]] += 1
            continue
        if requestType == "echo":
            want = [{"type": "response", "requestId": requestId, "data": payload}]
        else:
            filler = "x" * payload["chunkBytes"]
            want = [*({"type": "chunk", "requestId": requestId, "seq": i,
                       "data": {"index": i, "filler": filler}} for i in range(2)),
                    {"type": "response", "requestId": requestId,
                     "data": {"chunks": 2, "chunkBytes": len(filler), "delayMs": 0,
                              "bytes": 2 * len(filler)}}]
        seen = [{key: frame.get(key) for key in expected} for frame, expected
                in zip(frames, want, strict=False)]  # fields added later do not matter
        assert len(frames) == len(want) and canonical(seen) == canonical(want), \
            f"{requestId}: {frames}, expected {want}"
        outcomes["correct response"] += 1
    return outcomes


# The tests


# websockets' keepalive thread draws ping payloads from `random` while hypothesis generates
# an example in this thread; hypothesis takes that for a strategy using `random`.
@pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")
def test_fuzzed_frames_get_their_documented_answers(stack, connect):
    fuzzer = Fuzzer(stack, connect)
    maxBytes = fuzzer.model.maxBytes
    started = time.monotonic()
    with loadRunning([connect(stack)], wellBehavedRequest, inFlight=2, perSecond=100,
                     timeoutMs=10_000) as loads:
        load = loads[0]

        def completed() -> int:
            return len(load.sent) - len(load.snapshot())

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], print_blob=False,
                  suppress_health_check=list(HealthCheck))
        @given(batch=batches(maxBytes))
        def fuzz(batch: Batch) -> None:
            before = completed()
            try:
                fuzzer.run(batch)
                # "Throughout": the other connection got answers while this batch ran.
                try:
                    waitUntil(lambda: completed() > before, "a well-behaved request to end",
                              RECV_TIMEOUT)
                except AssertionError as e:
                    fuzzer.blameBroker(e)
                    raise
            except BrokerDisturbed:
                fuzzer.recover()

        fuzz()
        load.finish()
    elapsed = time.monotonic() - started
    requestIds = [r for r in load.sent if "barrier" not in r]
    # Only while the broker was disturbed may the other client get anything but responses.
    troubled = fuzzer.disturbed or fuzzer.brokerTrouble(since=fuzzer.startMark)
    allowed = ["response", "unavailable", "timeout", "worker_lost"] if troubled \
        else ["response"]
    Tally.of(loads).assertExactlyOnce("well-behaved client", allowed=allowed)
    outcomes = checkWellBehavedReplies(load.client, requestIds)
    print(f"\n[{stack.provider}] {fuzzer.report()}\n  well-behaved client: {dict(outcomes)}, "
          f"no wrong or missing reply; {elapsed:.1f} s")
    assert fuzzer.frames >= FRAMES_AT_LEAST, fuzzer.report()
    assert fuzzer.disturbed <= MAX_DISTURBED_SHARE * EXAMPLES, \
        f"other tests disturbed the broker during {fuzzer.disturbed} batches"
    assert outcomes["correct response"] > 0
    for process in [*stack.gateways, *stack.workers]:
        assert process.process.poll() is None, f"{process.name} exited:\n{process.log[-4000:]}"
    assert stack.gateway.httpStatus("/healthz") == 200
    assert stack.gateway.httpStatus("/readyz") == 200


# Found by the fuzzer: Autobahn answered a malformed close frame with a close frame, then
# aborted the TCP connection at once, which discarded it unsent (GatewayProtocol.dropConnection).


@pytest.mark.parametrize(("payload", "codes"), [
    (struct.pack("!H", 5000), {CLOSE_PROTOCOL_ERROR}),
    (struct.pack("!H", 1005), {CLOSE_PROTOCOL_ERROR}),
    (b"\x03", {CLOSE_PROTOCOL_ERROR}),
    # A close reason is not a text frame: 1007 (invalid payload) would do as well.
    (struct.pack("!H", 1000) + b"\xff", {CLOSE_PROTOCOL_ERROR, 1007}),
], ids=["code 5000", "code 1005", "one byte", "reason not UTF-8"])
def test_malformed_close_frame_gets_a_close_code(stack, connect, payload, codes):
    """The contract promises a close code for every protocol violation; the client learns
    what it did wrong only from that code."""
    client = connect(stack)
    client.ws.socket.sendall(_rawFrame(8, payload))
    assert client.waitClosed() in codes
