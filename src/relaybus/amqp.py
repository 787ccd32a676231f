"""The RabbitMQ bus: pika's Twisted adapter behind IRequestBus (gateways) and IWorkerBus (workers).

Every AMQP name, property and header used here is part of the contract in docs/protocol.md;
change them together. pika stays inside this module so that it can be swapped out.
"""

from __future__ import annotations

import functools
import random
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import pika
from pika.adapters.twisted_connection import TwistedProtocolConnection
from pika.exceptions import AMQPConnectionError, NackError, UnroutableError
from twisted.application.internet import ClientService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, inlineCallbacks
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import IReplyReceiver, IRequestBus, IRequestReceiver, IWorkerBus
from relaybus.messages import CancelNotice, Delivery, ReplyKind, ReplyMessage, RequestMessage

log = Logger(namespace="relaybus.amqp")

HEADER_REQUEST_TYPE = "relaybus-request-type"
HEADER_DEADLINE_MS = "relaybus-deadline-ms"
HEADER_GATEWAY_ID = "relaybus-gateway-id"
HEADER_PRINCIPAL = "relaybus-principal"
HEADER_SEQ = "relaybus-seq"
HEADER_CANCEL_REASON = "relaybus-cancel-reason"
CONTENT_TYPE = "application/json"
REPLY_QUEUE_EXPIRES_MS = 60_000
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
SETUP_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 3.0
# RabbitMQ proposes 60 s, so a silently cut connection went unnoticed for minutes (and the
# gateway stayed "ready"); `?heartbeat=N` in the broker URL overrides this.
DEFAULT_HEARTBEAT_S = 15
TRANSIENT = 1  # delivery_mode: requests and replies are worthless after their deadline


@attrs.frozen
class Topology:
    """Exchange and queue names; `prefix` lets several deployments (or test runs) share a vhost."""

    prefix: str = ""

    @property
    def requestsExchange(self) -> str:
        return f"{self.prefix}requests"

    @property
    def responsesExchange(self) -> str:
        return f"{self.prefix}responses"

    @property
    def cancelsExchange(self) -> str:
        return f"{self.prefix}cancels"

    def requestQueue(self, requestType: str) -> str:
        return f"{self.prefix}requests.{requestType}"

    def replyQueue(self, gatewayId: str) -> str:
        return f"{self.prefix}replies.{gatewayId}"

    @inlineCallbacks
    def declareExchanges(self, channel: Any) -> Any:
        for name in (self.requestsExchange, self.responsesExchange, self.cancelsExchange):
            yield channel.exchange_declare(exchange=name, exchange_type="direct", durable=True)


def brokerParameters(url: str) -> pika.URLParameters:
    parameters = pika.URLParameters(url)
    if "heartbeat" not in urllib.parse.parse_qs(urllib.parse.urlsplit(url).query):
        parameters.heartbeat = DEFAULT_HEARTBEAT_S
    return parameters


