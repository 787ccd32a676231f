"""--jwks-url: the gateway's JWK Set, fetched over HTTPS with twisted.web's Agent, cached, and
refreshed periodically and when a token names a key id the set does not hold.

Never a blocking call: the fetch is an Agent request on the reactor, bounded in time
(`FETCH_TIMEOUT_S`) and size (`MAX_JWKS_BYTES` of body, `MAX_HEAD_BYTES` more on the wire;
the transfer is aborted beyond them); no redirect is followed. A fetch that fails in any way
(connection, TLS, status, size, JSON, an unusable, symmetric or private key set) is logged with
a short fixed reason and the keys loaded before are kept, so tokens with known kids verify
while the key server is down. Refetches that tokens with unknown kids cause are at most one per
`UNKNOWN_KID_INTERVAL_S`; the handshakes that ask while a fetch is in flight wait for it (at
most `MAX_WAITERS` of them), so a freshly rotated key works on its first use. Until the first
set is loaded, handshakes with a token get HTTP 503 (relaybus.admission) and /readyz says not
ready; the first fetch is retried with a backoff of 1 s doubling to 30 s.

Every time is the injected clock's; the HTTP client is behind IJWKSFetcher (a fake in
relaybus.testing).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from relaybus.interfaces import IJWKSFetcher

if TYPE_CHECKING:
    from relaybus.identity import JWTChecker

log = Logger(namespace="relaybus.jwks")

MAX_JWKS_BYTES = 1024 * 1024
# What a response may add to its body on the wire: status line, headers, chunk framing.
MAX_HEAD_BYTES = 64 * 1024
FETCH_TIMEOUT_S = 10.0
DEFAULT_REFRESH_S = 300.0
MIN_REFRESH_S = 1.0
MAX_REFRESH_S = 86_400.0
UNKNOWN_KID_INTERVAL_S = 30.0
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
MAX_WAITERS = 1000
MAX_URL_LENGTH = 2048
_LOOPBACK_NAMES = {"localhost"}


class JWKSFetchError(Exception):
    """A fetch failed; the message is a short fixed reason, safe to log."""


def checkJWKSURL(url: str) -> str:
    """The URL as logs may show it (no query); ValueError when it is not acceptable.

    https:// only, except http:// to a loopback address (a key server beside the gateway,
    and the tests): keys fetched in clear over a network could be swapped by anyone on the
    path. No user:password@ (a JWK Set is public; a secret there would end up in logs)."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"--jwks-url must be at most {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("--jwks-url must be ASCII without spaces or control characters")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError("--jwks-url is not a URL") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError("--jwks-url must be an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("--jwks-url must not carry credentials (user:password@)")
    if parts.fragment:
        raise ValueError("--jwks-url must not have a #fragment")
    if parts.scheme == "http" and not _isLoopback(host):
        raise ValueError("--jwks-url must be https:// (http:// only to 127.0.0.1, ::1 or "
                         "localhost)")
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}{'' if port is None else f':{port}'}{parts.path}"


def _isLoopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _CappedBody(Protocol):
    """Collects a response body up to `maxBytes`; beyond it the transfer is aborted."""

    def __init__(self, maxBytes: int) -> None:
        self._maxBytes = maxBytes
        self._chunks: list[bytes] = []
        self._size = 0
        self._open = True
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[bytes]) -> None:
        self._open = False
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if not self._open:
            return
        self._size += len(data)
        if self._size > self._maxBytes:
            self._open = False
            self.transport.stopProducing()  # type: ignore[union-attr]
            self.done.errback(JWKSFetchError(f"the response is larger than {self._maxBytes} "
                                             "bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        if not self._open:
            return
        self._open = False
        # PotentialDataLoss: a body ended by the connection's close; a truncated set would
        # not parse as JSON.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
            return
        self.done.errback(_cutOff(reason)
                          or JWKSFetchError("the connection was lost during the response"))


class _CappedConnection(ProtocolWrapper):
    """Cuts a connection once it has received more than its factory's `maxBytes`, headers
    included: twisted.web's client bounds neither the number nor the size of response headers
    (a server sending them for the 10 s of a fetch grew the gateway to 3.4 GB)."""

    factory: _CappedFactory
    _received = 0
    _cut = False

    def dataReceived(self, data: bytes) -> None:
        if self._cut:
            return
        self._received += len(data)
        super().dataReceived(data)  # when this is the body, _CappedBody's own cap speaks first
        if self._received > self.factory.maxBytes and not self._cut:
            self._cut = True
            self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._cut:
            reason = Failure(JWKSFetchError(f"the response is larger than "
                                            f"{self.factory.maxBytes} bytes, headers included"))
        super().connectionLost(reason)


def _cutOff(failure: Failure) -> Failure | None:
    """The refusal _CappedConnection gave as the reason its connection was lost, when it is
    among the reasons of the Agent's failure."""
    for cause in getattr(failure.value, "reasons", []):
        if cause.check(JWKSFetchError):
            return cause
    return None


class _CappedFactory(WrappingFactory):
    protocol = _CappedConnection

    def __init__(self, wrappedFactory: IProtocolFactory, maxBytes: int) -> None:
        super().__init__(wrappedFactory)
        self.maxBytes = maxBytes


@implementer(IStreamClientEndpoint)
class _CappedEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint, maxBytes: int) -> None:
        self._endpoint = endpoint
        self._maxBytes = maxBytes

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        """Fires with the caller's protocol (the Agent's pool talks to it), not the wrapper."""
        connected: Deferred[Any] = self._endpoint.connect(
            _CappedFactory(protocolFactory, self._maxBytes))
        return connected.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
class _CappedEndpoints:
    """Agent's own choice of endpoint (TCP; TLS for https, verified by
    BrowserLikePolicyForHTTPS), each connection capped at `maxBytes` received."""

    def __init__(self, reactor: Any, connectTimeoutS: float, maxBytes: int) -> None:
        self._reactor = reactor
        self._connectTimeoutS = connectTimeoutS
        self._maxBytes = maxBytes
        self._policy = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):  # never a clear-text fallback
            raise SchemeNotSupported(f"Unsupported scheme: {uri.scheme!r}")
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._connectTimeoutS)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        return _CappedEndpoint(endpoint, self._maxBytes)


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@implementer(IJWKSFetcher)
class AgentJWKSFetcher:
    """GET the URL with twisted.web's Agent: TLS verified against the system's trust store
    (BrowserLikePolicyForHTTPS, the host name included), no redirects, no persistent
    connection (a fetch every few minutes does not need one, and none lingers in the
    reactor), a timeout over the whole transfer and a size cap."""

    def __init__(self, reactor: Any, url: str, timeoutS: float = FETCH_TIMEOUT_S,
                 maxBytes: int = MAX_JWKS_BYTES, agent: IAgent | None = None) -> None:
        self._reactor = reactor
        self._url = url.encode("ascii")
        self._timeoutS = timeoutS
        self._maxBytes = maxBytes
        self._agent = agent or Agent.usingEndpointFactory(
            reactor, _CappedEndpoints(reactor, timeoutS, maxBytes + MAX_HEAD_BYTES),
            pool=HTTPConnectionPool(reactor, persistent=False))

    def fetch(self) -> Deferred[bytes]:
        d: Deferred[Any] = self._agent.request(b"GET", self._url, Headers({
            b"accept": [b"application/jwk-set+json, application/json"],
            b"user-agent": [b"relaybus"]}))
        d.addCallback(self._body)
        # However the cancellation surfaces (the Agent wraps it in ResponseNeverReceived), a
        # fetch cut off by the timeout fails as a timeout.
        d.addTimeout(self._timeoutS, self._reactor, onTimeoutCancel=self._timedOut)
        d.addErrback(self._asFetchError)
        return d

    def _body(self, response: IResponse) -> Deferred[bytes]:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise JWKSFetchError(f"HTTP status {int(response.code)}")
        if response.length is not UNKNOWN_LENGTH and response.length > self._maxBytes:
            response.deliverBody(_Discard())
            raise JWKSFetchError(f"the response is larger than {self._maxBytes} bytes")
        body = _CappedBody(self._maxBytes)
        response.deliverBody(body)
        return body.done

    def _timedOut(self, result: object, timeoutS: float) -> Failure:
        return Failure(JWKSFetchError(f"no answer within {timeoutS:g} s"))

    def _asFetchError(self, failure: Failure) -> Failure:
        if failure.check(JWKSFetchError, CancelledError):
            return failure
        if failure.check(DeferredTimeoutError, ConnectTimeoutError):
            reason = f"no answer within {self._timeoutS:g} s"
        elif failure.check(DNSLookupError):
            reason = "the host name does not resolve"
        elif failure.check(ConnectError):
            reason = "cannot connect"
        elif failure.check(ResponseNeverReceived, ResponseFailed):
            cutOff = _cutOff(failure)
            if cutOff is not None:
                return cutOff
            reasons = getattr(failure.value, "reasons", [])
            causes = {type(f.value).__name__ for f in reasons} or {"unknown"}
            reason = f"the connection failed ({', '.join(sorted(causes))})"
        else:
            reason = f"the request failed ({type(failure.value).__name__})"
        return Failure(JWKSFetchError(reason))


