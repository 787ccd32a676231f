"""Client frames in (parseClientFrame), gateway frames out (the encoders)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaybus import frames
from relaybus.errors import ErrorCode, RelaybusError
from relaybus.frames import (
    MAX_LOG_CONTEXT_BYTES,
    MAX_LOG_ENTRIES_PER_FRAME,
    MAX_LOG_MESSAGE_LENGTH,
    MAX_REQUEST_ID_LENGTH,
    MAX_REQUEST_TYPE_LENGTH,
    CancelFrame,
    ClientLogEntry,
    ClientLogFrame,
    FrameError,
    RequestFrame,
    chunkFrame,
    errorFrame,
    escapeControlCharacters,
    helloFrame,
    parseClientFrame,
    responseFrame,
)
from relaybus.strictjson import decodeJSON, encodeJSON


def parse(frame: Any) -> Any:
    return parseClientFrame(json.dumps(frame).encode("utf-8"), False)


def refused(data: bytes, isBinary: bool = False) -> FrameError:
    with pytest.raises(FrameError) as info:
        parseClientFrame(data, isBinary)
    error = info.value
    assert error.code == ErrorCode.BAD_REQUEST
    assert isinstance(error.message, str) and error.message
    return error


def refusedFrame(frame: Any) -> FrameError:
    return refused(json.dumps(frame).encode("utf-8"))


def request(**fields: Any) -> dict[str, Any]:
    frame = {"type": "request", "requestId": "r-1", "requestType": "testRequest"}
    frame.update(fields)
    return {k: v for k, v in frame.items() if v is not _ABSENT}


def clientLog(**fields: Any) -> dict[str, Any]:
    frame = {"type": "client-log", "level": "info", "message": "hello"}
    frame.update(fields)
    return {k: v for k, v in frame.items() if v is not _ABSENT}


_ABSENT = object()


# Valid shapes


def test_request_with_every_field() -> None:
    frame = parse(request(payload={"count": 3, "nested": [1, {"a": None}]}, timeoutMs=10_000))
    assert frame == RequestFrame("r-1", "testRequest", {"count": 3, "nested": [1, {"a": None}]},
                                 10_000)


def test_request_minimal_has_null_payload_and_no_timeout() -> None:
    assert parse(request()) == RequestFrame("r-1", "testRequest", None, None)


@pytest.mark.parametrize("payload", [None, 0, -1.5, "text", [], [1, "two"], {}, True, "é\u2028"])
def test_request_payload_may_be_any_json_value(payload: Any) -> None:
    assert parse(request(payload=payload)).payload == payload


def test_request_ignores_unknown_fields() -> None:
    assert parse(request(extra={"x": 1}, timeoutMs=1)) == RequestFrame("r-1", "testRequest",
                                                                        None, 1)


@pytest.mark.parametrize("requestType", ["a", "A", "0", "echo", "a.b:c-d_e", "9lives",
                                         "x" * MAX_REQUEST_TYPE_LENGTH])
def test_request_type_accepted(requestType: str) -> None:
    assert parse(request(requestType=requestType)).requestType == requestType


@pytest.mark.parametrize("requestId", ["r", "x" * MAX_REQUEST_ID_LENGTH, "with space",
                                       "üñí©ødé", "a/b?c#d", "\u2603"])
def test_request_id_accepted(requestId: str) -> None:
    assert parse(request(requestId=requestId)).requestId == requestId
    assert parse({"type": "cancel", "requestId": requestId}) == CancelFrame(requestId)


def test_request_timeout_large_integer_is_left_to_the_table() -> None:
    assert parse(request(timeoutMs=10**15)).timeoutMs == 10**15


def test_cancel() -> None:
    assert parse({"type": "cancel", "requestId": "r-9", "extra": 1}) == CancelFrame("r-9")


def test_client_log_full() -> None:
    frame = parse(clientLog(level="warn", message="retrying", context={"page": "/upload"},
                            timestamp=1764143100123))
    assert frame == ClientLogFrame(
        (ClientLogEntry("warn", "retrying", {"page": "/upload"}, 1764143100123),))


@pytest.mark.parametrize("level", ["debug", "info", "warn", "error"])
def test_client_log_levels(level: str) -> None:
    assert parse(clientLog(level=level)) == ClientLogFrame((ClientLogEntry(level, "hello"),))


@pytest.mark.parametrize("timestamp", [0, 1.5, -3, 1764143100123.25])
def test_client_log_timestamp_numbers(timestamp: float) -> None:
    assert parse(clientLog(timestamp=timestamp)).entries[0].timestamp == timestamp


def test_client_log_limits_are_inclusive() -> None:
    message = "m" * MAX_LOG_MESSAGE_LENGTH
    # {"k":"xxx..."} is exactly MAX_LOG_CONTEXT_BYTES bytes once encoded compactly
    context = {"k": "x" * (MAX_LOG_CONTEXT_BYTES - len('{"k":""}'))}
    assert len(encodeJSON(context)) == MAX_LOG_CONTEXT_BYTES
    [entry] = parse(clientLog(message=message, context=context)).entries
    assert entry.message == message and entry.context == context


def test_client_log_empty_message_is_allowed() -> None:
    assert parse(clientLog(message="")).entries[0].message == ""


def test_client_log_batch_keeps_entry_order() -> None:
    entries = [{"level": "info", "message": f"m{i}", "timestamp": i}
               for i in range(MAX_LOG_ENTRIES_PER_FRAME)]
    frame = parse({"type": "client-log", "entries": entries})
    assert [e.message for e in frame.entries] == [f"m{i}" for i in range(len(entries))]
    assert frame.entries[3] == ClientLogEntry("info", "m3", None, 3)


@pytest.mark.parametrize("entries", [
    pytest.param([], id="empty"),
    pytest.param([{"level": "info", "message": "m"}] * (MAX_LOG_ENTRIES_PER_FRAME + 1),
                 id="too-many"),
    pytest.param({"level": "info", "message": "m"}, id="object-not-list"),
    pytest.param(None, id="null"),
    pytest.param(["info"], id="entry-not-object"),
    pytest.param([{"level": "info", "message": "m"}, {"level": "loud", "message": "m"}],
                 id="one-bad-entry"),
])
def test_bad_client_log_batch_is_refused_whole(entries: Any) -> None:
    error = refusedFrame({"type": "client-log", "entries": entries})
    assert error.requestId is None
    assert "client-log" in error.message


def test_unicode_text_frame_bytes() -> None:
    data = '{"type":"cancel","requestId":"ré-☃"}'.encode()
    assert parseClientFrame(data, False) == CancelFrame("ré-☃")


# Bad shapes: the transport level


def test_binary_frame_refused_even_if_it_is_valid_json() -> None:
    error = refused(json.dumps(request()).encode(), isBinary=True)
    assert error.requestId is None
    assert "binary" in error.message


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"{'a': 1}", b'{"type":"cancel",}',
                                  b'{"a":1} {"b":2}', b"\x00"])
def test_invalid_json(data: bytes) -> None:
    error = refused(data)
    assert error.requestId is None
    assert "JSON" in error.message


@pytest.mark.parametrize("data", [b'{"type":"cancel","requestId":"r\xff"}', b"\xc3\x28",
                                  b'{"type":"cancel","requestId":"\xc0\xaf"}',
                                  b'{"type":"cancel","requestId":"\xf8\x88\x80\x80\x80"}'])
def test_invalid_utf8(data: bytes) -> None:
    assert refused(data).requestId is None


def test_utf8_encoded_surrogate_is_invalid_utf8() -> None:
    assert refused(b'{"type":"cancel","requestId":"\xed\xa0\x80"}').requestId is None


@pytest.mark.parametrize("data", [
    b'{"type":"cancel","requestId":"\\ud800"}',
    b'{"type":"request","requestId":"r\\udfff","requestType":"echo"}',
    b'{"type":"request","requestId":"r\\udfff","requestType":"_bad"}',
])
def test_lone_surrogate_request_id_is_refused_or_at_least_encodable(data: bytes) -> None:
    try:
        frame = parseClientFrame(data, False)
    except FrameError as e:
        errorFrame(e.requestId, e)  # must not raise
    else:
        raise AssertionError(f"accepted a requestId that cannot be echoed: {frame!r}")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_refused(constant: str) -> None:
    data = b'{"type":"request","requestId":"r-1","requestType":"x","payload":' + (
        constant.encode() + b"}")
    error = refused(data)
    assert error.requestId is None
    assert constant in error.message


@pytest.mark.parametrize("depth", [100_000, 2_000])
def test_deeply_nested_json_is_a_frame_error_not_recursion_error(depth: int) -> None:
    data = ('{"type":"request","requestId":"r-1","requestType":"x","payload":'
            + "[" * depth + "]" * depth + "}").encode()
    error = refused(data)
    assert error.requestId is None


def test_deeply_nested_objects_too() -> None:
    depth = 50_000
    data = ('{"a":' * depth + "1" + "}" * depth).encode()
    assert refused(data).requestId is None


@pytest.mark.parametrize("value", [[], [{"type": "cancel", "requestId": "r"}], "text", 1, 1.5,
                                   None, True])
def test_non_object_json(value: Any) -> None:
    error = refusedFrame(value)
    assert error.requestId is None
    assert "object" in error.message


@pytest.mark.parametrize("frame", [
    {},
    {"requestId": "r-1", "requestType": "x"},
    {"type": "Request", "requestId": "r-1", "requestType": "x"},
    {"type": "response", "requestId": "r-1"},
    {"type": "hello"},
    {"type": None, "requestId": "r-1"},
    {"type": ["request"], "requestId": "r-1"},
    {"type": 1},
])
def test_missing_or_unknown_type(frame: dict[str, Any]) -> None:
    # docs/protocol.md: requestId is null for an unknown type, even when one was readable.
    error = refusedFrame(frame)
    assert error.requestId is None
    assert "type" in error.message


# Bad shapes: requestId (no readable requestId -> the error has none)


BAD_REQUEST_IDS = [
    pytest.param(_ABSENT, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("x" * (MAX_REQUEST_ID_LENGTH + 1), id="too-long"),
    pytest.param(1, id="int"),
    pytest.param(None, id="null"),
    pytest.param(["r-1"], id="list"),
    pytest.param({"id": "r-1"}, id="object"),
    pytest.param(True, id="bool"),
    pytest.param("r\n1", id="newline"),
    pytest.param("r\x00", id="nul"),
    pytest.param("\x1b[31mred", id="escape"),
    pytest.param("r\x7f", id="del"),
    pytest.param("tab\there", id="tab"),
]


@pytest.mark.parametrize("requestId", BAD_REQUEST_IDS)
def test_request_with_bad_request_id(requestId: Any) -> None:
    error = refusedFrame(request(requestId=requestId))
    assert error.requestId is None
    assert "requestId" in error.message


@pytest.mark.parametrize("requestId", BAD_REQUEST_IDS)
def test_cancel_with_bad_request_id(requestId: Any) -> None:
    frame = {"type": "cancel", "requestId": requestId}
    error = refusedFrame({k: v for k, v in frame.items() if v is not _ABSENT})
    assert error.requestId is None
    assert "requestId" in error.message


# Bad shapes: fields after a valid requestId (the error carries it)


@pytest.mark.parametrize("requestType", [
    pytest.param(_ABSENT, id="missing"),
    pytest.param("", id="empty"),
    pytest.param(None, id="null"),
    pytest.param(5, id="int"),
    pytest.param(["echo"], id="list"),
    pytest.param("_echo", id="leading-underscore"),
    pytest.param(".echo", id="leading-dot"),
    pytest.param("-echo", id="leading-dash"),
    pytest.param("echo now", id="space"),
    pytest.param("echo/now", id="slash"),
    pytest.param("echo\n", id="trailing-newline"),
    pytest.param("ëcho", id="non-ascii"),
    pytest.param("e*", id="star"),
    pytest.param("e#", id="hash"),
    pytest.param("x" * (MAX_REQUEST_TYPE_LENGTH + 1), id="too-long"),
])
def test_bad_request_type_keeps_the_request_id(requestType: Any) -> None:
    error = refusedFrame(request(requestId="keep-me", requestType=requestType))
    assert error.requestId == "keep-me"
    assert "requestType" in error.message


@pytest.mark.parametrize("timeoutMs", [
    pytest.param(0, id="zero"),
    pytest.param(-1, id="negative"),
    pytest.param(1.5, id="float"),
    pytest.param(1000.0, id="integral-float"),
    pytest.param(True, id="true"),
    pytest.param(False, id="false"),
    pytest.param("1000", id="string"),
    pytest.param([1000], id="list"),
    pytest.param({}, id="object"),
])
def test_bad_timeout_keeps_the_request_id(timeoutMs: Any) -> None:
    error = refusedFrame(request(requestId="keep-me", timeoutMs=timeoutMs))
    assert error.requestId == "keep-me"
    assert "timeoutMs" in error.message


def test_null_timeout_means_default() -> None:
    assert parse(request(timeoutMs=None)).timeoutMs is None


# Bad shapes: client-log (never has a requestId)


@pytest.mark.parametrize("fields", [
    pytest.param({"level": _ABSENT}, id="level-missing"),
    pytest.param({"level": "warning"}, id="level-unknown"),
    pytest.param({"level": "INFO"}, id="level-case"),
    pytest.param({"level": None}, id="level-null"),
    pytest.param({"level": ["info"]}, id="level-list"),
    pytest.param({"message": _ABSENT}, id="message-missing"),
    pytest.param({"message": None}, id="message-null"),
    pytest.param({"message": 5}, id="message-int"),
    pytest.param({"message": ["a"]}, id="message-list"),
    pytest.param({"message": "m" * (MAX_LOG_MESSAGE_LENGTH + 1)}, id="message-too-long"),
    pytest.param({"context": []}, id="context-list"),
    pytest.param({"context": "ctx"}, id="context-string"),
    pytest.param({"context": 1}, id="context-int"),
    pytest.param({"context": {"k": "x" * MAX_LOG_CONTEXT_BYTES}}, id="context-too-big"),
    pytest.param({"timestamp": "1764143100123"}, id="timestamp-string"),
    pytest.param({"timestamp": True}, id="timestamp-bool"),
    pytest.param({"timestamp": [1]}, id="timestamp-list"),
    pytest.param({"timestamp": {}}, id="timestamp-object"),
])
def test_bad_client_log(fields: dict[str, Any]) -> None:
    error = refusedFrame(clientLog(requestId="not-a-request", **fields))
    assert error.requestId is None
    assert "client-log" in error.message


def test_client_log_context_size_counts_utf8_bytes_not_characters() -> None:
    # 6000 three-byte characters: 6000 characters, 18000+ bytes
    context = {"k": "☃" * 6000}
    assert len(json.dumps(context, ensure_ascii=False)) < MAX_LOG_CONTEXT_BYTES
    assert len(encodeJSON(context)) > MAX_LOG_CONTEXT_BYTES
    refusedFrame(clientLog(context=context))


def test_client_log_context_that_cannot_be_re_encoded_is_a_frame_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-encoding a context can hit the recursion limit a little before decoding does."""
    def tooDeep(value: Any) -> bytes:
        raise ValueError("JSON nested too deeply")

    monkeypatch.setattr(frames, "encodeJSON", tooDeep)
    error = refusedFrame(clientLog(context={"a": {"b": {}}}))
    assert error.requestId is None
    assert "deep" in error.message


