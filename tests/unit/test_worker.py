"""The worker runtime: one final reply per delivery, ack only after it, and clean stops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from unitsupport import assertNoResult, requestMessage, successResultOf
from zope.interface import implementer

from relaybus import worker as workerModule
from relaybus.errors import WORKER_ERROR_CODES, ErrorCode, RelaybusError, ReplyRefusedError
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.messages import CancelNotice, Delivery, ReplyKind, ReplyMessage
from relaybus.strictjson import decodeJSON
from relaybus.testing import FakeRequestHandler, FakeWorkerBus
from relaybus.worker import CHUNK_WINDOW, HandlerRequest, WorkerRuntime

START = 1_764_000_000.0


@implementer(IRequestHandler)
class CallableHandler:
    """A handler whose behaviour is a plain function of (request, stream)."""

    def __init__(self, requestType: str, behaviour: Any, idempotent: bool = False) -> None:
        self.requestType = requestType
        self.idempotent = idempotent
        self.behaviour = behaviour
        self.requests: list[HandlerRequest] = []

    def handle(self, request: Any, stream: IRequestStream) -> Any:
        self.requests.append(request)
        return self.behaviour(request, stream)


class HeldRepliesBus(FakeWorkerBus):
    """Replies stay unconfirmed until the test fires their Deferreds."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        self.replies.append(reply)
        d: Deferred[None] = Deferred()
        self.held.append(d)
        return d


class RefusingBus(FakeWorkerBus):
    """The broker nacks the replies of the kinds in `refuse` (as a full reply queue with
    overflow reject-publish does); others are published."""

    def __init__(self, *refuse: ReplyKind, later: bool = False) -> None:
        super().__init__()
        self.refuse = set(refuse)
        self.refused: list[ReplyMessage] = []
        self.later = later  # the nack comes when the test calls nackAll(), not at once
        self.held: list[Deferred[None]] = []

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        if reply.kind not in self.refuse:
            return super().publishReply(reply)
        self.refused.append(reply)
        if not self.later:
            return fail(ReplyRefusedError("the fake broker refused the reply"))
        d: Deferred[None] = Deferred()
        self.held.append(d)
        return d

    def nackAll(self) -> None:
        held, self.held = self.held, []
        for d in held:
            d.errback(ReplyRefusedError("the fake broker refused the reply"))


