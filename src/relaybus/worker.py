"""The worker runtime: requests from the bus in, handler calls, chunks and one final reply out.

A delivery is acked only after its final reply is published (at-least-once). A redelivered
request may have been half-run by a worker that died, so by default it is answered with
`worker_lost` instead of being run again; handlers that declare `idempotent = True` run again.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.errors import WORKER_ERROR_CODES, ErrorCode, RelaybusError, ReplyRefusedError
from relaybus.handlerworlds import (
    ASYNCIO_ON_REACTOR,
    DEFAULT_THREADS,
    THREAD,
    TWISTED,
    HandlerCalls,
    threadsFor,
    worldOf,
)
from relaybus.interfaces import IRequestHandler, IRequestReceiver, IRequestStream, IWorkerBus
from relaybus.messages import CancelNotice, Delivery, ReplyKind, ReplyMessage, RequestMessage
from relaybus.strictjson import decodeJSON, encodeJSON

log = Logger(namespace="relaybus.worker")

# Cancel notices for requests not (yet) running are remembered this long, in case the request
# is still queued: it is then skipped instead of run.
REMEMBER_CANCELLED_S = 300.0
REMEMBER_CANCELLED_MAX = 10_000
# After a drain times out and hands the rest back, how long their stopped handlers get to end
# (an asyncio Task's `finally` blocks run on the loop after Task.cancel()).
STOPPED_HANDLERS_GRACE_S = 2.0
# Chunks of one request that may await their publisher confirms at once before sendChunk
# makes the handler wait (docs/protocol.md: a worker may pipeline its chunks).
CHUNK_WINDOW = 16
# Either kind of cancellation ends a handler quietly once the runtime has stopped it.
_CANCELLATIONS = (CancelledError, asyncio.CancelledError)


class Settlement(enum.Enum):
    """How the runtime lets go of a delivery."""

    ACK = "ack"  # finished: its final reply is published, or it needed none
    REQUEUE = "requeue"  # handed back unfinished, for another worker (shutdown)
    # Let go without telling the bus: its connection is gone and the broker requeues it itself.
    RELEASE = "release"


@attrs.frozen
class HandlerRequest:
    """What a handler is given about one request."""

    payload: Any
    requestType: str
    correlationId: str
    deadline: float
    redelivered: bool
    principal: str | None  # the sub the gateway verified (relaybus-principal), or None
    # The verified claims the gateway forwards (relaybus-claims): {} when it has none.
    claims: Mapping[str, Any] = attrs.field(factory=dict)


def _publishReply(bus: IWorkerBus, request: RequestMessage, kind: ReplyKind, body: bytes,
                  seq: int | None = None) -> Deferred[None]:
    """Publish a chunk or final reply to the gateway waiting for `request`."""
    return bus.publishReply(ReplyMessage(
        correlationId=request.correlationId, replyTo=request.replyTo, kind=kind, body=body,
        seq=seq))


@implementer(IRequestStream)
@attrs.define(eq=False)
class _Stream:
    """A request's chunks on their way out. sendChunk does not wait for each chunk's publisher
    confirm (a broker round trip per chunk): up to CHUNK_WINDOW chunks of a request may await
    theirs, and only a handler that gets further ahead waits, for the oldest. A refused chunk
    still ends the request (`refused`), and the final reply waits for every chunk's confirm,
    so a client never gets a response past a chunk the broker dropped."""

    _bus: IWorkerBus
    _request: RequestMessage
    _nextSeq: int = 0
    ended: bool = False
    # Called when the broker refuses a chunk: the runtime then ends the request, so that no
    # later chunk reaches the client past the gap.
    refused: Callable[[], None] | None = None
    unconfirmed: int = 0  # chunks published whose confirm has not come back
    chunkRefused: bool = False  # the broker refused one of them (a nack)
    _waiters: list[Deferred[None]] = attrs.field(factory=list)  # handlers ahead of the window
    _allConfirmed: list[Deferred[None]] = attrs.field(factory=list)

    def sendChunk(self, data: Any) -> Deferred[None]:
        if self.ended:
            log.debug("Chunk after the end of {correlationId} dropped",
                      correlationId=self._request.correlationId)
            return succeed(None)
        body = encodeJSON(data)  # raises for what JSON cannot carry: nothing is sent
        seq, self._nextSeq = self._nextSeq, self._nextSeq + 1
        self.unconfirmed += 1
        _publishReply(self._bus, self._request, ReplyKind.CHUNK, body,
                      seq).addBoth(self._chunkSettled)
        if self.unconfirmed < CHUNK_WINDOW:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def whenConfirmed(self) -> Deferred[None]:
        """Fires once every chunk sent so far has its confirm (or its failure)."""
        done: Deferred[None] = Deferred()
        if not self.unconfirmed:
            done.callback(None)
        else:
            self._allConfirmed.append(done)
        return done

    def _chunkSettled(self, result: Any) -> None:
        self.unconfirmed -= 1
        if isinstance(result, Failure) and result.check(ReplyRefusedError):
            self.chunkRefused = True
            if not self.ended and self.refused is not None:
                self.refused()
        # Any other failure is a lost channel: the runtime hears of it as busInterrupted.
        while self._waiters and self.unconfirmed < CHUNK_WINDOW:
            self._waiters.pop(0).callback(None)
        if not self.unconfirmed:
            waiting, self._allConfirmed = self._allConfirmed, []
            for done in waiting:
                done.callback(None)


@attrs.define(eq=False)
class _Running:
    delivery: Delivery
    stream: _Stream
    work: Deferred[Any] | None = None
    deadlineTimer: IDelayedCall | None = None
    endReason: str | None = None  # why the runtime cancelled it, if it did


@implementer(IRequestReceiver)
class WorkerRuntime(Service):
    """Runs handlers for the deliveries of one IWorkerBus."""

    def __init__(self, bus: IWorkerBus, handlers: dict[str, IRequestHandler],
                 clock: IReactorTime, concurrency: int = 10, drainTimeoutS: float = 10.0,
                 threads: int = DEFAULT_THREADS) -> None:
        self._bus = bus
        self._handlers = handlers
        self._worlds = {requestType: worldOf(h) for requestType, h in handlers.items()}
        self._clock = clock
        # Blocking handlers get `threads` threads on a real reactor; on a Clock they run inline.
        self._calls = HandlerCalls(threadsFor(clock, threads), clock)
        # Handlers stopped by the runtime whose work has not ended yet (an asyncio Task still
        # running its finally blocks): what a drain that timed out waits a little for.
        self._stopping: set[Deferred[Any]] = set()
        self._threadsHeldLogged = False
        self._concurrency = concurrency
        self._drainTimeoutS = drainTimeoutS
        self._running: dict[str, _Running] = {}
        # Every delivery until it is settled (or can no longer be): what shutdown waits for.
        self._inHand: set[Delivery] = set()
        self._whenIdle: list[Deferred[None]] = []
        self._cancelled: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._accepting = False

    @property
    def runningCount(self) -> int:
        return len(self._running)

    @property
    def requestTypes(self) -> list[str]:
        return list(self._handlers)

    def describeHandlers(self) -> str:
        """For the start-up log line: each requestType, and where it runs when not on the
        reactor (e.g. "echo, fetch (asyncio), report (thread; 8 threads)")."""
        threads = self._calls.threads.size
        return ", ".join(
            requestType if world == TWISTED else
            f"{requestType} ({world}{f'; {threads} threads' if world == THREAD else ''})"
            for requestType, world in self._worlds.items())

    def startService(self) -> None:
        super().startService()
        self._accepting = True
        self._bus.serve(self.requestTypes, self, self._concurrency)

    def stopService(self) -> Deferred[None]:
        """Finish what is in hand (up to the drain timeout), then hand the rest back.

        Deliveries that still arrive while draining (sent before the broker saw our
        basic.cancel) are run too: handing them back would mark them redelivered, and the
        next worker would answer worker_lost for a request nobody started.
        """
        super().stopService()
        done: Deferred[None] = Deferred()
        finishing = False

        def finish(_: Any = None) -> None:
            nonlocal finishing
            if finishing:
                return
            finishing = True
            self._accepting = False
            if timer.active():
                timer.cancel()
            # Handlers stopped on the way (drain timeout, cancels) get a moment to clean up.
            self.whenStoppedHandlersEnd(STOPPED_HANDLERS_GRACE_S).addCallback(stopped)

        def stopped(_: Any) -> None:
            self._calls.threads.stop()
            done.callback(None)

        def consumersStopped(_: Any) -> None:
            if not self._inHand:
                finish()
            else:
                self._whenIdle.append(Deferred().addCallback(finish))

        def drainTimeout() -> None:
            self._handBackAll()
            finish()

        timer = self._clock.callLater(self._drainTimeoutS, drainTimeout)
        maybeDeferred(self._bus.stopServing, self).addBoth(consumersStopped)
        return done

    def whenStoppedHandlersEnd(self, graceS: float | None = None) -> Deferred[None]:
        """Fires once the work of every handler the runtime stopped (cancel, deadline,
        shutdown) has ended, or after `graceS` (None: no limit). The request itself was
        answered when it was stopped; this is for the handler's own cleanup (an asyncio
        Task's `finally` blocks)."""
        ended: Deferred[None] = Deferred()
        pending = list(self._stopping)  # a cancelled Task's Deferred is called but paused
        if not pending:
            ended.callback(None)
            return ended
        def graceOver() -> None:
            if not ended.called:
                ended.callback(None)

        grace = None if graceS is None else self._clock.callLater(graceS, graceOver)
        remaining = len(pending)

        def oneEnded(result: Any) -> Any:
            nonlocal remaining
            remaining -= 1
            if not remaining and not ended.called:
                if grace is not None and grace.active():
                    grace.cancel()
                ended.callback(None)
            return result

        for work in pending:
            work.addBoth(oneEnded)
        return ended

    def _handBackAll(self) -> None:
        for running in list(self._running.values()):
            self._abandon(running, "the worker is shutting down", Settlement.REQUEUE)
        for delivery in list(self._inHand):  # final replies still unconfirmed
            self._settle(delivery, Settlement.RELEASE)

    # IRequestReceiver

    def requestReceived(self, delivery: Delivery) -> None:
        message = delivery.message
        handler = self._handlers.get(message.requestType)
        if not self._accepting:
            delivery.requeue()
            return
        self._inHand.add(delivery)
        if handler is None:
            self._replyError(delivery, ErrorCode.HANDLER_ERROR,
                             f"this worker does not serve {message.requestType!r}")
            return
        now = self._clock.seconds()  # read once: a deadline between two reads broke callLater
        if message.deadline <= now:
            log.info("Skipped {correlationId}: its deadline passed while queued",
                     correlationId=message.correlationId)
            self._settle(delivery, Settlement.ACK)
            return
        if self._cancelled.pop(message.correlationId, None) is not None:
            log.info("Skipped {correlationId}: cancelled while queued",
                     correlationId=message.correlationId)
            self._settle(delivery, Settlement.ACK)
            return
        if delivery.redelivered and not getattr(handler, "idempotent", False):
            self._replyError(delivery, ErrorCode.WORKER_LOST,
                             "the worker handling this request was lost; it was not retried")
            return
        if self._worlds[message.requestType] == THREAD and self._threadsAllHeld():
            # Waiting would end it with timeout at its deadline; overloaded now lets the
            # client retry, and the worker's other requests (other worlds) go on.
            self._replyError(delivery, ErrorCode.OVERLOADED,
                             "every thread of this worker is held by a blocking handler call "
                             "that outlived its request")
            return
        try:
            payload = decodeJSON(message.body)
        except (ValueError, UnicodeDecodeError):
            self._replyError(delivery, ErrorCode.BAD_REQUEST, "the request payload is not JSON")
            return
        request = HandlerRequest(payload, message.requestType, message.correlationId,
                                 message.deadline, delivery.redelivered, message.principal,
                                 _claims(message.claims))
        running = _Running(delivery, _Stream(self._bus, message))
        running.stream.refused = lambda: self._chunkRefused(running)
        self._running[message.correlationId] = running
        running.work = self._calls.call(handler, request, running.stream,
                                        self._worlds[message.requestType])
        running.work.addBoth(self._handlerEnded, running)
        if running.endReason is None:  # still running (most handlers are done by now)
            running.deadlineTimer = self._clock.callLater(
                max(0.0, message.deadline - self._clock.seconds()), self._deadlinePassed,
                running)
        elif not running.work.called:  # ended (a refused chunk...) while being called
            self._cancelWork(running.work)

    def cancelReceived(self, notice: CancelNotice) -> None:
        running = self._running.get(notice.correlationId)
        if running is not None:
            self._endWithError(running, ErrorCode.CANCELLED,
                               f"cancelled by the gateway ({notice.reason})")
            return
        now = self._clock.seconds()
        self._cancelled[notice.correlationId] = now + REMEMBER_CANCELLED_S
        while self._cancelled and (len(self._cancelled) > REMEMBER_CANCELLED_MAX
                                   or next(iter(self._cancelled.values())) < now):
            self._cancelled.popitem(last=False)

    def busInterrupted(self, reason: Failure | None) -> None:
        # Unsettled deliveries go back to the queue with the broker; the gateway has already
        # ended these requests, so stop the work without replying.
        for running in list(self._running.values()):
            self._abandon(running, "lost the connection to the message broker",
                          Settlement.RELEASE)
        for delivery in list(self._inHand):
            self._settle(delivery, Settlement.RELEASE)

    # Internals

    def _threadsAllHeld(self) -> bool:
        """True while stuck blocking calls hold every thread; logged once per episode."""
        held = self._calls.threadsAllHeld
        if held and not self._threadsHeldLogged:
            log.warn("All {threads} handler threads are held by blocking calls that outlived "
                     "their requests: thread requests are answered overloaded until one "
                     "returns", threads=self._calls.threads.size)
        self._threadsHeldLogged = held
        return held

    def _chunkRefused(self, running: _Running) -> None:
        log.warn("The broker refused a chunk of {correlationId}: ending the request",
                 correlationId=running.delivery.message.correlationId)
        self._endWithError(running, ErrorCode.HANDLER_ERROR,
                           "the broker refused a chunk of this request")

    def _deadlinePassed(self, running: _Running) -> None:
        self._endWithError(running, ErrorCode.TIMEOUT, "the request's deadline passed")

    def _endWithError(self, running: _Running, code: ErrorCode, why: str) -> None:
        """Stop a running handler and answer its request with the error `code` (then ack)."""
        if self._stopHandler(running, why):
            self._replyError(running.delivery, code, why)

    def _abandon(self, running: _Running, why: str,
                 settlement: Literal[Settlement.REQUEUE, Settlement.RELEASE]) -> None:
        """Stop a running handler without answering its request."""
        if self._stopHandler(running, why):
            self._settle(running.delivery, settlement)

    def _stopHandler(self, running: _Running, why: str) -> bool:
        """Cancel a running handler; False if it had already ended."""
        if not self._markEnded(running, why):
            return False
        message = running.delivery.message
        log.info("Stopped {requestType} {correlationId}: {why}", why=why,
                 requestType=message.requestType, correlationId=message.correlationId)
        if running.work is not None:
            self._cancelWork(running.work)
        return True

    def _cancelWork(self, work: Deferred[Any]) -> None:
        self._stopping.add(work)
        work.addBoth(self._stoppedWorkEnded, work)
        work.cancel()

    def _stoppedWorkEnded(self, result: Any, work: Deferred[Any]) -> None:
        self._stopping.discard(work)

    def _markEnded(self, running: _Running, reason: str) -> bool:
        """End a request's run once (no more chunks, no deadline); False if it already was."""
        if running.endReason is not None:
            return False
        running.endReason = reason
        running.stream.ended = True
        self._running.pop(running.delivery.message.correlationId, None)
        if running.deadlineTimer is not None and running.deadlineTimer.active():
            running.deadlineTimer.cancel()
        return True

    def _handlerEnded(self, result: Any, running: _Running) -> None:
        if not self._markEnded(running, "ended"):
            # A refused chunk the handler did not catch is how it usually ends after
            # _chunkRefused: nothing to report.
            if isinstance(result, Failure) and not result.check(*_CANCELLATIONS,
                                                                ReplyRefusedError):
                log.failure("Handler failed after it was cancelled", result)
            return
        if not running.stream.unconfirmed:  # the common case: no Deferred needed
            self._replyWithResult(running, result)
            return
        running.stream.whenConfirmed().addCallback(
            lambda _: self._replyWithResult(running, result))

    def _replyWithResult(self, running: _Running, result: Any) -> None:
        message = running.delivery.message
        if running.stream.chunkRefused:  # the broker dropped a chunk: no response past it
            log.warn("The broker refused a chunk of {correlationId}: ending the request",
                     correlationId=message.correlationId)
            self._replyError(running.delivery, ErrorCode.HANDLER_ERROR,
                             "the broker refused a chunk of this request")
            return
        try:
            if isinstance(result, Failure):
                kind, body = ReplyKind.ERROR, encodeJSON(_errorReply(
                    result, message.correlationId, self._worlds[message.requestType]))
            else:
                kind, body = ReplyKind.RESPONSE, encodeJSON(result)
        except Exception as e:  # whatever happens, the request gets a final reply and a settle
            log.error("Handler for {requestType} gave a result that cannot be sent: {e!r}",
                      requestType=message.requestType, e=e)
            kind, body = ReplyKind.ERROR, encodeJSON(
                {"code": "handler_error", "message": "the handler's result is not JSON"})
        self._replyFinal(running.delivery, kind, body)

    def _replyError(self, delivery: Delivery, code: ErrorCode, message: str) -> None:
        self._replyFinal(delivery, ReplyKind.ERROR,
                         encodeJSON({"code": str(code), "message": message}))

    def _replyFinal(self, delivery: Delivery, kind: ReplyKind, body: bytes) -> None:
        """Publish the one final reply, then ack (at-least-once: never before)."""
        _publishReply(self._bus, delivery.message, kind, body).addBoth(
            self._settleAfterFinalReply, delivery)

    def _settleAfterFinalReply(self, result: Any, delivery: Delivery) -> None:
        if isinstance(result, Failure) and result.check(ReplyRefusedError):
            # The broker got the reply and refused it (the gateway's reply queue is full):
            # redelivering the request would repeat that refusal until the deadline, and
            # keeping it would hold a prefetch slot until the next reconnect. Let it go; its
            # client gets timeout from the gateway at its deadline.
            log.warn("The broker refused the final reply for {correlationId} ({why}): "
                     "acked the request without an answer; its client gets timeout",
                     correlationId=delivery.message.correlationId,
                     why=result.getErrorMessage())
            self._settle(delivery, Settlement.ACK)
        elif isinstance(result, Failure):
            # Not acked: the broker redelivers it once we (or another worker) reconnect.
            log.warn("Final reply for {correlationId} not published: {why}",
                     correlationId=delivery.message.correlationId,
                     why=result.getErrorMessage())
            self._settle(delivery, Settlement.RELEASE)
        else:
            self._settle(delivery, Settlement.ACK)

    def _settle(self, delivery: Delivery, settlement: Settlement) -> None:
        """Let go of a delivery once; what shutdown waits for."""
        if delivery not in self._inHand:
            return
        self._inHand.discard(delivery)
        if settlement is Settlement.ACK:
            delivery.ack()
        elif settlement is Settlement.REQUEUE:
            delivery.requeue()
        if not self._inHand and self._whenIdle:
            waiters, self._whenIdle = self._whenIdle, []
            for waiter in waiters:
                waiter.callback(None)


