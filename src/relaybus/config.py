"""Every tunable of a gateway or worker in one place; the defaults are documented in the README."""

from __future__ import annotations

import secrets
import socket

import attrs

from relaybus.frames import MAX_LOG_ENTRIES_PER_FRAME
from relaybus.identity import JWTSettings

MiB = 1024 * 1024


def newGatewayId() -> str:
    host = "".join(c for c in socket.gethostname() if c.isascii() and (c.isalnum() or c in "-."))
    return f"gw-{host[:40]}-{secrets.token_hex(4)}"


@attrs.frozen
class Limits:
    """What one client connection may do; sent to the client in the hello frame."""

    maxMessageBytes: int = 1 * MiB
    maxInFlight: int = 100
    defaultTimeoutMs: int = 30_000
    maxTimeoutMs: int = 300_000
    # client-log entries: a token bucket per connection (entries per second, burst).
    clientLogPerSecond: int = 20
    clientLogBurst: int = 100
    maxLogEntriesPerFrame: int = MAX_LOG_ENTRIES_PER_FRAME
    # requests: a token bucket per connection (requests per second, burst); 0: no limit.
    requestsPerSecond: int = 0
    requestsBurst: int = 0

    def forHello(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class GatewayConfig:
    listen: str = "tcp:8080:interface=127.0.0.1"
    reusePort: bool = False  # SO_REUSEPORT: several gateway processes share the port
    broker: str = "memory"
    handlers: tuple[str, ...] = ()
    gatewayId: str = attrs.field(factory=newGatewayId)
    amqpPrefix: str = ""
    limits: Limits = Limits()
    autoPingIntervalS: float = 20.0
    autoPingTimeoutS: float = 10.0
    openHandshakeTimeoutS: float = 10.0
    drainTimeoutS: float = 10.0
    # Requests of a requestType whose queue has had no consumer this long end with
    # worker_lost instead of waiting for their deadlines (0: never; RabbitMQ only).
    workerAbsentGraceS: float = 5.0
    workerConcurrency: int = 10  # for handlers run in-process
    workerThreads: int = 10  # the thread pool of in-process blocking handlers
    # What a client that stops reading may cost: bytes queued for it beyond Twisted's own
    # 64 KiB write buffer before the gateway closes it with 1008.
    maxSendBufferBytes: int = 4 * MiB
    # Every connection costs memory whatever it does: the cap on them (HTTP 503 beyond).
    maxConnections: int = 50_000
    # What one client address may cost (HTTP 429 beyond; 0: no limit), and which proxies'
    # X-Forwarded-For is believed (CIDRs).
    maxConnectionsPerIp: int = 0
    handshakesPerIpPerSecond: float = 0.0
    trustedProxies: tuple[str, ...] = ()
    # Who may connect: with a key configured, a handshake needs a valid token (HTTP 401).
    jwt: JWTSettings = attrs.field(factory=JWTSettings)
    allowAnonymous: bool = False  # with a key: admit handshakes without a token as "anonymous"
    jwtCookie: str | None = None  # a cookie that may carry the token (same-origin web apps)
    # Which pages may connect (beside same-origin ones and non-browser clients), and under
    # which Host names; anything else gets HTTP 403.
    allowedOrigins: tuple[str, ...] = ()
    allowedHosts: tuple[str, ...] = ()
    # What a principal may call (a JSON policy file; None: everything), where its roles are,
    # and which verified claims workers see.
    authzPolicy: str | None = None
    rolesClaim: str = "roles"
    forwardClaims: tuple[str, ...] = ("sub", "roles")

    @property
    def inMemory(self) -> bool:
        return self.broker == "memory"

    @property
    def inProcessHandlers(self) -> tuple[str, ...]:
        """The embedded default runs the example workers when none are named."""
        if self.handlers or not self.inMemory:
            return self.handlers
        return ("workers.examples",)


@attrs.frozen
class WorkerConfig:
    broker: str
    handlers: tuple[str, ...]
    concurrency: int = 10
    amqpPrefix: str = ""
    drainTimeoutS: float = 10.0
    threads: int = 10  # the thread pool of blocking handlers (runsIn = "thread")