@contextlib.contextmanager
def loggedLines() -> Iterator[list[str]]:
    """The worker runtime's log lines (with a marker for those that carry a failure)."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "relaybus.worker":
            lines.append(("FAILURE " if "log_failure" in event else "")
                         + (formatEvent(event) or ""))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


class Worker:
    def __init__(self, *handlers: Any, concurrency: int = 4, drainTimeoutS: float = 10.0,
                 bus: FakeWorkerBus | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.bus = bus if bus is not None else FakeWorkerBus()
        self.handler = FakeRequestHandler("fake")
        registry = {h.requestType: h for h in handlers or (self.handler,)}
        self.runtime = WorkerRuntime(self.bus, registry, self.clock, concurrency, drainTimeoutS)
        self.runtime.startService()

    def deliver(self, correlationId: str = "c-1", requestType: str = "fake",
                payload: Any = None, timeoutS: float = 30.0, redelivered: bool = False,
                body: bytes | None = None) -> Delivery:
        message = requestMessage(correlationId, requestType, payload,
                                 deadline=self.clock.seconds() + timeoutS, body=body)
        return self.bus.deliver(message, redelivered)

    def replies(self, correlationId: str = "c-1") -> list[tuple[str, Any, int | None]]:
        return [(str(r.kind), decodeJSON(r.body), r.seq)
                for r in self.bus.repliesFor(correlationId)]

    def settled(self, correlationId: str = "c-1") -> str | None:
        return self.bus.settled.get(correlationId)

    def cancel(self, correlationId: str = "c-1", reason: str = "cancelled") -> None:
        self.runtime.cancelReceived(CancelNotice(correlationId, "fake", reason))

    def assertIdle(self) -> None:
        assert self.runtime.runningCount == 0
        assert self.clock.getDelayedCalls() == []


def errorReply(code: str, message: str | None = None) -> tuple[str, Any, None]:
    body: dict[str, Any] = {"code": code, "message": message}
    return ("error", body, None)


@pytest.fixture
def w() -> Worker:
    return Worker()


# Starting


def test_start_serves_the_handler_types_with_concurrency_as_prefetch() -> None:
    a, b = FakeRequestHandler("a"), FakeRequestHandler("b")
    w = Worker(a, b, concurrency=7)
    assert sorted(w.bus.requestTypes) == ["a", "b"]
    assert w.bus.prefetch == 7
    assert w.bus.receiver is w.runtime


def test_nothing_is_served_before_start() -> None:
    bus = FakeWorkerBus()
    WorkerRuntime(bus, {"fake": FakeRequestHandler()}, Clock())
    assert bus.receiver is None and bus.requestTypes == []


# Running handlers


def test_handler_request_fields(w: Worker) -> None:
    w.deliver(payload={"a": [1, 2]}, timeoutS=12)
    [(request, _stream, _d)] = w.handler.calls
    assert request == HandlerRequest(payload={"a": [1, 2]}, requestType="fake",
                                     correlationId="c-1", deadline=START + 12,
                                     redelivered=False, principal=None)
    assert w.runtime.runningCount == 1


@pytest.mark.parametrize(("header", "claims"), [
    (b'{"sub":"alice","roles":["user"]}', {"sub": "alice", "roles": ["user"]}),
    (None, {}), (b"not json", {}), (b'["a list"]', {}), (b"\xff", {}),
])
def test_the_gateways_claims_reach_the_handler(w: Worker, header: bytes | None,
                                               claims: dict[str, Any]) -> None:
    message = attrs.evolve(requestMessage("c-1", "fake", None, deadline=START + 30),
                           principal="alice", claims=header)
    w.bus.deliver(message)
    [(request, _stream, _d)] = w.handler.calls
    assert (request.principal, request.claims) == ("alice", claims)


def test_plain_return_value_is_the_response_then_acked() -> None:
    handler = CallableHandler("plain", lambda request, stream: {"echo": request.payload})
    w = Worker(handler)
    w.deliver(requestType="plain", payload=[1, "two"])
    assert w.replies() == [("response", {"echo": [1, "two"]}, None)]
    assert w.settled() == "ack"
    w.assertIdle()


@pytest.mark.parametrize("value", [None, 0, "", [], False])
def test_falsy_return_values_are_responses(value: Any) -> None:
    w = Worker(CallableHandler("plain", lambda request, stream: value))
    w.deliver(requestType="plain")
    assert w.replies() == [("response", value, None)]


def test_ack_only_after_the_final_reply_is_published() -> None:
    bus = HeldRepliesBus()
    w = Worker(bus=bus)
    w.deliver()
    [(_request, stream, d)] = w.handler.calls
    assert successResultOf(stream.sendChunk("c")) is None  # the window: no wait for a confirm
    d.callback("done")
    # The final reply waits for the chunk's confirm: a refused chunk would end it otherwise.
    assert [r.kind for r in bus.replies] == [ReplyKind.CHUNK]
    bus.held[0].callback(None)
    assert [r.kind for r in bus.replies] == [ReplyKind.CHUNK, ReplyKind.RESPONSE]
    assert w.settled() is None  # the chunk's confirm is not the final one
    bus.held[1].callback(None)
    assert w.settled() == "ack"


def test_a_handler_may_get_chunk_window_chunks_ahead_of_their_confirms() -> None:
    bus = HeldRepliesBus()
    w = Worker(bus=bus)
    w.deliver()
    [(_request, stream, _d)] = w.handler.calls
    sent = [stream.sendChunk(i) for i in range(CHUNK_WINDOW + 2)]
    assert all(s.called for s in sent[:CHUNK_WINDOW - 1])
    assert not any(s.called for s in sent[CHUNK_WINDOW - 1:])  # ahead of the window: wait
    assert len(bus.replies) == CHUNK_WINDOW + 2  # published all the same, in order
    for held in bus.held[:2]:  # 18 unconfirmed -> 16: still a full window
        held.callback(None)
    assert not any(s.called for s in sent[CHUNK_WINDOW - 1:])
    bus.held[2].callback(None)  # 15: below the window, the waiting handler goes on
    assert all(s.called for s in sent)
    for held in bus.held[3:]:
        held.callback(None)
    assert [r.seq for r in bus.replies] == list(range(CHUNK_WINDOW + 2))


def test_chunks_get_seq_0_1_2_then_the_response(w: Worker) -> None:
    w.deliver()
    [(_request, stream, d)] = w.handler.calls
    results = [stream.sendChunk({"index": i}) for i in range(3)]
    assert all(successResultOf(r) is None for r in results)
    assert w.settled() is None
    d.callback({"chunks": 3})
    assert w.replies() == [("chunk", {"index": 0}, 0), ("chunk", {"index": 1}, 1),
                           ("chunk", {"index": 2}, 2), ("response", {"chunks": 3}, None)]
    assert all(r.replyTo == "gw-test" for r in w.bus.replies)
    assert w.settled() == "ack"
    w.assertIdle()


def test_coroutine_handler() -> None:
    gate: Deferred[str] = Deferred()

    @implementer(IRequestHandler)
    class Async:
        requestType = "async"
        idempotent = False

        async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
            await stream.sendChunk({"got": request.payload})
            answer = await gate
            await stream.sendChunk("second")
            return {"answer": answer}

    w = Worker(Async())
    w.deliver(requestType="async", payload=7)
    assert w.replies() == [("chunk", {"got": 7}, 0)]
    assert w.settled() is None
    gate.callback("forty-two")
    assert w.replies()[1:] == [("chunk", "second", 1), ("response", {"answer": "forty-two"}, None)]
    assert w.settled() == "ack"
    w.assertIdle()


def test_coroutine_handler_is_cancelled_by_a_cancel_notice() -> None:
    cancelled: list[bool] = []

    @implementer(IRequestHandler)
    class Async:
        requestType = "async"
        idempotent = False

        async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
            try:
                await Deferred()
            except CancelledError:
                cancelled.append(True)
                raise

    w = Worker(Async())
    w.deliver(requestType="async")
    w.cancel()
    assert cancelled == [True]
    assert w.replies() == [errorReply("cancelled", "cancelled by the gateway (cancelled)")]
    assert w.settled() == "ack"


@pytest.mark.parametrize("code", sorted(str(c) for c in WORKER_ERROR_CODES))
def test_relaybus_error_with_an_allowed_code_is_that_code(code: str) -> None:
    def fail(request: Any, stream: Any) -> Any:
        raise RelaybusError(code, f"because {code}")

    w = Worker(CallableHandler("failing", fail))
    w.deliver(requestType="failing")
    assert w.replies() == [errorReply(code, f"because {code}")]
    assert w.settled() == "ack"


@pytest.mark.parametrize("code", ["no_handler", "unavailable", "payload_too_large", "made_up"])
def test_relaybus_error_with_a_code_workers_may_not_use_is_handler_error(code: str) -> None:
    def fail(request: Any, stream: Any) -> Any:
        raise RelaybusError(code, "secret-detail")

    w = Worker(CallableHandler("failing", fail))
    w.deliver(requestType="failing")
    [(kind, body, _seq)] = w.replies()
    assert (kind, body["code"]) == ("error", "handler_error")
    assert "secret-detail" not in body["message"]


@pytest.mark.parametrize("how", ["raise", "deferred", "coroutine"])
def test_any_other_exception_is_handler_error_without_its_text(how: str) -> None:
    def fail(request: Any, stream: Any) -> Any:
        error = KeyError("password=hunter2")
        if how == "raise":
            raise error
        if how == "deferred":
            d: Deferred[Any] = Deferred()
            d.errback(error)
            return d

        async def coroutine() -> Any:
            raise error

        return coroutine()

    w = Worker(CallableHandler("failing", fail))
    w.deliver(requestType="failing")
    [(kind, body, _seq)] = w.replies()
    assert (kind, body["code"]) == ("error", "handler_error")
    assert "hunter2" not in body["message"] and "KeyError" not in body["message"]
    assert w.settled() == "ack"


@pytest.mark.parametrize("value", [object(), {1, 2}, float("nan"), b"bytes", {"k": 1e400}],
                         ids=["object", "set", "nan", "bytes", "inf-inside"])
def test_result_that_is_not_json_is_handler_error(value: Any) -> None:
    w = Worker(CallableHandler("odd", lambda request, stream: value))
    w.deliver(requestType="odd")
    assert w.replies() == [errorReply("handler_error", "the handler's result is not JSON")]
    assert w.settled() == "ack"


def test_chunk_that_is_not_json_fails_the_handler_not_the_runtime() -> None:
    def handle(request: Any, stream: IRequestStream) -> Any:
        stream.sendChunk(object())
        return "unreachable"

    w = Worker(CallableHandler("odd", handle))
    w.deliver(requestType="odd")
    [(kind, body, _seq)] = w.replies()
    assert (kind, body["code"]) == ("error", "handler_error")
    assert w.settled() == "ack"


# Cancel notices and deadlines


def test_cancel_notice_while_running_cancels_the_handler_and_replies_cancelled(
        w: Worker) -> None:
    w.deliver()
    [(request, _stream, d)] = w.handler.calls
    w.cancel(reason="disconnected")
    assert w.handler.cancelled == [request]
    assert d.called  # cancelled: the runtime consumed its CancelledError
    assert w.replies() == [errorReply("cancelled", "cancelled by the gateway (disconnected)")]
    assert w.settled() == "ack"
    w.assertIdle()


def test_cancel_notice_for_another_request_changes_nothing(w: Worker) -> None:
    w.deliver()
    w.cancel("c-other")
    assert w.handler.cancelled == [] and w.bus.replies == []
    assert w.runtime.runningCount == 1


def test_cancel_notice_before_the_delivery_skips_it(w: Worker) -> None:
    w.cancel("c-1")
    w.deliver()
    assert w.handler.calls == []
    assert w.bus.replies == []
    assert w.settled() == "ack"
    # remembered once only: a (theoretical) second delivery with the same id runs
    w.bus.settled.clear()
    w.deliver()
    assert len(w.handler.calls) == 1


def test_remembered_cancel_notices_are_bounded(w: Worker,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workerModule, "REMEMBER_CANCELLED_MAX", 3)
    for i in range(4):
        w.cancel(f"c-{i}")
    w.deliver("c-0")  # forgotten: the oldest notice went first
    w.deliver("c-1")  # still remembered
    assert [request.correlationId for request, _s, _d in w.handler.calls] == ["c-0"]
    assert w.settled("c-1") == "ack"


def test_remembered_cancel_notices_expire(w: Worker) -> None:
    w.cancel("old")
    w.clock.advance(workerModule.REMEMBER_CANCELLED_S + 1)
    w.cancel("new")  # pruning happens as notices arrive
    w.deliver("old")
    w.deliver("new")
    assert [request.correlationId for request, _s, _d in w.handler.calls] == ["old"]


def test_deadline_passing_while_running_cancels_with_timeout(w: Worker) -> None:
    w.deliver(timeoutS=5)
    [(request, _stream, _d)] = w.handler.calls
    w.clock.advance(4.999)
    assert w.handler.cancelled == []
    w.clock.advance(0.001)
    assert w.handler.cancelled == [request]
    assert w.replies() == [errorReply("timeout", "the request's deadline passed")]
    assert w.settled() == "ack"
    w.assertIdle()


@pytest.mark.parametrize("timeoutS", [0, -1, -3600])
def test_delivery_whose_deadline_passed_is_acked_and_not_run(w: Worker,
                                                             timeoutS: float) -> None:
    w.deliver(timeoutS=timeoutS)
    assert w.handler.calls == [] and w.bus.replies == []
    assert w.settled() == "ack"
    w.assertIdle()


class TickingClock(Clock):
    """A clock that moves on a microsecond each time it is read, as the reactor's does, and
    refuses a negative delay, as the reactor's callLater does."""

    def seconds(self) -> float:
        self.rightNow += 1e-6
        return self.rightNow

    def callLater(self, delay: float, callable: Any, *args: Any, **kw: Any) -> Any:
        assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"
        return super().callLater(delay, callable, *args, **kw)


