"""The correlation table: every accepted request ends exactly once, and nothing leaks."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from unitsupport import assertNoResult, successResultOf

from relaybus.config import Limits
from relaybus.correlation import CorrelationTable
from relaybus.errors import WORKER_ERROR_CODES, ErrorCode, RelaybusError
from relaybus.frames import RequestFrame
from relaybus.messages import CancelNotice, ReplyKind, ReplyMessage, RequestMessage
from relaybus.strictjson import encodeJSON
from relaybus.testing import FakeClientConnection, FakeRequestBus

START = 1_764_000_000.0
LIMITS = Limits(maxMessageBytes=1000, maxInFlight=3, defaultTimeoutMs=5000, maxTimeoutMs=60_000)


class Gateway:
    """A table over a FakeRequestBus with a Clock, and helpers to play client and worker."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.bus = FakeRequestBus(replyTo="gw-test-replies")
        self.table = CorrelationTable(self.bus, self.clock, limits, "gw-test")
        # the edge holds frames to the same limit as the table (one GatewayConfig in service.py)
        self.conn = FakeClientConnection("c1", maxMessageBytes=limits.maxMessageBytes)

    def submit(self, requestId: str = "r-1", conn: FakeClientConnection | None = None,
               requestType: str = "echo", payload: Any = None,
               timeoutMs: int | None = None) -> Deferred[Any] | None:
        return self.table.submit(conn or self.conn,
                                 RequestFrame(requestId, requestType, payload, timeoutMs))

    def accept(self, requestId: str = "r-1", **kwargs: Any) -> tuple[Deferred[Any],
                                                                     RequestMessage]:
        """Submit and return the outcome and the message published for it."""
        before = len(self.bus.published)
        outcome = self.submit(requestId, **kwargs)
        assert outcome is not None, "the request was refused"
        assert len(self.bus.published) == before + 1
        return outcome, self.bus.published[-1][0]

    def reply(self, message: RequestMessage, kind: str, data: Any = None,
              seq: int | None = None, body: bytes | None = None) -> None:
        self.bus.reply(message, kind, encodeJSON(data) if body is None else body, seq)

    def assertEmpty(self) -> None:
        """Nothing left: no entries, no per-connection index, no timers."""
        assert len(self.table) == 0
        assert self.table.connectionCount() == 0
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def gw() -> Gateway:
    return Gateway()


def terminal(conn: FakeClientConnection, requestId: str) -> dict[str, Any]:
    frames = conn.terminalFrames(requestId)
    assert len(frames) == 1, f"expected exactly one terminal frame, got {frames}"
    return frames[0]


def errorCodeOf(conn: FakeClientConnection, requestId: str) -> str:
    frame = terminal(conn, requestId)
    assert frame["type"] == "error", frame
    assert isinstance(frame["error"]["message"], str)
    return str(frame["error"]["code"])


# The success path


def test_success_path_chunks_then_response(gw: Gateway) -> None:
    outcome, message = gw.accept(payload={"count": 3})
    assert len(gw.table) == 1 and gw.table.inFlight(gw.conn) == 1
    for seq in range(3):
        gw.reply(message, "chunk", {"index": seq}, seq=seq)
    gw.reply(message, "response", {"chunks": 3})
    assert gw.conn.frames == [
        {"type": "chunk", "requestId": "r-1", "seq": 0, "data": {"index": 0}},
        {"type": "chunk", "requestId": "r-1", "seq": 1, "data": {"index": 1}},
        {"type": "chunk", "requestId": "r-1", "seq": 2, "data": {"index": 2}},
        {"type": "response", "requestId": "r-1", "data": {"chunks": 3}},
    ]
    assert successResultOf(outcome) == {"chunks": 3}
    assert gw.bus.cancels == []
    gw.assertEmpty()


def test_response_without_chunks_and_with_falsy_data(gw: Gateway) -> None:
    for requestId, data in [("a", None), ("b", 0), ("c", ""), ("d", []), ("e", False)]:
        outcome, message = gw.accept(requestId)
        gw.reply(message, "response", data)
        assert terminal(gw.conn, requestId) == {"type": "response", "requestId": requestId,
                                                "data": data}
        assert successResultOf(outcome) == data
    gw.assertEmpty()


