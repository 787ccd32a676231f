"""Test support: an in-memory fake for every relaybus interface (real processes: relaybus.harness).

The fakes record what they are asked to do and let a test play the other side by hand; each
provides its interface fully (tests check that with verifyObject).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.errors import RelaybusError
from relaybus.frames import decodeJSON
from relaybus.interfaces import (
    IClientConnection,
    IReplyReceiver,
    IRequestBus,
    IRequestHandler,
    IRequestReceiver,
    IRequestStream,
    IWorkerBus,
)
from relaybus.messages import CancelNotice, Delivery, ReplyMessage, RequestMessage

# Fakes


@implementer(IClientConnection)
@attrs.define(eq=False)
class FakeClientConnection:
    """A client connection that keeps every frame sent to it, decoded."""

    connectionId: str = "connection-1"
    frames: list[dict[str, Any]] = attrs.field(factory=list)

    def deliverFrame(self, frame: bytes) -> None:
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

    def listen(self, receiver: IReplyReceiver) -> None:
        self.receiver = receiver

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
    failPublishes: bool = False

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