def test_deadline_passing_between_two_reads_of_the_clock_still_ends_the_request() -> None:
    # Found by benchmarks/soak.py: the deadline was checked against one reading of the clock
    # and the timer set from another, so a deadline between the two made callLater refuse a
    # negative delay, and the delivery stayed unacked with no reply.
    clock = TickingClock()
    clock.advance(START)
    bus = FakeWorkerBus()
    handler = FakeRequestHandler("fake")
    WorkerRuntime(bus, {"fake": handler}, clock).startService()
    bus.deliver(requestMessage("c-1", "fake", deadline=clock.rightNow + 1.5e-6))
    clock.advance(1)
    assert [str(r.kind) for r in bus.repliesFor("c-1")] == ["error"]
    assert bus.settled == {"c-1": "ack"}


def test_handler_without_a_canceller_is_still_ended_at_the_deadline() -> None:
    @implementer(IRequestHandler)
    class Stubborn:  # its Deferreds have no canceller
        requestType = "fake"
        idempotent = False

        def __init__(self) -> None:
            self.pending: list[Deferred[Any]] = []

        def handle(self, request: Any, stream: IRequestStream) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            return d

    handler = Stubborn()
    w = Worker(handler)
    w.deliver(timeoutS=1)
    w.clock.advance(1)
    assert w.replies() == [errorReply("timeout", "the request's deadline passed")]
    # cancel() failed the canceller-less Deferred with CancelledError (consumed by the
    # runtime) and nothing more is published for the request
    assert handler.pending[0].called
    assert len(w.bus.replies) == 1
    assert w.settled() == "ack"


