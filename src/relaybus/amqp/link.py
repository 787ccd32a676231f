"""One AMQP connection that keeps coming back, and the pika traps every user of it must avoid.

The buses build on `BrokerLink`; the helpers below it (`detached`, `atMost`, `consumeForever`,
`BrokerLink.openChannel`) are how they talk to pika's Twisted adapter safely.
"""

from __future__ import annotations

import random
import urllib.parse
from collections.abc import Callable, Generator
from typing import Any, TypeVar

import attrs
import pika
from OpenSSL import SSL
from pika.adapters.twisted_connection import (
    ClosableDeferredQueue,
    ReceivedMessage,
    TwistedChannel,
    TwistedProtocolConnection,
)
from pika.exceptions import AMQPConnectionError
from service_identity import VerificationError
from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IAddress, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from relaybus.amqp.brokerurl import clientTLS, parseBrokerURL, pikaParameters
from relaybus.errors import ErrorCode, RelaybusError

log = Logger(namespace="relaybus.amqp")
T = TypeVar("T")

SETUP_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 3.0
CONNECT_TIMEOUT_S = 10
# RabbitMQ proposes 60 s, so a silently cut connection went unnoticed for minutes (and the
# gateway stayed "ready"); `?heartbeat=N` in the broker URL overrides this.
DEFAULT_HEARTBEAT_S = 15


def brokerParameters(url: str) -> pika.URLParameters:
    """pika's parameters for a broker URL, relaybus's own TLS options taken out."""
    broker = parseBrokerURL(url)
    parameters = pikaParameters(broker)
    if "heartbeat" not in urllib.parse.parse_qs(urllib.parse.urlsplit(broker.pikaURL).query):
        parameters.heartbeat = DEFAULT_HEARTBEAT_S
    return parameters


def validateBrokerURL(url: str) -> None:
    """Everything a broker URL can get wrong, at start: its form, its options, pika's
    values, and the TLS files (read and parsed). ValueError's message never holds the
    password or a key."""
    broker = parseBrokerURL(url)
    pikaParameters(broker)
    if broker.tls:
        clientTLS(broker)


def endpointForURL(reactor: Any, url: str) -> IStreamClientEndpoint:
    """pika ignores host, port and TLS in its parameters: Twisted does the connecting (and
    the TLS, with the files the URL names, read once here)."""
    broker = parseBrokerURL(url)
    tcp = HostnameEndpoint(reactor, broker.host, broker.port, timeout=CONNECT_TIMEOUT_S)
    if broker.tls:
        return wrapClientTLS(clientTLS(broker), tcp)
    return tcp


def tlsProblem(reason: Failure | None) -> str | None:
    """What went wrong in a TLS handshake, in OpenSSL's words (None: not a TLS failure).
    The broker's refusal of our certificate arrives as an alert (`certificate required`,
    `unknown ca`); our refusal of its certificate as `certificate verify failed`, or as a
    service_identity error when it names another host."""
    if reason is None:
        return None
    if reason.check(SSL.Error):
        args = getattr(reason.value, "args", ())
        errors = args[0] if args else []
        if isinstance(errors, list) and errors:
            return "; ".join(str(e[-1]) if isinstance(e, tuple) else str(e) for e in errors)
        return str(reason.value) or "a TLS error"
    if reason.check(VerificationError):
        return f"the broker's certificate does not name the host: {reason.value}"
    return None


@attrs.frozen
class Backoff:
    """The delay before reconnect attempt N (1, 2, ...): `initialS` doubling up to `maxS`,
    each shortened by up to `jitterShare` at random so that many clients cut at once do not
    come back at once. `jitter` returns a number in [0, 1); tests pass a constant."""

    initialS: float = 0.5
    maxS: float = 10.0
    jitterShare: float = 0.25
    jitter: Callable[[], float] = random.random

    def delay(self, attempt: int) -> float:
        full = min(self.initialS * 2 ** (attempt - 1), self.maxS)
        return full * (1 - self.jitterShare * self.jitter())


