"""The gateway's Deferred correlation table: every accepted request until its one terminal frame.

A request enters on `submit` and leaves through exactly one door (`_finish`): its response,
an error reply, cancel, deadline, connection loss, broker loss or the shutdown drain. Each
entry's `outcome` Deferred fires once, and its callbacks send the terminal frame, so "exactly
one terminal frame" is a property of Deferred itself rather than of careful bookkeeping.
"""

from __future__ import annotations

import collections
import secrets
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.authorization import Authorizer
from relaybus.config import Limits
from relaybus.errors import WORKER_ERROR_CODES, ErrorCode, RelaybusError
from relaybus.frames import RequestFrame
from relaybus.interfaces import IClientConnection, IReplyReceiver, IRequestBus
from relaybus.messages import CancelNotice, ReplyKind, ReplyMessage, RequestMessage
from relaybus.strictjson import decodeJSON, encodeJSON

log = Logger(namespace="relaybus.correlation")


DEFAULT_FORWARD_CLAIMS = ("sub", "roles")


def newCorrelationId() -> str:
    """Unguessable, so a worker or another client cannot address someone else's request."""
    return secrets.token_hex(16)


@attrs.define(eq=False)
class PendingRequest:
    correlationId: str
    requestId: str
    requestType: str
    connection: IClientConnection
    deadline: float
    outcome: Deferred[Any] = attrs.field(factory=Deferred)
    timer: IDelayedCall | None = None
    nextSeq: int = 0