def test_a_handler_that_swallows_cancellation_sends_nothing_more() -> None:
    @implementer(IRequestHandler)
    class Swallowing:
        requestType = "fake"
        idempotent = False

        async def handle(self, request: Any, stream: IRequestStream) -> Any:
            try:
                await Deferred()
            except CancelledError:
                await stream.sendChunk("after cancel")
                return "finished anyway"

    w = Worker(Swallowing())
    w.deliver()
    w.cancel()
    assert w.replies() == [errorReply("cancelled", "cancelled by the gateway (cancelled)")]
    assert w.settled() == "ack"


# Redelivery and bad input


def test_redelivered_non_idempotent_request_is_worker_lost_and_not_run(w: Worker) -> None:
    w.deliver(redelivered=True)
    assert w.handler.calls == []
    [(kind, body, _seq)] = w.replies()
    assert (kind, body["code"]) == ("error", "worker_lost")
    assert w.settled() == "ack"


def test_redelivered_idempotent_request_runs_again() -> None:
    handler = FakeRequestHandler("fake", idempotent=True)
    w = Worker(handler)
    w.deliver(redelivered=True, payload="again")
    [(request, _stream, d)] = handler.calls
    assert request.redelivered is True and request.payload == "again"
    d.callback("ok")
    assert w.replies() == [("response", "ok", None)]
    assert w.settled() == "ack"