def test_chunks_without_seq_are_numbered_contiguously(gw: Gateway) -> None:
    _, message = gw.accept()
    gw.reply(message, "chunk", "a")
    gw.reply(message, "chunk", "b", seq=1)
    gw.reply(message, "chunk", "c")
    gw.reply(message, "chunk", "d")
    assert [(f["seq"], f["data"]) for f in gw.conn.frames] == [(0, "a"), (1, "b"), (2, "c"),
                                                               (3, "d")]
    gw.reply(message, "response", None)
    gw.assertEmpty()


def test_a_chunk_whose_seq_skips_ahead_ends_the_request_with_handler_error(gw: Gateway) -> None:
    """A chunk the broker refused while the worker had more in flight: the next one must not
    go out in its place, or the client would never know one is missing."""
    _, message = gw.accept()
    gw.reply(message, "chunk", "c0", seq=0)
    gw.reply(message, "chunk", "c2", seq=2)  # 1 never came
    gw.reply(message, "chunk", "c3", seq=3)  # late: the request has ended
    gw.reply(message, "response", "done")
    assert [f["type"] for f in gw.conn.frames] == ["chunk", "error"]
    assert gw.conn.frames[1]["error"] == {
        "code": "handler_error",
        "message": "chunk 1 of this request was lost (the worker's next chunk was 2)"}
    assert gw.bus.cancels == [CancelNotice(message.correlationId, "echo", "handler_error")]
    gw.assertEmpty()


def test_published_request_message(gw: Gateway) -> None:
    _, message = gw.accept("client-id-1", requestType="testRequest",
                           payload={"count": 2, "text": "é"}, timeoutMs=2500)
    assert message.requestType == "testRequest"
    assert message.replyTo == "gw-test-replies"
    assert message.deadline == START + 2.5
    assert message.body == encodeJSON({"count": 2, "text": "é"})
    assert message.gatewayId == "gw-test"
    assert message.principal is None
    assert message.correlationId != "client-id-1"
    assert re.fullmatch(r"[0-9a-f]{32}", message.correlationId)


def test_published_body_of_a_request_without_payload_is_json_null(gw: Gateway) -> None:
    _, message = gw.accept()
    assert message.body == b"null"


def test_correlation_ids_are_unique_and_never_the_request_id(gw: Gateway) -> None:
    other = FakeClientConnection("c2")
    gw.table = CorrelationTable(gw.bus, gw.clock, Limits(maxInFlight=1000), "gw-test")
    for i in range(200):
        assert gw.submit(f"r-{i}") is not None
        assert gw.submit(f"r-{i}", conn=other) is not None
    ids = [message.correlationId for message, _ in gw.bus.published]
    assert len(ids) == 400 == len(set(ids))
    assert not set(ids) & {f"r-{i}" for i in range(200)}


def test_publish_succeeding_later_sends_nothing(gw: Gateway) -> None:
    outcome, _ = gw.accept()
    gw.bus.published[0][1].callback(None)
    assert gw.conn.frames == []
    assertNoResult(outcome)
    assert len(gw.table) == 1


# Each way a request can end: exactly one terminal frame, then silence


def _response(gw: Gateway, message: RequestMessage) -> None:
    gw.reply(message, "response", {"ok": True})


def _errorReply(gw: Gateway, message: RequestMessage) -> None:
    gw.reply(message, "error", {"code": "bad_request", "message": "count must be positive"})


def _cancel(gw: Gateway, message: RequestMessage) -> None:
    gw.table.cancel(gw.conn, "r-1")


def _deadline(gw: Gateway, message: RequestMessage) -> None:
    gw.clock.advance(LIMITS.defaultTimeoutMs / 1000)


def _connectionLost(gw: Gateway, message: RequestMessage) -> None:
    gw.table.connectionLost(gw.conn)


def _busInterrupted(gw: Gateway, message: RequestMessage) -> None:
    gw.table.busInterrupted(None)


def _publishNoHandler(gw: Gateway, message: RequestMessage) -> None:
    gw.bus.published[0][1].errback(RelaybusError(ErrorCode.NO_HANDLER, "nobody"))


