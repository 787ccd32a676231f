"""The WebSocket edge over a StringTransport: handshake, hello, frames in and out.

A real GatewayFactory and protocol, a CorrelationTable over a MemoryBus with the echo handler in
a WorkerRuntime, all on one Clock (also txaio's loop, which Autobahn's timers use).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from autobahn.websocket.types import ConnectionRequest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from websupport import OPCODE_BINARY, OPCODE_CLOSE, OPCODE_TEXT, Client, autobahnOn
from workers.examples import EchoHandler

from relaybus.config import GatewayConfig, Limits
from relaybus.correlation import CorrelationTable
from relaybus.errors import RelaybusError
from relaybus.frames import chunkFrame, responseFrame
from relaybus.gateway import GatewayFactory
from relaybus.memory import MemoryBus
from relaybus.testing import FakeRequestHandler
from relaybus.worker import WorkerRuntime

LIMITS = Limits(maxMessageBytes=4096, maxInFlight=5, defaultTimeoutMs=2000, maxTimeoutMs=10_000)

@pytest.fixture
def clock() -> Iterator[Clock]:
    with autobahnOn(1_764_000_000) as clock:
        yield clock


class Gateway:
    def __init__(self, clock: Clock, **config: Any) -> None:
        self.clock = clock
        self.config = GatewayConfig(gatewayId="gw-test", limits=LIMITS, **config)
        self.bus = MemoryBus(clock)
        self.bus.startService()
        self.handler = FakeRequestHandler("fake")  # a worker the test plays by hand
        self.runtime = WorkerRuntime(self.bus, {"echo": EchoHandler(), "fake": self.handler},
                                     clock)
        self.runtime.startService()
        self.table = CorrelationTable(self.bus, clock, LIMITS, "gw-test")
        self.factory = GatewayFactory(self.config, self.table, clock)

    def connect(self) -> Client:
        client = Client(self.factory)
        response = client.handshake()
        head, _, accept = response.rpartition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: " + accept in head
        return client

    def settle(self) -> None:
        for _ in range(10):
            self.clock.advance(0)


@pytest.fixture
def gw(clock: Clock) -> Gateway:
    return Gateway(clock)


def test_hello_frame_first_on_open(gw: Gateway) -> None:
    client = gw.connect()
    [hello] = client.messages()
    assert hello["type"] == "hello" and hello["protocol"] == 1
    assert hello["limits"] == {"maxMessageBytes": 4096, "maxInFlight": 5,
                               "defaultTimeoutMs": 2000, "maxTimeoutMs": 10_000,
                               "clientLogPerSecond": 20, "clientLogBurst": 100,
                               "maxLogEntriesPerFrame": 50, "requestsPerSecond": 0,
                               "requestsBurst": 0}
    assert hello["connectionId"] == client.protocol.connectionId != ""
    assert client.protocol in gw.factory.connections
    assert client.isOpen


def test_an_open_connection_lets_go_of_its_handshake(gw: Gateway) -> None:
    """Autobahn's handshake leftovers (the request text, parsed headers, copies of handshake
    options) are dropped once open, and the instance dict is rebuilt small; the connection
    still works, pings and closes as before."""
    from relaybus.gateway import _HANDSHAKE_ONLY_ATTRIBUTES

    client = gw.connect()
    state = vars(client.protocol)
    assert not set(_HANDSHAKE_ONLY_ATTRIBUTES) & set(state)
    assert len(state) <= 85  # a dict with more keys takes a table twice the size
    client.messages()
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "echo",
                     "payload": 1})
    gw.settle()
    assert client.messages() == [{"type": "response", "requestId": "r-1", "data": 1}]
    client.protocol.sendPing()
    client.protocol.sendClose(1000)
    assert client.protocol.state == client.protocol.STATE_CLOSING


def test_a_handshake_does_not_format_autobahns_configuration(gw: Gateway) -> None:
    """Autobahn pformats its configuration for a debug line on every connection (about 40 %
    of a handshake's CPU); relaybus.gateway skips that one call and no other."""
    import pprint

    import autobahn.websocket.protocol as autobahnProtocol
    import txaio

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    level = txaio.get_global_log_level()
    txaio.set_global_log_level("debug")  # so that Autobahn emits the line at all
    try:
        gw.connect().messages()
    finally:
        txaio.set_global_log_level(level)
        globalLogPublisher.removeObserver(events.append)
    dumps = [e["attrs"] for e in events if "attrs" in e]
    assert dumps == ["(configuration not formatted: relaybus.gateway skips it)"]
    assert autobahnProtocol.pformat({"a": [1]}) == pprint.pformat({"a": [1]})  # others: as before


def test_each_connection_gets_its_own_id(gw: Gateway) -> None:
    ids = {gw.connect().messages()[0]["connectionId"] for _ in range(5)}
    assert len(ids) == 5


def test_request_round_trip_through_the_memory_bus(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "echo",
                     "payload": {"hello": "wörld"}})
    assert client.messages() == []  # the bus delivers on a later turn
    gw.settle()
    assert client.messages() == [{"type": "response", "requestId": "r-1",
                                  "data": {"hello": "wörld"}}]
    assert len(gw.table) == 0