def test_handler_without_idempotent_attribute_counts_as_not_idempotent() -> None:
    @implementer(IRequestHandler)
    class Bare:
        requestType = "bare"

        def handle(self, request: Any, stream: IRequestStream) -> Any:
            raise AssertionError("must not run")

    w = Worker(Bare())
    w.deliver(requestType="bare", redelivered=True)
    assert w.replies()[0][1]["code"] == "worker_lost"


@pytest.mark.parametrize("body", [b"{", b"\xff", b"NaN", b"", b"[" * 5000 + b"]" * 5000],
                         ids=["broken", "not-utf8", "nan", "empty", "too-deep"])
def test_payload_that_is_not_json_is_bad_request(w: Worker, body: bytes) -> None:
    w.deliver(body=body)
    assert w.handler.calls == []
    assert w.replies() == [errorReply("bad_request", "the request payload is not JSON")]
    assert w.settled() == "ack"


def test_request_type_this_worker_does_not_serve_is_handler_error(w: Worker) -> None:
    w.deliver(requestType="other")
    [(kind, body, _seq)] = w.replies()
    assert (kind, body["code"]) == ("error", "handler_error")
    assert w.settled() == "ack"


# The bus failing


def test_final_reply_not_published_means_not_acked(w: Worker) -> None:
    w.deliver()
    w.bus.failPublishes = True
    w.handler.calls[0][2].callback("result")
    assert w.bus.replies == [] and w.settled() is None
    # the runtime let go of it: a stop does not wait for it
    assert successResultOf(w.runtime.stopService()) is None