def consumeForever(queue: ClosableDeferredQueue, handle: Callable[[ReceivedMessage], None],
                   stopped: Callable[[], None] | None = None) -> None:
    """Feed each message of a pika consumer queue to `handle` until the queue closes, then
    call `stopped` (the broker cancelled the consumer, or its channel or connection died).

    pika's adapter hands every message to the queue's `put` and ends the consumer with its
    `close`; this takes over both on this queue, so a message goes straight to `handle` as pika
    decodes it. Reading the queue with `get()` instead cost a Deferred chain per message
    (2.4 us against 0.06 us: a chunk of every reply the gateway forwards). What was queued
    before is handled first, in order.
    """

    def deliver(message: ReceivedMessage) -> None:
        try:
            handle(message)
        except Exception:
            log.failure("Handling an AMQP message failed")

    def close(reason: BaseException | None) -> None:
        del queue.put, queue.close  # pika's own again: a put after the close is refused
        queue.close(reason)
        if stopped is not None:
            stopped()

    if queue.closed:  # the channel or connection went before we started
        if stopped is not None:
            stopped()
        return
    while queue.pending:
        deliver(queue.pending.pop(0))
    queue.put = deliver
    queue.close = close


def detached(published: Deferred[T]) -> Deferred[T]:
    """pika's result, in a Deferred of our own: cancelling it (a handler cancelled while it
    awaits sendChunk) must never cancel pika's Deferred (pika #1282, see the field notes)."""
    ours: Deferred[T] = Deferred()

    def relay(result: T | Failure) -> None:
        if ours.called:  # cancelled already; the late result needs no further handling
            return
        if isinstance(result, Failure):
            ours.errback(result)
        else:
            ours.callback(result)

    published.addBoth(relay)
    return ours


def atMost(d: Deferred[T], seconds: float, clock: IReactorTime) -> Deferred[None]:
    """Fires (with None) when `d` does or after `seconds`, whichever comes first; never
    cancels `d` and never fails."""
    ours: Deferred[None] = Deferred()

    def fire(_: object = None) -> None:
        if not ours.called:
            ours.callback(None)

    detached(d).addBoth(fire)
    timer = clock.callLater(seconds, fire)
    ours.addCallback(lambda _: timer.cancel() if timer.active() else None)
    return ours


def unavailable(failure: Failure) -> Failure:
    """A publish the broker did not take, as the error code clients see."""
    if failure.check(RelaybusError, CancelledError):
        return failure
    why = failure.getErrorMessage()
    return Failure(RelaybusError(ErrorCode.UNAVAILABLE, f"the broker did not take it: {why}"))


def notReachable() -> Deferred[None]:
    return fail(RelaybusError(ErrorCode.UNAVAILABLE, "the message broker is not reachable"))


class AmqpConnection(TwistedProtocolConnection):
    """pika's protocol, with TCP_NODELAY and a word to its link when the TCP connection goes."""

    def __init__(self, parameters: pika.ConnectionParameters, clock: IReactorTime,
                 onLost: Callable[[AmqpConnection, Failure], None]) -> None:
        super().__init__(parameters, custom_reactor=clock)
        self._onLost = onLost

    def connectionMade(self) -> None:
        # Twisted connects, so pika's own TCP_NODELAY is skipped: without it Nagle and delayed
        # ACKs add ~40 ms to a reply followed by its ack.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        super().connectionMade()

    lostReason: Failure | None = None  # why the transport went: pika keeps only a number

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason  # before pika fails `ready` with it
        super().connectionLost(reason)
        self._onLost(self, reason)


SetUp = Callable[[TwistedProtocolConnection], Deferred[None]]


class SetupRefused(Exception):
    """What a setup raises when the broker refused it for a reason the operator has to fix or
    wait out (another connection holds what it needs): the message, which says so, is logged
    once per episode without a traceback, and the link retries with its backoff."""