def _claims(body: bytes | None) -> Mapping[str, Any]:
    """The relaybus-claims header, when it is a JSON object; anything else counts as none."""
    if body is None:
        return {}
    try:
        claims = decodeJSON(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _errorReply(failure: Failure, correlationId: str,
                world: str = TWISTED) -> dict[str, str | int]:
    error = failure.value
    if isinstance(error, ReplyRefusedError):
        # Raised by the handler itself: a refused chunk ends its request before the handler
        # hears of it (_chunkRefused), so this is the rare other way round.
        return {"code": "handler_error", "message": "the broker refused a chunk of this request"}
    if isinstance(error, RelaybusError) and error.code in WORKER_ERROR_CODES:
        return error.asDict()
    if isinstance(error, _CANCELLATIONS):
        return {"code": "cancelled", "message": "the request was cancelled"}
    if isinstance(error, RelaybusError) and error.code == ErrorCode.UNAVAILABLE:
        # A chunk could not be published: the broker went away. Not a handler bug, no traceback.
        log.warn("Request {correlationId} ended: {why}", correlationId=correlationId,
                 why=error.message)
        return {"code": "handler_error", "message": "the worker lost the message broker"}
    hint = ""
    if (world == TWISTED and isinstance(error, RuntimeError)
            and any(sign in str(error) for sign in ASYNCIO_ON_REACTOR)):
        hint = ("\n(it awaited an asyncio object on the reactor: declare runsIn = \"asyncio\" "
                "on the handler and run it under `twistd -r asyncio`; docs/workers.md)")
    log.error("Handler failed for {correlationId}:\n{tb}{hint}", correlationId=correlationId,
              tb="".join(traceback.format_exception(error)), hint=hint)
    return {"code": "handler_error", "message": "the handler failed; see the worker's log"}