@pytest.mark.parametrize("scenario", ["bad-payload", "worker-lost", "cancelled", "timeout"])
def test_refusal_not_published_means_not_acked(w: Worker, scenario: str) -> None:
    w.bus.failPublishes = scenario in ("bad-payload", "worker-lost")
    if scenario == "bad-payload":
        w.deliver(body=b"{")
    elif scenario == "worker-lost":
        w.deliver(redelivered=True)
    else:
        w.deliver(timeoutS=1)
        w.bus.failPublishes = True
        if scenario == "cancelled":
            w.cancel()
        else:
            w.clock.advance(1)
    assert w.bus.replies == [] and w.settled() is None
    w.assertIdle()


@pytest.mark.parametrize("scenario", ["response", "bad-payload", "worker-lost", "cancelled",
                                      "timeout"])
def test_final_reply_the_broker_refuses_is_acked(scenario: str) -> None:
    """A nack means the broker got the reply and refused it (the gateway's reply queue is
    full): redelivering the request would repeat that until its deadline, and holding it
    would keep a prefetch slot until the next reconnect. Acked; the client gets timeout."""
    w = Worker(bus=RefusingBus(ReplyKind.RESPONSE, ReplyKind.ERROR))
    with loggedLines() as lines:
        if scenario == "bad-payload":
            w.deliver(body=b"{")
        elif scenario == "worker-lost":
            w.deliver(redelivered=True)
        else:
            w.deliver(timeoutS=1)
            if scenario == "response":
                w.handler.calls[0][2].callback("result")
            elif scenario == "cancelled":
                w.cancel()
            else:
                w.clock.advance(1)
    assert len(w.bus.refused) == 1 and w.bus.replies == []
    assert w.settled() == "ack"
    assert [line for line in lines if "refused the final reply for c-1" in line
            and "acked the request" in line]
    w.assertIdle()
    assert successResultOf(w.runtime.stopService()) is None  # nothing left in hand