class BrokerLink(Service):
    """One AMQP connection that keeps coming back.

    `setup(connection)` runs after every (re)connect and must reopen channels, topology and
    consumers; `lost(reason)` runs when a set-up connection (or one being set up) goes away.
    Backoff grows across failed handshakes and setups, not just failed TCP connects, and
    resets only after a successful setup (so a wrong password does not retry in a tight loop).
    A setup that raises SetupRefused is an error logged once until a setup succeeds (retries
    refused the same way log nothing more), and its connection is closed politely.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, parameters: pika.ConnectionParameters,
                 clock: IReactorTime, name: str, setup: SetUp, lost: Callable[[Failure], None],
                 backoff: Backoff = Backoff()) -> None:
        self._endpoint = endpoint
        self._parameters = parameters
        self._clock = clock
        self._name = name
        self._setup = setup
        self._lost = lost
        self.backoff = backoff
        self._client: ClientService | None = None
        self._failedAttempts = 0  # since the last successful setup
        self._settingUp: TwistedProtocolConnection | None = None
        self._dropped: TwistedProtocolConnection | None = None
        # SetupRefused since the last successful setup: what was logged, how many times
        self._refusal: str | None = None
        self._refusals = 0
        self.connection: TwistedProtocolConnection | None = None
        self.blocked = False  # the broker refuses to read from us (memory or disk alarm)

    @classmethod
    def forURL(cls, url: str, reactor: Any, name: str, setup: SetUp,
               lost: Callable[[Failure], None],
               endpoint: IStreamClientEndpoint | None = None) -> BrokerLink:
        """The link a gateway or worker uses: `name` shows in RabbitMQ's connection list;
        `endpoint` replaces the one the URL names (tests)."""
        parameters = brokerParameters(url)
        parameters.client_properties = {"connection_name": name, "product": "relaybus"}
        return cls(endpoint or endpointForURL(reactor, url), parameters, reactor, name, setup,
                   lost)

    @property
    def ready(self) -> bool:
        return self.connection is not None and self.connection.is_open and not self.blocked

    @property
    def brokerNoticesDeathWithinS(self) -> int | None:
        """How long RabbitMQ may take to notice that a connection of ours died silently (a
        network cut): it checks for incoming bytes every heartbeat and gives up after two
        checks saw none, 2 to 3 heartbeats after the last data. None: heartbeats are off,
        and only TCP gives up (many minutes)."""
        heartbeat = self._parameters.heartbeat
        return 3 * heartbeat if isinstance(heartbeat, int) and heartbeat > 0 else None

    def startService(self) -> None:
        super().startService()
        link = self

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: IAddress | None) -> AmqpConnection:
                protocol = AmqpConnection(link._parameters, link._clock, link._connectionLost)
                assert protocol.ready is not None
                protocol.ready.addCallbacks(lambda _: link._handshaken(protocol),
                                            lambda f: link._handshakeFailed(protocol, f))
                return protocol

        self._client = ClientService(self._endpoint, _Factory(), retryPolicy=self._nextDelay,
                                     clock=self._clock)
        self._client.startService()

    def _nextDelay(self, _clientServiceAttempts: int) -> float:
        # ClientService counts failed TCP connects only, and restarts its count on each one
        # that succeeds: ours counts every attempt since the last successful setup.
        self._failedAttempts += 1
        return self.backoff.delay(self._failedAttempts)

    def _handshakeFailed(self, connection: AmqpConnection, failure: Failure) -> None:
        tls = tlsProblem(connection.lostReason)
        if tls is not None:
            why = ("TLS failed (check cafile, certfile, keyfile and server_hostname in the "
                   f"broker URL): {tls}")
        elif failure.check(AMQPConnectionError):
            # pika reports any stream lost during the handshake as a refusal: keep its reason
            # so an operator can tell a cut connection from a refused login.
            detail = failure.getErrorMessage() or repr(failure.value)
            why = ("the AMQP handshake failed (a refused login: check user, password and "
                   f"vhost; or a dropped connection): {detail}")
        else:
            why = failure.getErrorMessage() or repr(failure.value)
        log.warn("AMQP {name}: connection failed: {why}", name=self._name, why=why)

    def _handshaken(self, connection: TwistedProtocolConnection) -> Deferred[None]:
        self._settingUp = connection
        # pika's Twisted adapter has no public hook for connection.blocked (see field notes)
        impl = connection._impl
        impl.add_on_connection_blocked_callback(lambda *_: self._setBlocked(True))
        impl.add_on_connection_unblocked_callback(lambda *_: self._setBlocked(False))

        def ready(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not connection.is_open or self._settingUp is not connection:
                return
            self._settingUp = None
            self._failedAttempts = 0
            self.connection = connection
            if self._refusal is None:
                log.info("AMQP {name}: connected and set up", name=self._name)
            else:
                log.info("AMQP {name}: connected and set up, after {n} refused setups",
                         name=self._name, n=self._refusals)
            self._refusal, self._refusals = None, 0

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            stillOurs = self._settingUp is connection and self.running
            if not stillOurs:
                return
            if not connection.is_open:  # lost midway: _connectionLost says why
                self.drop(connection, "setup failed")
            elif failure.check(SetupRefused):
                self._refused(connection, failure.getErrorMessage())
            else:
                log.failure("AMQP {name}: setting up the connection failed", failure,
                            name=self._name)
                self.drop(connection, "setup failed")

        def tooSlow() -> None:
            log.warn("AMQP {name}: setup took over {s} s", name=self._name, s=SETUP_TIMEOUT_S)
            self.drop(connection, "setup timed out")

        timer = self._clock.callLater(SETUP_TIMEOUT_S, tooSlow)
        return detached(self._setup(connection)).addCallbacks(ready, failed)

    def _refused(self, connection: TwistedProtocolConnection, why: str) -> None:
        """Say why once per episode; close politely, so that retrying for hours does not
        leave a warning in the broker's log at each attempt (an abort: 'client unexpectedly
        closed TCP connection'); the close leads to a retry with the backoff."""
        self._refusals += 1
        if why != self._refusal:
            log.error("AMQP {name}: {why}", name=self._name, why=why)
            self._refusal = why
        else:
            log.debug("AMQP {name}: refused again ({n} times)", name=self._name,
                      n=self._refusals)
        self._dropped = connection  # its channels closing need no word of their own
        self._close(connection)

    def _close(self, connection: TwistedProtocolConnection) -> Deferred[None]:
        """Close politely, but never wait on a broker that does not answer or read: abort
        after CLOSE_TIMEOUT_S. Fires when the connection is gone (or aborted)."""
        closing: Deferred[None] = defer.succeed(None)
        if connection.is_open and connection.closed is not None:
            closing = atMost(connection.closed, CLOSE_TIMEOUT_S, self._clock)
            connection.close()

        def abort(_: object) -> None:
            transport = connection.transport
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()  # a blocked broker never reads our close

        return closing.addCallback(abort)

    def _setBlocked(self, blocked: bool) -> None:
        self.blocked = blocked
        log.warn("AMQP {name}: the broker {state} this connection (resource alarm)",
                 name=self._name, state="blocks" if blocked else "unblocked")

    def drop(self, connection: TwistedProtocolConnection, why: str) -> None:
        """Abort `connection` if it is still ours, so the normal reconnect path takes over
        (used when a channel or consumer dies while the connection lives on).

        A connection that is no longer open is going already, and its channels and consumers
        close with it: `why` is not the reason then, and _connectionLost logs the real one.
        """
        if connection not in (self.connection, self._settingUp) or not self.running:
            return
        if connection is self._dropped:  # one reason is enough
            return
        self._dropped = connection
        transport = connection.transport
        if transport is not None:
            if connection.is_open:
                log.warn("AMQP {name}: reconnecting: {why}", name=self._name, why=why)
            transport.abortConnection()

    @inlineCallbacks
    def openChannel(self, connection: TwistedProtocolConnection,
                    role: str) -> Generator[Deferred[Any], Any, TwistedChannel]:
        """A channel on `connection` that the link watches: a channel the broker closes
        while its connection lives on (a 406, a deleted queue) would leave a zombie, so the
        link reconnects instead, which re-creates everything."""
        channel = yield connection.channel()
        channel.on_closed.addBoth(lambda _: self.drop(connection, f"the {role} channel closed"))
        return channel

    def canPublish(self, channel: TwistedChannel | None) -> bool:
        """Open, and not blocked by a broker resource alarm."""
        return channel is not None and channel.is_open and not self.blocked

    def _connectionLost(self, connection: TwistedProtocolConnection, reason: Failure) -> None:
        if connection is self._settingUp:
            self._settingUp = None  # deliveries may already have been handed out
        elif connection is self.connection:
            self.connection = None
        else:
            return
        self.blocked = False
        if not self.running:
            log.info("AMQP {name}: connection closed", name=self._name)
            return
        # A connection we dropped while refused: _refused (or drop) said why already.
        if connection is not self._dropped or self._refusal is None:
            log.warn("AMQP {name}: connection lost: {why}", name=self._name,
                     why=reason.getErrorMessage())
        self._lost(reason)

    def stopService(self) -> Deferred[None]:
        """Close politely, but never wait on a broker that does not answer or read."""
        super().stopService()
        connection, client = self.connection or self._settingUp, self._client
        closing = self._close(connection) if connection is not None else defer.succeed(None)

        def stopClient(_: object) -> Deferred[None] | None:
            if client is not None:
                return atMost(client.stopService(), CLOSE_TIMEOUT_S, self._clock)
            return None

        return closing.addCallback(stopClient).addCallback(lambda _: None)
