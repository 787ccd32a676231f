"""The WebSocket edge: frames from clients into the correlation table, frames back out.

Mounted at /ws of a twisted.web Site, so the health endpoints, the demo page and the browser
library share the one port.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from relaybus.admission import (
    CLOSE_TOKEN_EXPIRED,
    FORBIDDEN_STATUS,
    KEYS_UNAVAILABLE_STATUS,
    UNAUTHORIZED_STATUS,
    Authenticator,
    OriginPolicy,
    chosenSubprotocol,
    redactingLogFormatter,
    redactSecrets,
)
from relaybus.config import GatewayConfig
from relaybus.correlation import CorrelationTable
from relaybus.errors import ErrorCode, RelaybusError
from relaybus.frames import (
    AuthFrame,
    CancelFrame,
    ClientFrames,
    ClientLogFrame,
    FrameError,
    RequestFrame,
    authOkFrame,
    errorFrame,
    escapeControlCharacters,
    helloFrame,
    parseClientFrame,
)
from relaybus.httplimits import GatewaySite, RequestLimits
from relaybus.identity import Principal
from relaybus.interfaces import IClientConnection, IRequestBus
from relaybus.ratelimits import PerAddressLimits, TokenBucket, clientAddress

log = Logger(namespace="relaybus.gateway")
# What browser and other clients send in client-log frames (relaybus.client is the Python client).
clientLog = Logger(namespace="relaybus.clientlog")

CLOSE_GOING_AWAY = 1001
TOO_MANY_REQUESTS = 429
KEYS_UNAVAILABLE_RETRY_AFTER_S = 5
CLOSE_NOT_READING = 1008  # policy violation: the client let too much pile up unread
CLOSE_FLUSH_TIMEOUT_S = 5.0  # how long a finished close handshake may wait to flush
LOG_DROP_NOTICE_INTERVAL_S = 1.0
WEB_ROOT = Path(__file__).parent / "web"


# What Autobahn's server protocol keeps from the opening handshake for the connection's whole
# life (the request and response text, the parsed headers, per-connection copies of the
# handshake options) and never reads again once the connection is open (checked against
# autobahn 26.10's websocket/protocol.py: every read is in processHandshake/succeedHandshake).
# Dropped in onOpen: with them gone the instance dict has at most 85 keys and, rebuilt, takes
# half the memory (benchmarks/connections.py measures the whole: RSS per idle connection).
_HANDSHAKE_ONLY_ATTRIBUTES = (
    "http_request_data", "http_response_data", "http_status_line", "http_headers",
    "http_request_uri", "http_request_path", "http_request_params", "http_request_host",
    "_wskey", "websocket_origin", "websocket_protocols", "websocket_extensions",
    "flashSocketPolicy", "serveFlashSocketPolicy", "allowedOrigins", "allowedOriginsPatterns",
    "allowNullOrigin", "webStatus", "trustXForwardedFor", "maxConnections", "versions",
    "perMessageCompressionAccept",
)

def _skipAutobahnConfigurationDump() -> None:
    """Autobahn's WebSocketProtocol._connectionMade formats its ~30 configuration values with
    pprint.pformat for a debug line on every connection, whether debug logging is on or not:
    about 1 ms of a 2.4 ms handshake in a profiled gateway (benchmarks/connections.py
    --profile). Its module's `pformat` is swapped for one that skips exactly that call (the
    line then says so) and formats everything else as before."""
    import pprint
    import sys

    import autobahn.websocket.protocol as autobahnProtocol

    if autobahnProtocol.pformat is not pprint.pformat:
        return  # done already (or Autobahn changed: then leave it alone)
    dumpsConfiguration = autobahnProtocol.WebSocketProtocol._connectionMade.__code__

    def pformat(value: Any, *args: Any, **kwargs: Any) -> str:
        if sys._getframe(1).f_code is dumpsConfiguration:
            return "(configuration not formatted: relaybus.gateway skips it)"
        return pprint.pformat(value, *args, **kwargs)

    autobahnProtocol.pformat = pformat  # type: ignore[assignment]


_skipAutobahnConfigurationDump()


# Close codes counted by name in /metrics: the protocol's and ours (docs/protocol.md); any other
# code a client sends counts as "other", so clients cannot grow the label set.
COUNTED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 4401})


@implementer(IClientConnection, IPushProducer)
class GatewayProtocol(WebSocketServerProtocol):
    factory: GatewayFactory
    connectionId: str = ""
    # Set while the transport's write buffer is full: the client is not keeping up.
    _sendPaused = False
    _bytesQueuedWhilePaused = 0
    _admitted = False
    _abortAfterFlush: IDelayedCall | None = None
    principal: Principal | None = None  # who the handshake's token proved (None: no auth)
    _clientAddress: str | None = None  # counted in the factory's per-address limits
    _retryAfterS: int | None = None
    _tokenExpiry: IDelayedCall | None = None

    # Autobahn takes a Deferred here too (txaio.as_future), though its types do not say so.
    def onConnect(  # type: ignore[override]
            self, request: ConnectionRequest) -> Deferred[str | None] | str | None:
        """Admit the handshake while under --max-connections (counting handshakes in progress,
        so a burst cannot overshoot; HTTP 503 beyond it), then, when the gateway authenticates,
        only with a token that proves a principal (HTTP 401 otherwise)."""
        factory = self.factory
        address = clientAddress(self.transport.getPeer().host,  # type: ignore[union-attr]
                                request.headers.get("x-forwarded-for"), factory.trustedProxies)
        over = factory.perAddress.admit(address)
        if over is not None:
            what, self._retryAfterS = over
            factory.handshakesRefused[f"per_ip_{what}"] += 1
            raise ConnectionDeny(TOO_MANY_REQUESTS, f"too many {what} from this address")
        self._clientAddress = address
        if factory.admitted >= factory.config.maxConnections:
            factory.connectionsRefused += 1
            raise ConnectionDeny(503, "the gateway is at its connection limit")
        factory.admitted += 1
        self._admitted = True
        refusal = factory.originPolicy.refusal(request)
        if refusal is not None:
            reason, statusText = refusal
            factory.handshakesRefused[reason] += 1
            raise ConnectionDeny(FORBIDDEN_STATUS, statusText)
        subprotocol = chosenSubprotocol(request.protocols)
        if factory.authenticator is None:
            return subprotocol

        def admitted(principal: Principal) -> str | None:
            self.principal = principal
            return subprotocol

        def refused(failure: Failure) -> Failure:
            if getattr(failure.value, "code", None) == KEYS_UNAVAILABLE_STATUS:
                factory.handshakesRefused["keys_unavailable"] += 1
                self._retryAfterS = KEYS_UNAVAILABLE_RETRY_AFTER_S
            else:
                factory.handshakesRefused["unauthorized"] += 1
            return failure

        return factory.authenticator.admit(request).addCallbacks(admitted, refused)

    def failHandshake(self, reason: str, code: int = 400,
                      responseHeaders: list[tuple[str, str]] | None = None) -> None:
        if code == UNAUTHORIZED_STATUS:  # RFC 6750: say which scheme would be accepted
            responseHeaders = [*(responseHeaders or []),
                               ("WWW-Authenticate", 'Bearer realm="relaybus"')]
        if code in (TOO_MANY_REQUESTS, KEYS_UNAVAILABLE_STATUS) and self._retryAfterS is not None:
            responseHeaders = [*(responseHeaders or []), ("Retry-After", str(self._retryAfterS))]
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        self._dropHandshakeState()
        self.connectionId = secrets.token_urlsafe(12)
        self.factory.connections.add(self)
        limits = self.factory.config.limits
        self._logBucket = TokenBucket(limits.clientLogPerSecond, limits.clientLogBurst,
                                      self.factory.clock)
        self._requestBucket = (TokenBucket(limits.requestsPerSecond, limits.requestsBurst,
                                           self.factory.clock)
                               if limits.requestsPerSecond else None)
        self._logEntriesDropped = 0
        self._lastDropNoticeAt: float | None = None
        self._watchSendBuffer()
        principal = self.principal.forHello() if self.principal is not None else None
        self._sendTextFrame(helloFrame(self.connectionId, limits.forHello(), principal))
        self._watchTokenExpiry()

    def _watchTokenExpiry(self) -> None:
        self._cancelTokenExpiry()
        authenticator = self.factory.authenticator
        if authenticator is None or self.principal is None:
            return
        closesAt = authenticator.closesAt(self.principal)
        if closesAt is not None:
            clock = self.factory.clock
            self._tokenExpiry = clock.callLater(max(0.0, closesAt - clock.seconds()),
                                                self._tokenExpired)

    def _cancelTokenExpiry(self) -> None:
        if self._tokenExpiry is not None and self._tokenExpiry.active():
            self._tokenExpiry.cancel()
        self._tokenExpiry = None

    def _tokenExpired(self) -> None:
        """No refresh came in time: end the connection's requests (workers are told, as on
        any disconnect) and close with the documented code."""
        self._tokenExpiry = None
        log.info("Closing {connectionId}: its token expired", connectionId=self.connectionId)
        self.factory.tokensExpired += 1
        self.sendClose(CLOSE_TOKEN_EXPIRED, "the token expired")
        self.factory.table.connectionLost(self)

    def _refreshToken(self, frame: AuthFrame) -> None:
        authenticator = self.factory.authenticator
        if authenticator is None or self.principal is None:
            self._sendTextFrame(errorFrame(None, FrameError(
                "this gateway does not authenticate: auth frames are not accepted")))
            return
        try:
            principal = authenticator.refreshed(self.principal, frame.token)
        except RelaybusError as e:
            self.factory.refreshesRefused += 1
            self._sendTextFrame(errorFrame(None, e))
            return
        self.principal = principal
        self._watchTokenExpiry()
        self._sendTextFrame(authOkFrame(principal.forHello()["expiresAt"]))

    def _dropHandshakeState(self) -> None:
        state = self.__dict__
        for name in _HANDSHAKE_ONLY_ATTRIBUTES:
            state.pop(name, None)
        self.__dict__ = dict(state)  # a dict never shrinks in place; a copy is sized to fit

    def _watchSendBuffer(self) -> None:
        """Become the transport's producer so a full write buffer tells us the client stalled.

        twisted.web's HTTP channel registered itself for the upgrade request; it has no more
        use for the transport (Autobahn took it over)."""
        transport = IConsumer(self.transport)
        transport.unregisterProducer()
        transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self._sendPaused = True

    def resumeProducing(self) -> None:
        self._sendPaused = False
        self._bytesQueuedWhilePaused = 0

    def stopProducing(self) -> None:
        pass  # the connection is going away; onClose cleans up

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        try:
            self._frameReceived(payload, isBinary)
        except Exception:
            # A bug of ours must cost this frame only, never the connection or its requests.
            log.failure("Handling a frame from {connectionId} failed",
                        connectionId=self.connectionId)
            self._sendTextFrame(errorFrame(None, FrameError("the gateway could not handle "
                                                            "this frame")))

    def _frameReceived(self, payload: bytes, isBinary: bool) -> None:
        try:
            frame = parseClientFrame(payload, isBinary)
        except FrameError as e:
            self.factory.framesRefused[str(e.code)] += 1
            self._sendTextFrame(errorFrame(e.requestId, e))
            return
        if isinstance(frame, RequestFrame):
            if self._requestBucket is not None and not self._requestBucket.take(1):
                self._refuseOverRate(frame)
                return
            self.factory.table.submit(self, frame)
        elif isinstance(frame, CancelFrame):
            self.factory.table.cancel(self, frame.requestId)
        elif isinstance(frame, ClientLogFrame):
            self._recordClientLog(frame)
        elif isinstance(frame, AuthFrame):
            self._refreshToken(frame)

    def dropConnection(self, abort: bool = False) -> None:
        """Autobahn aborts the TCP connection once the close handshake completes. When the
        client's close crossed ours (e.g. our 1002 for its malformed close frame), ours may
        still sit in the transport and the abort would discard it: flush instead, but never
        wait long on a client that does not read."""
        if abort and self.wasClean and self.state != WebSocketProtocol.STATE_CLOSED:
            abort = False
            self._abortAfterFlush = self.factory.clock.callLater(
                CLOSE_FLUSH_TIMEOUT_S, self._abortConnection)
        super().dropConnection(abort)

    def _abortConnection(self) -> None:
        self._abortAfterFlush = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._cancelTokenExpiry()
        if self.connectionId:  # it opened: count how it ended (a client picks its own codes)
            self.factory.connectionsClosed[
                str(code) if code in COUNTED_CLOSE_CODES else "none" if code is None
                else "other"] += 1
        if self._clientAddress is not None:
            self.factory.perAddress.release(self._clientAddress)
            self._clientAddress = None
        if self._abortAfterFlush is not None and self._abortAfterFlush.active():
            self._abortAfterFlush.cancel()
            self._abortAfterFlush = None
        if self._admitted:
            self._admitted = False
            self.factory.admitted -= 1
        if self.connectionId:
            self.factory.connections.discard(self)
            self.factory.table.connectionLost(self)

    # IClientConnection: a request's frames, held to the client's maxMessageBytes (ClientFrames
    # raises before anything is sent), then sent or dropped like every frame.

    def sendChunk(self, requestId: str, seq: int, data: Any) -> None:
        self._sendTextFrame(self.factory.clientFrames.chunk(requestId, seq, data))

    def sendResponse(self, requestId: str, data: Any) -> None:
        self._sendTextFrame(self.factory.clientFrames.response(requestId, data))

    def sendError(self, requestId: str, error: RelaybusError) -> None:
        self._sendTextFrame(self.factory.clientFrames.error(requestId, error))

    def _sendTextFrame(self, frame: bytes) -> None:
        """Send one encoded text frame; silently dropped once the connection is closing."""
        if self.state != WebSocketProtocol.STATE_OPEN:
            return
        if self._sendPaused:
            self._bytesQueuedWhilePaused += len(frame)
            if self._bytesQueuedWhilePaused > self.factory.config.maxSendBufferBytes:
                self._closeNotReading()
                return
        self.sendMessage(frame, isBinary=False)

    def _closeNotReading(self) -> None:
        """Bound what a stalled client costs: stop sending, end its requests, close with 1008.

        The close frame waits behind the unread data, so Autobahn's close-handshake timeout
        drops the TCP connection if the client never reads it."""
        limit = self.factory.config.maxSendBufferBytes
        log.warn("Closing {connectionId} ({peer}): over {limit} bytes queued unread",
                 connectionId=self.connectionId, peer=escapeControlCharacters(str(self.peer)),
                 limit=limit)
        self.factory.slowClientsClosed += 1
        self.sendCloseFrame(code=CLOSE_NOT_READING, isReply=False,
                            reasonUtf8=f"over {limit} bytes queued unread".encode())
        self.factory.table.connectionLost(self)

    def _refuseOverRate(self, frame: RequestFrame) -> None:
        """Over --requests-per-second: the request ends at once; the others go on."""
        assert self._requestBucket is not None
        limits = self.factory.config.limits
        self.factory.requestsRateLimited += 1
        retryAfterMs = max(1, math.ceil(self._requestBucket.secondsUntilOne() * 1000))
        self.sendError(frame.requestId, RelaybusError(
            ErrorCode.OVERLOADED,
            f"request rate limit ({limits.requestsPerSecond}/s, burst {limits.requestsBurst}) "
            "exceeded", retryAfterMs=retryAfterMs))

    def _recordClientLog(self, frame: ClientLogFrame) -> None:
        granted = self._logBucket.take(len(frame.entries))
        peer = escapeControlCharacters(str(self.peer))
        for entry in frame.entries[:granted]:
            level = {"debug": clientLog.debug, "info": clientLog.info, "warn": clientLog.warn,
                     "error": clientLog.error}[entry.level]
            # Tokens out first (a "Bearer\n<jwt>" is still one), then no forged lines.
            level("[{connectionId} {peer}] {message}", connectionId=self.connectionId,
                  peer=peer, message=escapeControlCharacters(redactSecrets(entry.message)),
                  context=_redactedContext(entry.context), clientTimestamp=entry.timestamp)
        self._logEntriesDropped += len(frame.entries) - granted
        self.factory.clientLogEntriesDropped += len(frame.entries) - granted
        if self._logEntriesDropped:
            self._noticeDroppedLogEntries()

    def _noticeDroppedLogEntries(self) -> None:
        """Tell the client (and our log) about dropped entries, at most once a second."""
        now = self.factory.clock.seconds()
        if (self._lastDropNoticeAt is not None
                and now - self._lastDropNoticeAt < LOG_DROP_NOTICE_INTERVAL_S):
            return
        self._lastDropNoticeAt = now
        limits = self.factory.config.limits
        dropped, self._logEntriesDropped = self._logEntriesDropped, 0
        log.warn("Dropped {dropped} client-log entries from {connectionId} over its rate limit",
                 dropped=dropped, connectionId=self.connectionId)
        self._sendTextFrame(errorFrame(None, RelaybusError(
            ErrorCode.OVERLOADED,
            f"client-log rate limit ({limits.clientLogPerSecond} entries/s, burst "
            f"{limits.clientLogBurst}) exceeded: {dropped} entries dropped")))


def _redactedContext(context: dict[str, Any] | None) -> dict[str, Any] | None:
    """A copy of a client-log context with redactSecrets applied to every string in it, keys
    included (for log observers that write the event's fields). Iterative: a context may be
    nested as deep as the JSON parser allowed."""
    if context is None:
        return None
    copy: dict[str, Any] = {}
    pending: list[tuple[Any, Any]] = [(context, copy)]
    while pending:
        source, target = pending.pop()
        items = source.items() if isinstance(source, dict) else enumerate(source)
        for key, value in items:
            if isinstance(value, dict | list):
                child: Any = {} if isinstance(value, dict) else [None] * len(value)
                pending.append((value, child))
                value = child
            elif isinstance(value, str):
                value = redactSecrets(value)
            target[redactSecrets(key) if isinstance(key, str) else key] = value
    return copy


class GatewayFactory(WebSocketServerFactory):
    protocol = GatewayProtocol  # type: ignore[assignment]

    def __init__(self, config: GatewayConfig, table: CorrelationTable,
                 clock: IReactorTime, authenticator: Authenticator | None = None) -> None:
        super().__init__()
        self.config = config
        self.table = table
        self.clock = clock
        self.authenticator = authenticator  # None: every handshake is admitted (no keys)
        self.originPolicy = OriginPolicy(config.allowedOrigins, config.allowedHosts)
        self.trustedProxies = [ipaddress.ip_network(cidr, strict=False)
                               for cidr in config.trustedProxies]
        self.perAddress = PerAddressLimits(config.maxConnectionsPerIp,
                                           config.handshakesPerIpPerSecond, clock)
        self.handshakesRefused: collections.Counter[str] = collections.Counter()  # by reason
        self.framesRefused: collections.Counter[str] = collections.Counter()  # by error code
        self.connectionsClosed: collections.Counter[str] = collections.Counter()  # close code
        self.tokensExpired = 0
        self.requestsRateLimited = 0
        self.refreshesRefused = 0
        self.clientFrames = ClientFrames(config.limits.maxMessageBytes)
        self.connections: set[GatewayProtocol] = set()
        self.admitted = 0  # connections open or in their handshake
        self.connectionsRefused = 0
        self.clientLogEntriesDropped = 0
        self.slowClientsClosed = 0
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
            # Autobahn answers a plain GET of /ws with a status page (and a 303 to any
            # ?redirect= URL: an open redirect) before onConnect sees it: never.
            webStatus=False,
            # Send a close frame with the reason (1009 too big, 1007 bad UTF-8) rather than
            # dropping TCP, so clients can tell what happened.
            failByDrop=False,
        )

    def closeAll(self) -> Deferred[Any]:
        """Close every connection with 1001 (going away); fires once they are gone, which
        Autobahn's closeHandshakeTimeout (5 s, then an abort) bounds for a client that never
        answers."""
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


class _WebFile(Resource):
    """One file of the demo page or the browser library, read on each request (they are small,
    and a developer editing them sees the change on reload)."""

    isLeaf = True
    contentTypes = {".html": b"text/html; charset=utf-8",
                    ".js": b"text/javascript; charset=utf-8"}

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", self.contentTypes[self._path.suffix])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self._path.read_bytes()


class _BrowserLibrary(Resource):
    """/client/NAME.js: the library's top-level modules only (not its tests or package files)."""

    _MODULE_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_-]*\.js\Z")

    def getChild(self, path: bytes, request: Request) -> IResource:
        module = WEB_ROOT / "client" / path.decode("ascii", "replace")
        if self._MODULE_NAME.match(path) and module.is_file():
            return _WebFile(module)
        return notFound()


def makeSite(factory: GatewayFactory, bus: IRequestBus, isDraining: Any,
             metrics: Resource, keysReady: Callable[[], bool] = lambda: True) -> GatewaySite:
    """`keysReady`: False until --jwks-url's first set is loaded (/readyz says not ready)."""
    root = Resource()
    root.putChild(b"metrics", metrics)
    root.putChild(b"", _WebFile(WEB_ROOT / "index.html"))
    root.putChild(b"demo.js", _WebFile(WEB_ROOT / "demo.js"))
    root.putChild(b"client", _BrowserLibrary())
    root.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"healthz", _Health(lambda: True))
    root.putChild(b"readyz", _Health(lambda: bus.isReady() and not isDraining()
                                     and keysReady()))
    config = factory.config
    limits = RequestLimits(deadlineS=config.openHandshakeTimeoutS,
                           maxPendingPerPeer=config.maxConnectionsPerIp,
                           trustedProxies=factory.trustedProxies, clock=factory.clock,
                           refused=factory.handshakesRefused)
    return GatewaySite(root, limits, logFormatter=redactingLogFormatter)