def test_frame_error_is_a_relaybus_error_with_code_and_request_id() -> None:
    error = FrameError("bad", "r-1")
    assert isinstance(error, RelaybusError)
    assert error.asDict() == {"code": "bad_request", "message": "bad"}
    assert error.requestId == "r-1"
    assert FrameError("bad").requestId is None


# The property: anything in, a frame or FrameError out


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)

FIELD_VALUES = JSON | st.sampled_from(["r-1", "echo", "info", "x" * 200, "a\nb", 0, -1, 10**6])

FRAME_LIKE = st.fixed_dictionaries(
    {"type": st.sampled_from(["request", "cancel", "client-log", "other"]) | JSON},
    optional={name: FIELD_VALUES for name in ("requestId", "requestType", "payload",
                                              "timeoutMs", "level", "message", "context",
                                              "timestamp")},
)

PARSED = (RequestFrame, CancelFrame, ClientLogFrame)

# Deterministic: the same examples on every run, and no example database on disk.
PROPERTY_SETTINGS: dict[str, Any] = {
    "deadline": None, "derandomize": True, "database": None,
    "suppress_health_check": [HealthCheck.too_slow]}


def checkParse(data: bytes, isBinary: bool) -> None:
    try:
        result = parseClientFrame(data, isBinary)
    except FrameError as e:
        assert e.code == ErrorCode.BAD_REQUEST
        assert e.requestId is None or isinstance(e.requestId, str)
        # the error always encodes into a valid error frame
        assert decodeJSON(errorFrame(e.requestId, e))["type"] == "error"
    else:
        assert isinstance(result, PARSED)
        assert not isBinary


