"""The Python client's request bookkeeping, driven frame by frame with a Clock (no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from unitsupport import assertNoResult, errorCode, failureResultOf, successResultOf

from relaybus.client import LOCAL_TIMEOUT_GRACE_S, RelaybusClient
from relaybus.errors import RelaybusError


class FakeProtocol:
    state = WebSocketProtocol.STATE_OPEN

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closedWith: int | None = None

    def sendMessage(self, payload: bytes, isBinary: bool = False) -> None:
        assert not isBinary
        self.sent.append(json.loads(payload))

    def sendClose(self, code: int) -> None:
        self.closedWith = code


HELLO = {"type": "hello", "connectionId": "c", "protocol": 1,
         "limits": {"maxMessageBytes": 200, "maxInFlight": 10, "defaultTimeoutMs": 1000,
                    "maxTimeoutMs": 5000}}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def protocol() -> FakeProtocol:
    return FakeProtocol()


@pytest.fixture
def client(clock: Clock, protocol: FakeProtocol) -> RelaybusClient:
    client = RelaybusClient(clock)
    client.connectionOpened(protocol)  # type: ignore[arg-type]
    client.frameReceived(HELLO)
    return client


def test_ready_after_hello(client: RelaybusClient) -> None:
    assert successResultOf(client.whenReady) is client
    assert client.connected and client.maxMessageBytes == 200


def test_call_streams_chunks_then_fires_with_the_response(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    chunks: list[Any] = []
    result = client.call("testRequest", {"count": 2}, onChunk=chunks.append)
    [request] = protocol.sent
    assert request["type"] == "request" and request["requestType"] == "testRequest"
    assert request["payload"] == {"count": 2} and "timeoutMs" not in request
    requestId = request["requestId"]
    client.frameReceived({"type": "chunk", "requestId": requestId, "seq": 0, "data": "a"})
    client.frameReceived({"type": "chunk", "requestId": requestId, "seq": 1, "data": "b"})
    assertNoResult(result)
    client.frameReceived({"type": "response", "requestId": requestId, "data": {"ok": 1}})
    assert successResultOf(result) == {"ok": 1}
    assert chunks == ["a", "b"]
    assert client.inFlight == 0


def test_error_frame_fails_the_call_with_its_code(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    result = client.call("nope")
    requestId = protocol.sent[0]["requestId"]
    client.frameReceived({"type": "error", "requestId": requestId,
                           "error": {"code": "no_handler", "message": "nobody"}})
    assert errorCode(result) == "no_handler"


def test_duplicate_request_id_error_does_not_end_the_call(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    result = client.call("echo")
    requestId = protocol.sent[0]["requestId"]
    client.frameReceived({"type": "error", "requestId": requestId,
                           "error": {"code": "duplicate_request_id", "message": "again"}})
    assertNoResult(result)
    client.frameReceived({"type": "response", "requestId": requestId, "data": 1})
    assert successResultOf(result) == 1


def test_frames_for_unknown_requests_are_ignored(client: RelaybusClient) -> None:
    client.frameReceived({"type": "response", "requestId": "other", "data": 1})
    client.frameReceived({"type": "error", "requestId": None,
                           "error": {"code": "bad_request", "message": "?"}})
    assert client.inFlight == 0


def test_cancelling_the_deferred_sends_cancel(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    result = client.call("testRequest")
    requestId = protocol.sent[0]["requestId"]
    result.cancel()
    failureResultOf(result, CancelledError)
    assert protocol.sent[-1] == {"type": "cancel", "requestId": requestId}
    # The gateway's `cancelled` error that follows is ignored.
    client.frameReceived({"type": "error", "requestId": requestId,
                           "error": {"code": "cancelled", "message": "by you"}})
    assert client.inFlight == 0


def test_timeout_is_sent_and_enforced_locally(
        protocol: FakeProtocol, client: RelaybusClient, clock: Clock) -> None:
    result = client.call("testRequest", timeout=1.5)
    request = protocol.sent[0]
    assert request["timeoutMs"] == 1500
    clock.advance(1.5 + LOCAL_TIMEOUT_GRACE_S - 0.01)
    assertNoResult(result)
    clock.advance(0.02)
    assert errorCode(result) == "timeout"
    assert protocol.sent[-1] == {"type": "cancel", "requestId": request["requestId"]}


def test_response_cancels_the_local_timer(
        protocol: FakeProtocol, client: RelaybusClient, clock: Clock) -> None:
    result = client.call("echo", timeout=1)
    client.frameReceived({"type": "response", "requestId": protocol.sent[0]["requestId"],
                           "data": None})
    successResultOf(result)
    assert clock.getDelayedCalls() == []


def test_calls_in_flight_fail_with_disconnected_when_the_socket_closes(
        client: RelaybusClient) -> None:
    first, second = client.call("a"), client.call("b")
    client.connectionClosed(1006, "gone")
    assert errorCode(first) == errorCode(second) == "disconnected"
    assert successResultOf(client.whenClosed) == (1006, "gone")
    assert errorCode(client.call("c")) == "disconnected"


def test_request_over_the_gateways_limit_fails_locally(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    assert errorCode(client.call("echo", "x" * 300)) == "payload_too_large"
    assert protocol.sent == []


def test_payload_that_is_not_json_fails_locally(
        protocol: FakeProtocol, client: RelaybusClient) -> None:
    assert errorCode(client.call("echo", float("nan"))) == "bad_request"
    assert protocol.sent == []


def test_closed_before_hello_fails_ready(clock: Clock) -> None:
    client = RelaybusClient(clock)
    client.connectionClosed(1002, "protocol error")
    assert errorCode(client.whenReady) == "disconnected"


def test_a_401_at_the_handshake_fails_ready_with_unauthorized(clock: Clock) -> None:
    client = RelaybusClient(clock)
    client.connectionClosed(1006, 'connection was closed uncleanly ("WebSocket connection '
                                  'upgrade failed [401]: token expired")')
    error = failureResultOf(client.whenReady, RelaybusError).value
    assert (error.code, error.message) == ("unauthorized", "token expired")
    other = RelaybusClient(clock)
    other.connectionClosed(1006, 'connection was closed uncleanly ("WebSocket connection '
                                 'upgrade failed [503]: the gateway is at its limit")')
    error = failureResultOf(other.whenReady, RelaybusError).value
    assert error.code == "disconnected" and "HTTP 503" in error.message


def test_log_sends_a_client_log_frame(
        protocol: FakeProtocol, client: RelaybusClient, clock: Clock) -> None:
    clock.advance(12.5)
    client.log("warn", "careful", {"page": "/"})
    assert protocol.sent[-1] == {"type": "client-log", "level": "warn", "message": "careful",
                                "timestamp": 12500.0, "context": {"page": "/"}}