def validateBrokerURL(url: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise ValueError(f"broker must be 'memory' or an amqp:// or amqps:// URL, not {url!r}")


def endpointForURL(reactor: Any, url: str) -> IStreamClientEndpoint:
    """pika ignores host, port and TLS in its parameters: Twisted does the connecting."""
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or "localhost"
    if parsed.scheme == "amqps":
        return wrapClientTLS(optionsForClientTLS(host),
                             HostnameEndpoint(reactor, host, parsed.port or 5671, timeout=10))
    return HostnameEndpoint(reactor, host, parsed.port or 5672, timeout=10)


def consumeForever(queue: Any, handle: Callable[[Any], None],
                   stopped: Callable[[], None] | None = None) -> None:
    """Feed each message of a pika consumer queue to `handle` until the queue closes, then
    call `stopped` (the broker cancelled the consumer, or its channel or connection died).

    Iterative, not recursive: a backlog of ready messages must not grow the stack.
    """

    def deliver(message: Any) -> bool:
        try:
            handle(message)
        except Exception:
            log.failure("Handling an AMQP message failed")
        return True

    def later(more: bool) -> None:
        if more:
            step()
        elif stopped is not None:
            stopped()

    def step() -> None:
        while True:
            d = queue.get().addCallbacks(deliver, lambda _failure: False)
            if not d.called:  # nothing ready yet: continue when something arrives
                d.addCallback(later)
                return
            more: list[bool] = []
            d.addCallback(more.append)
            if not more[0]:  # the queue is closed: channel or connection gone
                if stopped is not None:
                    stopped()
                return

    step()


def watchChannel(link: BrokerLink, connection: TwistedProtocolConnection, channel: Any,
                 why: str) -> None:
    """A channel the broker closes while its connection lives on (a 406, a deleted queue)
    would leave a zombie: reconnect instead, which re-creates everything."""
    channel.on_closed.addBoth(lambda _: link.drop(connection, why))


def detached(published: Deferred[Any]) -> Deferred[Any]:
    """pika's result, in a Deferred of our own: cancelling it (a handler cancelled while it
    awaits sendChunk) must never cancel pika's Deferred (pika #1282, see the field notes)."""
    ours: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if ours.called:  # cancelled already; the late result needs no further handling
            return
        if isinstance(result, Failure):
            ours.errback(result)
        else:
            ours.callback(result)

    published.addBoth(relay)
    return ours


def atMost(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[None]:
    """Fires (with None) when `d` does or after `seconds`, whichever comes first; never
    cancels `d` and never fails."""
    ours: Deferred[None] = Deferred()

    def fire(_: Any = None) -> None:
        if not ours.called:
            ours.callback(None)

    detached(d).addBoth(fire)
    timer = clock.callLater(seconds, fire)
    ours.addCallback(lambda _: timer.cancel() if timer.active() else None)
    return ours


class _Connection(TwistedProtocolConnection):
    link: BrokerLink

    def connectionMade(self) -> None:
        # Twisted connects, so pika's own TCP_NODELAY is skipped: without it Nagle and delayed
        # ACKs add ~40 ms to a reply followed by its ack.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.link._connectionLost(self, reason)


class BrokerLink(Service):
    """One AMQP connection that keeps coming back.

    `setup(connection)` runs after every (re)connect and must reopen channels, topology and
    consumers; `lost(reason)` runs when a set-up connection goes away. Backoff grows across
    failed handshakes and setups, not just failed TCP connects, and resets only after a
    successful setup (so a wrong password does not retry in a tight loop).
    """

    def __init__(self, url: str, reactor: Any, name: str,
                 setup: Callable[[TwistedProtocolConnection], Deferred[Any]],
                 lost: Callable[[Failure], None]) -> None:
        self._url = url
        self._reactor = reactor
        self._name = name
        self._setup = setup
        self._lost = lost
        self._client: ClientService | None = None
        self._attempt = 0
        self._settingUp: TwistedProtocolConnection | None = None
        self._dropped: TwistedProtocolConnection | None = None
        self.connection: TwistedProtocolConnection | None = None
        self.blocked = False  # the broker refuses to read from us (memory or disk alarm)

    @property
    def ready(self) -> bool:
        return self.connection is not None and self.connection.is_open and not self.blocked

    def startService(self) -> None:
        super().startService()
        parameters = brokerParameters(self._url)
        parameters.client_properties = {"connection_name": self._name, "product": "relaybus"}
        link = self

        class _Factory(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> _Connection:
                protocol = _Connection(parameters, custom_reactor=link._reactor)
                protocol.link = link
                assert protocol.ready is not None
                protocol.ready.addCallbacks(lambda _: link._handshaken(protocol),
                                            link._handshakeFailed)
                return protocol

        self._client = ClientService(endpointForURL(self._reactor, self._url), _Factory(),
                                     retryPolicy=self._nextDelay, clock=self._reactor)
        self._client.startService()

    def _nextDelay(self, _attempt: int) -> float:
        """0.5 s doubling to 10 s, each shortened by up to a quarter at random."""
        self._attempt += 1
        delay = min(BACKOFF_INITIAL_S * 2 ** (self._attempt - 1), BACKOFF_MAX_S)
        return delay * random.uniform(0.75, 1.0)

    def _handshakeFailed(self, failure: Failure) -> None:
        if failure.check(AMQPConnectionError):
            # pika reports any stream lost during the handshake as a refusal: keep its reason
            # so an operator can tell a cut connection from a refused login.
            detail = failure.getErrorMessage() or repr(failure.value)
            why = ("the AMQP handshake failed (a refused login: check user, password and "
                   f"vhost; or a dropped connection): {detail}")
        else:
            why = failure.getErrorMessage() or repr(failure.value)
        log.warn("AMQP {name}: connection failed: {why}", name=self._name, why=why)

    def _handshaken(self, connection: TwistedProtocolConnection) -> Deferred[Any]:
        self._settingUp = connection
        impl = getattr(connection, "_impl", None)  # no public hook for connection.blocked
        if impl is not None:
            impl.add_on_connection_blocked_callback(lambda *_: self._setBlocked(True))
            impl.add_on_connection_unblocked_callback(lambda *_: self._setBlocked(False))

        def ready(_: Any) -> None:
            if timer.active():
                timer.cancel()
            if not connection.is_open or self._settingUp is not connection:
                return
            self._settingUp = None
            self._attempt = 0
            self.connection = connection
            log.info("AMQP {name}: connected and set up", name=self._name)

        def failed(failure: Failure) -> None:
            if timer.active():
                timer.cancel()
            lostMidway = not connection.is_open  # then _connectionLost says why
            if self._settingUp is connection:
                if not lostMidway:
                    log.failure("AMQP {name}: setting up the connection failed", failure,
                                name=self._name)
                self.drop(connection, "setup failed")

        def tooSlow() -> None:
            log.warn("AMQP {name}: setup took over {s} s", name=self._name, s=SETUP_TIMEOUT_S)
            self.drop(connection, "setup timed out")

        timer = self._reactor.callLater(SETUP_TIMEOUT_S, tooSlow)
        return detached(self._setup(connection)).addCallbacks(ready, failed)

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
        log.warn("AMQP {name}: connection lost: {why}", name=self._name,
                 why=reason.getErrorMessage())
        self._lost(reason)

    def stopService(self) -> Deferred[None]:
        """Close politely, but never wait on a broker that does not answer or read."""
        super().stopService()
        connection, client = self.connection or self._settingUp, self._client
        closing: Deferred[Any] = defer.succeed(None)
        if connection is not None and connection.is_open and connection.closed is not None:
            closing = atMost(connection.closed, CLOSE_TIMEOUT_S, self._reactor)
            connection.close()

        def abortAndStop(_: Any) -> Any:
            transport = connection.transport if connection is not None else None
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()  # a blocked broker never reads our close
            if client is not None:
                return atMost(client.stopService(), CLOSE_TIMEOUT_S, self._reactor)
            return None

        return closing.addCallback(abortAndStop).addCallback(lambda _: None)


def _properties(**kwargs: Any) -> pika.BasicProperties:
    return pika.BasicProperties(content_type=CONTENT_TYPE, delivery_mode=TRANSIENT, **kwargs)


def _unavailable(failure: Failure) -> Failure:
    if failure.check(RelaybusError, CancelledError):
        return failure
    why = failure.getErrorMessage()
    return Failure(RelaybusError(ErrorCode.UNAVAILABLE, f"the broker did not take it: {why}"))


@implementer(IRequestBus)
class AmqpRequestBus(MultiService):
    """A gateway's bus: publishes requests and cancels, consumes its own reply queue."""

    def __init__(self, url: str, reactor: IReactorTime, topology: Topology,
                 gatewayId: str) -> None:
        super().__init__()
        self.replyTo = gatewayId
        self._clock = reactor
        self._topology = topology
        self._receiver: IReplyReceiver | None = None
        self._channel: Any = None
        self._returned: set[str] = set()
        self._link = BrokerLink(url, reactor, f"relaybus gateway {gatewayId}", self._setup,
                                self._lost)
        self._link.setServiceParent(self)

    def listen(self, receiver: IReplyReceiver) -> None:
        self._receiver = receiver

    def isReady(self) -> bool:
        """Connected, set up, and not blocked by a broker resource alarm."""
        return self._channel is not None and self._channel.is_open and not self._link.blocked

    @inlineCallbacks
    def _setup(self, connection: TwistedProtocolConnection) -> Any:
        topology = self._topology
        consuming = yield connection.channel()
        watchChannel(self._link, connection, consuming, "the reply channel closed")
        yield topology.declareExchanges(consuming)
        replyQueue = topology.replyQueue(self.replyTo)
        # Not exclusive: it must outlive a short reconnect; x-expires removes it once this
        # gateway is gone for good.
        yield consuming.queue_declare(queue=replyQueue, durable=False, exclusive=False,
                                      auto_delete=False,
                                      arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
        yield consuming.queue_bind(queue=replyQueue, exchange=topology.responsesExchange,
                                   routing_key=self.replyTo)
        publishing = yield connection.channel()
        watchChannel(self._link, connection, publishing, "the publishing channel closed")
        yield publishing.confirm_delivery()
        publishing.add_on_return_callback(self._messageReturned)
        queue, _tag = yield consuming.basic_consume(queue=replyQueue, auto_ack=True)
        consumeForever(queue, self._replyArrived, lambda: self._link.drop(
            connection, "the broker cancelled the reply consumer"))
        self._returned.clear()
        self._channel = publishing

    def _lost(self, reason: Failure) -> None:
        self._channel = None
        if self._receiver is not None:
            self._receiver.busInterrupted(reason)

    def publishRequest(self, message: RequestMessage) -> Deferred[None]:
        channel = self._channel
        if channel is None or not channel.is_open:
            return fail(RelaybusError(ErrorCode.UNAVAILABLE,
                                      "the message broker is not reachable"))
        now = self._clock.seconds()
        headers: dict[str, Any] = {
            HEADER_REQUEST_TYPE: message.requestType,
            HEADER_DEADLINE_MS: int(message.deadline * 1000),
            HEADER_GATEWAY_ID: message.gatewayId,
            HEADER_PRINCIPAL: message.principal,
        }
        properties = _properties(
            correlation_id=message.correlationId, reply_to=message.replyTo, type="request",
            expiration=str(max(1, int((message.deadline - now) * 1000))),
            timestamp=int(now), headers=headers)
        correlationId = message.correlationId
        published = channel.basic_publish(
            exchange=self._topology.requestsExchange, routing_key=message.requestType,
            body=message.body, properties=properties, mandatory=True)

        def settled(result: Any) -> None:
            # The adapter can blame a basic.return on the wrong publish (see the field notes):
            # whether *this* message came back is decided by its correlation_id alone.
            returned = correlationId in self._returned
            self._returned.discard(correlationId)
            if returned:
                raise RelaybusError(ErrorCode.NO_HANDLER,
                                    f"no worker serves requestType {message.requestType!r}")
            if isinstance(result, Failure) and not result.check(UnroutableError):
                if result.check(NackError):
                    raise RelaybusError(ErrorCode.OVERLOADED,
                                        "the message broker refused the request")
                return _unavailable(result)  # type: ignore[return-value]
            return None

        return detached(published).addBoth(settled)

    def _messageReturned(self, message: Any) -> None:
        correlationId = message.properties.correlation_id
        if correlationId:
            self._returned.add(correlationId)

    def publishCancel(self, notice: CancelNotice) -> None:
        channel = self._channel
        if channel is None or not channel.is_open:
            return
        properties = _properties(correlation_id=notice.correlationId, type="cancel",
                                 headers={HEADER_CANCEL_REASON: notice.reason})
        channel.basic_publish(
            exchange=self._topology.cancelsExchange, routing_key=notice.requestType,
            body=b"", properties=properties).addErrback(
            lambda f: log.debug("Cancel notice not published: {why}", why=f.getErrorMessage()))

    def _replyArrived(self, message: Any) -> None:
        properties = message.properties
        kind = properties.type
        if kind not in ReplyKind._value2member_map_ or not properties.correlation_id:
            log.warn("Dropped a reply with type {kind!r} and no usable correlation_id",
                     kind=kind)
            return
        seq = (properties.headers or {}).get(HEADER_SEQ)
        if self._receiver is not None:
            self._receiver.replyReceived(ReplyMessage(
                correlationId=properties.correlation_id, replyTo=self.replyTo,
                kind=ReplyKind(kind), body=message.body,
                seq=seq if isinstance(seq, int) else None))


@implementer(IWorkerBus)
class AmqpWorkerBus(MultiService):
    """A worker's bus: consumes its requestTypes' queues and cancel notices, publishes replies."""

    def __init__(self, url: str, reactor: IReactorTime, topology: Topology,
                 name: str = "relaybus worker") -> None:
        super().__init__()
        self._clock = reactor
        self._topology = topology
        self._requestTypes: list[str] = []
        self._receiver: IRequestReceiver | None = None
        self._prefetch = 1
        self._consuming: Any = None
        self._publishing: Any = None
        self._consumerTags: list[str] = []
        self._serving = False
        self._link = BrokerLink(url, reactor, name, self._setup, self._lost)
        self._link.setServiceParent(self)

    def serve(self, requestTypes: Iterable[str], receiver: IRequestReceiver,
              prefetch: int) -> None:
        if self._receiver is not None:
            raise RuntimeError("an AmqpWorkerBus serves one receiver")
        self._requestTypes = list(requestTypes)
        self._receiver = receiver
        self._prefetch = prefetch
        self._serving = True

    def startService(self) -> None:
        if self._receiver is None:
            raise RuntimeError("call serve() before starting an AmqpWorkerBus")
        super().startService()

    def stopServing(self, receiver: IRequestReceiver) -> Deferred[Any]:
        """Stop taking new deliveries (those in hand can still be settled); fires once the
        broker confirmed, so deliveries already on their way have arrived."""
        self._serving = False
        channel, tags, self._consumerTags = self._consuming, self._consumerTags, []
        if channel is None or not channel.is_open:
            return defer.succeed(None)
        return DeferredList([detached(channel.basic_cancel(tag)) for tag in tags],
                            consumeErrors=True)

    def isReady(self) -> bool:
        return (self._publishing is not None and self._publishing.is_open
                and not self._link.blocked)

    @inlineCallbacks
    def _setup(self, connection: TwistedProtocolConnection) -> Any:
        topology = self._topology
        link = self._link
        consuming = yield connection.channel()
        watchChannel(link, connection, consuming, "the consuming channel closed")
        yield topology.declareExchanges(consuming)
        yield consuming.basic_qos(prefetch_count=self._prefetch)
        for requestType in self._requestTypes:
            queue = topology.requestQueue(requestType)
            yield consuming.queue_declare(queue=queue, durable=True)
            yield consuming.queue_bind(queue=queue, exchange=topology.requestsExchange,
                                       routing_key=requestType)
        declared = yield consuming.queue_declare(queue="", exclusive=True, auto_delete=True)
        cancelQueue = declared.method.queue
        for requestType in self._requestTypes:
            yield consuming.queue_bind(queue=cancelQueue, exchange=topology.cancelsExchange,
                                       routing_key=requestType)
        publishing = yield connection.channel()
        watchChannel(link, connection, publishing, "the publishing channel closed")
        yield publishing.confirm_delivery()
        self._consuming, self._publishing = consuming, publishing
        cancels, _tag = yield consuming.basic_consume(queue=cancelQueue, auto_ack=True)
        consumeForever(cancels, self._cancelArrived, lambda: link.drop(
            connection, "the broker cancelled the cancel-notice consumer"))
        self._consumerTags = []
        for requestType in self._requestTypes:
            if not self._serving:  # stopServing() came while we were setting up
                break
            queue, tag = yield consuming.basic_consume(
                queue=topology.requestQueue(requestType), auto_ack=False)
            if not self._serving:
                detached(consuming.basic_cancel(tag)).addErrback(lambda _: None)
            else:
                self._consumerTags.append(tag)
            consumeForever(queue, functools.partial(self._requestArrived, consuming),
                           functools.partial(self._consumerStopped, connection, requestType))

    def _consumerStopped(self, connection: TwistedProtocolConnection, requestType: str) -> None:
        if self._serving:  # not our own basic.cancel: the broker cancelled it (queue deleted)
            self._link.drop(connection, f"the broker cancelled the {requestType} consumer")

    def _lost(self, reason: Failure) -> None:
        self._consuming = self._publishing = None
        self._consumerTags = []
        if self._receiver is not None:
            self._receiver.busInterrupted(reason)

    def _requestArrived(self, channel: Any, message: Any) -> None:
        properties, method = message.properties, message.method
        headers = properties.headers or {}
        tag = method.delivery_tag

        def settle(requeue: bool) -> None:
            if channel is not self._consuming or not channel.is_open:
                return  # the broker requeues it itself when the channel closed
            if requeue:
                channel.basic_nack(delivery_tag=tag, requeue=True)
            else:
                channel.basic_ack(delivery_tag=tag)

        if not properties.correlation_id or not properties.reply_to:
            log.warn("Dropped a request without correlation_id or reply_to on {key}",
                     key=method.routing_key)
            settle(False)
            return
        deadlineMs = headers.get(HEADER_DEADLINE_MS)
        deadline = deadlineMs / 1000 if isinstance(deadlineMs, int) else float("inf")
        principal = headers.get(HEADER_PRINCIPAL)
        request = RequestMessage(
            correlationId=properties.correlation_id,
            requestType=method.routing_key,  # the queue is bound by it: always right
            replyTo=properties.reply_to, body=message.body, deadline=deadline,
            gatewayId=str(headers.get(HEADER_GATEWAY_ID) or ""),
            principal=principal if isinstance(principal, str) else None)
        assert self._receiver is not None
        self._receiver.requestReceived(Delivery(request, bool(method.redelivered), settle))

    def _cancelArrived(self, message: Any) -> None:
        properties = message.properties
        if properties.correlation_id and self._receiver is not None:
            reason = (properties.headers or {}).get(HEADER_CANCEL_REASON) or "cancelled"
            self._receiver.cancelReceived(CancelNotice(
                properties.correlation_id, message.method.routing_key, str(reason)))

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        channel = self._publishing
        if channel is None or not channel.is_open:
            return fail(RelaybusError(ErrorCode.UNAVAILABLE,
                                      "the message broker is not reachable"))
        headers = {HEADER_SEQ: reply.seq} if reply.seq is not None else None
        properties = _properties(correlation_id=reply.correlationId, type=str(reply.kind),
                                 headers=headers)
        published = channel.basic_publish(exchange=self._topology.responsesExchange,
                                          routing_key=reply.replyTo, body=reply.body,
                                          properties=properties)
        return detached(published).addCallbacks(lambda _: None, _unavailable)