def _publishBroken(gw: Gateway, message: RequestMessage) -> None:
    gw.bus.published[0][1].errback(ConnectionResetError("socket gone"))


def _drainTimeout(gw: Gateway, message: RequestMessage) -> None:
    gw.table.drain(1.0)
    gw.clock.advance(1.0)


def _tooLarge(gw: Gateway, message: RequestMessage) -> None:
    gw.reply(message, "response", "x" * LIMITS.maxMessageBytes)


def _notJSON(gw: Gateway, message: RequestMessage) -> None:
    gw.reply(message, "response", body=b"{not json")


def _violation(gw: Gateway, message: RequestMessage) -> None:
    assert gw.bus.receiver is not None
    gw.bus.receiver.replyReceived(ReplyMessage(
        message.correlationId, message.replyTo, ReplyKind.CHUNK, b"1",
        violation="a chunk whose relaybus-seq is '0' (not an integer >= 0)"))


def _selfCancelled(gw: Gateway, message: RequestMessage) -> None:
    gw.reply(message, "error", {"code": "cancelled", "message": "nobody asked"})


ENDINGS: list[Any] = [
    # ending, terminal frame (type or error code), cancel notice reason for workers
    pytest.param(_response, "response", None, id="response"),
    pytest.param(_errorReply, "bad_request", None, id="error-reply"),
    pytest.param(_cancel, "cancelled", "cancelled", id="cancel"),
    pytest.param(_deadline, "timeout", "timeout", id="deadline"),
    pytest.param(_connectionLost, "cancelled", "disconnected", id="connection-lost"),
    pytest.param(_busInterrupted, "unavailable", None, id="bus-interrupted"),
    pytest.param(_publishNoHandler, "no_handler", None, id="publish-no-handler"),
    pytest.param(_publishBroken, "unavailable", None, id="publish-other-failure"),
    pytest.param(_drainTimeout, "shutting_down", "shutting_down", id="drain-timeout"),
    pytest.param(_tooLarge, "payload_too_large", "payload_too_large", id="payload-too-large"),
    pytest.param(_notJSON, "handler_error", "handler_error", id="reply-not-json"),
    pytest.param(_violation, "handler_error", "handler_error", id="reply-violation"),
    pytest.param(_selfCancelled, "handler_error", None, id="worker-cancelled-by-itself"),
]


@pytest.mark.parametrize(("end", "expected", "cancelReason"), ENDINGS)
def test_every_ending_sends_one_terminal_frame_and_then_nothing(
        gw: Gateway, end: Callable[[Gateway, RequestMessage], None], expected: str,
        cancelReason: str | None) -> None:
    outcome, message = gw.accept()
    gw.reply(message, "chunk", "first", seq=0)
    end(gw, message)

    frame = terminal(gw.conn, "r-1")
    assert (frame["type"] if frame["type"] == "response" else frame["error"]["code"]) == expected
    assert outcome.called
    if cancelReason is None:
        assert gw.bus.cancels == []
    else:
        assert gw.bus.cancels == [CancelNotice(message.correlationId, "echo", cancelReason)]
    gw.assertEmpty()

    # Whatever comes afterwards is dropped: late chunks, responses, errors, cancels, deadlines.
    framesBefore = list(gw.conn.frames)
    lateBefore = gw.table.lateReplies
    gw.reply(message, "chunk", "late", seq=1)
    gw.reply(message, "response", "late")
    gw.reply(message, "error", {"code": "timeout", "message": "late"})
    gw.table.cancel(gw.conn, "r-1")
    gw.table.connectionLost(gw.conn)
    gw.table.busInterrupted(None)
    gw.clock.advance(3600)
    assert gw.conn.frames == framesBefore
    assert gw.table.lateReplies == lateBefore + 3
    assert len(gw.bus.cancels) == (0 if cancelReason is None else 1)
    gw.assertEmpty()


@pytest.mark.parametrize(("end", "expected", "cancelReason"), ENDINGS)
def test_the_request_id_is_free_again_after_any_ending(
        gw: Gateway, end: Callable[[Gateway, RequestMessage], None], expected: str,
        cancelReason: str | None) -> None:
    _, message = gw.accept()
    end(gw, message)
    if end is _drainTimeout:
        return  # the table no longer accepts anything
    outcome, again = gw.accept()
    assert again.correlationId != message.correlationId
    gw.reply(message, "response", "for the old one")  # must not end the new one
    assertNoResult(outcome)
    gw.reply(again, "response", "new")
    assert gw.conn.frames[-1] == {"type": "response", "requestId": "r-1", "data": "new"}
    gw.assertEmpty()


