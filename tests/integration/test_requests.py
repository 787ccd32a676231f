"""The wire protocol end to end, on the embedded bus and on RabbitMQ with a separate worker.

These tests share one gateway (+ worker) per provider: none of them disturbs the processes.
"""

from __future__ import annotations

import json
import re
import secrets

import pytest

from processfixtures import assertRepliesStopped

pytestmark = [pytest.mark.processes]

CORRELATION_ID = r"[0-9a-f]{32}"
# How long a cancelled 100 ms-a-chunk stream is watched for more chunks: five of its intervals.
CHUNKS_STOPPED_S = 0.5

PRIMES_BELOW_100 = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71,
                    73, 79, 83, 89, 97]


def stoppedLine(reason: str) -> str:
    return rf"Stopped testRequest {CORRELATION_ID}: {reason}"


# Streaming and plain requests


def test_hello(stack, connect):
    first, second = connect(stack), connect(stack)
    for client in (first, second):
        hello = client.hello
        assert hello["protocol"] == 1
        assert isinstance(hello["connectionId"], str) and hello["connectionId"]
        assert hello["limits"] == {"maxMessageBytes": 1048576, "maxInFlight": 100,
                                   "defaultTimeoutMs": 30000, "maxTimeoutMs": 300000,
                                   "clientLogPerSecond": 20, "clientLogBurst": 100,
                                   "maxLogEntriesPerFrame": 50, "requestsPerSecond": 0,
                                   "requestsBurst": 0}
    assert first.hello["connectionId"] != second.hello["connectionId"]


def test_testRequest_streams_chunks_then_summary(stack, connect):
    client = connect(stack)
    outcome = client.call("testRequest", {"count": 5, "delayMs": 20, "chunkBytes": 7})
    assert [c["seq"] for c in outcome.chunks] == [0, 1, 2, 3, 4]
    assert outcome.chunkData == [{"index": i, "filler": "xxxxxxx"} for i in range(5)]
    assert outcome.data == {"chunks": 5, "chunkBytes": 7, "delayMs": 20, "bytes": 35}


def test_testRequest_without_chunks(stack, connect):
    outcome = connect(stack).call("testRequest", {"count": 0, "delayMs": 0, "chunkBytes": 3})
    assert outcome.chunks == []
    assert outcome.data == {"chunks": 0, "chunkBytes": 3, "delayMs": 0, "bytes": 0}


def test_interleaved_streams_on_one_connection(stack, connect):
    client = connect(stack)
    shapes = {client.request("testRequest", {"count": n, "delayMs": 10, "chunkBytes": n}): n
              for n in (1, 3, 6, 10)}
    for requestId, n in shapes.items():
        outcome = client.collect(requestId)
        assert outcome.chunkData == [{"index": i, "filler": "x" * n} for i in range(n)]
        assert outcome.data["bytes"] == n * n
    client.assertQuiet(*shapes)


@pytest.mark.parametrize("payload", [
    {"a": 1, "nested": {"list": [1, 2.5, True, None, "s"]}},
    [1, 2, 3],
    "a string",
    0,
    None,
    {"unicode": "za\u017c\u00f3\u0142\u0107 \u2014 \u6f22\u5b57 \U0001f680",
     "escapes": "quote\" backslash\\ nul\u0000"},
    {"big": "y" * 300_000},
], ids=["object", "list", "string", "zero", "null", "unicode", "300KB"])
def test_echo_returns_its_payload(stack, connect, payload):
    outcome = connect(stack).call("echo", payload)
    assert outcome.chunks == []
    assert outcome.data == payload


def test_echo_without_payload_field_gets_null(stack, connect):
    client = connect(stack)
    requestId = "no-payload"
    client.sendJSON({"type": "request", "requestId": requestId, "requestType": "echo"})
    assert client.finish(requestId).data is None


def test_longest_requestId_and_unicode_requestId(stack, connect):
    client = connect(stack)
    for requestId in ("L" * 128, "\u00e9-\U0001f680-" + "x" * 120):
        assert client.call("echo", {"id": requestId}, requestId=requestId).data == {
            "id": requestId}


def test_primes_streams_batches(stack, connect):
    outcome = connect(stack).call("primes", {"below": 100, "batch": 10})
    batches = [chunk["primes"] for chunk in outcome.chunkData]
    assert [len(b) for b in batches] == [10, 10, 5]
    assert [p for b in batches for p in b] == PRIMES_BELOW_100
    assert outcome.data == {"below": 100, "count": 25}