@settings(max_examples=300, **PROPERTY_SETTINGS)
@given(st.binary(max_size=200), st.booleans())
def test_property_arbitrary_bytes(data: bytes, isBinary: bool) -> None:
    checkParse(data, isBinary)


@settings(max_examples=300, **PROPERTY_SETTINGS)
@given(JSON)
def test_property_arbitrary_json(value: Any) -> None:
    checkParse(json.dumps(value).encode("utf-8"), False)


@settings(max_examples=500, **PROPERTY_SETTINGS)
@given(FRAME_LIKE)
def test_property_frame_like_objects(frame: dict[str, Any]) -> None:
    checkParse(json.dumps(frame).encode("utf-8"), False)
    # a valid requestId is echoed on a refused request
    if frame.get("type") == "request":
        try:
            parsed = parseClientFrame(json.dumps(frame).encode("utf-8"), False)
        except FrameError as e:
            if e.requestId is not None:
                assert e.requestId == frame["requestId"]
        else:
            assert parsed.requestId == frame["requestId"]


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(st.text(max_size=50))
def test_property_arbitrary_text_as_json_string_or_raw(text: str) -> None:
    checkParse(text.encode("utf-8"), False)
    checkParse(text.encode("utf-8", "surrogatepass"), False)


# Log escaping