def test_error_reply_ends_the_request(gw: Gateway) -> None:
    outcome, message = gw.accept()
    gw.reply(message, "error", {"code": "handler_error", "message": "see the worker's log"})
    assert terminal(gw.conn, "r-1") == {
        "type": "error", "requestId": "r-1",
        "error": {"code": "handler_error", "message": "see the worker's log"}}
    assert successResultOf(outcome) is None  # the error frame handled the failure
    gw.assertEmpty()


def test_cancel_of_unknown_or_finished_request_is_ignored(gw: Gateway) -> None:
    gw.table.cancel(gw.conn, "never-sent")
    _, message = gw.accept()
    gw.table.cancel(FakeClientConnection("someone-else"), "r-1")
    assert gw.conn.frames == [] and len(gw.table) == 1
    gw.reply(message, "response", 1)
    gw.table.cancel(gw.conn, "r-1")
    assert len(gw.conn.frames) == 1 and gw.bus.cancels == []
    gw.assertEmpty()


def test_deadline_fires_exactly_at_the_timeout(gw: Gateway) -> None:
    _, message = gw.accept(timeoutMs=1500)
    gw.clock.advance(1.499)
    assert gw.conn.frames == [] and gw.bus.cancels == []
    gw.clock.advance(0.001)
    assert errorCodeOf(gw.conn, "r-1") == "timeout"
    assert gw.bus.cancels == [CancelNotice(message.correlationId, "echo", "timeout")]
    gw.assertEmpty()


def test_default_timeout_applied(gw: Gateway) -> None:
    _, message = gw.accept()
    assert message.deadline == START + LIMITS.defaultTimeoutMs / 1000
    [timer] = gw.clock.getDelayedCalls()
    assert timer.getTime() == START + 5
    gw.clock.advance(4.999)
    assert gw.conn.frames == []
    gw.clock.advance(0.001)
    assert errorCodeOf(gw.conn, "r-1") == "timeout"


def test_connection_lost_ends_all_its_requests_and_tells_workers(gw: Gateway) -> None:
    other = FakeClientConnection("c2")
    outcomes = [gw.accept(f"r-{i}")[0] for i in range(3)]
    otherOutcome, otherMessage = gw.accept("r-0", conn=other)
    messages = [m for m, _ in gw.bus.published if m is not otherMessage]

    gw.table.connectionLost(gw.conn)

    assert {n.correlationId: n.reason for n in gw.bus.cancels} == {
        m.correlationId: "disconnected" for m in messages}
    assert all(outcome.called for outcome in outcomes)
    # Only the other connection's request is left, untouched.
    assert len(gw.table) == 1 and gw.table.connectionCount() == 1
    assert gw.table.inFlight(gw.conn) == 0
    assertNoResult(otherOutcome)
    assert other.frames == []
    # What the table handed the lost connection is at most its cancelled errors, which a closed
    # GatewayProtocol drops (IClientConnection); never a response or chunk.
    assert all(f["type"] == "error" and f["error"]["code"] == "cancelled"
               for f in gw.conn.frames)
    for message in messages:
        gw.reply(message, "response", "late")
    assert all(f["type"] == "error" for f in gw.conn.frames)
    gw.reply(otherMessage, "response", "ok")
    assert terminal(other, "r-0")["type"] == "response"
    gw.assertEmpty()


def test_connection_lost_with_nothing_in_flight(gw: Gateway) -> None:
    gw.table.connectionLost(gw.conn)
    assert gw.conn.frames == [] and gw.bus.cancels == []
    gw.assertEmpty()


def test_bus_interrupted_ends_every_request_with_unavailable(gw: Gateway) -> None:
    other = FakeClientConnection("c2")
    gw.accept("a")
    gw.accept("b")
    gw.accept("a", conn=other)
    gw.table.busInterrupted(None)
    assert errorCodeOf(gw.conn, "a") == errorCodeOf(gw.conn, "b") == "unavailable"
    assert errorCodeOf(other, "a") == "unavailable"
    assert gw.bus.cancels == []  # the bus is gone: nobody to tell
    gw.assertEmpty()


