"""The embedded bus: gateway and workers in one process, with the broker's semantics.

It is what `twistd -n relaybus` runs with no broker configured, so it keeps the behaviour a
user will later see on RabbitMQ: per-requestType queues with prefetch, deadlines that expire
queued requests, cancel notices, no_handler when nobody serves a requestType, and deliveries
that are asynchronous and strictly ordered.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import (
    IReplyReceiver,
    IRequestBus,
    IRequestReceiver,
    IWorkerBus,
)
from relaybus.messages import CancelNotice, Delivery, ReplyMessage, RequestMessage

log = Logger(namespace="relaybus.memory")


@attrs.define(eq=False)
class _Consumer:
    receiver: IRequestReceiver
    prefetch: int
    unsettled: int = 0


@implementer(IRequestBus, IWorkerBus)
class MemoryBus(Service):
    """One process's bus. Serves one gateway (IRequestBus) and any number of workers."""

    replyTo = "memory"

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._replyReceiver: IReplyReceiver | None = None
        self._consumers: dict[str, list[_Consumer]] = {}
        self._queues: dict[str, collections.deque[tuple[RequestMessage, bool]]] = {}
        self._roundRobin: dict[str, int] = {}
        self._calls: collections.deque[Callable[[], Any]] = collections.deque()
        self._scheduled = False

    # Ordered asynchronous delivery: a FIFO of calls run on the next reactor turn. (Separate
    # callLater(0) calls are not guaranteed to run in the order they were made.)

    def _later(self, call: Callable[[], Any]) -> None:
        self._calls.append(call)
        if not self._scheduled:
            self._scheduled = True
            self._clock.callLater(0, self._runCalls)

    def _runCalls(self) -> None:
        self._scheduled = False
        for _ in range(len(self._calls)):
            try:
                self._calls.popleft()()
            except Exception:
                log.failure("A receiver of the embedded bus failed")

    # IRequestBus

    def listen(self, receiver: IReplyReceiver) -> None:
        self._replyReceiver = receiver

    def isReady(self) -> bool:
        return bool(self.running)

    def publishRequest(self, message: RequestMessage) -> Deferred[None]:
        if not self.running:
            return fail(RelaybusError(ErrorCode.UNAVAILABLE, "the embedded bus is stopped"))
        if not self._consumers.get(message.requestType):
            return fail(RelaybusError(ErrorCode.NO_HANDLER,
                                      f"no worker serves requestType {message.requestType!r}"))
        self._queues.setdefault(message.requestType, collections.deque()).append((message, False))
        self._later(lambda: self._pump(message.requestType))
        return succeed(None)

    def consumersOf(self, requestType: str) -> Deferred[int | None]:
        return succeed(None)  # in-process handlers live as long as the gateway

    def publishCancel(self, notice: CancelNotice) -> None:
        for consumer in self._consumers.get(notice.requestType, ()):
            self._later(functools.partial(consumer.receiver.cancelReceived, notice))

    # IWorkerBus

    def serve(self, requestTypes: Iterable[str], receiver: IRequestReceiver,
              prefetch: int) -> None:
        for requestType in requestTypes:  # prefetch applies per requestType, as with AMQP
            self._consumers.setdefault(requestType, []).append(_Consumer(receiver, prefetch))

    def stopServing(self, receiver: IRequestReceiver) -> Deferred[None]:
        for requestType, consumers in list(self._consumers.items()):
            consumers[:] = [c for c in consumers if c.receiver is not receiver]
            if not consumers:
                del self._consumers[requestType]
        return succeed(None)

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        if not self.running:
            return fail(RelaybusError(ErrorCode.UNAVAILABLE, "the embedded bus is stopped"))
        receiver = self._replyReceiver
        if receiver is not None:
            self._later(lambda: receiver.replyReceived(reply))
        return succeed(None)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._replyReceiver is not None:
            self._replyReceiver.busInterrupted(Failure(RelaybusError(
                ErrorCode.UNAVAILABLE, "the embedded bus stopped")))
        return None

    # Queues

    def queuedCount(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def _pump(self, requestType: str) -> None:
        queue = self._queues.get(requestType)
        while queue:
            message, redelivered = queue[0]
            if message.deadline <= self._clock.seconds():
                queue.popleft()  # expired in the queue, as a broker TTL would drop it
                continue
            consumer = self._nextConsumer(requestType)
            if consumer is None:
                return
            queue.popleft()
            consumer.unsettled += 1
            consumer.receiver.requestReceived(
                Delivery(message, redelivered=redelivered,
                         settle=self._settler(consumer, requestType, message)))
        if queue is not None and not queue:
            del self._queues[requestType]

    def _nextConsumer(self, requestType: str) -> _Consumer | None:
        consumers = self._consumers.get(requestType, [])
        start = self._roundRobin.get(requestType, 0)
        for offset in range(len(consumers)):
            index = (start + offset) % len(consumers)
            if consumers[index].unsettled < consumers[index].prefetch:
                self._roundRobin[requestType] = index + 1
                return consumers[index]
        return None

    def _settler(self, consumer: _Consumer, requestType: str,
                 message: RequestMessage) -> Callable[[bool], None]:
        settled = False

        def settle(requeue: bool) -> None:
            nonlocal settled
            if settled:
                return
            settled = True
            consumer.unsettled -= 1
            if requeue:
                queue = self._queues.setdefault(requestType, collections.deque())
                queue.appendleft((message, True))
            self._later(lambda: self._pump(requestType))

        return settle