@pytest.mark.parametrize(("raw", "escaped"), [
    ("plain text", "plain text"),
    ("line\nforged", "line\\x0aforged"),
    ("cr\rlf", "cr\\x0dlf"),
    ("\x1b[2J", "\\x1b[2J"),
    ("nul\x00", "nul\\x00"),
    ("del\x7f", "del\\x7f"),
    ("tab\t", "tab\\x09"),
    ("unicode é ☃ stays", "unicode é ☃ stays"),
    ("", ""),
])
def test_escape_control_characters(raw: str, escaped: str) -> None:
    assert escapeControlCharacters(raw) == escaped


@settings(max_examples=300, **PROPERTY_SETTINGS)
@given(st.text())
def test_property_escaped_text_has_no_unsafe_characters_and_keeps_the_rest(text: str) -> None:
    def unsafe(c: str) -> bool:
        code = ord(c)
        return (code < 0x20 or 0x7F <= code <= 0x9F or code in (0x2028, 0x2029)
                or 0xD800 <= code <= 0xDFFF)

    escaped = escapeControlCharacters(text)
    assert not any(unsafe(c) for c in escaped)
    escaped.encode("utf-8")  # always loggable
    if not any(unsafe(c) for c in text):
        assert escaped == text


@pytest.mark.parametrize("char", ["\x85", "\x9b"])
def test_escape_control_characters_covers_c1_controls(char: str) -> None:
    assert char not in escapeControlCharacters(f"a{char}b")


