"""Where handlers run (relaybus.handlerworlds): declared worlds, the start-up check against the
reactor, asyncio handlers as Tasks on a real asyncio loop, blocking handlers in a real bounded
thread pool, and cancellation reaching each of them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from workers import asyncio_examples
from zope.interface import implementer

from relaybus.handlerworlds import (
    HandlerWorldError,
    InlineThreads,
    PooledThreads,
    checkWorlds,
    threadsFor,
    worldOf,
)
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.messages import Delivery, ReplyKind, RequestMessage
from relaybus.options import WorkerOptions
from relaybus.strictjson import decodeJSON, encodeJSON
from relaybus.testing import FakeWorkerBus, runHandler
from relaybus.worker import WorkerRuntime

TIMEOUT_S = 10.0  # every wait below on a real loop or thread


@implementer(IRequestHandler)
class Handler:
    """A handler assembled per test: `handle` and `runsIn` as given."""

    idempotent = False

    def __init__(self, handle: Callable[..., Any], runsIn: str | None = None,
                 requestType: str = "t") -> None:
        self.requestType = requestType
        self.handle = handle  # type: ignore[method-assign]
        if runsIn is not None:
            self.runsIn = runsIn


def plain(request: Any, stream: IRequestStream) -> Any:
    return "plain"


async def coroutine(request: Any, stream: IRequestStream) -> Any:
    return "coroutine"


# Declaring a world


def test_the_default_world_is_twisted() -> None:
    assert worldOf(Handler(plain)) == "twisted"
    assert worldOf(Handler(coroutine)) == "twisted"


@pytest.mark.parametrize("value", ["Asyncio", "threads", "", None, 1, "trio"])
def test_an_unknown_world_names_the_three(value: Any) -> None:
    handler = Handler(plain)
    handler.runsIn = value
    with pytest.raises(HandlerWorldError, match=r'use "twisted" .*"asyncio" or "thread"'):
        worldOf(handler)


def test_an_asyncio_handler_must_be_async_def() -> None:
    with pytest.raises(HandlerWorldError, match="not an `async def`"):
        worldOf(Handler(plain, "asyncio"))
    assert worldOf(Handler(coroutine, "asyncio")) == "asyncio"


def test_a_thread_handler_must_be_a_plain_def() -> None:
    with pytest.raises(HandlerWorldError, match="plain `def handle`"):
        worldOf(Handler(coroutine, "thread"))
    assert worldOf(Handler(plain, "thread")) == "thread"


def test_the_runtime_refuses_a_bad_world_when_built() -> None:
    with pytest.raises(HandlerWorldError):
        WorkerRuntime(FakeWorkerBus(), {"t": Handler(plain, "asyncio")}, Clock())


def test_the_runtime_describes_where_each_handler_runs() -> None:
    from twisted.internet import reactor

    runtime = WorkerRuntime(FakeWorkerBus(), {"a": Handler(plain, requestType="a"),
                                              "b": Handler(coroutine, "asyncio", "b"),
                                              "c": Handler(plain, "thread", "c")},
                            reactor, threads=3)
    assert runtime.describeHandlers() == "a, b (asyncio), c (thread; 3 threads)"


# The start-up check


def test_an_asyncio_handler_on_the_default_reactor_fails_naming_the_fix() -> None:
    with pytest.raises(HandlerWorldError) as caught:
        checkWorlds({"asyncTicker": asyncio_examples.asyncTicker}, None)
    message = str(caught.value)
    assert "'asyncTicker' (workers.asyncio_examples.AsyncTickerHandler)" in message
    assert "twistd's default reactor" in message
    assert "`twistd -r asyncio relaybus-worker ...`" in message


def test_the_check_names_the_reactor_that_runs() -> None:
    with pytest.raises(HandlerWorldError, match="runs the Clock: start it with the asyncio "
                                                r"reactor, `twistd -r asyncio relaybus \.\.\.`"):
        checkWorlds({"a": asyncio_examples.asyncTicker}, Clock(), "relaybus")


def test_asyncio_handlers_pass_on_the_asyncio_reactor() -> None:
    loop = asyncio.new_event_loop()
    try:
        checkWorlds({"a": asyncio_examples.asyncTicker, "b": Handler(plain, "thread"),
                     "c": Handler(coroutine)}, AsyncioSelectorReactor(loop))
    finally:
        loop.close()


def test_twisted_and_thread_handlers_pass_anywhere() -> None:
    checkWorlds({"b": Handler(plain, "thread"), "c": Handler(coroutine)}, None)


def test_worker_options_refuse_an_asyncio_module_on_this_reactor() -> None:
    # This test process runs pytest-twisted's default reactor, as twistd without -r would.
    options = WorkerOptions()
    with pytest.raises(usage.UsageError, match=r"twistd -r asyncio relaybus-worker"):
        options.parseOptions(["--broker", "amqp://guest:guest@127.0.0.1/",
                              "--handlers", "workers.asyncio_examples"])


@pytest.mark.parametrize("value", ["0", "-1", "257", "1e3", "ten", "99999999999999999999"])
def test_worker_threads_option_is_bounded(value: str) -> None:
    with pytest.raises(usage.UsageError, match=r"1\.\.256"):
        WorkerOptions().parseOptions(["--broker", "amqp://127.0.0.1/", "--handlers",
                                      "workers.blocking_examples", "--threads", value])


def test_worker_threads_option_reaches_the_config() -> None:
    options = WorkerOptions()
    options.parseOptions(["--broker", "amqp://127.0.0.1/", "--handlers",
                          "workers.blocking_examples", "--threads", "256"])
    assert options.config.threads == 256
    assert WorkerOptions.fromEnvironment({
        "RELAYBUS_BROKER": "amqp://127.0.0.1/", "RELAYBUS_HANDLERS": "workers.examples",
        "RELAYBUS_THREADS": "3"}).config.threads == 3


def test_threads_are_real_on_a_reactor_and_inline_on_a_clock() -> None:
    from twisted.internet import reactor

    assert isinstance(threadsFor(reactor, 3), PooledThreads)
    assert isinstance(threadsFor(Clock(), 3), InlineThreads)


# asyncio handlers, as Tasks on a real loop (asyncio.run: no Twisted reactor involved)


@implementer(IRequestHandler)
class Recorder:
    """An asyncio handler that streams `count` chunks `delayS` apart and records what it saw."""

    requestType = "recorder"
    idempotent = False
    runsIn = "asyncio"

    def __init__(self, swallowCancel: bool = False) -> None:
        self.swallowCancel = swallowCancel
        self.events: list[str] = []

    async def handle(self, request: Any, stream: IRequestStream) -> Any:
        self.events.append(f"task {asyncio.current_task() is not None}")
        try:
            for index in range(request.payload["count"]):
                await asyncio.sleep(request.payload["delayS"])
                published = stream.sendChunk(index)
                assert isinstance(published, asyncio.Future)
                await published
            return {"sent": request.payload["count"]}
        except asyncio.CancelledError:
            self.events.append("cancelled")
            if not self.swallowCancel:
                raise
            return {"swallowed": True}
        finally:
            self.events.append("finally")


def test_an_asyncio_handler_runs_as_a_task_and_streams() -> None:
    async def scenario() -> None:
        handler = Recorder()
        run = runHandler(handler, {"count": 3, "delayS": 0.001})
        outcome = await asyncio.wait_for(run.finished(), TIMEOUT_S)
        assert outcome.chunks == [0, 1, 2] and outcome.result == {"sent": 3} and outcome.ok
        assert handler.events == ["task True", "finally"]

    asyncio.run(scenario())


@pytest.mark.parametrize("swallow", [False, True], ids=["raises", "swallows"])
def test_a_cancel_cancels_the_task_and_ends_the_request_once(swallow: bool) -> None:
    async def scenario() -> None:
        handler = Recorder(swallowCancel=swallow)
        run = runHandler(handler, {"count": 1000, "delayS": 0.001})
        while len(run.chunks) < 2:
            await asyncio.sleep(0.001)
        run.cancel()
        outcome = run.outcome  # answered at once, before the Task has even seen it
        assert outcome.errorCode == "cancelled" and outcome.settled == "ack"
        await asyncio.wait_for(run.handlerDone(), TIMEOUT_S)
        assert handler.events[-2:] == ["cancelled", "finally"]
        finals = [r for r in run.bus.replies if r.kind is not ReplyKind.CHUNK]
        assert len(finals) == 1  # the swallowing handler's late return is not a second one
        chunks = len(run.chunks)
        await asyncio.sleep(0.02)
        assert len(run.chunks) == chunks

    asyncio.run(scenario())


def test_the_deadline_cancels_the_task() -> None:
    async def scenario() -> None:
        handler = Recorder()
        run = runHandler(handler, {"count": 1000, "delayS": 0.001}, timeoutS=5)
        await asyncio.sleep(0.005)
        run.passDeadline()
        assert run.outcome.errorCode == "timeout"
        await asyncio.wait_for(run.handlerDone(), TIMEOUT_S)
        assert handler.events[-2:] == ["cancelled", "finally"]

    asyncio.run(scenario())


def test_a_drain_that_times_out_cancels_the_task_and_waits_for_its_finally() -> None:
    async def scenario() -> None:
        handler = Recorder()
        run = runHandler(handler, {"count": 1000, "delayS": 0.001}, drainTimeoutS=1)
        await asyncio.sleep(0.005)
        stopped = run.shutDown()
        run.clock.advance(1)  # the drain timeout
        assert run.outcome.settled == "requeue"  # handed back, unanswered
        assert not stopped.done()  # ... and the runtime waits for the Task to end
        await asyncio.wait_for(stopped, TIMEOUT_S)  # awaitable in a Task, like finished()
        assert handler.events[-2:] == ["cancelled", "finally"]

    asyncio.run(scenario())


def test_an_asyncio_handler_without_a_running_loop_is_a_handler_error() -> None:
    run = runHandler(Recorder(), {"count": 1, "delayS": 0})
    assert run.outcome.errorCode == "handler_error"


def test_awaiting_asyncio_on_the_reactor_logs_the_fix() -> None:
    """The mistake the worlds exist for: an asyncio await in a default-world handler."""
    async def awaitsAsyncio(request: Any, stream: IRequestStream) -> Any:
        await asyncio.sleep(0.01)

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        async def scenario() -> Any:
            run = runHandler(Handler(awaitsAsyncio), None)
            return await asyncio.wait_for(run.finished(), TIMEOUT_S)

        outcome = asyncio.run(scenario())
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert outcome.errorCode == "handler_error"
    hints = [e for e in events if 'declare runsIn = "asyncio"' in str(e.get("hint", ""))]
    assert hints, "no log line tells the author what to change"


def test_awaiting_asyncio_on_the_default_reactor_logs_the_fix_too() -> None:
    """Under twistd's default reactor no asyncio loop runs: asyncio says 'no running event loop'
    (here: a Clock, no loop), and the log still names the fix."""
    async def awaitsAsyncio(request: Any, stream: IRequestStream) -> Any:
        await asyncio.sleep(0.01)

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        run = runHandler(Handler(awaitsAsyncio), None)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert run.outcome.errorCode == "handler_error"
    hints = [e for e in events if 'declare runsIn = "asyncio"' in str(e.get("hint", ""))]
    assert hints, "no log line tells the author what to change"


# Blocking handlers in a real thread pool (pytest-twisted's running reactor)


def deliver(runtime: WorkerRuntime, bus: FakeWorkerBus, correlationId: str,
            payload: Any, requestType: str) -> None:
    from twisted.internet import reactor

    message = RequestMessage(correlationId, requestType, "gw", encodeJSON(payload),
                             reactor.seconds() + 60)

    def settle(requeue: bool) -> None:
        bus.settled[correlationId] = "requeue" if requeue else "ack"

    runtime.requestReceived(Delivery(message, False, settle))


async def until(condition: Callable[[], bool], what: str) -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.005, lambda: None)


@implementer(IRequestHandler)
class Blocking:
    """Blocks its thread until released; counts how many run at once."""

    requestType = "blocking"
    idempotent = False
    runsIn = "thread"

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.mostAtOnce = 0
        self.release = threading.Event()
        self.threads: set[str] = set()
        self.returned = 0

    def handle(self, request: Any, stream: IRequestStream) -> Any:
        with self.lock:
            self.running += 1
            self.mostAtOnce = max(self.mostAtOnce, self.running)
            self.threads.add(threading.current_thread().name)
        try:
            stream.sendChunk({"from": "thread"})  # blocks until published on the reactor
            self.release.wait(TIMEOUT_S)
            return {"thread": threading.current_thread().name}
        finally:
            with self.lock:
                self.running -= 1
                self.returned += 1


@pytest_twisted.ensureDeferred
async def test_blocking_handlers_run_in_at_most_threads_threads() -> None:
    from twisted.internet import reactor

    bus = FakeWorkerBus()
    handler = Blocking()
    runtime = WorkerRuntime(bus, {"blocking": handler}, reactor, concurrency=5, threads=2)
    runtime.startService()
    try:
        for n in range(5):
            deliver(runtime, bus, f"b{n}", None, "blocking")
        await until(lambda: handler.running == 2, "two running")
        await until(lambda: len([r for r in bus.replies if r.kind is ReplyKind.CHUNK]) == 2,
                    "their chunks")
        assert handler.running == 2  # the other three wait for a thread
        handler.release.set()
        await until(lambda: len(bus.settled) == 5, "all five answered")
        assert handler.mostAtOnce == 2 and len(handler.threads) <= 2
        assert threading.current_thread().name not in handler.threads
        finals = [decodeJSON(r.body) for r in bus.replies if r.kind is ReplyKind.RESPONSE]
        assert len(finals) == 5
        assert all(f["thread"].startswith("PoolThread-relaybus-handlers-") for f in finals)
    finally:
        handler.release.set()
        await runtime.stopService()


@implementer(IRequestHandler)
class Looping:
    """Streams a chunk every few ms until sendChunk raises (or `steps` are done)."""

    requestType = "looping"
    idempotent = False
    runsIn = "thread"

    def __init__(self, checks: bool = True) -> None:
        self.checks = checks
        self.outcome: list[str] = []
        self.release = threading.Event()

    def handle(self, request: Any, stream: Any) -> Any:
        if not self.checks:  # never looks: holds its thread until released
            self.outcome.append("started")
            self.release.wait(TIMEOUT_S)
            self.outcome.append("returned")
            return "late"
        try:
            for step in range(10_000):
                stream.sendChunk(step)
                time.sleep(0.002)
        except CancelledError:
            self.outcome.append(f"cancelled, flag {stream.cancelled.is_set()}")
            raise
        return "done"


@pytest_twisted.ensureDeferred
async def test_a_cancelled_blocking_handler_is_answered_at_once_and_told_at_its_next_chunk(
) -> None:
    from twisted.internet import reactor

    bus = FakeWorkerBus()
    handler = Looping()
    runtime = WorkerRuntime(bus, {"looping": handler}, reactor, threads=1)
    runtime.startService()
    try:
        deliver(runtime, bus, "l1", None, "looping")
        await until(lambda: len(bus.replies) >= 3, "some chunks")
        runtime.cancelReceived(_cancel("l1", "looping"))
        assert bus.settled == {"l1": "ack"}  # answered and acked before the thread knows
        assert decodeJSON(bus.replies[-1].body)["code"] == "cancelled"
        await until(lambda: handler.outcome != [], "the thread to notice")
        assert handler.outcome == ["cancelled, flag True"]
        assert len([r for r in bus.replies if r.kind is not ReplyKind.CHUNK]) == 1
    finally:
        await runtime.stopService()


@pytest_twisted.ensureDeferred
async def test_a_blocking_handler_that_never_checks_holds_its_thread_until_it_returns() -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    bus = FakeWorkerBus()
    handler = Looping(checks=False)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    runtime = WorkerRuntime(bus, {"looping": handler}, reactor, concurrency=2, threads=1)
    runtime.startService()
    try:
        deliver(runtime, bus, "first", None, "looping")
        await until(lambda: handler.outcome == ["started"], "the first to start")
        deliver(runtime, bus, "second", None, "looping")
        runtime.cancelReceived(_cancel("first", "looping"))
        assert bus.settled == {"first": "ack"}  # the reply is sent; the slot is still held
        await deferLater(reactor, 0.05, lambda: None)
        assert "second" not in bus.settled and handler.outcome == ["started"]
        handler.release.set()
        await until(lambda: "second" in bus.settled, "the second request")
        finals = {r.correlationId: decodeJSON(r.body) for r in bus.replies}
        assert finals == {"first": {"code": "cancelled", "message": finals["first"]["message"]},
                          "second": "late"}
        assert handler.outcome == ["started", "returned", "started", "returned"]
        dropped = [e for e in events if "its result was dropped" in str(e.get("log_format"))]
        assert len(dropped) == 1
    finally:
        globalLogPublisher.removeObserver(events.append)
        handler.release.set()
        await runtime.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_that_ends_while_it_waits_for_a_thread_never_runs() -> None:
    from twisted.internet import reactor

    bus = FakeWorkerBus()
    handler = Looping(checks=False)
    runtime = WorkerRuntime(bus, {"looping": handler}, reactor, concurrency=2, threads=1)
    runtime.startService()
    try:
        deliver(runtime, bus, "first", None, "looping")
        await until(lambda: handler.outcome == ["started"], "the first to start")
        deliver(runtime, bus, "queued", None, "looping")
        runtime.cancelReceived(_cancel("queued", "looping"))
        handler.release.set()
        await until(lambda: len(bus.settled) == 2, "both answered")
        assert handler.outcome == ["started", "returned"]  # "queued" never ran
    finally:
        handler.release.set()
        await runtime.stopService()


@pytest_twisted.ensureDeferred
async def test_requests_that_end_waiting_for_a_thread_do_not_pile_up() -> None:
    """All threads held by a call that never returns: every later request waits, ends
    (cancel, deadline), is acked, and the broker sends the next; the ended ones must not stay
    queued (with their payloads) until a thread frees."""
    from twisted.internet import reactor

    bus = FakeWorkerBus()
    handler = Looping(checks=False)
    runtime = WorkerRuntime(bus, {"looping": handler}, reactor, concurrency=2, threads=1)
    runtime.startService()
    threads = runtime._calls.threads
    assert isinstance(threads, PooledThreads)
    try:
        deliver(runtime, bus, "stuck", None, "looping")
        await until(lambda: handler.outcome == ["started"], "the stuck call")
        for n in range(50):
            deliver(runtime, bus, f"q{n}", {"blob": "x" * 10_000}, "looping")
            runtime.cancelReceived(_cancel(f"q{n}", "looping"))
        assert len(bus.settled) == 50  # all answered and acked
        assert threads._pool._team.statistics().backloggedWorkCount == 0
        assert threads.busy == 1  # only the stuck call
        handler.release.set()
        await until(lambda: threads.busy == 0, "the stuck call to return")
        assert handler.outcome == ["started", "returned"]  # none of the 50 ran
    finally:
        handler.release.set()
        await runtime.stopService()


@pytest_twisted.ensureDeferred
async def test_with_every_thread_held_by_an_abandoned_call_thread_requests_get_overloaded(
) -> None:
    """Stuck calls that outlived their requests hold both threads: a new thread request is
    answered overloaded at once (not timeout at its deadline); other worlds go on; once a
    thread returns, thread requests run again."""
    from twisted.internet import reactor

    bus = FakeWorkerBus()
    stuck = Looping(checks=False)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    runtime = WorkerRuntime(bus, {"looping": stuck, "t": Handler(plain, requestType="t")},
                            reactor, concurrency=10, threads=2)
    runtime.startService()
    try:
        for name in ("s1", "s2"):
            deliver(runtime, bus, name, None, "looping")
        await until(lambda: stuck.outcome == ["started", "started"], "both threads held")
        deliver(runtime, bus, "waits", None, "looping")  # not all held yet: it waits
        assert "waits" not in bus.settled
        for name in ("s1", "s2"):
            runtime.cancelReceived(_cancel(name, "looping"))
        for n in range(3):
            deliver(runtime, bus, f"o{n}", None, "looping")
        deliver(runtime, bus, "other", None, "t")
        codes = {r.correlationId: decodeJSON(r.body) for r in bus.replies}
        assert [codes[f"o{n}"]["code"] for n in range(3)] == ["overloaded"] * 3
        assert codes["other"] == "plain"
        warnings = [e for e in events if "are held by blocking calls" in
                    str(e.get("log_format"))]
        assert len(warnings) == 1  # once per episode, not per request
        stuck.release.set()
        await until(lambda: "waits" in bus.settled, "the waiting request to run")
        deliver(runtime, bus, "after", None, "looping")
        await until(lambda: "after" in bus.settled, "a thread request after recovery")
        assert decodeJSON(bus.replies[-1].body) == "late"
    finally:
        globalLogPublisher.removeObserver(events.append)
        stuck.release.set()
        await runtime.stopService()


@pytest_twisted.ensureDeferred
async def test_the_handler_is_done_only_once_its_thread_returns() -> None:
    """run.handlerDone() (and the shutdown grace) wait for a cancelled blocking call's thread,
    as they do for a cancelled Task, while the request is answered at once."""
    from twisted.internet import reactor

    handler = Looping(checks=False)
    run = runHandler(handler, None, clock=reactor)
    await until(lambda: handler.outcome == ["started"], "the thread to start")
    run.cancel()
    assert run.outcome.errorCode == "cancelled"
    done = run.handlerDone()
    try:
        assert not done.called, "handlerDone fired while the handler still runs in its thread"
    finally:
        handler.release.set()
    await done
    assert handler.outcome == ["started", "returned"]


class HoldingBus(FakeWorkerBus):
    """Chunk publishes are never confirmed (a broker under a resource alarm); final replies
    go through."""

    def publishReply(self, reply: Any) -> Deferred[None]:
        if reply.kind is ReplyKind.CHUNK:
            return Deferred()
        return super().publishReply(reply)


@implementer(IRequestHandler)
class SendsOnce:
    requestType = "sendsOnce"
    idempotent = False
    runsIn = "thread"

    def __init__(self) -> None:
        self.outcome: list[str] = []

    def handle(self, request: Any, stream: Any) -> Any:
        from relaybus.worker import CHUNK_WINDOW

        self.outcome.append("sending")
        try:
            for index in range(CHUNK_WINDOW):  # the last one waits: the window is full
                stream.sendChunk(index)
        except CancelledError:
            self.outcome.append("cancelled")
            raise
        self.outcome.append("sent")


@pytest_twisted.ensureDeferred
async def test_a_blocking_handler_waiting_on_a_chunk_is_released_when_its_request_ends() -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    bus = HoldingBus()
    handler = SendsOnce()
    runtime = WorkerRuntime(bus, {"sendsOnce": handler}, reactor, threads=1)
    runtime.startService()
    try:
        deliver(runtime, bus, "held", None, "sendsOnce")
        await until(lambda: handler.outcome == ["sending"], "the thread to send")
        await deferLater(reactor, 0.05, lambda: None)  # ... and to wait for the publish
        runtime.cancelReceived(_cancel("held", "sendsOnce"))
        assert bus.settled == {"held": "ack"}
        await until(lambda: len(handler.outcome) == 2, "the thread to leave sendChunk")
        assert handler.outcome == ["sending", "cancelled"]
    finally:
        await runtime.stopService()


def _cancel(correlationId: str, requestType: str) -> Any:
    from relaybus.messages import CancelNotice

    return CancelNotice(correlationId, requestType, "client")
