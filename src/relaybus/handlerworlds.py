"""Where a handler's code runs: on the reactor (Deferreds), in an asyncio Task, or in a thread.

A handler says which with its `runsIn` attribute ("twisted", the default; "asyncio"; "thread").
Detection cannot work: an `async def` looks the same whether it awaits Deferreds or asyncio
futures, and guessing wrong fails only at the first await, mid-request. The runtime starts each
call in its world and gets back a Deferred whose cancellation reaches that world: a Deferred
cancel, `Task.cancel()` (CancelledError inside the handler, `finally` blocks run), or an Event
that a thread can see (a thread cannot be stopped from outside).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    ensureDeferred,
    fail,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream

log = Logger(namespace="relaybus.worker")

TWISTED = "twisted"  # on the reactor: a value, a Deferred, or a coroutine awaiting Deferreds
ASYNCIO = "asyncio"  # an `async def handle` run as an asyncio Task (needs -r asyncio)
THREAD = "thread"  # a plain blocking `def handle`, run in the bounded thread pool
WORLDS = (TWISTED, ASYNCIO, THREAD)
DEFAULT_THREADS = 10

# A hint for the mistake this module exists for: an asyncio await inside a handler that the
# runtime drives with Deferreds. Under the asyncio reactor the awaited future is not driven;
# under any other reactor (twistd's default) asyncio finds no running loop at all.
ASYNCIO_ON_REACTOR = ("await wasn't used with future", "no running event loop")


class HandlerWorldError(ValueError):
    """A handler declares a world it cannot run in here; the message names the fix."""


def _describe(handler: IRequestHandler) -> str:
    kind = type(handler)
    return f"handler {handler.requestType!r} ({kind.__module__}.{kind.__qualname__})"


def worldOf(handler: IRequestHandler) -> str:
    """The world a handler declares, checked against the kind of its `handle`."""
    world = getattr(handler, "runsIn", TWISTED)
    if world not in WORLDS:
        raise HandlerWorldError(
            f"{_describe(handler)} has runsIn = {world!r}: use \"twisted\" (the default), "
            "\"asyncio\" or \"thread\"")
    isCoroutine = inspect.iscoroutinefunction(handler.handle)
    if world == ASYNCIO and not isCoroutine:
        raise HandlerWorldError(
            f"{_describe(handler)} has runsIn = \"asyncio\" but its handle is not an "
            "`async def`: make it one, or drop runsIn")
    if world == THREAD and isCoroutine:
        raise HandlerWorldError(
            f"{_describe(handler)} has runsIn = \"thread\" but its handle is an `async def`: "
            "a blocking handler is a plain `def handle`; an async one runs in \"twisted\" or "
            "\"asyncio\"")
    return world


def installedReactor() -> Any:
    """The reactor this process has installed, or None when none is yet (twistd's default
    one, epoll, is installed later, on first use)."""
    return sys.modules.get("twisted.internet.reactor")


def isAsyncioReactor(reactor: Any) -> bool:
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor  # installs nothing

    return isinstance(reactor, AsyncioSelectorReactor)


def checkWorlds(handlers: Mapping[str, IRequestHandler], reactor: Any,
                command: str = "relaybus-worker") -> None:
    """Fail at start, not at the first request, when a handler cannot run on this reactor.

    `reactor` is installedReactor() (None: the default reactor will be installed).
    """
    for handler in handlers.values():
        if worldOf(handler) != ASYNCIO or isAsyncioReactor(reactor):
            continue
        running = ("twistd's default reactor" if reactor is None
                   else f"the {type(reactor).__name__}")
        raise HandlerWorldError(
            f"{_describe(handler)} runs in asyncio (runsIn = \"asyncio\"), but this process "
            f"runs {running}: start it with the asyncio reactor, `twistd -r asyncio {command} "
            "...` (docs/workers.md)")


class ThreadRunner(Protocol):
    """How thread handlers get a thread, and how their code gets back to the reactor."""

    def run(self, work: Callable[[], Any],
            done: Callable[[bool, Any], None]) -> Callable[[], bool]:
        """Call work() in a thread; then done(True, result) or done(False, Failure) on the
        reactor. Returns `forget`: True if the call was still waiting for a thread and now
        never runs (nor calls done)."""

    def callInReactor(self, f: Callable[..., Any], *args: Any) -> Any:
        """From a handler's thread: f(*args) on the reactor, waiting for its Deferred."""

    def stop(self) -> None:
        """Let the threads go (at shutdown)."""


def _daemonThread(*args: Any, **kwargs: Any) -> threading.Thread:
    # A blocking handler that never returns must not keep the process from exiting.
    return threading.Thread(*args, daemon=True, **kwargs)