def test_publish_failing_at_once_with_no_handler(gw: Gateway) -> None:
    gw.bus.publishResult = RelaybusError(ErrorCode.NO_HANDLER, "no worker serves 'nope'")
    outcome = gw.submit(requestType="nope")
    assert outcome is not None and outcome.called
    assert terminal(gw.conn, "r-1")["error"] == {"code": "no_handler",
                                                 "message": "no worker serves 'nope'"}
    assert gw.bus.cancels == []
    gw.assertEmpty()


@pytest.mark.parametrize("code", [ErrorCode.OVERLOADED, ErrorCode.UNAVAILABLE])
def test_publish_failing_with_a_relaybus_error_keeps_its_code(gw: Gateway,
                                                              code: ErrorCode) -> None:
    gw.accept()
    gw.bus.published[0][1].errback(RelaybusError(code, "refused"))
    assert errorCodeOf(gw.conn, "r-1") == str(code)
    gw.assertEmpty()


def test_publish_failing_with_another_exception_is_unavailable_without_details(
        gw: Gateway) -> None:
    gw.accept()
    gw.bus.published[0][1].errback(RuntimeError("secret internal detail"))
    assert errorCodeOf(gw.conn, "r-1") == "unavailable"
    assert "secret" not in terminal(gw.conn, "r-1")["error"]["message"]
    gw.assertEmpty()


# Refusals: one error frame with the requestId, nothing in flight


def test_bus_not_ready_is_unavailable(gw: Gateway) -> None:
    gw.bus.ready = False
    assert gw.submit() is None
    assert errorCodeOf(gw.conn, "r-1") == "unavailable"
    assert gw.bus.published == []
    gw.assertEmpty()


def test_timeout_above_max_is_bad_request_and_the_max_itself_is_fine(gw: Gateway) -> None:
    assert gw.submit("too-long", timeoutMs=LIMITS.maxTimeoutMs + 1) is None
    assert errorCodeOf(gw.conn, "too-long") == "bad_request"
    assert "timeoutMs" in terminal(gw.conn, "too-long")["error"]["message"]
    _, message = gw.accept("max", timeoutMs=LIMITS.maxTimeoutMs)
    assert message.deadline == START + LIMITS.maxTimeoutMs / 1000


def test_payload_that_cannot_be_encoded_is_bad_request(gw: Gateway) -> None:
    assert gw.submit(payload={"x": float("inf")}) is None
    assert errorCodeOf(gw.conn, "r-1") == "bad_request"
    assert gw.bus.published == []
    gw.assertEmpty()


def test_duplicate_request_id_is_refused_and_the_original_goes_on(gw: Gateway) -> None:
    outcome, message = gw.accept()
    assert gw.submit("r-1", payload="again") is None
    assert gw.conn.frames == [{
        "type": "error", "requestId": "r-1",
        "error": {"code": "duplicate_request_id",
                  "message": "a request with this requestId is still in flight"}}]
    assert len(gw.bus.published) == 1 and len(gw.table) == 1
    assertNoResult(outcome)
    gw.reply(message, "chunk", "c", seq=0)
    gw.reply(message, "response", "original")
    assert gw.conn.frames[1:] == [
        {"type": "chunk", "requestId": "r-1", "seq": 0, "data": "c"},
        {"type": "response", "requestId": "r-1", "data": "original"}]
    gw.assertEmpty()


def test_same_request_id_on_two_connections_is_kept_apart(gw: Gateway) -> None:
    other = FakeClientConnection("c2")
    _, mine = gw.accept("same", payload=1)
    _, theirs = gw.accept("same", conn=other, payload=2)
    assert mine.correlationId != theirs.correlationId
    gw.reply(theirs, "chunk", "for c2", seq=0)
    gw.reply(mine, "response", "for c1")
    assert gw.conn.frames == [{"type": "response", "requestId": "same", "data": "for c1"}]
    assert other.frames == [{"type": "chunk", "requestId": "same", "seq": 0, "data": "for c2"}]
    gw.table.cancel(other, "same")
    assert errorCodeOf(other, "same") == "cancelled"
    assert len(gw.conn.frames) == 1
    gw.assertEmpty()