@pytest.mark.parametrize(("payload", "opcode"), [
    (b"{not json", OPCODE_TEXT),
    (b"[1, 2]", OPCODE_TEXT),
    (b'{"type": "nope"}', OPCODE_TEXT),
    (b'{"type": "request", "requestId": "r-1", "requestType": "echo"}', OPCODE_BINARY),
    (b"[" * 2000 + b"]" * 2000, OPCODE_TEXT),
], ids=["invalid-json", "not-an-object", "unknown-type", "binary", "deeply-nested"])
def test_malformed_frame_gets_an_error_frame_and_the_connection_stays_open(
        gw: Gateway, payload: bytes, opcode: int) -> None:
    client = gw.connect()
    client.messages()
    client.send(payload, opcode)
    [error] = client.messages()
    assert error["type"] == "error" and error["requestId"] is None
    assert error["error"]["code"] == "bad_request"
    assert client.isOpen
    # and the connection still works
    client.sendJSON({"type": "request", "requestId": "after", "requestType": "echo",
                     "payload": 1})
    gw.settle()
    assert client.messages() == [{"type": "response", "requestId": "after", "data": 1}]
    assert gw.factory.framesRefused == {"bad_request": 1}


@pytest.mark.parametrize(("code", "counted"), [
    (1000, "1000"), (4401, "4401"), (3000, "other"), (4999, "other"), (None, "none")])
def test_closes_are_counted_by_code_and_client_chosen_codes_stay_one_label(
        gw: Gateway, code: int | None, counted: str) -> None:
    client = gw.connect()
    client.protocol.onClose(False, code, None)
    assert gw.factory.connectionsClosed == {counted: 1}


def test_refused_request_carries_its_request_id(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "bad type"})
    client.sendJSON({"type": "request", "requestId": "r-2", "requestType": "nobody"})
    gw.settle()
    codes = {m["requestId"]: m["error"]["code"] for m in client.messages()}
    assert codes == {"r-1": "bad_request", "r-2": "no_handler"}
    assert client.isOpen