def test_primes_none_below_two(stack, connect):
    outcome = connect(stack).call("primes", {"below": 2, "batch": 10})
    assert outcome.chunks == []
    assert outcome.data == {"below": 2, "count": 0}


# Errors for one request


def test_unknown_requestType_is_no_handler(stack, connect):
    client = connect(stack)
    # A long timeoutMs, so that a timeout could not pass for no_handler: the recv timeout is
    # the only hang guard.
    requestId = client.request("noSuchType", {"x": 1}, timeoutMs=30_000)
    client.expectError(requestId, "no_handler")


@pytest.mark.parametrize("payload", [{"count": "x"}, {"delayMs": -1}, {"chunkBytes": 10**9},
                                     "not an object", [1]])
def test_handler_rejects_bad_payload(stack, connect, payload):
    client = connect(stack)
    requestId = client.request("testRequest", payload)
    outcome = client.expectError(requestId, "bad_request")
    assert outcome.terminal["requestId"] == requestId


# Malformed frames: one error frame each, and the connection carries on

def _request(**fields):
    return json.dumps({"type": "request", "requestType": "echo", "payload": 1, **fields})


# (frame as sent, the requestId the error must carry)
MALFORMED = {
    "invalid JSON": ("{not json", None),
    "truncated JSON": ('{"type": "request", "requestId": "t"', None),
    "JSON array": ("[1, 2]", None),
    "JSON number": ("42", None),
    "JSON string": ('"request"', None),
    "JSON null": ("null", None),
    "binary frame": (_request(requestId="bin").encode(), None),
    "empty object": ("{}", None),
    "unknown type": ('{"type": "subscribe", "requestId": "u"}', None),
    "type not a string": ('{"type": 1, "requestId": "u"}', None),
    "missing requestId": (_request(), None),
    "empty requestId": (_request(requestId=""), None),
    "requestId too long": (_request(requestId="r" * 129), None),
    "requestId not a string": (_request(requestId=7), None),
    "requestId with a newline": (_request(requestId="a\nb"), None),
    "requestId with a C1 control": (_request(requestId="a\x85b"), None),
    "requestId with U+2028": (_request(requestId="a\u2028b"), None),
    "requestId with a lone surrogate": (_request(requestId="a\ud800b"), None),
    "number too big for a float": (
        '{"type": "request", "requestId": "huge", "requestType": "echo", "payload": 1e999}',
        None),
    "NaN": ('{"type": "request", "requestId": "nan", "requestType": "echo", "payload": NaN}',
            None),
    "Infinity": ('{"type": "request", "requestId": "inf", "requestType": "echo", '
                 '"payload": [-Infinity]}', None),
    "nested too deeply": ('{"type": "request", "requestId": "deep", "requestType": "echo", '
                          '"payload": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    "cancel without requestId": ('{"type": "cancel"}', None),
    # Refused requests whose requestId was readable carry it (protocol rule 2).
    "requestType missing": (json.dumps({"type": "request", "requestId": "rt0"}), "rt0"),
    "requestType empty": (_request(requestId="rt1", requestType=""), "rt1"),
    "requestType with a space": (_request(requestId="rt2", requestType="bad type"), "rt2"),
    "requestType leading dash": (_request(requestId="rt3", requestType="-echo"), "rt3"),
    "requestType too long": (_request(requestId="rt4", requestType="e" * 129), "rt4"),
    "requestType not a string": (_request(requestId="rt5", requestType=["echo"]), "rt5"),
    "timeoutMs zero": (_request(requestId="to0", timeoutMs=0), "to0"),
    "timeoutMs negative": (_request(requestId="to1", timeoutMs=-5), "to1"),
    "timeoutMs fraction": (_request(requestId="to2", timeoutMs=1.5), "to2"),
    "timeoutMs string": (_request(requestId="to3", timeoutMs="100"), "to3"),
    "timeoutMs boolean": (_request(requestId="to4", timeoutMs=True), "to4"),
    "timeoutMs above maxTimeoutMs": (_request(requestId="to5", timeoutMs=300_001), "to5"),
    "client-log bad level": ('{"type": "client-log", "level": "verbose", "message": "m"}', None),
    "client-log no message": ('{"type": "client-log", "level": "info"}', None),
    "client-log message not a string": (
        '{"type": "client-log", "level": "info", "message": 5}', None),
    "client-log message too long": (
        json.dumps({"type": "client-log", "level": "info", "message": "m" * 8193}), None),
    "client-log context not an object": (
        '{"type": "client-log", "level": "info", "message": "m", "context": [1]}', None),
    "client-log context too big": (
        json.dumps({"type": "client-log", "level": "info", "message": "m",
                    "context": {"k": "v" * 17_000}}), None),
    "client-log timestamp not a number": (
        '{"type": "client-log", "level": "info", "message": "m", "timestamp": "now"}', None),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frame_is_bad_request_and_connection_carries_on(stack, connect, name):
    frame, requestId = MALFORMED[name]
    client = connect(stack)
    client.sendRaw(frame)
    error = client.next(lambda f: f["type"] == "error", "the error frame")
    assert error["requestId"] == requestId, error
    assert error["error"]["code"] == "bad_request", error
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    # The same connection still serves requests, and that one frame cost exactly one frame.
    assert client.call("echo", {"after": name}).data == {"after": name}
    assert client.unread == []
    # hello, the error, the echo's response, the response to call()'s own echo barrier
    assert [f["type"] for f in client.received] == ["hello", "error", "response", "response"]


def test_bad_frames_do_not_disturb_a_request_in_flight(stack, connect):
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 4, "delayMs": 50, "chunkBytes": 1})
    for name in ("invalid JSON", "binary frame", "NaN", "timeoutMs zero"):
        client.sendRaw(MALFORMED[name][0])
    outcome = client.finish(requestId)
    assert len(outcome.chunks) == 4 and outcome.data["chunks"] == 4
    errors = [f for f in client.received if f["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["bad_request"] * 4


INVALID_UTF8 = b'{"type": "client-log", "level": "info", "message": "\xff\xfe"}'


def test_invalid_utf8_text_frame_closes_with_1007_only_that_connection(stack, connect):
    client = connect(stack)
    other = connect(stack)
    client.sendRaw(INVALID_UTF8, text=True)
    assert client.waitClosed() == 1007
    assert other.call("echo", "still here").data == "still here"


# requestIds


def test_duplicate_requestId_in_flight(stack, connect):
    client = connect(stack)
    requestId = "dup"
    client.request("testRequest", {"count": 3, "delayMs": 100, "chunkBytes": 2}, requestId)
    client.request("echo", "second", requestId)
    frames = []
    while not frames or frames[-1]["type"] != "response":
        frames.append(client.next(lambda f: f.get("requestId") == requestId,
                                  f"frames of {requestId}"))
    errors = [f for f in frames if f["type"] == "error"]
    assert [e["error"]["code"] for e in errors] == ["duplicate_request_id"], frames
    chunks = [f for f in frames if f["type"] == "chunk"]
    assert [c["seq"] for c in chunks] == [0, 1, 2]
    assert frames[-1]["data"] == {"chunks": 3, "chunkBytes": 2, "delayMs": 100, "bytes": 6}
    client.assertQuiet(requestId)
    # Once finished, the id is free again.
    assert client.call("echo", "again", requestId=requestId).data == "again"


def test_same_requestId_on_two_connections_stays_separate(stack, connect):
    one, two = connect(stack), connect(stack)
    one.request("echo", {"who": "one"}, "same")
    two.request("echo", {"who": "two"}, "same")
    assert one.collect("same").data == {"who": "one"}
    assert two.collect("same").data == {"who": "two"}
    one.request("testRequest", {"count": 2, "delayMs": 30, "chunkBytes": 1}, "stream")
    two.request("testRequest", {"count": 4, "delayMs": 20, "chunkBytes": 3}, "stream")
    first, second = one.collect("stream"), two.collect("stream")
    assert first.chunkData == [{"index": i, "filler": "x"} for i in range(2)]
    assert second.chunkData == [{"index": i, "filler": "xxx"} for i in range(4)]
    assert first.data["bytes"] == 2 and second.data["bytes"] == 12
    one.assertQuiet("same", "stream")
    two.assertQuiet("same", "stream")


# Cancel, deadline, disconnect: the worker's handler must stop too


def test_cancel_stops_the_handler(stack, connect):
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)  # it is running on the worker now
    mark = stack.mark()
    client.cancel(requestId)
    outcome = client.collect(requestId)
    assert outcome.code == "cancelled"
    stack.waitForHandlerLog(stoppedLine(r"cancelled by the gateway \(cancelled\)"), mark)
    if stack.rabbitmq:  # the handler ran in the worker process, not in the gateway
        assert "Stopped testRequest" not in mark.since(stack.gateway)
    # The stream stopped: nothing more comes, not even to the gateway.
    assertRepliesStopped(stack.gateway, CHUNKS_STOPPED_S)
    client.assertQuiet(requestId)


def test_cancel_frees_the_requestId(stack, connect):
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100})
    client.waitForChunk(requestId)
    client.cancel(requestId)
    assert client.collect(requestId).code == "cancelled"
    assert client.call("echo", "reused", requestId=requestId).data == "reused"