def test_max_in_flight_per_connection_is_overloaded(gw: Gateway) -> None:
    messages = [gw.accept(f"r-{i}")[1] for i in range(LIMITS.maxInFlight)]
    assert gw.submit("one-too-many") is None
    assert errorCodeOf(gw.conn, "one-too-many") == "overloaded"
    assert len(gw.bus.published) == LIMITS.maxInFlight
    # another connection has its own allowance
    gw.accept("r-0", conn=FakeClientConnection("c2"))
    # and once one ends there is room again
    gw.reply(messages[0], "response", None)
    gw.accept("one-more")
    assert gw.table.inFlight(gw.conn) == LIMITS.maxInFlight


# Replies from workers


def test_chunk_with_seq_lower_than_forwarded_is_dropped(gw: Gateway) -> None:
    """An idempotent handler ran again after a redelivery: the client already has 0 and 1."""
    _, message = gw.accept()
    gw.reply(message, "chunk", "a0", seq=0)
    gw.reply(message, "chunk", "a1", seq=1)
    # the rerun starts over
    gw.reply(message, "chunk", "b0", seq=0)
    gw.reply(message, "chunk", "b1", seq=1)
    gw.reply(message, "chunk", "b2", seq=2)
    gw.reply(message, "response", "done")
    assert [(f["type"], f.get("seq"), f["data"]) for f in gw.conn.frames] == [
        ("chunk", 0, "a0"), ("chunk", 1, "a1"), ("chunk", 2, "b2"), ("response", None, "done")]
    gw.assertEmpty()


@pytest.mark.parametrize("kind", ["chunk", "response", "error"])
def test_reply_larger_than_max_message_bytes_is_payload_too_large(gw: Gateway,
                                                                  kind: str) -> None:
    _, message = gw.accept()
    body = encodeJSON({"code": "handler_error", "message": "x" * LIMITS.maxMessageBytes})
    gw.reply(message, kind, body=body, seq=0)
    assert errorCodeOf(gw.conn, "r-1") == "payload_too_large"
    assert [f["type"] for f in gw.conn.frames] == ["error"]
    assert gw.bus.cancels == [CancelNotice(message.correlationId, "echo", "payload_too_large")]
    gw.assertEmpty()


# A reply the connection cannot send (IClientConnection raises; the sizes are the edge's, see
# test_gateway_protocol.py): the request still ends once, with the connection's code.

SMALL_CLIENT = 200  # bytes: a reply body well within the table's limit makes a frame over it
UNSENDABLE = [
    pytest.param(b'"' + b"x" * 300 + b'"', "payload_too_large", id="frame-over-the-limit"),
    pytest.param(b'"report-\\udcff"', "handler_error", id="lone-surrogate"),
]


@pytest.mark.parametrize(("body", "code"), UNSENDABLE)
def test_chunk_the_connection_cannot_send_ends_the_request_and_tells_workers(
        gw: Gateway, body: bytes, code: str) -> None:
    gw.conn = FakeClientConnection("small", maxMessageBytes=SMALL_CLIENT)
    outcome, message = gw.accept()
    gw.reply(message, "chunk", "fits", seq=0)
    gw.reply(message, "chunk", body=body, seq=1)
    assert [f["type"] for f in gw.conn.frames] == ["chunk", "error"]
    assert errorCodeOf(gw.conn, "r-1") == code
    assert outcome.called
    assert gw.bus.cancels == [CancelNotice(message.correlationId, "echo", code)]
    gw.reply(message, "chunk", "late", seq=2)
    gw.reply(message, "response", "late")
    assert len(gw.conn.frames) == 2
    gw.assertEmpty()


@pytest.mark.parametrize(("body", "code"), UNSENDABLE)
def test_response_the_connection_cannot_send_becomes_an_error_frame(
        gw: Gateway, body: bytes, code: str) -> None:
    gw.conn = FakeClientConnection("small", maxMessageBytes=SMALL_CLIENT)
    outcome, message = gw.accept()
    gw.reply(message, "response", body=body)
    assert [f["type"] for f in gw.conn.frames] == ["error"]
    assert errorCodeOf(gw.conn, "r-1") == code
    assert outcome.called
    assert gw.bus.cancels == []  # the worker is done already
    gw.assertEmpty()


