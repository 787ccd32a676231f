"""The kit's two connections: a WebSocket to the gateway it started, and its own AMQP connection
to the author's broker (where it acts as a gateway itself, to see exactly what the worker sends).

Both are synchronous, so that each scenario reads as a list of steps; every wait has a timeout.
The WebSocket runs on a Twisted reactor in a thread of its own (Autobahn is the WebSocket
library relaybus already depends on); the AMQP connection is pika's BlockingConnection on the
calling thread, pumped by every wait (so its heartbeats go on while the kit waits for frames).
"""

from __future__ import annotations

import contextlib
import queue
import secrets
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pika
import pika.data
from pika.adapters.blocking_connection import BlockingChannel, BlockingConnection
from pika.exceptions import AMQPError

from relaybus.amqp.codec import (
    HEADER_CANCEL_REASON,
    HEADER_CLAIMS,
    HEADER_DEADLINE_MS,
    HEADER_GATEWAY_ID,
    HEADER_PRINCIPAL,
    HEADER_REQUEST_TYPE,
)
from relaybus.amqp.topology import REPLY_QUEUE_EXPIRES_MS, Topology
from relaybus.strictjson import decodeJSON, encodeJSON

PUMP_S = 0.02


class KitError(Exception):
    """What a scenario saw that the document does not allow (the table shows the message)."""


def safeURL(url: str) -> str:
    """The broker URL without its password, for the table's heading."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# AMQP integers of a chosen width (pika picks 32 or 64 bits by value; the kit sends them all)

_INTEGER_FORMATS = {b"b": "b", b"B": "B", b"s": "h", b"u": "H", b"I": "i", b"i": "I",
                    b"l": "q"}


@attrs.frozen
class AmqpInteger:
    """A header value encoded as the AMQP field type `kind` (b B s u I i l)."""

    kind: bytes
    value: int

    def encode(self) -> bytes:
        return struct.pack(">c" + _INTEGER_FORMATS[self.kind], self.kind, self.value)


_encodeValue = pika.data.encode_value
_patchLock = threading.Lock()


def _encodeWithWidths(pieces: list[bytes], value: Any) -> int:
    if isinstance(value, AmqpInteger):
        encoded = value.encode()
        pieces.append(encoded)
        return len(encoded)
    if isinstance(value, float):  # pika 1.4 cannot encode a double in a table
        pieces.append(struct.pack(">cd", b"d", value))
        return 9
    if isinstance(value, dict):  # a nested table: its values may be ours too
        pieces.append(b"F")
        return 1 + int(pika.data.encode_table(pieces, value))
    if isinstance(value, list):
        inner: list[bytes] = []
        for item in value:
            _encodeWithWidths(inner, item)
        joined = b"".join(inner)
        pieces.append(struct.pack(">cI", b"A", len(joined)) + joined)
        return 5 + len(joined)
    return int(_encodeValue(pieces, value))


@contextlib.contextmanager
def integerWidths() -> Iterator[None]:
    """While publishing: pika's table encoder also writes AmqpInteger values and doubles."""
    with _patchLock:
        pika.data.encode_value = _encodeWithWidths
        try:
            yield
        finally:
            pika.data.encode_value = _encodeValue


# The kit's AMQP side


@attrs.define
class Reply:
    kind: str | None
    body: bytes
    properties: pika.BasicProperties
    at: float

    @property
    def data(self) -> Any:
        return decodeJSON(self.body)

    @property
    def seq(self) -> Any:
        return (self.properties.headers or {}).get("relaybus-seq")

    def describe(self) -> str:
        body = self.body[:120].decode("utf-8", "replace")
        return f"{self.kind} {body}"


DEFAULT = object()  # "as a gateway would send it" for publishRequest's header arguments