@implementer(IReplyReceiver)
class CorrelationTable:
    """Routes replies from the bus to the connection that asked, and ends every request once."""

    def __init__(self, bus: IRequestBus, clock: IReactorTime, limits: Limits,
                 gatewayId: str, authorizer: Authorizer | None = None,
                 forwardClaims: tuple[str, ...] = DEFAULT_FORWARD_CLAIMS) -> None:
        """`authorizer` decides which requestTypes a connection's principal may call (None:
        all); `forwardClaims` are the verified claims workers see (relaybus-claims)."""
        self._bus = bus
        self._clock = clock
        self._limits = limits
        self._gatewayId = gatewayId
        self._authorizer = authorizer
        self._forwardClaims = forwardClaims
        self._pending: dict[str, PendingRequest] = {}
        self._byConnection: dict[str, dict[str, PendingRequest]] = {}
        self._accepting = True
        self._whenEmpty: list[Deferred[None]] = []
        self.lateReplies = 0
        self.accepted = 0
        self.ended: collections.Counter[str] = collections.Counter()  # by outcome
        self.refused: collections.Counter[str] = collections.Counter()  # by code, never accepted
        bus.listen(self)

    def __len__(self) -> int:
        return len(self._pending)

    def inFlight(self, connection: IClientConnection) -> int:
        return len(self._byConnection.get(connection.connectionId, ()))

    def connectionCount(self) -> int:
        """Connections with requests in flight (for leak checks)."""
        return len(self._byConnection)

    # Client side

    def submit(self, connection: IClientConnection, frame: RequestFrame) -> Deferred[Any] | None:
        """Accept a request or answer it with an error frame at once.

        Returns the entry's outcome Deferred when accepted (it fires with the response data,
        or with None after an error frame was sent), None when refused.
        """
        refusal = self._refusal(connection, frame)
        if refusal is None:
            try:
                body = encodeJSON(frame.payload)
            except ValueError as e:
                refusal = RelaybusError(ErrorCode.BAD_REQUEST, f"payload: {e}")
        if refusal is not None:
            self.refused[str(refusal.code)] += 1
            connection.sendError(frame.requestId, refusal)
            return None

        timeoutMs = frame.timeoutMs or self._limits.defaultTimeoutMs
        now = self._clock.seconds()
        entry = PendingRequest(
            correlationId=newCorrelationId(),
            requestId=frame.requestId,
            requestType=frame.requestType,
            connection=connection,
            deadline=now + timeoutMs / 1000,
        )
        entry.outcome.addCallbacks(self._sendResponse, self._sendError,
                                   callbackArgs=(entry,), errbackArgs=(entry,))
        entry.outcome.addErrback(self._sendFailed, entry)
        self._pending[entry.correlationId] = entry
        self.accepted += 1
        self._byConnection.setdefault(connection.connectionId, {})[frame.requestId] = entry
        entry.timer = self._clock.callLater(timeoutMs / 1000, self._expire, entry)

        message = RequestMessage(
            correlationId=entry.correlationId,
            requestType=frame.requestType,
            replyTo=self._bus.replyTo,
            body=body,
            deadline=entry.deadline,
            gatewayId=self._gatewayId,
            principal=connection.principal.sub if connection.principal is not None else None,
            claims=self._claimsFor(connection),
        )
        maybeDeferred(self._bus.publishRequest, message).addErrback(self._publishFailed, entry)
        return entry.outcome

    def _claimsFor(self, connection: IClientConnection) -> bytes | None:
        """The verified claims workers may see, as JSON; None without a principal."""
        principal = connection.principal
        if principal is None:
            return None
        return encodeJSON({name: principal.claims[name] for name in self._forwardClaims
                           if name in principal.claims})

    def _refusal(self, connection: IClientConnection, frame: RequestFrame) -> RelaybusError | None:
        if not self._accepting:
            return RelaybusError(ErrorCode.SHUTTING_DOWN, "the gateway is shutting down")
        if frame.requestId in self._byConnection.get(connection.connectionId, ()):
            return RelaybusError(ErrorCode.DUPLICATE_REQUEST_ID,
                                 "a request with this requestId is still in flight")
        principal = connection.principal
        if (self._authorizer is not None and principal is not None
                and not self._authorizer.allows(principal, frame.requestType)):
            return RelaybusError(ErrorCode.FORBIDDEN,
                                 f"{principal.sub!r} may not call {frame.requestType!r}")
        if frame.timeoutMs is not None and frame.timeoutMs > self._limits.maxTimeoutMs:
            return RelaybusError(ErrorCode.BAD_REQUEST,
                                 f"timeoutMs must be at most {self._limits.maxTimeoutMs}")
        if self.inFlight(connection) >= self._limits.maxInFlight:
            return RelaybusError(ErrorCode.OVERLOADED,
                                 f"at most {self._limits.maxInFlight} requests may be in flight "
                                 "per connection")
        if not self._bus.isReady():
            return RelaybusError(ErrorCode.UNAVAILABLE, "the message broker is not reachable")
        return None

    def cancel(self, connection: IClientConnection, requestId: str) -> None:
        """Cancel a request; unknown or already finished ids are ignored (they race the end)."""
        entry = self._byConnection.get(connection.connectionId, {}).get(requestId)
        if entry is not None:
            self._finish(entry, RelaybusError(ErrorCode.CANCELLED, "cancelled by the client"))
            self._notifyWorkers(entry, "cancelled")

    def connectionLost(self, connection: IClientConnection) -> None:
        for entry in list(self._byConnection.get(connection.connectionId, {}).values()):
            self._finish(entry, RelaybusError(ErrorCode.CANCELLED, "the client disconnected"))
            self._notifyWorkers(entry, "disconnected")

    # Bus side

    def pendingRequestTypes(self) -> set[str]:
        return {entry.requestType for entry in self._pending.values()}

    def endWithoutWorker(self, requestType: str, why: str) -> int:
        """End every pending request of requestType with worker_lost (no worker consumes it
        any more: AbsentWorkerWatch); returns how many."""
        entries = [e for e in self._pending.values() if e.requestType == requestType]
        for entry in entries:
            self._finish(entry, RelaybusError(ErrorCode.WORKER_LOST, why))
            self._notifyWorkers(entry, "worker_lost")
        return len(entries)

    def replyReceived(self, reply: ReplyMessage) -> None:
        entry = self._pending.get(reply.correlationId)
        if entry is None:
            # Normal after a cancel, deadline or disconnect; counted, not logged (twistd logs
            # every level, and a burst of disconnects would flood the log).
            self.lateReplies += 1
            return
        try:
            self._routeReply(entry, reply)
        except Exception:
            # A bug of ours: end the request with an error rather than lose a chunk silently
            # and let it "succeed" later.
            log.failure("Routing a reply for {correlationId} failed",
                        correlationId=entry.correlationId)
            self._finish(entry, RelaybusError(ErrorCode.UNAVAILABLE,
                                              "the gateway failed to forward a reply"))
            self._notifyWorkers(entry, "gateway_error")

    def _routeReply(self, entry: PendingRequest, reply: ReplyMessage) -> None:
        if reply.violation is not None:
            log.warn("Ended {correlationId} ({requestType}): the worker sent {violation}",
                     correlationId=entry.correlationId, requestType=entry.requestType,
                     violation=reply.violation)
            self._finish(entry, RelaybusError(ErrorCode.HANDLER_ERROR,
                                              f"the worker sent {reply.violation}"))
            self._notifyWorkers(entry, "handler_error")
            return
        # A bus-side guard: a body over the client's limit is refused before the gateway spends
        # time and memory decoding it. The frame made of a smaller one is held to the limit by
        # the connection (IClientConnection).
        if len(reply.body) > self._limits.maxMessageBytes:
            self._finish(entry, RelaybusError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"the worker's {reply.kind} is larger than {self._limits.maxMessageBytes} bytes"))
            self._notifyWorkers(entry, "payload_too_large")
            return
        try:
            data = decodeJSON(reply.body)
        except (ValueError, UnicodeDecodeError):
            self._finish(entry, RelaybusError(ErrorCode.HANDLER_ERROR,
                                              "the worker sent a reply that is not JSON"))
            self._notifyWorkers(entry, "handler_error")
            return
        if reply.kind == ReplyKind.CHUNK:
            self._forwardChunk(entry, reply.seq, data)
        elif reply.kind == ReplyKind.RESPONSE:
            self._finish(entry, data)
        else:
            self._finish(entry, _workerError(data))

    def busInterrupted(self, reason: Failure | None) -> None:
        for entry in list(self._pending.values()):
            self._finish(entry, RelaybusError(ErrorCode.UNAVAILABLE,
                                              "lost the connection to the message broker"))

    # Shutdown

    def stopAccepting(self) -> None:
        self._accepting = False

    def drain(self, timeoutS: float) -> Deferred[None]:
        """Stop accepting; fire once every request has ended, ending the rest at the deadline."""
        self.stopAccepting()
        done: Deferred[None] = Deferred()
        if not self._pending:
            done.callback(None)
            return done
        self._whenEmpty.append(done)
        timer = self._clock.callLater(timeoutS, self._endAll, ErrorCode.SHUTTING_DOWN,
                                      "the gateway is shutting down")

        def stopTimer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(stopTimer)
        return done

    def _endAll(self, code: ErrorCode, message: str) -> None:
        for entry in list(self._pending.values()):
            self._finish(entry, RelaybusError(code, message))
            self._notifyWorkers(entry, str(code))

    # Internals

    def _forwardChunk(self, entry: PendingRequest, seq: int | None, data: Any) -> None:
        if seq is not None and seq < entry.nextSeq:
            # An idempotent handler ran again after a redelivery: the client has these already.
            return
        if seq is not None and seq > entry.nextSeq:
            # A chunk went missing on the way (the broker refused it while the worker had
            # more in flight): forwarding this one would hide the gap from the client.
            self._finish(entry, RelaybusError(
                ErrorCode.HANDLER_ERROR, f"chunk {entry.nextSeq} of this request was lost "
                f"(the worker's next chunk was {seq})"))
            self._notifyWorkers(entry, "handler_error")
            return
        try:
            entry.connection.sendChunk(entry.requestId, entry.nextSeq, data)
        except RelaybusError as refusal:  # nothing was sent: the chunk ends the request
            self._finish(entry, refusal)
            self._notifyWorkers(entry, str(refusal.code))
            return
        entry.nextSeq += 1

    def _expire(self, entry: PendingRequest) -> None:
        entry.timer = None
        self._finish(entry, RelaybusError(ErrorCode.TIMEOUT,
                                          "no response before the request's deadline"))
        self._notifyWorkers(entry, "timeout")

    def _publishFailed(self, failure: Failure, entry: PendingRequest) -> None:
        error = failure.value if failure.check(RelaybusError) else RelaybusError(
            ErrorCode.UNAVAILABLE, "the message broker did not take the request")
        if not failure.check(RelaybusError):
            log.failure("Publishing {correlationId} failed", failure,
                        correlationId=entry.correlationId)
        self._finish(entry, error)

    def _finish(self, entry: PendingRequest, result: Any) -> None:
        """The one door out of the table."""
        if self._pending.pop(entry.correlationId, None) is None:
            return
        byRequestId = self._byConnection[entry.connection.connectionId]
        del byRequestId[entry.requestId]
        if not byRequestId:
            del self._byConnection[entry.connection.connectionId]
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None
        self.ended[result.code if isinstance(result, RelaybusError) else "response"] += 1
        if isinstance(result, RelaybusError):
            entry.outcome.errback(Failure(result))
        else:
            entry.outcome.callback(result)
        if not self._pending:
            waiters, self._whenEmpty = self._whenEmpty, []
            for waiter in waiters:
                waiter.callback(None)

    def _notifyWorkers(self, entry: PendingRequest, reason: str) -> None:
        if self._bus.isReady():
            self._bus.publishCancel(CancelNotice(entry.correlationId, entry.requestType, reason))

    def _sendResponse(self, data: Any, entry: PendingRequest) -> Any:
        try:
            entry.connection.sendResponse(entry.requestId, data)
        except RelaybusError as refusal:  # nothing was sent: the error is the terminal frame
            entry.connection.sendError(entry.requestId, refusal)
        return data

    @staticmethod
    def _sendFailed(failure: Failure, entry: PendingRequest) -> None:
        log.failure("Sending the terminal frame of {correlationId} failed", failure,
                    correlationId=entry.correlationId)

    def _sendError(self, failure: Failure, entry: PendingRequest) -> None:
        # The error frame is the failure's final handling: nothing is left unhandled.
        error = failure.value
        if not isinstance(error, RelaybusError):  # a bug of ours: still end the request
            log.failure("Request {correlationId} failed", failure,
                        correlationId=entry.correlationId)
            error = RelaybusError(ErrorCode.UNAVAILABLE, "the gateway failed")
        entry.connection.sendError(entry.requestId, error)


def _workerError(data: Any) -> RelaybusError:
    """A worker's error reply, held to the codes a worker may use. `cancelled` is not one of
    them for a request still open: the gateway ends a request before it tells workers to
    cancel it, so a worker's `cancelled` that still finds its request was nobody's cancel,
    and the client must not mistake it for the answer to its own."""
    if isinstance(data, dict):
        code, message = data.get("code"), data.get("message")
        if not isinstance(message, str):
            message = "the worker failed"
        if code == ErrorCode.CANCELLED:
            return RelaybusError(ErrorCode.HANDLER_ERROR,
                                 f"the worker cancelled the request by itself: {message}")
        if isinstance(code, str) and code in WORKER_ERROR_CODES:
            return RelaybusError(code, message)
        return RelaybusError(ErrorCode.HANDLER_ERROR, message)
    return RelaybusError(ErrorCode.HANDLER_ERROR, "the worker failed")