@pytest.mark.parametrize("body", [b"{not json", b"", b"\xff\xfe", b"NaN", b"[1,]",
                                  b"[" * 5000 + b"]" * 5000], ids=[
    "broken", "empty", "not-utf8", "nan", "trailing-comma", "too-deep"])
@pytest.mark.parametrize("kind", ["chunk", "response", "error"])
def test_reply_that_is_not_json_is_handler_error(gw: Gateway, kind: str, body: bytes) -> None:
    table = CorrelationTable(gw.bus, gw.clock, Limits(maxMessageBytes=100_000), "gw")
    outcome = table.submit(gw.conn, RequestFrame("r-1", "echo", None))
    assert outcome is not None
    gw.reply(gw.bus.published[-1][0], kind, body=body, seq=0)
    assert errorCodeOf(gw.conn, "r-1") == "handler_error"
    assert len(table) == 0


def test_a_contract_violation_ends_the_request_with_what_the_worker_did(gw: Gateway) -> None:
    _, message = gw.accept()
    _violation(gw, message)
    assert terminal(gw.conn, "r-1")["error"] == {
        "code": "handler_error",
        "message": "the worker sent a chunk whose relaybus-seq is '0' (not an integer >= 0)"}


def test_a_workers_own_cancelled_is_not_mistaken_for_the_clients_cancel(gw: Gateway) -> None:
    _, message = gw.accept()
    _selfCancelled(gw, message)
    assert terminal(gw.conn, "r-1")["error"] == {
        "code": "handler_error",
        "message": "the worker cancelled the request by itself: nobody asked"}


@pytest.mark.parametrize("code", sorted(str(c) for c in WORKER_ERROR_CODES - {"cancelled"}))
def test_worker_error_codes_that_workers_may_use_pass_through(gw: Gateway, code: str) -> None:
    _, message = gw.accept()
    gw.reply(message, "error", {"code": code, "message": "why"})
    assert terminal(gw.conn, "r-1")["error"] == {"code": code, "message": "why"}


@pytest.mark.parametrize("code", ["no_handler", "payload_too_large", "duplicate_request_id",
                                  "unavailable", "made_up", "", None, 42, "CANCELLED"])
def test_worker_error_codes_a_worker_may_not_use_become_handler_error(
        gw: Gateway, code: Any) -> None:
    _, message = gw.accept()
    gw.reply(message, "error", {"code": code, "message": "why"})
    assert terminal(gw.conn, "r-1")["error"] == {"code": "handler_error", "message": "why"}
    gw.assertEmpty()


@pytest.mark.parametrize("data", [None, "timeout", 42, ["timeout", "x"], True])
def test_worker_error_body_that_is_not_an_object_is_handler_error(gw: Gateway,
                                                                  data: Any) -> None:
    _, message = gw.accept()
    gw.reply(message, "error", data)
    assert terminal(gw.conn, "r-1")["error"] == {"code": "handler_error",
                                                 "message": "the worker failed"}
    gw.assertEmpty()


@pytest.mark.parametrize("text", [None, 5, ["m"], {"m": 1}])
def test_worker_error_message_that_is_not_a_string_is_replaced(gw: Gateway, text: Any) -> None:
    _, message = gw.accept()
    gw.reply(message, "error", {"code": "timeout", "message": text})
    assert terminal(gw.conn, "r-1")["error"] == {"code": "timeout",
                                                 "message": "the worker failed"}


@pytest.mark.parametrize("code", [[], {"code": "timeout"}])
def test_worker_error_with_unhashable_code_is_handler_error(gw: Gateway, code: Any) -> None:
    _, message = gw.accept()
    try:
        gw.reply(message, "error", {"code": code, "message": "why"})
    finally:
        frames = gw.conn.terminalFrames("r-1")
    assert frames == [{"type": "error", "requestId": "r-1",
                       "error": {"code": "handler_error", "message": "why"}}]