class PooledThreads:
    """A bounded pool of daemon threads (`--threads N`).

    Calls wait for a thread here, on the reactor, not in the pool's own queue: a request that
    ends while it waits is forgotten at once (with its payload), while all threads are held by
    calls that never return."""

    def __init__(self, reactor: Any, size: int) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(0, size, name="relaybus-handlers")
        self._pool.threadFactory = _daemonThread  # type: ignore[assignment]
        self.size = size
        self._inThreads = 0  # calls handed to a thread that have not returned
        self._waiting: dict[int, tuple[Callable[[], Any], Callable[[bool, Any], None]]] = {}
        self._numbers = itertools.count()

    @property
    def busy(self) -> int:
        """Calls not returned yet: in a thread, or waiting for one."""
        return self._inThreads + len(self._waiting)

    def run(self, work: Callable[[], Any],
            done: Callable[[bool, Any], None]) -> Callable[[], bool]:
        number = next(self._numbers)
        self._waiting[number] = (work, done)
        self._startWaiting()
        return lambda: self._waiting.pop(number, None) is not None

    def _startWaiting(self) -> None:
        while self._waiting and self._inThreads < self.size:
            work, done = self._waiting.pop(next(iter(self._waiting)))
            if not self._pool.started:
                self._pool.start()
            self._inThreads += 1
            self._pool.callInThreadWithCallback(self._fromThread(done), work)

    def _fromThread(self, done: Callable[[bool, Any], None]) -> Callable[[bool, Any], None]:
        def returned(ok: bool, result: Any) -> None:  # in the thread
            self._reactor.callFromThread(self._returned, done, ok, result)

        return returned

    def _returned(self, done: Callable[[bool, Any], None], ok: bool, result: Any) -> None:
        self._inThreads -= 1
        try:
            done(ok, result)
        finally:
            self._startWaiting()

    def callInReactor(self, f: Callable[..., Any], *args: Any) -> Any:
        return blockingCallFromThread(self._reactor, f, *args)

    def stop(self) -> None:
        if not self._pool.started:
            return
        if self.busy:
            # ThreadPool.stop() joins every thread: one stuck handler would hang the exit.
            log.warn("{busy} blocking handler call(s) still running at shutdown: exiting "
                     "without them (their requests were answered or handed back)",
                     busy=self.busy)
            return
        self._pool.stop()


class InlineThreads:
    """No threads: work runs at once in the caller's thread (the testing kit on a Clock, where
    no reactor runs to hop back to)."""

    size = 1
    busy = 0

    def run(self, work: Callable[[], Any],
            done: Callable[[bool, Any], None]) -> Callable[[], bool]:
        try:
            result = work()
        except BaseException:
            done(False, Failure())
        else:
            done(True, result)
        return lambda: False  # it has run already

    def callInReactor(self, f: Callable[..., Any], *args: Any) -> Any:
        outcome: list[Any] = []
        maybeDeferred(f, *args).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("a reactor call from an inline 'thread' did not finish at once "
                               "(run the kit on a real reactor to test real threads)")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def stop(self) -> None:
        pass


def threadsFor(clock: Any, size: int) -> PooledThreads | InlineThreads:
    """A real pool on a real reactor; inline calls on anything less (a Clock)."""
    if IReactorThreads.providedBy(clock) and IReactorFromThreads.providedBy(clock):
        return PooledThreads(clock, size)
    return InlineThreads()


