"""Test support: an in-memory fake for every relaybus interface (real processes: relaybus.harness),
and the testing kit for handler authors (runHandler, at the end; docs/workers.md).

The fakes record what they are asked to do and let a test play the other side by hand; each
provides its interface fully (tests check that with verifyObject).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable
from typing import Any, cast

import attrs
import pika
import pika.frame
import pika.spec
from pika.adapters.twisted_connection import ClosableDeferredQueue, ReceivedMessage
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.config import Limits
from relaybus.errors import RelaybusError, ReplyRefusedError
from relaybus.frames import ClientFrames
from relaybus.identity import Principal
from relaybus.interfaces import (
    IClientConnection,
    IJWKSFetcher,
    IReplyReceiver,
    IRequestBus,
    IRequestHandler,
    IRequestReceiver,
    IRequestStream,
    IWorkerBus,
)
from relaybus.jwks import JWKSFetchError
from relaybus.messages import CancelNotice, Delivery, ReplyKind, ReplyMessage, RequestMessage
from relaybus.strictjson import decodeJSON, encodeJSON

# Fakes


@implementer(IClientConnection)
@attrs.define(eq=False)
class FakeClientConnection:
    """A client connection that keeps every frame sent to it, decoded.

    Frames are made as the gateway's are (ClientFrames), so a chunk or response over
    `maxMessageBytes` or not encodable raises the same RelaybusError and records nothing.
    """

    connectionId: str = "connection-1"
    frames: list[dict[str, Any]] = attrs.field(factory=list)
    maxMessageBytes: int = Limits().maxMessageBytes
    principal: Principal | None = None

    def sendChunk(self, requestId: str, seq: int, data: Any) -> None:
        self._record(ClientFrames(self.maxMessageBytes).chunk(requestId, seq, data))

    def sendResponse(self, requestId: str, data: Any) -> None:
        self._record(ClientFrames(self.maxMessageBytes).response(requestId, data))

    def sendError(self, requestId: str, error: RelaybusError) -> None:
        self._record(ClientFrames(self.maxMessageBytes).error(requestId, error))

    def _record(self, frame: bytes) -> None:
        self.frames.append(decodeJSON(frame))

    def terminalFrames(self, requestId: str) -> list[dict[str, Any]]:
        return [f for f in self.frames
                if f.get("requestId") == requestId and f["type"] in ("response", "error")]


@implementer(IRequestBus)
@attrs.define(eq=False)
class FakeRequestBus:
    """A gateway bus whose publishes stay pending until the test settles them.

    `publishResult` set to a RelaybusError makes every publish fail with it at once.
    """

    replyTo: str = "fake-gateway"
    ready: bool = True
    publishResult: RelaybusError | None = None
    published: list[tuple[RequestMessage, Deferred[None]]] = attrs.field(factory=list)
    cancels: list[CancelNotice] = attrs.field(factory=list)
    receiver: IReplyReceiver | None = None
    consumers: dict[str, int | None] = attrs.field(factory=dict)  # by requestType; else None
    consumerQueries: list[str] = attrs.field(factory=list)

    def listen(self, receiver: IReplyReceiver) -> None:
        self.receiver = receiver

    def consumersOf(self, requestType: str) -> Deferred[int | None]:
        self.consumerQueries.append(requestType)
        return succeed(self.consumers.get(requestType))

    def isReady(self) -> bool:
        return self.ready

    def publishRequest(self, message: RequestMessage) -> Deferred[None]:
        if self.publishResult is not None:
            return fail(self.publishResult)
        d: Deferred[None] = Deferred()
        self.published.append((message, d))
        return d

    def publishCancel(self, notice: CancelNotice) -> None:
        self.cancels.append(notice)

    def reply(self, message: RequestMessage, kind: str, body: bytes,
              seq: int | None = None) -> None:
        """Play a worker: deliver a reply to the listening gateway."""
        from relaybus.messages import ReplyKind

        assert self.receiver is not None
        self.receiver.replyReceived(ReplyMessage(message.correlationId, message.replyTo,
                                                 ReplyKind(kind), body, seq))


@implementer(IWorkerBus)
@attrs.define(eq=False)
class FakeWorkerBus:
    """A worker bus: the test hands in deliveries and reads the replies published."""

    ready: bool = True
    replies: list[ReplyMessage] = attrs.field(factory=list)
    settled: dict[str, str] = attrs.field(factory=dict)  # correlationId -> "ack" | "requeue"
    receiver: IRequestReceiver | None = None
    requestTypes: list[str] = attrs.field(factory=list)
    prefetch: int = 0
    failPublishes: bool = False  # publishes fail as on a lost channel (unavailable)
    refusePublishes: bool = False  # ... as on a publisher nack (ReplyRefusedError)

    def serve(self, requestTypes: Iterable[str], receiver: IRequestReceiver,
              prefetch: int) -> None:
        self.requestTypes = list(requestTypes)
        self.receiver = receiver
        self.prefetch = prefetch

    def stopServing(self, receiver: IRequestReceiver) -> Deferred[None]:
        self.receiver = None
        return succeed(None)

    def isReady(self) -> bool:
        return self.ready

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        if self.failPublishes:
            return fail(RelaybusError("unavailable", "fake bus is down"))
        if self.refusePublishes:
            return fail(ReplyRefusedError("the fake broker refused the reply"))
        self.replies.append(reply)
        return succeed(None)

    def deliver(self, message: RequestMessage, redelivered: bool = False) -> Delivery:
        def settle(requeue: bool) -> None:
            assert message.correlationId not in self.settled, "settled twice"
            self.settled[message.correlationId] = "requeue" if requeue else "ack"

        delivery = Delivery(message, redelivered, settle)
        assert self.receiver is not None
        self.receiver.requestReceived(delivery)
        return delivery

    def repliesFor(self, correlationId: str) -> list[ReplyMessage]:
        return [r for r in self.replies if r.correlationId == correlationId]


@implementer(IReplyReceiver)
@attrs.define(eq=False)
class FakeReplyReceiver:
    replies: list[ReplyMessage] = attrs.field(factory=list)
    interruptions: list[Failure | None] = attrs.field(factory=list)

    def replyReceived(self, reply: ReplyMessage) -> None:
        self.replies.append(reply)

    def busInterrupted(self, reason: Failure | None) -> None:
        self.interruptions.append(reason)


# Fakes of pika's Twisted adapter, for the AMQP buses (relaybus.amqp)


@attrs.define
class PublishedMessage:
    """One basic_publish; fire `confirm` as the broker would (callback: ack; errback: nack,
    unroutable, channel closed)."""

    exchange: str
    routingKey: str
    body: bytes
    properties: pika.BasicProperties
    mandatory: bool
    confirm: Deferred[Any]


@attrs.define(eq=False)
class FakeChannel:
    """The surface of pika's TwistedChannel that relaybus uses, recording every call.

    Declarations, qos and confirm mode succeed at once; publishes and basic_cancel wait for
    the test (`PublishedMessage.confirm`, `cancelOks`); `holdConsumes` makes basic_consume
    wait too (`heldConsumes`), for races during setup. An exclusive basic_consume on a queue
    that has consumers already (`queueConsumers`) is refused as RabbitMQ refuses it: 403
    ACCESS_REFUSED, the channel closes. The broker's side: `deliver`, `returnMessage`,
    `closeByBroker`.
    """

    holdConsumes: bool = False
    is_open: bool = True
    on_closed: Deferred[Any] = attrs.field(factory=Deferred)
    declarations: list[tuple[str, dict[str, Any]]] = attrs.field(factory=list)
    prefetch: int | None = None
    confirming: bool = False
    published: list[PublishedMessage] = attrs.field(factory=list)
    acks: list[int] = attrs.field(factory=list)
    nacks: list[tuple[int, bool]] = attrs.field(factory=list)
    consumers: dict[str, ClosableDeferredQueue] = attrs.field(factory=dict)  # by queue name
    consumerTags: dict[str, str] = attrs.field(factory=dict)  # queue name -> consumer tag
    # queue name -> basic_consume's keyword arguments (auto_ack, exclusive, ...)
    consumeArguments: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    heldConsumes: list[Deferred[None]] = attrs.field(factory=list)
    cancelled: list[str] = attrs.field(factory=list)  # consumer tags, in order
    cancelOks: list[Deferred[Any]] = attrs.field(factory=list)
    _returnCallbacks: list[Any] = attrs.field(factory=list)
    _serverNamedQueues: int = 0
    # What a passive queue.declare reports: consumers by queue name; a queue missing here
    # does not exist (the broker closes the channel with 404).
    queueConsumers: dict[str, int] = attrs.field(factory=dict)

    def _declared(self, method: str, **arguments: Any) -> Deferred[Any]:
        self.declarations.append((method, arguments))
        return succeed(None)

    def exchange_declare(self, **arguments: Any) -> Deferred[Any]:
        return self._declared("exchange_declare", **arguments)

    def queue_bind(self, **arguments: Any) -> Deferred[Any]:
        return self._declared("queue_bind", **arguments)

    def queue_declare(self, queue: str = "", **arguments: Any) -> Deferred[Any]:
        if arguments.get("passive"):
            self.declarations.append(("queue_declare", {"queue": queue, **arguments}))
            if queue not in self.queueConsumers:
                self.closeByBroker(ChannelClosedByBroker(404, f"NOT_FOUND - no queue '{queue}'"))
                return fail(ChannelClosedByBroker(404, f"NOT_FOUND - no queue '{queue}'"))
            return succeed(pika.frame.Method(1, pika.spec.Queue.DeclareOk(
                queue=queue, consumer_count=self.queueConsumers[queue])))
        if not queue:
            self._serverNamedQueues += 1
            queue = f"amq.gen-{self._serverNamedQueues}"
        self.declarations.append(("queue_declare", {"queue": queue, **arguments}))
        return succeed(pika.frame.Method(1, pika.spec.Queue.DeclareOk(queue=queue)))

    def basic_qos(self, prefetch_count: int = 0, **arguments: Any) -> Deferred[Any]:
        self.prefetch = prefetch_count
        return succeed(None)

    def confirm_delivery(self) -> Deferred[Any]:
        self.confirming = True
        return succeed(None)

    def add_on_return_callback(self, callback: Any) -> None:
        self._returnCallbacks.append(callback)

    def basic_consume(self, queue: str, auto_ack: bool = False,
                      **arguments: Any) -> Deferred[Any]:
        if arguments.get("exclusive") and self.queueConsumers.get(queue, 0) > 0:
            refusal = ChannelClosedByBroker(
                403, f"ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use")
            self.closeByBroker(refusal)
            return fail(refusal)
        self.consumeArguments[queue] = {"auto_ack": auto_ack, **arguments}
        consumer = ClosableDeferredQueue()
        tag = f"ctag-{queue}"
        self.consumers[queue] = consumer
        self.consumerTags[queue] = tag
        if not self.holdConsumes:
            return succeed((consumer, tag))
        held: Deferred[None] = Deferred()
        self.heldConsumes.append(held)
        return held.addCallback(lambda _: (consumer, tag))

    def basic_cancel(self, consumer_tag: str = "") -> Deferred[Any]:
        self.cancelled.append(consumer_tag)
        cancelOk: Deferred[Any] = Deferred()
        self.cancelOks.append(cancelOk)
        return cancelOk

    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None:
        self.acks.append(delivery_tag)

    def basic_nack(self, delivery_tag: int = 0, multiple: bool = False,
                   requeue: bool = True) -> None:
        self.nacks.append((delivery_tag, requeue))

    def basic_publish(self, exchange: str, routing_key: str, body: bytes,
                      properties: pika.BasicProperties | None = None,
                      mandatory: bool = False) -> Deferred[Any]:
        confirm: Deferred[Any] = Deferred()
        self.published.append(PublishedMessage(exchange, routing_key, body,
                                               properties or pika.BasicProperties(),
                                               mandatory, confirm))
        return confirm

    # The broker's side

    def deliver(self, queue: str, properties: pika.BasicProperties, body: bytes = b"",
                routingKey: str | None = None, deliveryTag: int = 1,
                redelivered: bool = False) -> None:
        """A message from `queue` to its consumer (routed by `routingKey`, default: the part
        of the queue name after its last dot, as for a request queue)."""
        method = pika.spec.Basic.Deliver(
            consumer_tag=self.consumerTags[queue], delivery_tag=deliveryTag,
            redelivered=redelivered, exchange="",
            routing_key=queue.rpartition(".")[2] if routingKey is None else routingKey)
        self.consumers[queue].put(ReceivedMessage(self, method, properties, body))

    def returnMessage(self, properties: pika.BasicProperties, body: bytes = b"") -> None:
        """A basic.return (NO_ROUTE) of a mandatory publish."""
        method = pika.spec.Basic.Return(reply_code=312, reply_text="NO_ROUTE")
        for callback in self._returnCallbacks:
            callback(ReceivedMessage(self, method, properties, body))

    def closeByBroker(self, reason: Exception) -> None:
        """What pika does when the channel closes: pending calls fail, consumers stop,
        on_closed fires."""
        self.is_open = False
        for call in self.heldConsumes:
            if not call.called:
                call.errback(reason)
        for consumer in self.consumers.values():
            consumer.close(reason)
        self.on_closed.callback(reason)


@attrs.define(eq=False)
class FakeAmqpConnection:
    """pika's TwistedProtocolConnection as the buses' setUpConnection sees it."""

    holdConsumes: bool = False
    is_open: bool = True
    channels: list[FakeChannel] = attrs.field(factory=list)
    queueConsumers: dict[str, int] = attrs.field(factory=dict)  # shared by its channels

    def channel(self) -> Deferred[FakeChannel]:
        channel = FakeChannel(holdConsumes=self.holdConsumes,
                              queueConsumers=self.queueConsumers)
        self.channels.append(channel)
        return succeed(channel)

    def lose(self, reason: Exception) -> None:
        """The connection drops: every channel closes with it."""
        self.is_open = False
        for channel in self.channels:
            if channel.is_open:
                channel.closeByBroker(reason)


@implementer(IRequestReceiver)
@attrs.define(eq=False)
class FakeRequestReceiver:
    """Records deliveries; settles them only when the test says so."""

    deliveries: list[Delivery] = attrs.field(factory=list)
    cancels: list[CancelNotice] = attrs.field(factory=list)
    interruptions: list[Failure | None] = attrs.field(factory=list)

    def requestReceived(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)

    def cancelReceived(self, notice: CancelNotice) -> None:
        self.cancels.append(notice)

    def busInterrupted(self, reason: Failure | None) -> None:
        self.interruptions.append(reason)


@implementer(IRequestStream)
@attrs.define(eq=False)
class FakeRequestStream:
    chunks: list[Any] = attrs.field(factory=list)

    def sendChunk(self, data: Any) -> Deferred[None]:
        self.chunks.append(data)
        return succeed(None)


@implementer(IRequestHandler)
@attrs.define(eq=False)
class FakeRequestHandler:
    """A handler whose every call waits on a Deferred the test fires (or cancels)."""

    requestType: str = "fake"
    idempotent: bool = False
    calls: list[tuple[Any, IRequestStream, Deferred[Any]]] = attrs.field(factory=list)
    cancelled: list[Any] = attrs.field(factory=list)

    def handle(self, request: Any, stream: IRequestStream) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: self.cancelled.append(request))
        self.calls.append((request, stream, d))
        return d


@implementer(IJWKSFetcher)
@attrs.define(eq=False)
class FakeJWKSFetcher:
    """A JWK Set server the test answers: each fetch waits until `respond` or `fail`."""

    pending: list[Deferred[bytes]] = attrs.field(factory=list)
    fetches: int = 0
    cancelled: int = 0

    def fetch(self) -> Deferred[bytes]:
        self.fetches += 1

        def cancel(d: Deferred[bytes]) -> None:
            self.cancelled += 1
            self.pending.remove(d)

        d: Deferred[bytes] = Deferred(cancel)
        self.pending.append(d)
        return d

    def respond(self, body: bytes | str) -> None:
        """Answer the oldest fetch in flight with `body`."""
        self.pending.pop(0).callback(body.encode() if isinstance(body, str) else body)

    def fail(self, reason: str = "HTTP status 500") -> None:
        self.pending.pop(0).errback(JWKSFetchError(reason))


# The handler testing kit: one request through the real WorkerRuntime, no broker, no sockets.


@attrs.frozen
class HandlerOutcome:
    """How one request ended, as the gateway would see it."""

    chunks: list[Any]  # every chunk's data, in order
    # "response", "error", or None: no final reply (skipped because its deadline passed or it
    # was cancelled while queued, or handed back at shutdown: see `settled`)
    final: str | None = None
    result: Any = None  # the final response's data
    errorCode: str | None = None  # e.g. "bad_request", "handler_error", "cancelled", "timeout"
    errorMessage: str | None = None
    settled: str = "ack"  # what the runtime did with the delivery: "ack" or "requeue"

    @property
    def ok(self) -> bool:
        return self.final == "response"


def _inAsyncioTask() -> bool:
    try:
        return asyncio.current_task() is not None
    except RuntimeError:  # no running loop
        return False


class HandlerRun:
    """One request to one handler, run by the real WorkerRuntime on a FakeWorkerBus: what the
    handler sees (payload, principal, claims, deadline, redelivered) and what the gateway would
    get (chunks, then one result or error code) are exactly what production gives.

    `clock` is a twisted Clock by default: the request's deadline passes only when the test
    says (passDeadline(), or clock.advance()), and blocking handlers run inline. Pass the real
    reactor (pytest-twisted, trial) for real time and real threads. Asyncio handlers run as
    Tasks on the running asyncio loop (pytest-asyncio, asyncio.run, or the asyncio reactor).
    """

    def __init__(self, handler: IRequestHandler, payload: Any = None, *,
                 clock: Any = None, timeoutS: float = 30.0, redelivered: bool = False,
                 principal: str | None = None, claims: dict[str, Any] | None = None,
                 threads: int = 4, drainTimeoutS: float = 10.0) -> None:
        from relaybus.worker import WorkerRuntime

        self.clock = Clock() if clock is None else clock
        self.bus = FakeWorkerBus()
        self.runtime = WorkerRuntime(self.bus, {handler.requestType: handler}, self.clock,
                                     concurrency=1, drainTimeoutS=drainTimeoutS,
                                     threads=threads)
        self.runtime.startService()
        self.correlationId = f"kit-{next(_runNumbers)}"
        self.message = RequestMessage(
            correlationId=self.correlationId, requestType=handler.requestType,
            replyTo="relaybus-testing", body=encodeJSON(payload),
            deadline=self.clock.seconds() + timeoutS, gatewayId="relaybus-testing",
            principal=principal, claims=None if claims is None else encodeJSON(claims))
        self._settled: str | None = None
        self._waiters: list[Deferred[HandlerOutcome]] = []
        self.runtime.requestReceived(Delivery(self.message, redelivered, self._settle))

    @property
    def chunks(self) -> list[Any]:
        """The chunks published so far."""
        return [decodeJSON(r.body) for r in self.bus.repliesFor(self.correlationId)
                if r.kind is ReplyKind.CHUNK]

    @property
    def ended(self) -> bool:
        return self._settled is not None

    @property
    def outcome(self) -> HandlerOutcome:
        if self._settled is None:
            raise AssertionError(f"the request has not ended yet ({len(self.chunks)} chunks "
                                 "so far): advance the clock or await finished()")
        finals = [r for r in self.bus.repliesFor(self.correlationId)
                  if r.kind is not ReplyKind.CHUNK]
        assert len(finals) <= 1, f"{len(finals)} final replies for one request"
        if not finals:
            return HandlerOutcome(self.chunks, settled=self._settled)
        body = decodeJSON(finals[0].body)
        if finals[0].kind is ReplyKind.ERROR:
            return HandlerOutcome(self.chunks, "error", errorCode=body.get("code"),
                                  errorMessage=body.get("message"), settled=self._settled)
        return HandlerOutcome(self.chunks, "response", result=body, settled=self._settled)

    def finished(self) -> Any:
        """Awaitable (or, for trial, returnable) outcome: an asyncio Future inside an asyncio
        Task, a Deferred anywhere else."""
        d: Deferred[HandlerOutcome] = Deferred()
        if self.ended:
            d.callback(self.outcome)
        else:
            self._waiters.append(d)
        if _inAsyncioTask():
            return Deferred.asFuture(d, asyncio.get_running_loop())
        return d

    def handlerDone(self) -> Any:
        """Awaitable: once the handler's own work has ended, after the runtime stopped it
        (its `finally` blocks ran). Same kinds as finished()."""
        d = self.runtime.whenStoppedHandlersEnd()
        if _inAsyncioTask():
            return Deferred.asFuture(d, asyncio.get_running_loop())
        return d

    def cancel(self, reason: str = "client") -> None:
        """The gateway's cancel notice (the client cancelled or went away)."""
        self.runtime.cancelReceived(CancelNotice(self.correlationId, self.message.requestType,
                                                 reason))

    def passDeadline(self) -> None:
        """Move a Clock to the request's deadline (on the real reactor: wait for it)."""
        if not isinstance(self.clock, Clock):
            raise TypeError("passDeadline() needs the default Clock; on a real reactor the "
                            "deadline passes by itself (timeoutS)")
        self.clock.advance(max(0.0, self.message.deadline - self.clock.seconds()))

    def shutDown(self) -> Any:
        """The worker's SIGTERM: drain (drainTimeoutS, on the clock), then hand back.
        Awaitable once the runtime has stopped: same kinds as finished()."""
        d = cast("Deferred[None]", self.runtime.stopService())
        if _inAsyncioTask():
            return Deferred.asFuture(d, asyncio.get_running_loop())
        return d

    def _settle(self, requeue: bool) -> None:
        assert self._settled is None, "the request was settled twice"
        self._settled = "requeue" if requeue else "ack"
        self._ended()

    def _ended(self) -> None:
        # Let the thread pool go once a stopped handler's own work has ended too: stopping at
        # once would leave the runtime's 2 s grace timer behind (trial: a dirty reactor).
        self.runtime.whenStoppedHandlersEnd().addCallback(self._stopRuntime)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.outcome)

    def _stopRuntime(self, _: object) -> None:
        if self.runtime.running:
            self.runtime.stopService()


_runNumbers = itertools.count(1)


def runHandler(handler: IRequestHandler, payload: Any = None, **options: Any) -> HandlerRun:
    """Run one request through a handler; see HandlerRun for the options."""
    return HandlerRun(handler, payload, **options)