@pytest.mark.parametrize("later", [False, True], ids=["nack-at-once", "nack-later"])
@pytest.mark.parametrize("how", ["awaits", "keeps-streaming", "does-not-wait"])
def test_a_chunk_the_broker_refuses_ends_the_request_with_handler_error(how: str,
                                                                       later: bool) -> None:
    """sendChunk does not wait for each confirm (the window), so the handler may never hear of
    a refusal: the runtime ends the request, with one handler_error and never a response past
    the dropped chunk, whatever the handler does (the gateway ends a request whose chunks
    skip a seq, so a later chunk cannot close the gap either)."""

    @implementer(IRequestHandler)
    class Streaming:
        requestType = "streaming"
        idempotent = False

        async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
            if how == "does-not-wait":
                stream.sendChunk(0)
                await Deferred()  # runs until the runtime stops it
            await stream.sendChunk(0)
            if how == "keeps-streaming":
                for index in range(1, 5):
                    await stream.sendChunk(index)
            return "done"

    bus = RefusingBus(ReplyKind.CHUNK, later=later)
    w = Worker(Streaming(), bus=bus)
    with loggedLines() as lines:
        w.deliver(requestType="streaming")
        bus.nackAll()
    assert bus.refused[0].seq == 0
    assert [reply for reply in w.replies() if reply[0] != "chunk"] == [
        errorReply("handler_error", "the broker refused a chunk of this request")]
    assert w.settled() == "ack"
    assert not [line for line in lines if line.startswith("FAILURE")], lines
    assert [line for line in lines if "refused a chunk of c-1" in line]
    w.assertIdle()


def test_a_refused_chunk_whose_error_reply_is_refused_too_is_acked() -> None:
    w = Worker(CallableHandler("streaming", lambda request, stream: stream.sendChunk(0)),
               bus=RefusingBus(ReplyKind.CHUNK, ReplyKind.ERROR))
    w.deliver(requestType="streaming")
    assert [str(r.kind) for r in w.bus.refused] == ["chunk", "error"]
    assert w.settled() == "ack"
    w.assertIdle()


def test_a_chunk_lost_with_the_channel_does_not_end_the_request(w: Worker) -> None:
    """Unlike a refusal: the connection is going, and busInterrupted stops the work; the
    handler is not told through sendChunk (the window does not wait for confirms)."""
    w.deliver()
    [(_request, stream, _d)] = w.handler.calls
    w.bus.failPublishes = True
    assert successResultOf(stream.sendChunk("x")) is None
    assert w.runtime.runningCount == 1 and w.bus.replies == []


def test_a_handler_raising_reply_refused_itself_is_handler_error() -> None:
    def handle(request: Any, stream: Any) -> Any:
        raise ReplyRefusedError()

    w = Worker(CallableHandler("odd", handle))
    w.deliver(requestType="odd")
    assert w.replies() == [errorReply("handler_error",
                                      "the broker refused a chunk of this request")]
    assert w.settled() == "ack"


def test_bus_interrupted_cancels_running_handlers_without_replies_or_settling(
        w: Worker) -> None:
    w.deliver("c-1")
    w.deliver("c-2")
    [(r1, s1, _d1), (r2, _s2, _d2)] = w.handler.calls
    w.runtime.busInterrupted(None)
    assert w.handler.cancelled == [r1, r2]
    assert w.bus.replies == [] and w.bus.settled == {}
    w.assertIdle()
    # a chunk from the abandoned handler goes nowhere
    assert successResultOf(s1.sendChunk("late")) is None
    assert w.bus.replies == []
    assert successResultOf(w.runtime.stopService()) is None


def test_bus_interrupted_forgets_unconfirmed_final_replies() -> None:
    bus = HeldRepliesBus()
    w = Worker(bus=bus)
    w.deliver()
    w.handler.calls[0][2].callback("done")
    w.runtime.busInterrupted(None)
    bus.held[0].callback(None)  # the confirm arrives after all (it cannot, but be safe)
    assert w.settled() is None
    assert successResultOf(w.runtime.stopService()) is None


# Stopping


def test_stop_with_nothing_in_hand_is_immediate(w: Worker) -> None:
    assert successResultOf(w.runtime.stopService()) is None
    assert w.bus.receiver is None  # stopServing was called
    w.assertIdle()


def test_stop_waits_for_running_handlers(w: Worker) -> None:
    w.deliver()
    done = w.runtime.stopService()
    assertNoResult(done)
    w.clock.advance(9.9)
    assertNoResult(done)
    assert w.handler.cancelled == []
    [(_request, stream, d)] = w.handler.calls
    stream.sendChunk("still streaming")
    d.callback("finished")
    assert w.replies() == [("chunk", "still streaming", 0), ("response", "finished", None)]
    assert w.settled() == "ack"
    assert successResultOf(done) is None
    w.assertIdle()


