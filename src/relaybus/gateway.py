"""The WebSocket edge: frames from clients into the correlation table, frames back out.

Mounted at /ws of a twisted.web Site, so health endpoints (and later metrics, the demo page)
share the one port.
"""

from __future__ import annotations

import secrets
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from relaybus.config import GatewayConfig
from relaybus.correlation import CorrelationTable
from relaybus.frames import (
    CancelFrame,
    ClientLogFrame,
    FrameError,
    RequestFrame,
    errorFrame,
    escapeControlCharacters,
    helloFrame,
    parseClientFrame,
)
from relaybus.interfaces import IClientConnection, IRequestBus

log = Logger(namespace="relaybus.gateway")
clientLog = Logger(namespace="relaybus.client")

CLOSE_GOING_AWAY = 1001


@implementer(IClientConnection)
class GatewayProtocol(WebSocketServerProtocol):
    factory: GatewayFactory
    connectionId: str = ""

    def onOpen(self) -> None:
        self.connectionId = secrets.token_urlsafe(12)
        self.factory.connections.add(self)
        self.deliverFrame(helloFrame(self.connectionId, self.factory.config.limits.forHello()))

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            self._frameReceived(payload, isBinary)
        except Exception:
            # A bug of ours must cost this frame only, never the connection or its requests.
            log.failure("Handling a frame from {connectionId} failed",
                        connectionId=self.connectionId)
            self.deliverFrame(errorFrame(None, FrameError("the gateway could not handle "
                                                          "this frame")))

    def _frameReceived(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = parseClientFrame(payload, isBinary)
        except FrameError as e:
            self.deliverFrame(errorFrame(e.requestId, e))
            return
        if isinstance(frame, RequestFrame):
            self.factory.table.submit(self, frame)
        elif isinstance(frame, CancelFrame):
            self.factory.table.cancel(self, frame.requestId)
        elif isinstance(frame, ClientLogFrame):
            self._recordClientLog(frame)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if self.connectionId:
            self.factory.connections.discard(self)
            self.factory.table.connectionLost(self)

    def deliverFrame(self, frame: bytes) -> None:
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendMessage(frame, isBinary=False)

    def _recordClientLog(self, frame: ClientLogFrame) -> None:
        level = {"debug": clientLog.debug, "info": clientLog.info, "warn": clientLog.warn,
                 "error": clientLog.error}[frame.level]
        level("[{connectionId} {peer}] {message}", connectionId=self.connectionId,
              peer=escapeControlCharacters(str(self.peer)),
              message=escapeControlCharacters(frame.message),
              context=frame.context, clientTimestamp=frame.timestamp)


class GatewayFactory(WebSocketServerFactory):
    protocol = GatewayProtocol  # type: ignore[assignment]

    def __init__(self, config: GatewayConfig, table: CorrelationTable) -> None:
        super().__init__()
        self.config = config
        self.table = table
        self.connections: set[GatewayProtocol] = set()
        # One call with every option: setProtocolOptions resets what it is not given.
        self.setProtocolOptions(
            maxMessagePayloadSize=config.limits.maxMessageBytes,
            maxFramePayloadSize=config.limits.maxMessageBytes,
            autoPingInterval=config.autoPingIntervalS,
            autoPingTimeout=config.autoPingTimeoutS,
            openHandshakeTimeout=config.openHandshakeTimeoutS,
            closeHandshakeTimeout=5,
            allowedOrigins=["*"],
            allowNullOrigin=True,
            # Send a close frame with the reason (1009 too big, 1007 bad UTF-8) rather than
            # dropping TCP, so clients can tell what happened.
            failByDrop=False,
        )

    def closeAll(self, timeoutS: float = 5.0) -> Deferred[Any]:
        """Close every connection with 1001 (going away); fires once they are gone."""
        waits = []
        for connection in list(self.connections):
            waits.append(connection.is_closed)
            try:
                # sendClose() only takes 1000 and 3000-4999; 1001 needs the frame-level call.
                connection.sendCloseFrame(code=CLOSE_GOING_AWAY, isReply=False,
                                          reasonUtf8=b"the gateway is shutting down")
            except Exception:
                log.failure("Closing {connectionId} failed", connectionId=connection.connectionId)
                connection.dropConnection(abort=True)
        return DeferredList(waits, consumeErrors=True)


class _Health(Resource):
    isLeaf = True

    def __init__(self, ready: Any) -> None:
        super().__init__()
        self._ready = ready

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self._ready():
            return b"ok\n"
        request.setResponseCode(503)
        return b"not ready\n"


class _Index(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"relaybus gateway: WebSocket at /ws, protocol in docs/protocol.md\n"


def makeSite(factory: GatewayFactory, bus: IRequestBus, isDraining: Any) -> Site:
    root = Resource()
    root.putChild(b"", _Index())
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"healthz", _Health(lambda: True))
    root.putChild(b"readyz", _Health(lambda: bus.isReady() and not isDraining()))
    return Site(root)
