"""The shutdown order of GatewayService and WorkerService, step by step on a MemoryReactorClock.

The integration tests see the same order from outside (twistd processes and SIGTERM); here each
step is caught while the one before it is still waiting, so a reordering fails by name.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import txaio
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from unitsupport import assertNoResult, errorCode, requestMessage, successResultOf
from websupport import OPCODE_CLOSE, OPCODE_TEXT, Client, get
from zope.interface import implementer

from relaybus.config import GatewayConfig, WorkerConfig
from relaybus.memory import MemoryBus
from relaybus.service import GatewayService, WorkerService
from relaybus.testing import FakeReplyReceiver, FakeRequestHandler

DRAIN_TIMEOUT_S = 10.0
NOW = 1_764_000_000.0

# The in-process handler of the gateway and the worker's handler: both services run the handlers
# the options resolved (options.registry), here this one (see the `handler` fixture).
slowHandler = FakeRequestHandler("slow")
REGISTRY = {"slow": slowHandler}


@implementer(IListeningPort)
class RecordingPort:
    """The listening port: records that it was closed, or fails to close when told to."""

    def __init__(self, failToStop: bool) -> None:
        self.listening = True
        self.failToStop = failToStop

    def startListening(self) -> None:
        pass

    def stopListening(self) -> None:
        self.listening = False
        if self.failToStop:
            raise OSError("the port would not close")

    def getHost(self) -> Any:
        return None


class Reactor(MemoryReactorClock):
    def __init__(self, failToStopListening: bool = False) -> None:
        super().__init__()
        self.ports: list[RecordingPort] = []
        self.failToStopListening = failToStopListening

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> RecordingPort:
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(RecordingPort(self.failToStopListening))
        return self.ports[-1]

    def settle(self) -> None:
        for _ in range(10):
            self.advance(0)


@contextmanager
def makeReactor(failToStopListening: bool = False) -> Iterator[Reactor]:
    reactor = Reactor(failToStopListening)
    reactor.advance(NOW)
    txaio.use_twisted()
    previous = txaio.config.loop
    txaio.config.loop = reactor  # Autobahn's timers
    try:
        yield reactor
    finally:
        txaio.config.loop = previous


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    with makeReactor() as reactor:
        yield reactor


@pytest.fixture
def reactorWhosePortFailsToClose() -> Iterator[Reactor]:
    with makeReactor(failToStopListening=True) as reactor:
        yield reactor


@pytest.fixture
def handler() -> FakeRequestHandler:
    slowHandler.calls.clear()
    slowHandler.cancelled.clear()
    return slowHandler


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


# Gateway: stop listening, /readyz 503, drain, close WebSockets with 1001, stop the in-process
# workers, then the bus.


class Gateway:
    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.service = GatewayService(GatewayConfig(
            listen="tcp:8080:interface=127.0.0.1", handlers=(__name__,), gatewayId="gw-test",
            drainTimeoutS=DRAIN_TIMEOUT_S), REGISTRY, reactor)
        self.service.startService()
        [(self.runtime, _)] = self.service.workers
        [self.port] = reactor.ports

    def connect(self) -> Client:
        client = Client(self.service.factory)
        client.handshake()
        client.messages()  # the hello frame
        return client

    def readyz(self) -> int:
        return get(self.service.site, b"/readyz")[0]

    def request(self, client: Client, requestId: str) -> None:
        client.sendJSON({"type": "request", "requestId": requestId, "requestType": "slow"})
        self.reactor.settle()


def shuttingDown(requestId: str) -> dict[str, Any]:
    return {"type": "error", "requestId": requestId,
            "error": {"code": "shutting_down", "message": "the gateway is shutting down"}}


def received(client: Client) -> tuple[list[Any], int | None]:
    """The messages the gateway sent since the last look, and its close code if it closed."""
    messages, closeCodes = [], []
    for opcode, payload in client.frames():
        if opcode == OPCODE_CLOSE:
            closeCodes.append(struct.unpack("!H", payload[:2])[0])
        else:
            assert opcode == OPCODE_TEXT
            messages.append(json.loads(payload))
    assert len(closeCodes) <= 1
    return messages, (closeCodes[0] if closeCodes else None)


def clientClosesToo(client: Client) -> None:
    """The client answers the close handshake and the TCP connection ends."""
    client.send(struct.pack("!H", 1001), OPCODE_CLOSE)
    client.protocol.connectionLost(Failure(ConnectionError("closed")))


def test_gateway_stops_listening_then_drains_then_closes_then_stops_workers_then_the_bus(
        reactor: Reactor, handler: FakeRequestHandler) -> None:
    gw = Gateway(reactor)
    client = gw.connect()
    gw.request(client, "r-1")
    [(_, _, work)] = handler.calls
    assert gw.readyz() == 200

    stopped = gw.service.stopService()
    # Draining: not listening, not ready, new requests refused; the one in flight goes on.
    assert not gw.port.listening
    assert gw.readyz() == 503
    gw.request(client, "r-2")
    assert received(client) == ([shuttingDown("r-2")], None)
    assert client.isOpen and gw.runtime.running and gw.service.bus.running
    assertNoResult(stopped)

    work.callback({"done": True})
    reactor.settle()
    # The request finished: its answer reached the client, then the 1001.
    assert received(client) == ([{"type": "response", "requestId": "r-1",
                                  "data": {"done": True}}], 1001)
    assert gw.runtime.running and gw.service.bus.running  # closing waits for the clients
    assertNoResult(stopped)

    clientClosesToo(client)
    reactor.settle()
    assert not gw.runtime.running and not gw.service.bus.running
    successResultOf(stopped)
    assert handler.cancelled == []


def test_gateway_drain_ends_what_is_left_shutting_down_at_the_drain_timeout(
        reactor: Reactor, handler: FakeRequestHandler) -> None:
    gw = Gateway(reactor)
    client = gw.connect()
    gw.request(client, "r-1")
    stopped = gw.service.stopService()

    reactor.advance(DRAIN_TIMEOUT_S - 0.001)
    assert received(client) == ([], None)
    reactor.advance(0.001)
    reactor.settle()
    assert received(client) == ([shuttingDown("r-1")], 1001)
    # The in-process worker was told, and stopped the handler.
    assert [request.correlationId for request in handler.cancelled] == [
        handler.calls[0][0].correlationId]
    clientClosesToo(client)
    reactor.settle()
    successResultOf(stopped)
    assert not gw.runtime.running and not gw.service.bus.running


def test_a_failing_gateway_shutdown_step_does_not_skip_the_ones_after_it(
        reactorWhosePortFailsToClose: Reactor, handler: FakeRequestHandler,
        logged: list[dict[str, Any]]) -> None:
    reactor = reactorWhosePortFailsToClose
    gw = Gateway(reactor)
    client = gw.connect()
    gw.request(client, "r-1")
    stopped = gw.service.stopService()
    [failure] = [event for event in logged if event.get("what") == "stop listening"]
    assert failure["log_format"] == "Shutdown: {what} failed"
    assert failure["log_failure"].check(OSError)
    # The steps after it still run, in order.
    assert gw.readyz() == 503
    assertNoResult(stopped)
    handler.calls[0][2].callback("late but fine")
    reactor.settle()
    assert received(client) == ([{"type": "response", "requestId": "r-1",
                                  "data": "late but fine"}], 1001)
    clientClosesToo(client)
    reactor.settle()
    successResultOf(stopped)
    assert not gw.runtime.running and not gw.service.bus.running


# Worker: stop consuming, let running handlers finish until the drain timeout, hand the rest
# back, then close the bus.


class Worker:
    def __init__(self, reactor: Reactor) -> None:
        self.reactor = reactor
        self.bus = MemoryBus(reactor)
        self.replies = FakeReplyReceiver()
        self.bus.listen(self.replies)  # plays the gateway
        self.service = WorkerService(WorkerConfig(
            broker="amqp://guest:guest@127.0.0.1:5672/", handlers=(__name__,),
            drainTimeoutS=DRAIN_TIMEOUT_S), REGISTRY, reactor, bus=self.bus)
        self.service.startService()

    def publish(self, correlationId: str) -> Deferred[None]:
        d = self.bus.publishRequest(requestMessage(correlationId, "slow", deadline=NOW + 60))
        self.reactor.settle()
        return d

    def answered(self) -> dict[str, str]:
        return {reply.correlationId: str(reply.kind) for reply in self.replies.replies}


def test_worker_stops_consuming_then_drains_then_hands_back_the_rest_then_closes_the_bus(
        reactor: Reactor, handler: FakeRequestHandler) -> None:
    worker = Worker(reactor)
    successResultOf(worker.publish("c-1"))
    successResultOf(worker.publish("c-2"))
    [(_, _, first), (_, _, second)] = handler.calls

    stopped = worker.service.stopService()
    # Not consuming: nobody serves "slow" any more, while both requests in hand go on.
    assert errorCode(worker.publish("c-3")) == "no_handler"
    assert worker.service.runtime.runningCount == 2 and worker.bus.running
    first.callback({"done": 1})
    reactor.settle()
    assert worker.answered() == {"c-1": "response"}
    assertNoResult(stopped)

    reactor.advance(DRAIN_TIMEOUT_S)
    # c-2 was still running: cancelled and handed back unanswered, then the bus closed.
    assert [request.correlationId for request in handler.cancelled] == ["c-2"]
    assert second.called
    assert worker.answered() == {"c-1": "response"}
    assert worker.bus.queuedCount() == 1  # back in the queue, for the next worker
    assert not worker.bus.running
    assert len(worker.replies.interruptions) == 1  # the gateway side heard the bus close
    successResultOf(stopped)


def test_worker_whose_handlers_finish_stops_without_waiting_for_the_drain_timeout(
        reactor: Reactor, handler: FakeRequestHandler) -> None:
    worker = Worker(reactor)
    successResultOf(worker.publish("c-1"))
    stopped = worker.service.stopService()
    assertNoResult(stopped)
    handler.calls[0][2].callback("ok")
    reactor.settle()
    successResultOf(stopped)
    assert worker.answered() == {"c-1": "response"}
    assert worker.bus.queuedCount() == 0 and not worker.bus.running
    assert reactor.getDelayedCalls() == []  # no drain timer left behind


def test_the_plugins_tune_the_garbage_collector_for_the_whole_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Many short-lived cycles per request: collected young, not promoted (service.py)."""
    import gc

    from relaybus import service, tap, tap_worker
    from relaybus.options import GatewayOptions, WorkerOptions

    monkeypatch.setattr(service, "exitZeroOnSigterm", lambda reactor=None: None)
    monkeypatch.setattr(tap, "exitZeroOnSigterm", lambda reactor=None: None)
    monkeypatch.setattr(tap_worker, "exitZeroOnSigterm", lambda reactor=None: None)
    before = gc.get_threshold()
    try:
        for module, options, argv in (
                (tap, GatewayOptions(), ["--listen", "tcp:0"]),
                (tap_worker, WorkerOptions(), ["--broker", "amqp://127.0.0.1/",
                                               "--handlers", "workers.examples"])):
            gc.set_threshold(*before)
            options.parseOptions(argv)
            module.makeService(options)
            assert gc.get_threshold() == (service.GC_FIRST_GENERATION_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