class KitBroker:
    """The kit's own AMQP connection: its reply queue (like a gateway's), requests and cancel
    notices published directly to the worker, and passive declares of the worker's topology."""

    def __init__(self, url: str, prefix: str, timeoutS: float) -> None:
        self.topology = Topology(prefix)
        self.timeoutS = timeoutS
        parameters = pika.URLParameters(url)
        parameters.socket_timeout = timeoutS
        parameters.stack_timeout = timeoutS
        parameters.blocked_connection_timeout = timeoutS
        parameters.client_properties = {"connection_name": "relaybus conformance kit"}
        self.connection = BlockingConnection(parameters)
        self.kitId = f"conformance-kit-{secrets.token_hex(6)}"
        self.replies: dict[str, list[Reply]] = {}
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.replyQueue = self.topology.replyQueue(self.kitId)

    def listen(self) -> None:
        """Declare and consume the kit's reply queue. Its binding needs the responses
        exchange: call this once the kit's gateway has declared it (the kit itself declares
        nothing of the worker's before the topology scenario has looked at it)."""
        self.channel.queue_declare(self.replyQueue, durable=False, exclusive=False,
                                   auto_delete=False,
                                   arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
        self.channel.queue_bind(self.replyQueue, self.topology.responsesExchange,
                                routing_key=self.kitId)
        self.channel.basic_consume(self.replyQueue, self._replyArrived, auto_ack=True)

    def close(self) -> None:
        with contextlib.suppress(AMQPError, OSError):
            if self.channel.is_open:
                self.channel.queue_delete(self.replyQueue)
        with contextlib.suppress(AMQPError, OSError):
            if self.connection.is_open:
                self.connection.close()

    def _replyArrived(self, _channel: BlockingChannel, _method: Any,
                      properties: pika.BasicProperties, body: bytes) -> None:
        key = properties.correlation_id or ""
        self.replies.setdefault(key, []).append(Reply(properties.type, body, properties,
                                                      time.monotonic()))

    def pump(self, seconds: float = PUMP_S) -> None:
        self.connection.process_data_events(time_limit=seconds)

    # Requests and cancel notices

    def publishRequest(self, requestType: str, payload: Any = None, *, body: bytes | None = None,
                       correlationId: Any = DEFAULT, replyTo: Any = DEFAULT,
                       deadlineMs: Any = DEFAULT, timeoutS: float = 30.0,
                       expiration: Any = DEFAULT, headers: dict[str, Any] | None = None,
                       dropHeaders: tuple[str, ...] = ()) -> str:
        """Publish one request as a gateway does (mandatory, confirmed), with any field
        overridden; returns its correlation id. `deadlineMs=None` leaves the header void;
        drop a header with `dropHeaders`."""
        correlationId = secrets.token_hex(16) if correlationId is DEFAULT else correlationId
        nowMs = int(time.time() * 1000)
        if deadlineMs is DEFAULT:
            deadlineMs = nowMs + int(timeoutS * 1000)
        if expiration is DEFAULT:
            expiration = str(max(1, int(timeoutS * 1000)))
        allHeaders: dict[str, Any] = {
            HEADER_REQUEST_TYPE: requestType, HEADER_DEADLINE_MS: deadlineMs,
            HEADER_GATEWAY_ID: self.kitId, HEADER_PRINCIPAL: None, HEADER_CLAIMS: None,
            **(headers or {})}
        for name in dropHeaders:
            allHeaders.pop(name, None)
        properties = pika.BasicProperties(
            content_type="application/json", delivery_mode=1,
            correlation_id=correlationId or None,
            reply_to=(self.kitId if replyTo is DEFAULT else replyTo) or None,
            expiration=expiration, type="request", timestamp=nowMs // 1000,
            headers=allHeaders)
        with integerWidths():
            self.channel.basic_publish(self.topology.requestsExchange, requestType,
                                       encodeJSON(payload) if body is None else body,
                                       properties, mandatory=True)
        return str(correlationId)

    def publishCancel(self, requestType: str, correlationId: str,
                      reason: str = "cancelled") -> None:
        properties = pika.BasicProperties(delivery_mode=1, correlation_id=correlationId,
                                          type="cancel",
                                          headers={HEADER_CANCEL_REASON: reason})
        self.channel.basic_publish(self.topology.cancelsExchange, requestType, b"", properties)

    # Replies

    def repliesOf(self, correlationId: str) -> list[Reply]:
        return self.replies.get(correlationId, [])

    def finalReply(self, correlationId: str, timeoutS: float | None = None) -> Reply:
        """Wait for the request's final reply (response or error)."""
        def final() -> Reply | None:
            for reply in self.repliesOf(correlationId):
                if reply.kind in ("response", "error"):
                    return reply
            return None

        found = self.waitFor(final, f"the worker's final reply to {correlationId[:8]}",
                             timeoutS)
        assert found is not None
        return found

    def waitFor(self, condition: Callable[[], Any], what: str,
                timeoutS: float | None = None, pumps: Callable[[], None] | None = None) -> Any:
        deadline = time.monotonic() + (self.timeoutS if timeoutS is None else timeoutS)
        while True:
            result = condition()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise KitError(f"no {what} within {timeoutS or self.timeoutS:g} s")
            self.pump()
            if pumps is not None:
                pumps()

    def quietFor(self, seconds: float, pumps: Callable[[], None] | None = None) -> None:
        """Keep the connections alive for a while (to let stray replies arrive)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(min(PUMP_S, max(0.0, end - time.monotonic())))
            if pumps is not None:
                pumps()

    # Passive looks at the worker's topology (a failed declare closes its channel)

    def _onFreshChannel(self, action: Callable[[BlockingChannel], Any]) -> Any:
        channel = self.connection.channel()
        try:
            return action(channel)
        finally:
            with contextlib.suppress(AMQPError):
                if channel.is_open:
                    channel.close()

    def queueCounts(self, name: str) -> tuple[int, int]:
        """(messages ready, consumers) of a queue; KitError when it does not exist."""
        try:
            method = self._onFreshChannel(
                lambda ch: ch.queue_declare(name, passive=True).method)
        except AMQPError as e:
            raise KitError(f"queue {name!r}: {_amqpReason(e)}") from None
        return int(method.message_count), int(method.consumer_count)

    def exchangeExists(self, name: str) -> None:
        try:
            self._onFreshChannel(lambda ch: ch.exchange_declare(name, passive=True))
        except AMQPError as e:
            raise KitError(f"exchange {name!r}: {_amqpReason(e)}") from None

    def redeclareExchange(self, name: str) -> None:
        """Declare it with the documented arguments: refused (406) if the worker's differ."""
        try:
            self._onFreshChannel(lambda ch: ch.exchange_declare(
                name, exchange_type="direct", durable=True, auto_delete=False, internal=False,
                arguments={}))
        except AMQPError as e:
            raise KitError(f"exchange {name!r} redeclared as documented: "
                           f"{_amqpReason(e)}") from None

    def redeclareRequestQueue(self, name: str) -> None:
        try:
            self._onFreshChannel(lambda ch: ch.queue_declare(
                name, durable=True, exclusive=False, auto_delete=False, arguments={}))
        except AMQPError as e:
            raise KitError(f"queue {name!r} redeclared as documented: "
                           f"{_amqpReason(e)}") from None

    # Redelivery: take one request from the worker's queue, then give it back unacked

    @contextlib.contextmanager
    def interceptor(self, queueName: str) -> Iterator[list[Any]]:
        """A consumer of the worker's request queue with a higher priority than any worker's
        (x-priority), prefetch 1, manual acks: the next request published there comes to the
        kit. Leaving the block closes its channel without an ack, so the broker hands that
        request to the worker with redelivered = true."""
        channel = self.connection.channel()
        taken: list[Any] = []
        try:
            channel.basic_qos(prefetch_count=1)
            channel.basic_consume(queueName, lambda _ch, method, properties, _body: taken.append(
                (method, properties)), auto_ack=False, arguments={"x-priority": 1_000_000})
            yield taken
        finally:
            with contextlib.suppress(AMQPError):
                if channel.is_open:
                    channel.close()


def _amqpReason(error: AMQPError) -> str:
    args: tuple[Any, ...] = tuple(getattr(error, "args", ()))
    if len(args) >= 2 and isinstance(args[0], int):
        return f"{args[0]} {args[1]}"
    return repr(error)


# The kit's WebSocket side


class _Closed:
    def __init__(self, code: int | None, reason: str | None) -> None:
        self.code = code
        self.reason = reason


class ReactorThread:
    """The global Twisted reactor, running in a daemon thread for the kit's WebSockets."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self._thread = threading.Thread(
            target=self.reactor.run, kwargs={"installSignalHandlers": False},
            name="relaybus-conformance-reactor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(5)


@attrs.define
class Outcome:
    requestId: str
    chunks: list[dict[str, Any]]
    terminal: dict[str, Any]

    @property
    def code(self) -> str | None:
        if self.terminal.get("type") != "error":
            return None
        return str((self.terminal.get("error") or {}).get("code"))

    @property
    def message(self) -> str | None:
        return (self.terminal.get("error") or {}).get("message")

    def describe(self) -> str:
        text = encodeJSON(self.terminal).decode("utf-8")
        return f"{len(self.chunks)} chunks, then {text[:200]}"


class KitSocket:
    """One WebSocket to the gateway: frames are read into `byRequest` by `pump`."""

    def __init__(self, reactorThread: ReactorThread, url: str, timeoutS: float,
                 pump: Callable[[float], None]) -> None:
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.internet.endpoints import HostnameEndpoint
        from twisted.internet.threads import blockingCallFromThread

        self.timeoutS = timeoutS
        self._reactor = reactorThread.reactor
        self._pumpOther = pump
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.byRequest: dict[str, list[dict[str, Any]]] = {}
        self.hello: dict[str, Any] | None = None
        self.closed: _Closed | None = None
        inbox = self.inbox

        class Protocol(WebSocketClientProtocol):
            def onMessage(self, payload: bytes, isBinary: bool) -> None:
                try:
                    inbox.put(decodeJSON(payload))
                except (ValueError, UnicodeDecodeError):
                    inbox.put({"type": "kit-not-json", "raw": payload[:200]})

            def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
                inbox.put(_Closed(code, reason))

        _isSecure, host, port = _hostPort(url)

        def connect() -> Any:
            factory = WebSocketClientFactory(url, reactor=self._reactor)
            factory.protocol = Protocol
            factory.setProtocolOptions(maxMessagePayloadSize=16 * 1024 * 1024,
                                       maxFramePayloadSize=16 * 1024 * 1024,
                                       openHandshakeTimeout=timeoutS)
            d = HostnameEndpoint(self._reactor, host, port, timeout=timeoutS).connect(factory)
            return d.addTimeout(timeoutS, self._reactor)

        self._protocol = blockingCallFromThread(self._reactor, connect)
        hello = self._waitFor(lambda: self.hello, "the gateway's hello frame", timeoutS)
        assert hello is not None

    def pump(self, seconds: float = 0.0) -> None:
        """Move received frames into `byRequest`, waiting up to `seconds` for the first."""
        try:
            item = self.inbox.get(timeout=seconds) if seconds > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._file(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _file(self, item: Any) -> None:
        if isinstance(item, _Closed):
            self.closed = item
        elif isinstance(item, dict):
            if item.get("type") == "hello":
                self.hello = item
            requestId = item.get("requestId")
            if isinstance(requestId, str):
                self.byRequest.setdefault(requestId, []).append(item)

    def _waitFor(self, condition: Callable[[], Any], what: str,
                 timeoutS: float | None = None) -> Any:
        timeoutS = self.timeoutS if timeoutS is None else timeoutS
        deadline = time.monotonic() + timeoutS
        while True:
            result = condition()
            if result:
                return result
            if self.closed is not None:
                raise KitError(f"the gateway closed the WebSocket ({self.closed.code} "
                               f"{self.closed.reason}) while the kit waited for {what}")
            if time.monotonic() >= deadline:
                raise KitError(f"no {what} within {timeoutS:g} s")
            self.pump(PUMP_S)
            self._pumpOther(0.0)

    def send(self, frame: dict[str, Any]) -> None:
        self._reactor.callFromThread(self._protocol.sendMessage, encodeJSON(frame), False)

    def request(self, requestType: str, payload: Any = None,
                timeoutMs: int | None = None) -> str:
        requestId = f"kit-{secrets.token_hex(6)}"
        frame: dict[str, Any] = {"type": "request", "requestId": requestId,
                                 "requestType": requestType, "payload": payload}
        if timeoutMs is not None:
            frame["timeoutMs"] = timeoutMs
        self.send(frame)
        return requestId

    def cancel(self, requestId: str) -> None:
        self.send({"type": "cancel", "requestId": requestId})

    def waitForChunks(self, requestId: str, count: int = 1,
                      timeoutS: float | None = None) -> None:
        self._waitFor(lambda: sum(f.get("type") == "chunk"
                                  for f in self.byRequest.get(requestId, [])) >= count,
                      f"chunk {count - 1} of {requestId}", timeoutS)

    def collect(self, requestId: str, timeoutS: float | None = None) -> Outcome:
        """The request's chunks and terminal frame; KitError on anything else, on a chunk
        after the terminal frame, or on seqs that are not 0, 1, 2, ..."""
        def ended() -> bool:
            return any(f.get("type") in ("response", "error")
                       for f in self.byRequest.get(requestId, []))

        self._waitFor(ended, f"the terminal frame of {requestId}", timeoutS)
        frames = self.byRequest[requestId]
        chunks: list[dict[str, Any]] = []
        for frame in frames:
            if frame.get("type") == "chunk":
                if frame.get("seq") != len(chunks):
                    raise KitError(f"{requestId}: chunk seq {frame.get('seq')}, expected "
                                   f"{len(chunks)}")
                chunks.append(frame)
            elif frame.get("type") in ("response", "error"):
                return Outcome(requestId, chunks, frame)
            else:
                raise KitError(f"{requestId}: unexpected frame {frame}")
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._reactor.callFromThread(self._protocol.sendClose, 1000)
        with contextlib.suppress(KitError):
            self._waitFor(lambda: self.closed, "the close handshake", 3.0)

    def framesAfterEnd(self, requestId: str) -> list[dict[str, Any]]:
        frames = self.byRequest.get(requestId, [])
        for i, frame in enumerate(frames):
            if frame.get("type") in ("response", "error"):
                return frames[i + 1:]
        return []


def _hostPort(url: str) -> tuple[bool, str, int]:
    from autobahn.websocket.util import parse_url

    isSecure, host, port, _resource, _path, _params = parse_url(url)
    return bool(isSecure), str(host), int(port)
