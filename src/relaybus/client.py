"""A Python client for the gateway: one WebSocket, many concurrent calls, Deferreds throughout.

    client = yield connect("ws://127.0.0.1:8080/ws")
    data = yield client.call("testRequest", {"count": 3}, onChunk=print, timeout=10)

A failed call fails with RelaybusError carrying the protocol's code, or one of two codes of
the client's own: `disconnected` (the socket dropped before the request ended) and `timeout`
(also raised locally when the gateway does not answer by the deadline plus a grace period).
Cancelling the Deferred of a call sends a `cancel` frame.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from typing import Any

import attrs
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.util import parse_url
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.strictjson import decodeJSON, encodeJSON

log = Logger(namespace="relaybus.client")

DISCONNECTED = "disconnected"
LOCAL_TIMEOUT_GRACE_S = 2.0


@attrs.define(eq=False)
class _Call:
    result: Deferred[Any]
    onChunk: Callable[[Any], Any] | None
    nextSeq: int = 0
    timer: IDelayedCall | None = None


class ClientProtocol(WebSocketClientProtocol):
    """Autobahn's side of one client connection: decoded frames to the RelaybusClient."""

    client: RelaybusClient

    def onOpen(self) -> None:
        self.client.connectionOpened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = decodeJSON(payload)
        except (ValueError, UnicodeDecodeError):
            log.error("The gateway sent a frame that is not JSON")
            return
        if isinstance(frame, dict):
            self.client.frameReceived(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.client.connectionClosed(code, reason)


class RelaybusClient:
    """The requests of one connection. Its protocol reports to it through connectionOpened,
    frameReceived and connectionClosed (unit tests call those with a fake protocol)."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._protocol: ClientProtocol | None = None
        self._calls: dict[str, _Call] = {}
        self.hello: dict[str, Any] | None = None
        self.whenReady: Deferred[RelaybusClient] = Deferred()
        self.whenClosed: Deferred[tuple[int | None, str | None]] = Deferred()

    @property
    def maxMessageBytes(self) -> int:
        """The gateway's limit from its hello frame: bigger requests fail here, not there."""
        limits = (self.hello or {}).get("limits") or {}
        return int(limits.get("maxMessageBytes") or 0) or 2**31

    @property
    def inFlight(self) -> int:
        """Calls sent and not yet ended."""
        return len(self._calls)

    @property
    def connected(self) -> bool:
        return (self._protocol is not None and self.hello is not None
                and self._protocol.state == WebSocketProtocol.STATE_OPEN)

    def call(self, requestType: str, payload: Any = None,
             onChunk: Callable[[Any], Any] | None = None,
             timeout: float | None = None) -> Deferred[Any]:
        """Send one request; the Deferred fires with the final response's data."""
        if not self.connected:
            return fail(RelaybusError(DISCONNECTED, "not connected to the gateway"))
        requestId = secrets.token_hex(8)
        result: Deferred[Any] = Deferred(lambda _: self._cancel(requestId))
        call = _Call(result, onChunk)
        frame: dict[str, Any] = {"type": "request", "requestId": requestId,
                                 "requestType": requestType, "payload": payload}
        if timeout is not None:
            frame["timeoutMs"] = max(1, int(timeout * 1000))
        try:
            encoded = encodeJSON(frame)
        except ValueError as e:
            return fail(RelaybusError(ErrorCode.BAD_REQUEST, f"payload: {e}"))
        if len(encoded) > self.maxMessageBytes:
            return fail(RelaybusError(ErrorCode.PAYLOAD_TOO_LARGE,
                                      f"the request is {len(encoded)} bytes; the gateway "
                                      f"accepts at most {self.maxMessageBytes}"))
        if timeout is not None:
            call.timer = self._reactor.callLater(timeout + LOCAL_TIMEOUT_GRACE_S, self._end,
                                                 requestId, RelaybusError(
                                                     ErrorCode.TIMEOUT,
                                                     "no answer from the gateway in time"), True)
        self._calls[requestId] = call
        assert self._protocol is not None
        self._protocol.sendMessage(encoded, isBinary=False)
        return result

    def log(self, level: str, message: str, context: dict[str, Any] | None = None) -> None:
        """Ship one log line to the gateway (a `client-log` frame)."""
        frame: dict[str, Any] = {"type": "client-log", "level": level, "message": message,
                                 "timestamp": self._reactor.seconds() * 1000}
        if context is not None:
            frame["context"] = context
        self._send(frame)

    def close(self) -> Deferred[tuple[int | None, str | None]]:
        if self._protocol is not None:
            self._protocol.sendClose(1000)
        return self.whenClosed

    # Internals

    def _send(self, frame: dict[str, Any]) -> None:
        if self._protocol is None:
            raise RelaybusError(DISCONNECTED, "not connected to the gateway")
        self._protocol.sendMessage(encodeJSON(frame), isBinary=False)

    def _cancel(self, requestId: str) -> None:
        if self._calls.pop(requestId, None) is not None and self._protocol is not None:
            self._send({"type": "cancel", "requestId": requestId})

    def _end(self, requestId: str, outcome: Any, sendCancel: bool = False) -> None:
        call = self._calls.pop(requestId, None)
        if call is None:
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        if sendCancel and self._protocol is not None:
            self._send({"type": "cancel", "requestId": requestId})
        if isinstance(outcome, RelaybusError):
            call.result.errback(Failure(outcome))
        else:
            call.result.callback(outcome)

    # What the protocol reports

    def connectionOpened(self, protocol: ClientProtocol) -> None:
        self._protocol = protocol

    def frameReceived(self, frame: dict[str, Any]) -> None:
        kind, requestId = frame.get("type"), frame.get("requestId")
        if kind == "hello":
            self.hello = frame
            if not self.whenReady.called:
                self.whenReady.callback(self)
            return
        if kind == "error" and requestId is None:
            log.error("The gateway refused a frame: {error}", error=frame.get("error"))
            return
        if not isinstance(requestId, str) or requestId not in self._calls:
            return
        call = self._calls[requestId]
        if kind == "chunk":
            if frame.get("seq") != call.nextSeq:
                log.error("Chunk {seq} out of order (expected {expected})",
                          seq=frame.get("seq"), expected=call.nextSeq)
            call.nextSeq += 1
            if call.onChunk is not None:
                try:
                    call.onChunk(frame.get("data"))
                except Exception as e:  # the caller's bug ends this call only
                    log.failure("onChunk failed for {requestId}", requestId=requestId)
                    self._end(requestId, RelaybusError(
                        ErrorCode.CANCELLED, f"onChunk raised {e!r}; the request was cancelled"),
                        sendCancel=True)
        elif kind == "response":
            self._end(requestId, frame.get("data"))
        elif kind == "error":
            error = frame.get("error") or {}
            if error.get("code") == ErrorCode.DUPLICATE_REQUEST_ID:
                return  # about a second frame with this id; the original goes on
            self._end(requestId, RelaybusError(str(error.get("code")),
                                               str(error.get("message"))))

    def connectionClosed(self, code: int | None, reason: str | None) -> None:
        self._protocol = None
        for requestId in list(self._calls):
            self._end(requestId, RelaybusError(
                DISCONNECTED, f"the connection closed ({code}: {reason}) before the request ended"))
        if not self.whenReady.called:
            self.whenReady.errback(_refusedHandshake(code, reason))
        if not self.whenClosed.called:
            self.whenClosed.callback((code, reason))


_HTTP_REFUSAL = re.compile(r"upgrade failed \[(\d{3})\]: ([^\"]{0,200})")


def _refusedHandshake(code: int | None, reason: str | None) -> RelaybusError:
    """A 401 (the gateway refused the token) is `unauthorized`; anything else before hello
    is `disconnected`. Autobahn reports the HTTP status as "upgrade failed [401]: token
    expired"."""
    refusal = _HTTP_REFUSAL.search(reason or "")
    if refusal is not None and refusal.group(1) == "401":
        return RelaybusError(ErrorCode.UNAUTHORIZED, refusal.group(2))
    detail = f"HTTP {refusal.group(1)} {refusal.group(2)}" if refusal else f"close code {code}"
    return RelaybusError(DISCONNECTED, f"the connection closed before the gateway said hello "
                                       f"({detail})")


def connect(url: str, reactor: Any = None, timeout: float = 10.0,
            maxMessageBytes: int = 16 * 1024 * 1024,
            token: str | None = None) -> Deferred[RelaybusClient]:
    """Open a WebSocket to a gateway; fires once its hello frame has arrived. `token` is a
    JWT for a gateway that authenticates, sent as `Authorization: Bearer`."""
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    isSecure, host, port, _resource, _path, _params = parse_url(url)
    client = RelaybusClient(reactor)

    class Protocol(ClientProtocol):
        pass

    Protocol.client = client
    headers = {"Authorization": f"Bearer {token}"} if token else None
    factory = WebSocketClientFactory(url, reactor=reactor, headers=headers)
    factory.protocol = Protocol
    factory.setProtocolOptions(maxMessagePayloadSize=maxMessageBytes,
                               maxFramePayloadSize=maxMessageBytes,
                               openHandshakeTimeout=timeout)
    endpoint: Any = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if isSecure:
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    connecting = endpoint.connect(factory)

    def connected(_: Any) -> Deferred[RelaybusClient]:
        return client.whenReady

    ready = connecting.addCallback(connected)
    ready.addTimeout(timeout, reactor)

    def failed(failure: Failure) -> Failure:
        if client._protocol is not None:
            client._protocol.dropConnection(abort=True)
        if failure.check(RelaybusError):
            return failure
        why = "timed out" if failure.check(CancelledError) else failure.getErrorMessage()
        return Failure(RelaybusError(DISCONNECTED, f"could not connect to {url}: {why}"))

    return ready.addErrback(failed)