def test_cancel_for_an_unknown_request_is_ignored(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.sendJSON({"type": "cancel", "requestId": "never-sent"})
    gw.settle()
    assert client.messages() == []
    assert client.isOpen


def test_client_log_is_logged_escaped_and_answers_nothing(gw: Gateway) -> None:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = gw.connect()
        client.messages()
        client.sendJSON({"type": "client-log", "level": "warn",
                         "message": "line\nforged \x1b[31m", "context": {"page": "/"}})
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert client.messages() == []
    [event] = [e for e in events if e.get("log_namespace") == "relaybus.clientlog"]
    assert event["message"] == "line\\x0aforged \\x1b[31m"
    assert event["context"] == {"page": "/"}
    assert event["connectionId"] == client.protocol.connectionId
    assert event["log_level"].name == "warn"


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def test_client_log_tokens_are_redacted_in_the_message_and_the_context(gw: Gateway) -> None:
    deep: Any = JWT
    for _ in range(500):
        deep = [deep]
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client = gw.connect()
        client.messages()
        client.sendJSON({"type": "client-log", "level": "info",
                         "message": f"token {JWT} or Authorization: Bearer\n{JWT}",
                         "context": {"token": JWT, JWT: [1, {"h": f"Bearer {JWT}"}],
                                     "deep": deep, "n": 1}})
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert client.messages() == []
    [event] = [e for e in events if e.get("log_namespace") == "relaybus.clientlog"]
    assert event["message"] == "token [redacted] or Authorization: Bearer\\x0a[redacted]"
    context = event["context"]
    assert context["token"] == "[redacted]" and context["n"] == 1
    assert context["[redacted]"] == [1, {"h": "Bearer [redacted]"}]
    assert JWT.split(".")[1] not in repr(context)


class ClientLogEvents:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> ClientLogEvents:
        globalLogPublisher.addObserver(self.events.append)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)

    def messages(self) -> list[str]:
        """What clients logged (the `message` field, as escaped by the gateway)."""
        return [e["message"] for e in self.events
                if e.get("log_namespace") == "relaybus.clientlog"]

    def gatewayLines(self) -> list[str]:
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "relaybus.gateway"]


def logBatch(*messages: str) -> dict[str, Any]:
    return {"type": "client-log",
            "entries": [{"level": "info", "message": m} for m in messages]}