@pytest.mark.parametrize("kind", ["response", "chunk"])
def test_reply_with_out_of_range_number_still_ends_the_request_once(gw: Gateway,
                                                                    kind: str) -> None:
    outcome, message = gw.accept()
    try:
        gw.reply(message, kind, body=b'{"big": 1e400}', seq=0)
        if kind == "chunk":
            gw.reply(message, "response", "done")
    finally:
        outcome.addErrback(lambda _: None)  # do not leave an unhandled failure behind
    frames = gw.conn.terminalFrames("r-1")
    assert len(frames) == 1


# Draining


def test_drain_with_nothing_in_flight_fires_at_once_and_refuses_new_requests(
        gw: Gateway) -> None:
    done = gw.table.drain(10)
    assert successResultOf(done) is None
    assert gw.submit() is None
    assert errorCodeOf(gw.conn, "r-1") == "shutting_down"
    assert gw.bus.published == []
    gw.assertEmpty()


def test_drain_fires_when_the_last_request_ends(gw: Gateway) -> None:
    _, first = gw.accept("a")
    _, second = gw.accept("b")
    done = gw.table.drain(10)
    assert gw.submit("c") is None
    assert errorCodeOf(gw.conn, "c") == "shutting_down"
    # requests in flight carry on: chunks still flow
    gw.reply(first, "chunk", "more", seq=0)
    gw.reply(first, "response", "a done")
    assertNoResult(done)
    gw.clock.advance(1)
    assertNoResult(done)
    gw.reply(second, "response", "b done")
    assert successResultOf(done) is None
    assert [f["type"] for f in gw.conn.frames if f["requestId"] in ("a", "b")] == [
        "chunk", "response", "response"]
    gw.assertEmpty()  # the drain timer was cancelled too


def test_drain_timeout_ends_the_rest_with_shutting_down(gw: Gateway) -> None:
    _, first = gw.accept("a", timeoutMs=60_000)
    _, second = gw.accept("b", timeoutMs=60_000)
    done = gw.table.drain(2.0)
    gw.reply(first, "response", "a done")
    gw.clock.advance(1.999)
    assertNoResult(done)
    gw.clock.advance(0.001)
    assert successResultOf(done) is None
    assert errorCodeOf(gw.conn, "b") == "shutting_down"
    assert terminal(gw.conn, "a")["type"] == "response"
    assert gw.bus.cancels == [CancelNotice(second.correlationId, "echo", "shutting_down")]
    gw.assertEmpty()


def test_requests_ending_by_their_deadline_during_a_drain_fire_it(gw: Gateway) -> None:
    gw.accept("a", timeoutMs=1000)
    done = gw.table.drain(10)
    gw.clock.advance(1)
    assert errorCodeOf(gw.conn, "a") == "timeout"
    assert successResultOf(done) is None
    gw.assertEmpty()


# Leaks under churn


def test_many_requests_over_many_connections_leave_nothing_behind(gw: Gateway) -> None:
    endings = [_response, _errorReply, _cancel, _deadline, _connectionLost, _publishNoHandler,
               _tooLarge, _notJSON]
    for round_ in range(5):
        for i, end in enumerate(endings):
            gw.conn = FakeClientConnection(f"c-{round_}-{i}")
            gw.bus.published.clear()
            _, message = gw.accept()
            gw.reply(message, "chunk", i, seq=0)
            end(gw, message)
            assert len(gw.conn.terminalFrames("r-1")) == 1
    gw.table.busInterrupted(None)
    gw.assertEmpty()


class RaisingBus(FakeRequestBus):
    def publishRequest(self, message: RequestMessage) -> Deferred[None]:
        raise RuntimeError("header table too large")


def test_publish_that_raises_ends_the_request_once_with_unavailable() -> None:
    clock = Clock()
    table = CorrelationTable(RaisingBus(), clock, LIMITS, "gw-test")
    conn = FakeClientConnection("c1")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        table.submit(conn, RequestFrame("r-1", "echo", None))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert terminal(conn, "r-1")["error"]["code"] == "unavailable"
    assert len(table) == 0 and clock.getDelayedCalls() == []
    # logged as the table's own line, not the WebSocket edge's
    assert [e["log_namespace"] for e in events if "log_failure" in e] == [
        "relaybus.correlation"]