def test_cancel_for_unknown_or_finished_request_is_ignored(stack, connect):
    client = connect(stack)
    finished = client.call("echo", "done")
    client.cancel("never-sent")
    client.cancel(finished.requestId)
    client.assertQuiet("never-sent", finished.requestId)
    # hello, then responses only: the echo, call()'s barrier and assertQuiet()'s barrier
    assert [f["type"] for f in client.received] == ["hello", "response", "response", "response"]


def test_deadline_ends_the_request_and_stops_the_handler(stack, connect):
    client = connect(stack)
    mark = stack.mark()
    # The first chunk would come after 10 s: no timer lag on a busy machine lets it beat the
    # 500 ms deadline.
    requestId = client.request("testRequest", {"count": 2, "delayMs": 10_000}, timeoutMs=500)
    outcome = client.finish(requestId)
    assert outcome.code == "timeout"
    assert outcome.chunks == []
    # Gateway and worker share the deadline: whichever notices first stops the handler.
    stack.waitForHandlerLog(stoppedLine(
        r"(cancelled by the gateway \(timeout\)|the request's deadline passed)"), mark)


def test_client_disconnect_stops_its_handlers(stack, connect):
    client = connect(stack)
    requestIds = [client.request("testRequest", {"count": 100, "delayMs": 100})
                  for _ in range(2)]
    for requestId in requestIds:
        client.waitForChunk(requestId)
    mark = stack.mark()
    client.close()
    stack.waitForHandlerLog(stoppedLine(r"cancelled by the gateway \(disconnected\)"), mark,
                            count=2)
    # Other clients are unaffected.
    assert connect(stack).call("echo", "next").data == "next"