@implementer(IRequestStream)
class AsyncioStream:
    """The stream an asyncio handler gets: sendChunk returns an asyncio Future."""

    def __init__(self, stream: IRequestStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop

    def sendChunk(self, data: Any) -> asyncio.Future[None]:
        return _asFuture(self._stream.sendChunk(data), self._loop)


def _asFuture(d: Deferred[Any], loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    """Deferred.asFuture without passing a cancel on: a cancelled Task must not cancel a
    publish in flight (pika's own Deferreds cannot be cancelled safely: field notes)."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any) -> None:
        if future.cancelled():
            return
        if isinstance(result, Failure):
            future.set_exception(result.value or Exception(result.getErrorMessage()))
        else:
            future.set_result(result)

    d.addBoth(settle)
    return future


@implementer(IRequestStream)
class ThreadStream:
    """The stream a blocking handler gets in its thread: sendChunk blocks until the chunk is
    published, and raises CancelledError once its request has ended, even while it waits for
    a publish (how a blocking handler learns it should stop; it may also poll `cancelled`)."""

    def __init__(self, stream: IRequestStream, threads: ThreadRunner) -> None:
        self._stream = stream
        self._threads = threads
        self.cancelled = threading.Event()
        self._waiting: set[Deferred[None]] = set()  # on the reactor: publishes a thread awaits

    def sendChunk(self, data: Any) -> None:
        if self.cancelled.is_set():
            raise _ended()
        self._threads.callInReactor(self._publish, data)

    def _publish(self, data: Any) -> Deferred[None]:
        """On the reactor: the chunk's publish, or CancelledError as soon as the request ends
        (the publish itself is never cancelled: pika's Deferreds must not be)."""
        if self.cancelled.is_set():
            raise _ended()
        published = self._stream.sendChunk(data)
        waiting: Deferred[None] = Deferred()
        self._waiting.add(waiting)

        def relay(result: Any) -> None:
            self._waiting.discard(waiting)
            if not waiting.called:
                waiting.errback(result) if isinstance(result, Failure) else waiting.callback(None)

        published.addBoth(relay)
        return waiting

    def end(self) -> None:
        """On the reactor, when the request ends: tell the thread, and let go of a thread
        blocked on a publish."""
        self.cancelled.set()
        for waiting in list(self._waiting):
            self._waiting.discard(waiting)
            waiting.errback(_ended())


def _ended() -> CancelledError:
    return CancelledError("the request has ended (cancelled, timed out or shut down)")


class HandlerCalls:
    """Starts each handler call in the world its handler declares."""

    def __init__(self, threads: PooledThreads | InlineThreads, clock: Any) -> None:
        self.threads = threads
        self._clock = clock
        # Thread calls whose request ended but whose thread has not returned: they hold a
        # thread each, and when they hold every one, no thread request can run here.
        self.abandonedInThreads = 0

    @property
    def threadsAllHeld(self) -> bool:
        return self.abandonedInThreads >= self.threads.size

    def call(self, handler: IRequestHandler, request: Any, stream: IRequestStream,
             world: str) -> Deferred[Any]:
        if world == ASYNCIO:
            return maybeDeferred(self._inTask, handler, request, stream)
        if world == THREAD:
            return self._inThread(handler, request, stream)
        try:
            result = handler.handle(request, stream)
        except BaseException:
            return fail()  # as maybeDeferred would, one Deferred fewer per request
        if isinstance(result, Deferred):
            return result
        if inspect.iscoroutine(result):
            return ensureDeferred(result)
        return succeed(result)

    def _inTask(self, handler: IRequestHandler, request: Any,
                stream: IRequestStream) -> Deferred[Any]:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                f"{_describe(handler)} runs in asyncio but no asyncio loop is running: run "
                "the process under the asyncio reactor (twistd -r asyncio), or a test under "
                "asyncio.run / pytest-asyncio") from None
        task = loop.create_task(handler.handle(request, AsyncioStream(stream, loop)),
                                name=f"relaybus {handler.requestType}")
        return Deferred.fromFuture(task)

    def _inThread(self, handler: IRequestHandler, request: Any,
                  stream: IRequestStream) -> Deferred[Any]:
        threadStream = ThreadStream(stream, self.threads)
        # Cancelling cannot stop the thread: it sets the flag, and the runtime answers and
        # acks now. The Deferred then waits (paused, as Deferred.fromFuture does for a Task)
        # until the thread returns, so whenStoppedHandlersEnd and the shutdown grace see the
        # thread's work end; what it returns then is dropped. A call still waiting for a
        # thread is forgotten: it never runs.
        forget: list[Callable[[], bool]] = []
        returned: list[Deferred[Any]] = []  # after a cancel: fires when the thread returns
        endedAt: list[float] = []
        ran: list[bool] = []

        def cancel(ended: Deferred[Any]) -> None:
            threadStream.end()
            if forget and forget[0]():
                return  # never ran: Deferred.cancel fails it with CancelledError
            endedAt.append(self._clock.seconds())
            self.abandonedInThreads += 1
            ended.callback(_STOPPED)

        def untilReturned(result: Any) -> Any:
            if result is _STOPPED:
                returned.append(Deferred())
                return returned[0]
            return result

        ended: Deferred[Any] = Deferred(cancel)
        ended.addCallback(untilReturned)

        def work() -> Any:
            if threadStream.cancelled.is_set():  # it ended just before it got its thread
                return None
            ran.append(True)
            return handler.handle(request, threadStream)

        def done(ok: bool, result: Any) -> None:
            target = returned[0] if returned else ended
            if returned:
                self.abandonedInThreads -= 1
            if returned and ran:
                log.info("A blocking {requestType} call returned {late:.1f} s after its "
                         "request ended; its result was dropped",
                         requestType=handler.requestType,
                         late=self._clock.seconds() - endedAt[0])
            target.callback(result) if ok else target.errback(result)

        forget.append(self.threads.run(work, done))
        return ended


_STOPPED = object()  # what a cancelled thread call's Deferred pauses on