class RemoteJWKS(Service):
    """Keeps a JWTChecker's keys in step with a JWK Set served over HTTP(S)."""

    name = "jwks"

    def __init__(self, checker: JWTChecker, fetcher: IJWKSFetcher, clock: IReactorTime,
                 displayURL: str, refreshS: float = DEFAULT_REFRESH_S,
                 unknownKidIntervalS: float = UNKNOWN_KID_INTERVAL_S,
                 maxWaiters: int = MAX_WAITERS) -> None:
        self._checker = checker
        self._fetcher = fetcher
        self._clock = clock
        self._url = displayURL
        self._refreshS = refreshS
        self._unknownKidIntervalS = unknownKidIntervalS
        self._maxWaiters = maxWaiters
        self.refreshes = {"ok": 0, "failed": 0}  # /metrics
        self.loadedAt: float | None = None
        self._kids: frozenset[str | None] = frozenset()
        self._fetching: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._next: IDelayedCall | None = None
        self._unknownKidFetchAt: float | None = None
        self._failuresInARow = 0
        checker.onUnknownKey = self.keyUnknown

    @property
    def loaded(self) -> bool:
        return self.loadedAt is not None

    @property
    def keyCount(self) -> int:
        return len(self._kids)

    def startService(self) -> None:
        super().startService()
        self._fetch()

    def stopService(self) -> None:
        super().stopService()
        self._cancelNext()
        if self._fetching is not None:
            self._fetching.cancel()

    def keyUnknown(self) -> Deferred[None] | None:
        """A token names a key id the set does not hold (or no set is loaded yet): a Deferred
        that fires once a fetch has ended (then verify again), or None when no fetch is in
        flight and one may not start yet (or too many handshakes wait already)."""
        if not self.running:
            return None
        if self._fetching is None:
            now = self._clock.seconds()
            if (self._unknownKidFetchAt is not None
                    and now - self._unknownKidFetchAt < self._unknownKidIntervalS):
                return None
            self._unknownKidFetchAt = now
            self._fetch()
            if self._fetching is None:  # a fetch that ended at once
                return succeed(None)
        if len(self._waiters) >= self._maxWaiters:
            return None
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fetch(self) -> None:
        self._cancelNext()
        d = maybeDeferred(self._fetcher.fetch)
        # _failed also gets what _loaded raises: every failure is logged and counted.
        self._fetching = d.addCallback(self._loaded).addErrback(self._failed)
        self._fetching.addBoth(self._ended)

    def _loaded(self, body: bytes) -> None:
        try:
            self._checker.replaceKeys(body.decode("utf-8"), "--jwks-url")
        except UnicodeDecodeError:
            self._failed(Failure(JWKSFetchError("the response is not UTF-8")))
            return
        except ValueError as e:  # identity's messages are fixed: no key material
            self._failed(Failure(JWKSFetchError(str(e))))
            return
        self.refreshes["ok"] += 1
        self._failuresInARow = 0
        first = self.loadedAt is None
        self.loadedAt = self._clock.seconds()
        kids = self._checker.keyIds
        if first or kids != self._kids:
            log.info("Loaded the JWK Set from {url}: {count} key(s)", url=self._url,
                     count=len(kids))
        self._kids = kids

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            return  # stopping
        self.refreshes["failed"] += 1
        self._failuresInARow += 1
        if failure.check(JWKSFetchError):
            reason = failure.getErrorMessage()
        else:
            log.failure("Fetching the JWK Set failed unexpectedly", failure)
            reason = "unexpected error"
        if self.loaded:
            log.warn("Could not refresh the JWK Set from {url}: {reason}; keeping the "
                     "{count} key(s) loaded before", url=self._url, reason=reason,
                     count=self.keyCount)
        else:
            log.error("Could not load the JWK Set from {url}: {reason}; handshakes with a "
                      "token get HTTP 503 until it loads", url=self._url, reason=reason)

    def _ended(self, result: object) -> None:
        self._fetching = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)
        if self.running:
            delay = self._refreshS
            if self._failuresInARow:
                delay = min(delay, RETRY_MAX_S,
                            RETRY_FIRST_S * 2 ** min(self._failuresInARow - 1, 16))
            self._next = self._clock.callLater(delay, self._fetch)

    def _cancelNext(self) -> None:
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