def test_stop_cancels_and_requeues_what_is_left_at_the_drain_timeout() -> None:
    w = Worker(drainTimeoutS=3)
    w.deliver("c-1")
    w.deliver("c-2")
    w.handler.calls[0][2].callback("quick")
    done = w.runtime.stopService()
    w.clock.advance(2.999)
    assertNoResult(done)
    w.clock.advance(0.001)
    assert successResultOf(done) is None
    assert w.handler.cancelled == [w.handler.calls[1][0]]
    assert w.bus.settled == {"c-1": "ack", "c-2": "requeue"}
    assert w.replies("c-2") == []  # handed back, not answered
    w.assertIdle()


def test_stop_waits_for_the_confirm_of_a_final_reply() -> None:
    bus = HeldRepliesBus()
    w = Worker(bus=bus)
    w.deliver()
    w.handler.calls[0][2].callback("done")
    done = w.runtime.stopService()
    assertNoResult(done)
    bus.held[0].callback(None)
    assert w.settled() == "ack"
    assert successResultOf(done) is None
    w.assertIdle()


def test_stop_gives_up_on_unconfirmed_final_replies_at_the_drain_timeout() -> None:
    bus = HeldRepliesBus()
    w = Worker(bus=bus, drainTimeoutS=2)
    w.deliver()
    w.handler.calls[0][2].callback("done")
    done = w.runtime.stopService()
    w.clock.advance(2)
    assert successResultOf(done) is None
    assert w.settled() is None  # neither acked nor requeued: the broker decides
    bus.held[0].callback(None)
    assert w.settled() is None


def test_deliveries_arriving_after_stop_are_requeued(w: Worker) -> None:
    successResultOf(w.runtime.stopService())
    settled: list[bool] = []
    message = requestMessage("late", "fake", deadline=w.clock.seconds() + 30)
    w.runtime.requestReceived(Delivery(message, False, settled.append))
    assert settled == [True]  # requeue
    assert w.handler.calls == [] and w.bus.replies == []


def test_deliveries_arriving_during_the_drain_are_run_and_waited_for(w: Worker) -> None:
    # Handing them back would mark them redelivered: the next worker would answer
    # worker_lost for a request nobody started.
    w.deliver("c-1")
    done = w.runtime.stopService()
    settled: list[bool] = []
    message = requestMessage("late", "fake", deadline=w.clock.seconds() + 30)
    w.runtime.requestReceived(Delivery(message, False, settled.append))
    assert len(w.handler.calls) == 2
    w.handler.calls[0][2].callback("ok")
    assertNoResult(done)
    w.handler.calls[1][2].callback("ok too")
    assert settled == [False]  # acked after its reply
    assert successResultOf(done) is None


def test_send_chunk_after_the_end_is_a_no_op(w: Worker) -> None:
    w.deliver("c-1")
    w.deliver("c-2")
    [(_r1, s1, d1), (_r2, s2, _d2)] = w.handler.calls
    d1.callback("done")
    w.cancel("c-2")
    before = list(w.bus.replies)
    assert successResultOf(s1.sendChunk("late")) is None
    assert successResultOf(s2.sendChunk("late")) is None
    assert w.bus.replies == before


def test_handler_returning_an_already_fired_deferred() -> None:
    w = Worker(CallableHandler("quick", lambda request, stream: succeed("now")))
    w.deliver(requestType="quick")
    assert w.replies() == [("response", "now", None)]
    assert w.settled() == "ack"
    w.assertIdle()


def test_error_code_enum_values_are_used_on_the_wire() -> None:
    w = Worker(CallableHandler("failing", lambda request, stream: (_ for _ in ()).throw(
        RelaybusError(ErrorCode.OVERLOADED, "busy"))))
    w.deliver(requestType="failing")
    assert w.bus.replies[0].body == b'{"code":"overloaded","message":"busy"}'