def test_client_log_batch_records_every_entry_in_order(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    with ClientLogEvents() as log:
        client.sendJSON(logBatch("one", "two\nthree"))
    assert log.messages() == ["one", "two\\x0athree"]
    assert client.messages() == []


def test_client_log_over_the_rate_is_dropped_with_one_notice_a_second(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    with ClientLogEvents() as log:
        for batch in range(3):  # 150 entries against a burst of 100
            client.sendJSON(logBatch(*(f"b{batch}-{i}" for i in range(50))))
        assert len(log.messages()) == 100
        [notice] = client.messages()
        assert notice["requestId"] is None and notice["error"]["code"] == "overloaded"
        assert "50 entries dropped" in notice["error"]["message"]
        assert any("Dropped" in m for m in log.gatewayLines())

        client.sendJSON(logBatch("still over"))
        assert client.messages() == []  # no second notice within the second...
        gw.clock.advance(1.0)  # ...which also refills 20 tokens
        client.sendJSON(logBatch(*(f"later-{i}" for i in range(21))))
    [notice] = client.messages()
    # the entry dropped earlier is reported with the one dropped now
    assert "2 entries dropped" in notice["error"]["message"]
    assert len(log.messages()) == 120 and log.messages()[-1] == "later-19"
    assert client.isOpen


def test_client_log_rate_is_per_connection(gw: Gateway) -> None:
    noisy, quiet = gw.connect(), gw.connect()
    noisy.messages(), quiet.messages()
    with ClientLogEvents() as log:
        for _ in range(3):
            noisy.sendJSON(logBatch(*(["noise"] * 50)))
        quiet.sendJSON(logBatch("heard"))
    assert "heard" in log.messages()
    assert quiet.messages() == []


def test_the_gateway_is_the_transports_producer(gw: Gateway) -> None:
    client = gw.connect()
    assert client.transport.producer is client.protocol and client.transport.streaming


def fillSlowReader(gw: Gateway, frames: int, frameBytes: int) -> Client:
    """A client whose transport said "stop": the gateway queues `frames` echo replies."""
    client = gw.connect()
    client.messages()
    client.protocol.pauseProducing()
    for i in range(frames):
        client.sendJSON({"type": "request", "requestId": f"r-{i}", "requestType": "echo",
                         "payload": "x" * frameBytes})
    gw.settle()
    return client


def test_a_client_that_does_not_read_is_closed_with_1008_past_the_cap(clock: Clock) -> None:
    gw = Gateway(clock, maxSendBufferBytes=10_000)
    slow: list[Any] = []
    gw.bus.serve(["slow"], _Recorder(slow), 10)
    client = gw.connect()
    client.messages()
    client.sendJSON({"type": "request", "requestId": "pending", "requestType": "slow"})
    gw.settle()
    client.protocol.pauseProducing()
    with ClientLogEvents() as log:
        for i in range(4):  # 4 replies of about 3,000 bytes: the fourth crosses 10,000
            client.sendJSON({"type": "request", "requestId": f"r-{i}", "requestType": "echo",
                             "payload": "x" * 3000})
            gw.settle()
    frames = client.frames()
    assert [op for op, _ in frames] == [OPCODE_TEXT] * 3 + [OPCODE_CLOSE]
    assert struct.unpack("!H", frames[-1][1][:2])[0] == 1008
    # its requests end at once (the worker is told), nothing more is queued for it
    assert len(gw.table) == 0
    assert [n.reason for n in _Recorder.cancels(slow)] == ["disconnected"]
    client.protocol.sendResponse("r-0", "late")
    assert client.frames() == []
    assert any("unread" in m for m in log.gatewayLines())


def test_a_client_that_catches_up_starts_a_fresh_count(clock: Clock) -> None:
    gw = Gateway(clock, maxSendBufferBytes=10_000)
    client = fillSlowReader(gw, frames=3, frameBytes=3000)
    client.protocol.resumeProducing()
    client.protocol.pauseProducing()
    for i in range(3):
        client.sendJSON({"type": "request", "requestId": f"again-{i}", "requestType": "echo",
                         "payload": "x" * 3000})
    gw.settle()
    assert [op for op, _ in client.frames()] == [OPCODE_TEXT] * 6
    assert client.isOpen


def test_connections_over_the_cap_are_refused_with_503_until_one_closes(clock: Clock) -> None:
    gw = Gateway(clock, maxConnections=2)
    first, _second = gw.connect(), gw.connect()
    third = Client(gw.factory)
    assert third.handshake().startswith(b"HTTP/1.1 503 ")
    assert gw.factory.connectionsRefused == 1 and gw.factory.admitted == 2
    third.protocol.connectionLost(Failure(ConnectionResetError()))
    assert gw.factory.admitted == 2  # a refused handshake was never counted
    first.protocol.connectionLost(Failure(ConnectionResetError()))
    assert gw.factory.admitted == 1
    assert gw.connect().isOpen


def test_handshakes_in_progress_count_toward_the_cap(clock: Clock) -> None:
    gw = Gateway(clock, maxConnections=1)
    halfway = Client(gw.factory)
    halfway.protocol.onConnect(ConnectionRequest(  # admitted, not yet open
        peer="tcp:127.0.0.1:50000", headers={}, host="127.0.0.1:8080", path="/ws", params={},
        version=13, origin=None, protocols=[], extensions=[]))
    refused = Client(gw.factory)
    assert refused.handshake().startswith(b"HTTP/1.1 503 ")


def test_message_over_the_limit_ends_the_connection(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.send(b'"' + b"x" * LIMITS.maxMessageBytes + b'"')
    assert not client.isOpen
    assert len(gw.table) == 0


def test_message_of_exactly_the_limit_is_accepted(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    frame = json.dumps({"type": "request", "requestId": "r-1", "requestType": "echo",
                        "payload": ""}).encode()
    frame = frame[:-len(b'""}')] + b'"' + b"x" * (LIMITS.maxMessageBytes - len(frame)) + b'"}'
    assert len(frame) == LIMITS.maxMessageBytes
    client.send(frame)
    gw.settle()
    [response] = client.messages()
    assert response["type"] == "response"
    assert client.isOpen




# A request's frames are held to maxMessageBytes at the edge (IClientConnection raises before
# anything is sent; the table's reaction is in test_correlation.py)


def openClient(gw: Gateway) -> Client:
    client = gw.connect()
    client.messages()  # the hello
    return client


def sender(client: Client, kind: str) -> Any:
    if kind == "chunk":
        return lambda data: client.protocol.sendChunk("r-1", 0, data)
    return lambda data: client.protocol.sendResponse("r-1", data)


def overhead(kind: str) -> int:
    """Bytes of a chunk or response frame of r-1 around its data (here an empty string)."""
    return len(chunkFrame("r-1", 0, "") if kind == "chunk" else responseFrame("r-1", ""))


@pytest.mark.parametrize("kind", ["chunk", "response"])
def test_a_frame_of_exactly_the_limit_is_sent_and_one_byte_more_is_refused(
        gw: Gateway, kind: str) -> None:
    client = openClient(gw)
    send = sender(client, kind)
    send("x" * (LIMITS.maxMessageBytes - overhead(kind)))
    [(opcode, payload)] = client.frames()
    assert opcode == OPCODE_TEXT and len(payload) == LIMITS.maxMessageBytes
    assert json.loads(payload)["type"] == kind
    with pytest.raises(RelaybusError) as refused:
        send("x" * (LIMITS.maxMessageBytes - overhead(kind) + 1))
    assert refused.value.asDict() == {
        "code": "payload_too_large",
        "message": "the worker's reply is larger than the client's limit of 4096 bytes"}
    assert client.frames() == []  # nothing was sent
    assert client.isOpen


@pytest.mark.parametrize("data", ["report-\udcff", float("nan"), {"x": float("inf")}],
                         ids=["lone-surrogate", "nan", "infinity"])
@pytest.mark.parametrize("kind", ["chunk", "response"])
def test_data_that_cannot_be_json_is_refused_as_handler_error(gw: Gateway, kind: str,
                                                              data: Any) -> None:
    client = openClient(gw)
    with pytest.raises(RelaybusError) as refused:
        sender(client, kind)(data)
    assert refused.value.asDict() == {"code": "handler_error",
                                      "message": "the worker's reply cannot be sent as JSON"}
    assert client.frames() == []


def test_an_error_frame_is_never_larger_than_the_limit_and_keeps_its_code(gw: Gateway) -> None:
    client = openClient(gw)
    fits = RelaybusError("handler_error", "m" * 1000)
    client.protocol.sendError("r-1", fits)
    # 1,024 four-byte characters (the longest message an error carries): over 4,096 bytes
    tooLong = RelaybusError("bad_request", "\U0001F600" * 2000)
    client.protocol.sendError("r-2", tooLong)
    frames = client.frames()
    assert all(len(payload) <= LIMITS.maxMessageBytes for _, payload in frames)
    assert [json.loads(payload) for _, payload in frames] == [
        {"type": "error", "requestId": "r-1", "error": fits.asDict()},
        {"type": "error", "requestId": "r-2",
         "error": {"code": "bad_request", "message": "the error message was too long to send"}}]


def handedToTheWorker(gw: Gateway) -> tuple[Client, Any, Any, Any]:
    """A client whose request r-1 is with the test's worker: (client, request, stream, work)."""
    client = openClient(gw)
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "fake"})
    gw.settle()
    [(request, stream, work)] = gw.handler.calls
    return client, request, stream, work


def test_a_worker_error_reply_within_the_limit_never_makes_a_frame_over_it(gw: Gateway) -> None:
    client, _request, _stream, work = handedToTheWorker(gw)
    # 4,056 bytes of message: the worker's reply fits the limit, an error frame of it does not
    work.errback(RelaybusError("handler_error", "\U0001F600" * 1014))
    gw.settle()
    [(_, payload)] = client.frames()
    assert len(payload) <= LIMITS.maxMessageBytes
    assert json.loads(payload)["error"] == {"code": "handler_error",
                                            "message": "the error message was too long to send"}
    assert len(gw.table) == 0


def test_a_worker_chunk_over_the_clients_limit_ends_the_request_and_stops_the_worker(
        gw: Gateway) -> None:
    client, request, stream, _work = handedToTheWorker(gw)
    stream.sendChunk("x" * (LIMITS.maxMessageBytes - 2))  # the reply fits, its frame does not
    gw.settle()
    [error] = client.messages()
    assert error["requestId"] == "r-1" and error["error"]["code"] == "payload_too_large"
    assert gw.handler.cancelled == [request]  # the worker was told, and stopped it
    assert len(gw.table) == 0


def test_a_worker_response_over_the_clients_limit_becomes_payload_too_large(
        gw: Gateway) -> None:
    client, _request, _stream, work = handedToTheWorker(gw)
    work.callback("x" * (LIMITS.maxMessageBytes - 2))
    gw.settle()
    [error] = client.messages()
    assert error["requestId"] == "r-1" and error["error"]["code"] == "payload_too_large"
    assert gw.handler.cancelled == []
    assert len(gw.table) == 0


def closeCode(client: Client) -> int | None:
    closes = [payload for opcode, payload in client.frames() if opcode == OPCODE_CLOSE]
    return struct.unpack("!H", closes[0][:2])[0] if closes else None


def test_message_over_the_limit_closes_with_1009(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.send(b'"' + b"x" * LIMITS.maxMessageBytes + b'"')
    assert closeCode(client) == 1009


def test_text_frame_that_is_not_utf8_closes_with_1007(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.send(b'{"type":"cancel","requestId":"\xff"}')
    assert closeCode(client) == 1007


@pytest.mark.parametrize("closePayload", [
    struct.pack("!H", 5000), struct.pack("!H", 1005), b"\x03", struct.pack("!H", 1000) + b"\xff",
], ids=["code-5000", "code-1005", "one-byte", "reason-not-utf8"])
def test_malformed_close_frame_is_answered_with_a_close_code_before_the_hang_up(
        gw: Gateway, closePayload: bytes) -> None:
    client = gw.connect()
    client.messages()
    client.send(closePayload, OPCODE_CLOSE)
    assert closeCode(client) in (1002, 1007)  # our close frame was flushed, not discarded
    assert client.transport.disconnecting and not client.transport.disconnected
    gw.clock.advance(5)  # a client that never reads it is not waited on for long
    assert client.transport.disconnected


def test_a_normal_close_handshake_does_not_leave_a_timer(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.send(struct.pack("!H", 1000), OPCODE_CLOSE)
    assert closeCode(client) == 1000
    client.protocol.connectionLost(Failure(ConnectionResetError()))
    assert gw.clock.getDelayedCalls() == []


def test_a_client_that_answers_no_ping_is_dropped(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    gw.clock.advance(gw.config.autoPingIntervalS)
    assert [op for op, _ in client.frames()] == [0x9]  # a ping
    assert client.isOpen
    gw.clock.advance(gw.config.autoPingTimeoutS)
    assert client.transport.disconnected


def test_a_client_that_answers_pings_stays(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    for _ in range(3):
        gw.clock.advance(gw.config.autoPingIntervalS)
        [(opcode, payload)] = client.frames()
        assert opcode == 0x9
        client.send(payload, 0xA)  # the pong
        gw.clock.advance(gw.config.autoPingTimeoutS)
        assert client.isOpen


def test_a_handshake_that_never_finishes_is_dropped(gw: Gateway) -> None:
    client = Client(gw.factory)
    client.protocol.dataReceived(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and no more
    gw.clock.advance(gw.config.openHandshakeTimeoutS)
    assert client.transport.disconnected
    assert gw.factory.admitted == 0


def test_text_frame_that_is_not_utf8_ends_the_connection(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.send(b'{"type":"cancel","requestId":"\xff"}')
    assert not client.isOpen


def test_connection_lost_cancels_its_requests_and_sends_nothing(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    # a request the worker will not get to: nobody consumes "slow"
    slow: list[Any] = []
    gw.bus.serve(["slow"], _Recorder(slow), 10)
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "slow"})
    gw.settle()
    assert len(gw.table) == 1 and len(slow) == 1
    written = len(client.transport.value())
    client.protocol.connectionLost(Failure(ConnectionResetError("peer gone")))
    gw.settle()
    assert len(client.transport.value()) == written  # nothing written to the dead socket
    assert len(gw.table) == 0 and gw.table.connectionCount() == 0
    assert client.protocol not in gw.factory.connections
    assert [n.reason for n in _Recorder.cancels(slow)] == ["disconnected"]


def test_frames_after_close_are_dropped(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    client.protocol.connectionLost(Failure(ConnectionResetError()))
    written = len(client.transport.value())
    client.protocol.sendChunk("r-1", 0, "late")
    client.protocol.sendResponse("r-1", "late")
    client.protocol.sendError("r-1", RelaybusError("cancelled", "late"))
    assert len(client.transport.value()) == written


def test_bad_frame_with_a_lone_surrogate_request_id_costs_one_error_frame(gw: Gateway) -> None:
    client = gw.connect()
    client.messages()
    raised = None
    try:
        client.send(b'{"type":"request","requestId":"\\ud800","requestType":"bad type"}')
    except Exception as e:  # Twisted would log it and drop the connection
        raised = e
    assert raised is None, f"dataReceived raised {raised!r}: the connection would be dropped"
    assert [m["type"] for m in client.messages()] == ["error"]
    assert client.isOpen


class _Recorder:
    """A request receiver that keeps deliveries and cancel notices in one list."""

    def __init__(self, into: list[Any]) -> None:
        self.into = into

    def requestReceived(self, delivery: Any) -> None:
        self.into.append(delivery)

    def cancelReceived(self, notice: Any) -> None:
        self.into.append(notice)

    def busInterrupted(self, reason: Any) -> None:
        pass

    @staticmethod
    def cancels(into: list[Any]) -> list[Any]:
        from relaybus.messages import CancelNotice

        return [item for item in into if isinstance(item, CancelNotice)]


def test_requests_over_the_connection_rate_end_at_once_with_retry_after(clock: Clock) -> None:
    limits = attrs.evolve(LIMITS, requestsPerSecond=2, requestsBurst=3)
    bus = MemoryBus(clock)
    bus.startService()
    runtime = WorkerRuntime(bus, {"echo": EchoHandler()}, clock)
    runtime.startService()
    table = CorrelationTable(bus, clock, limits, "gw-test")
    factory = GatewayFactory(GatewayConfig(gatewayId="gw-test", limits=limits), table, clock)
    client, other = Client(factory), Client(factory)
    for each in (client, other):
        each.handshake()
        [hello] = each.messages()
        assert (hello["limits"]["requestsPerSecond"], hello["limits"]["requestsBurst"]) == (2, 3)
    for i in range(5):
        client.sendJSON({"type": "request", "requestId": f"r-{i}", "requestType": "echo",
                         "payload": i})
    refused = [m for m in client.messages() if m["type"] == "error"]
    assert [m["requestId"] for m in refused] == ["r-3", "r-4"]
    assert refused[0]["error"] == {
        "code": "overloaded", "message": "request rate limit (2/s, burst 3) exceeded",
        "retryAfterMs": 500}
    assert factory.requestsRateLimited == 2
    other.sendJSON({"type": "request", "requestId": "o-1", "requestType": "echo"})
    clock.advance(0.5)  # one token back for the first connection; the other has its own
    client.sendJSON({"type": "request", "requestId": "r-5", "requestType": "echo"})
    for _ in range(5):
        clock.advance(0)
    assert {m["requestId"] for m in client.messages() if m["type"] == "response"} >= {"r-5"}
    assert [m["type"] for m in other.messages()] == ["response"]