# Encoders


def test_hello_frame() -> None:
    limits = {"maxMessageBytes": 10, "maxInFlight": 2, "defaultTimeoutMs": 3,
              "maxTimeoutMs": 4}
    assert decodeJSON(helloFrame("conn-1", limits)) == {
        "type": "hello", "connectionId": "conn-1", "protocol": 1, "limits": limits,
        "principal": None}
    assert decodeJSON(helloFrame("conn-1", limits, {"sub": "alice", "expiresAt": 5}))[
        "principal"] == {"sub": "alice", "expiresAt": 5}


def test_chunk_frame() -> None:
    assert decodeJSON(chunkFrame("r-1", 3, {"a": [1]})) == {
        "type": "chunk", "requestId": "r-1", "seq": 3, "data": {"a": [1]}}


def test_response_frame() -> None:
    assert decodeJSON(responseFrame("r-1", None)) == {
        "type": "response", "requestId": "r-1", "data": None}


def test_error_frame_with_and_without_request_id() -> None:
    error = RelaybusError(ErrorCode.TIMEOUT, "too slow")
    assert decodeJSON(errorFrame("r-1", error)) == {
        "type": "error", "requestId": "r-1",
        "error": {"code": "timeout", "message": "too slow"}}
    assert decodeJSON(errorFrame(None, error))["requestId"] is None


def test_encoders_are_compact_utf8_not_ascii_escaped() -> None:
    encoded = responseFrame("r-é", "☃")
    assert isinstance(encoded, bytes)
    assert encoded == '{"type":"response","requestId":"r-é","data":"☃"}'.encode()
