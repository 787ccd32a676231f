"""The HTTP half of a WebSocket handshake, bounded: twisted.web's own timeout is an idle timeout
that every trickled byte resets, so a client sending its upgrade request a byte at a time
(slowloris) held a socket for as long as it liked, before `onConnect` or any per-address limit
ever saw it. Here a request (line, headers and body) must be complete within a deadline, a
client address may hold only so many connections that have not sent a whole request yet, a
connection closes after its answer (no keep-alive connection idles outside both), and headers
and bodies are capped below twisted.web's defaults."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

# _GenericHTTPChannelProtocol is private, but the only way to give twisted.web's Site a channel
# class of our own while keeping its HTTP/1.1-or-HTTP/2 switch (Site.protocol builds this proxy).
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Site

from relaybus.ratelimits import IPNetwork, within

log = Logger()

MAX_HEADERS = 100  # twisted.web allows 500; a browser's WebSocket upgrade sends about 15
MAX_HEADER_BYTES = 16_384  # request line plus headers (twisted.web's default, kept)
MAX_BODY_BYTES = 65_536  # nothing the gateway serves takes a request body

_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                    b"Content-Length: 0\r\n\r\n")
_TOO_MANY_PENDING = (b"HTTP/1.1 429 Too Many Requests\r\nConnection: close\r\n"
                     b"Retry-After: 1\r\nContent-Length: 0\r\n\r\n")
_LINE_TOO_LONG = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                  b"Content-Length: 0\r\n\r\n")
_BODY_TOO_LARGE = (b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                   b"Content-Length: 0\r\n\r\n")


@attrs.define
class RequestLimits:
    """What every HTTP connection of one Site shares: the deadline, the per-peer count of
    connections still sending their first request, and the refusals by reason (shown in
    /metrics as relaybus_handshakes_refused_total)."""

    deadlineS: float
    maxPendingPerPeer: int  # 0: no limit
    trustedProxies: Sequence[IPNetwork]
    clock: IReactorTime
    refused: collections.Counter[str]
    pending: collections.Counter[str] = attrs.field(factory=collections.Counter)

    def admit(self, peer: str) -> bool:
        """Count a new connection in, unless its peer holds too many unfinished requests. A
        trusted proxy is never limited here: its clients are told apart later, by
        X-Forwarded-For, in the WebSocket handshake's per-address limits."""
        if (self.maxPendingPerPeer and self.pending[peer] >= self.maxPendingPerPeer
                and not within(peer, self.trustedProxies)):
            return False
        self.pending[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.pending[peer] -= 1
        if self.pending[peer] <= 0:
            del self.pending[peer]


class BoundedHTTPChannel(HTTPChannel):
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEADER_BYTES

    limits: RequestLimits
    _peer: str | None = None  # counted in limits.pending until its first request is in
    _deadline: IDelayedCall | None = None
    _waitingForRequest = True
    _bodyBytes = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(peer, "host", "unix")
        if not self.limits.admit(host):
            self.limits.refused["per_ip_pending"] += 1
            self._refuse(_TOO_MANY_PENDING)
            return
        self._peer = host
        self._startDeadline()

    def rawDataReceived(self, data: bytes) -> None:
        if self._waitingForRequest:  # a request body, not a pipelined request being held
            self._bodyBytes += len(data)
            if self._bodyBytes > MAX_BODY_BYTES:
                self.limits.refused["body_too_large"] += 1
                self._refuse(_BODY_TOO_LARGE)
                return
        super().rawDataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header over 16 KiB (twisted.web just drops the connection)."""
        self.limits.refused["headers_too_large"] += 1
        self._refuse(_LINE_TOO_LONG)

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.length is not None and self.length > MAX_BODY_BYTES:
            self.limits.refused["body_too_large"] += 1
            self._refuse(_BODY_TOO_LARGE)

    def allContentReceived(self) -> None:
        # The request is in: from here on (a WebSocket upgrade included) other timeouts rule,
        # and the connection closes after its answer (checkPersistence).
        self._waitingForRequest = False
        self._bodyBytes = 0
        self._cancelDeadline()
        self._releasePeer()
        super().allContentReceived()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """No keep-alive: between two requests a connection has sent a whole request, so it is
        in no count and under no deadline (twisted.web's idle timeout is 60 s), and nothing
        the gateway answers over plain HTTP (/healthz, /metrics, the demo page) needs one."""
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        return False

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelDeadline()
        self._releasePeer()
        super().connectionLost(reason)

    def _startDeadline(self) -> None:
        self._deadline = self.limits.clock.callLater(self.limits.deadlineS, self._tooSlow)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _releasePeer(self) -> None:
        if self._peer is not None:
            self.limits.release(self._peer)
            self._peer = None

    def _tooSlow(self) -> None:
        self._deadline = None
        self.limits.refused["request_timeout"] += 1
        log.info("Closing a connection that did not send its HTTP request within {seconds} s",
                 seconds=self.limits.deadlineS)
        self._refuse(_REQUEST_TIMEOUT)

    def _refuse(self, response: bytes) -> None:
        """Answer, stop reading, and close; a peer that does not read its answer either is cut
        after twisted.web's abortTimeout."""
        self._waitingForRequest = False
        self._cancelDeadline()
        self.dataReceived = self.lineReceived = lambda *args: None  # type: ignore[method-assign]
        self.transport.write(response)  # type: ignore[union-attr]
        self.timeoutConnection()


class GatewaySite(Site):
    """twisted.web's Site with BoundedHTTPChannel as its channel."""

    def __init__(self, resource: Any, limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(resource, reactor=limits.clock, **kwargs)
        self.requestLimits = limits

    def acceptableProtocols(self) -> list[bytes]:
        """HTTP/1.1 only, even with the h2 package installed: an h2 connection would be
        twisted.web's H2Connection, under none of BoundedHTTPChannel's limits (and Autobahn
        has no WebSocket over HTTP/2)."""
        return [b"http/1.1"]

    def protocol(self) -> _GenericHTTPChannelProtocol:
        channel = BoundedHTTPChannel()
        channel.limits = self.requestLimits
        return _GenericHTTPChannelProtocol(channel)