# client-log


def test_client_log_is_recorded_with_control_characters_escaped(stack, connect, waitUntil):
    client = connect(stack)
    token = secrets.token_hex(6)
    for level in ("debug", "info", "warn", "error"):
        client.sendJSON({"type": "client-log", "level": level,
                         "message": f"{token}-{level} first\nFORGED-{token}-{level} \x1b[31mred"
                                    "\u2028\x85",
                         "context": {"page": "/x"}, "timestamp": 1764143100123})
    client.assertQuiet()
    assert [f["type"] for f in client.received] == ["hello", "response"]  # nothing for the logs

    def logged():
        lines = [line for line in stack.gateway.log.splitlines() if token in line]
        return lines if len(lines) >= 4 else None

    lines = waitUntil(logged, f"4 client-log lines with {token} in the gateway log")
    assert len(lines) == 4, lines  # the "\n" did not start a line of its own
    for level, line in zip(("debug", "info", "warn", "error"), lines, strict=True):
        assert f"[relaybus.clientlog#{level}]" in line, line
        assert client.hello["connectionId"] in line, line
        assert (f"{token}-{level} first\\x0aFORGED-{token}-{level} \\x1b[31mred"
                "\\u2028\\x85") in line, line
    raw = stack.gateway.log
    assert not re.search(rf"^FORGED-{token}", raw, re.MULTILINE)
    assert not re.search("[\x1b\x85\u2028]", raw)


def test_client_log_batches_over_the_rate_are_dropped_and_the_client_told(stack, connect,
                                                                         waitUntil):
    client = connect(stack)
    token = secrets.token_hex(6)
    burst = client.hello["limits"]["clientLogBurst"]
    perFrame = client.hello["limits"]["maxLogEntriesPerFrame"]
    for batch in range(3):  # 150 entries at once against a burst of 100
        client.sendJSON({"type": "client-log", "entries": [
            {"level": "info", "message": f"{token} {batch}-{i}"} for i in range(perFrame)]})
    notice = client.next(lambda f: f["type"] == "error", "the rate-limit notice")
    assert notice["requestId"] is None and notice["error"]["code"] == "overloaded"
    # only the third frame overflows (a token or two may have refilled meanwhile)
    dropped = int(re.search(r"(\d+) entries dropped", notice["error"]["message"]).group(1))
    assert 0 < dropped <= 3 * perFrame - burst
    assert client.call("echo", "unaffected").data == "unaffected"

    def logged():
        return len([line for line in stack.gateway.log.splitlines() if token in line])
    waitUntil(lambda: logged() >= 3 * perFrame - dropped, "the recorded client-log lines")
    client.assertQuiet()
    assert logged() == 3 * perFrame - dropped

