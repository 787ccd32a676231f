"""The process fixtures of the integration and browser tests (a pytest plugin, loaded by
tests/conftest.py): a RabbitMQ vhost per run, real twistd processes (relaybus.harness) that are
always cleaned up, and a synchronous WebSocket client (the `websockets` library, not ours).

Tests reach everything here through fixtures, and import its helpers by name
(`from processfixtures import Client, waitUntil`):

- `broker` / `amqpURL` (session): a fresh vhost `relaybus-test-<hex>`, deleted at the end.
- `isolatedBroker` (function): a vhost of its own, for tests that break every connection in it.
- `stack` / `limitedStack` (module, parametrized "memory" / "rabbitmq"): a gateway (plus, on
  RabbitMQ, a `relaybus-worker`) shared by the tests of one module that do not disturb it.
- `provider` + `makeStack` (function): fresh processes for tests that stop or kill things.
  Every stack on RabbitMQ gets its own `--amqp-prefix` (`t<hex>.`), so tests never see each
  other's exchanges and queues.
- `processes` (function): a pool for processes a test starts by hand.
- `connect`: opens a `Client` to a gateway; closed at teardown.

Every process is stopped (or killed) at teardown even when the test fails; a failing test's
report carries the logs of the processes that were running, from the test's start on. A test
also fails when a process logs an unhandled error or a traceback while it runs (opt out with
`@pytest.mark.log_errors_expected`), and when a gateway it used does not balance its books
once the test's clients are gone: its /metrics must show no request in flight and every
accepted request ended exactly once (a second terminal frame that would come only at a
request's deadline, after every barrier of the test, still shows there).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as wsConnect

from relaybus.harness import (
    GatewayProcess,
    ServiceProcess,
    WorkerProcess,
    closeConnections,
    createVhost,
    deleteVhost,
    listQueues,
    logErrors,
    newVhostName,
    rabbitmqctl,
    requestAccounting,
)

LATE_REPLIES = "relaybus_late_replies_total"
RECV_TIMEOUT = 15.0  # the hang guard of every wait for a frame
LOG_TIMEOUT = 15.0  # ... and of every wait for a log line
SETTLE_TIMEOUT = 15.0  # ... and of the wait for a gateway's books to balance after a test
LOG_TAIL_CHARS = 20_000
EXAMPLE_REQUEST_TYPES = ("testRequest", "echo", "primes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "log_errors_expected: the processes may log tracebacks during this test")


def newRequestId(prefix: str = "r") -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def waitUntil(condition: Callable[[], Any], what: str, timeout: float = LOG_TIMEOUT,
              interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# RabbitMQ


class Broker:
    """One vhost of the local RabbitMQ, managed through rabbitmqctl."""

    def __init__(self, url: str, vhost: str, managed: bool) -> None:
        self.url = url
        self.vhost = vhost
        self.managed = managed  # we created the vhost (and rabbitmqctl can reach the broker)
        self.prefixes: list[str] = []

    ctl = staticmethod(rabbitmqctl)

    def newPrefix(self) -> str:
        prefix = f"t{secrets.token_hex(4)}."
        self.prefixes.append(prefix)
        return prefix

    def requireCtl(self) -> None:
        if not self.managed:
            pytest.skip("needs rabbitmqctl on the broker's host (RELAYBUS_TEST_AMQP_URL is set)")

    def closeAllConnections(self, reason: str = "test") -> None:
        self.requireCtl()
        closeConnections(self.vhost, reason)

    def queues(self, vhost: str | None = None) -> dict[str, dict[str, Any]]:
        self.requireCtl()
        return listQueues(vhost or self.vhost)

    def closeConnectionsNamed(self, name: str, reason: str = "test") -> int:
        """The broker closes this vhost's connections whose connection_name starts with
        `name` (one client among several: a fault to inject); returns how many it closed."""
        self.requireCtl()
        out = rabbitmqctl("list_connections", "--no-table-headers", "pid", "vhost",
                          "client_properties")
        pids = [line.split("\t")[0] for line in out.splitlines()
                if line.count("\t") >= 2 and line.split("\t")[1] == self.vhost
                and f'{{"connection_name","{name}' in line]
        for pid in pids:
            rabbitmqctl("close_connection", pid, reason)
        return len(pids)

    def unacked(self, queue: str) -> int:
        """Messages of a queue delivered to a consumer and not yet acked (rabbitmqctl)."""
        self.requireCtl()
        out = rabbitmqctl("list_queues", "-p", self.vhost, "name", "messages_unacknowledged",
                          "--formatter", "json")
        [count] = [q["messages_unacknowledged"] for q in json.loads(out or "[]")
                   if q["name"] == queue]
        return int(count)

    @contextlib.contextmanager
    def policy(self, queue: str, definition: dict[str, Any]) -> Iterator[None]:
        """A policy on the one queue `queue` while the block runs; it is in force (the broker
        says so) when the block starts, and gone again when the block ends."""
        self.requireCtl()
        name = f"test-{secrets.token_hex(4)}"

        def applied() -> str:
            out = rabbitmqctl("list_queues", "-p", self.vhost, "name", "policy",
                              "--formatter", "json")
            return next((str(q.get("policy") or "") for q in json.loads(out or "[]")
                         if q["name"] == queue), "")

        rabbitmqctl("set_policy", "-p", self.vhost, "--apply-to", "queues", name,
                    f"^{re.escape(queue)}$", json.dumps(definition))
        try:
            waitUntil(lambda: applied() == name, f"policy {definition} on {queue}")
            yield
        finally:
            rabbitmqctl("clear_policy", "-p", self.vhost, name)
            waitUntil(lambda: applied() != name, f"policy {definition} off {queue}")

    def messageCount(self, queue: str) -> int:
        """Messages ready in a queue, asked over AMQP (a passive declare): milliseconds, where
        a `rabbitmqctl` call takes a second or more on a busy machine."""
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            return int(connection.channel().queue_declare(queue, passive=True).method
                       .message_count)
        finally:
            connection.close()


def _requireLocalRabbitMQ() -> None:
    if shutil.which("rabbitmqctl") is None:
        pytest.fail(
            "The RabbitMQ integration tests need a local RabbitMQ (127.0.0.1:5672, guest/guest) "
            "and its rabbitmqctl. Install it (Debian/Ubuntu: apt-get install rabbitmq-server) "
            "and start it with `rabbitmq-server -detached` (`./dev test` does both checks and "
            "starts it), or point RELAYBUS_TEST_AMQP_URL at a broker, or deselect these "
            "tests with -m 'not rabbitmq'.", pytrace=False)
    try:
        subprocess.run(["rabbitmqctl", "-q", "await_startup", "--timeout", "10"],
                       capture_output=True, timeout=60, check=True)
        with socket.create_connection(("127.0.0.1", 5672), timeout=5):
            pass
    except (subprocess.SubprocessError, OSError):
        pytest.fail(
            "RabbitMQ is not running on 127.0.0.1:5672: start it with "
            "`rabbitmq-server -detached` (`./dev test` starts it for you), or point "
            "RELAYBUS_TEST_AMQP_URL at a broker, or deselect these tests with "
            "-m 'not rabbitmq'.", pytrace=False)


def _createVhost() -> Broker:
    _requireLocalRabbitMQ()
    vhost = newVhostName("relaybus-test")
    return Broker(createVhost(vhost), vhost, managed=True)


def _deletePrefixedTopology(broker: Broker) -> None:
    """For a broker we did not create a vhost on: remove what our prefixes declared."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(broker.url))
    try:
        channel = connection.channel()
        for prefix in broker.prefixes:
            for requestType in EXAMPLE_REQUEST_TYPES:
                channel.queue_delete(f"{prefix}requests.{requestType}")
            for exchange in ("requests", "responses", "cancels"):
                channel.exchange_delete(f"{prefix}{exchange}")
    finally:
        connection.close()


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A fresh vhost for this test run (or RELAYBUS_TEST_AMQP_URL, cleaned by prefix)."""
    external = os.environ.get("RELAYBUS_TEST_AMQP_URL")
    if external:
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(external).path[1:]) or "/"
        theBroker = Broker(external, vhost, managed=False)
        yield theBroker
        _deletePrefixedTopology(theBroker)
        return
    theBroker = _createVhost()
    try:
        yield theBroker
    finally:
        deleteVhost(theBroker.vhost)
        # Nothing of ours may end up in the default vhost.
        leftovers = [name for name in theBroker.queues("/")
                     if any(name.startswith(p) for p in theBroker.prefixes)]
        assert not leftovers, f"queues left behind in vhost '/': {leftovers}"


@pytest.fixture(scope="session")
def amqpURL(broker: Broker) -> str:
    return broker.url


@pytest.fixture
def isolatedBroker(broker: Broker) -> Iterator[Broker]:
    """A vhost of this test's own: for fault injection that hits every connection in a vhost."""
    broker.requireCtl()
    own = _createVhost()
    try:
        yield own
    finally:
        deleteVhost(own.vhost)


# Processes


class LogMark:
    """Where each process's log ended at one moment, to look only at what came after."""

    def __init__(self, processes: Iterable[ServiceProcess]) -> None:
        self.offsets = {id(p): len(p.log) for p in processes}

    def since(self, process: ServiceProcess) -> str:
        return process.log[self.offsets.get(id(process), 0):]


_LIVE_POOLS: list[ProcessPool] = []
# id(process) -> the (start, end) of its log that a test's call phase checked for errors
_CHECKED: dict[int, tuple[int, int]] = {}


def _liveProcesses() -> list[ServiceProcess]:
    return [p for pool in _LIVE_POOLS for p in pool.processes]


class ProcessPool:
    """Processes started for one test (or module); `shutdown` stops every one of them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[ServiceProcess] = []
        self.allowLogErrors = False
        _LIVE_POOLS.append(self)

    def start(self, process: ServiceProcess) -> Any:
        self.processes.append(process)
        process.start()
        return process

    def shutdown(self, checkLogsFrom: LogMark | None) -> list[str]:
        """Stop what still runs (SIGTERM, SIGKILL after 15 s); return the problems seen:
        a process that ignored SIGTERM or exited uncleanly, and errors in the logs from
        `checkLogsFrom` on (None: the whole log)."""
        problems = []
        for process in reversed(self.processes):
            popen = process.process
            if popen is None or popen.poll() is not None:
                continue  # never started, or the test already stopped/killed it
            try:
                code = process.stop(timeout=15)
            except RuntimeError as e:
                problems.append(str(e))
                continue
            if code not in (0, -signal.SIGTERM) or "Server Shut Down." not in process.log:
                problems.append(f"{process.name} did not shut down cleanly on SIGTERM "
                                f"(exit {code}):\n{process.log[-LOG_TAIL_CHARS:]}")
        if not self.allowLogErrors:
            for process in self.processes:
                if checkLogsFrom is not None:
                    text = checkLogsFrom.since(process)
                else:  # all of it but what a test's call phase checked already
                    start, end = _CHECKED.get(id(process), (0, 0))
                    text = process.log[:start] + process.log[end:]
                problems += [f"{process.name} logged an error:\n{e}" for e in logErrors(text)]
        for process in self.processes:
            _CHECKED.pop(id(process), None)
        _LIVE_POOLS.remove(self)
        for process in self.processes:
            shutil.rmtree(process.logPath.parent, ignore_errors=True)
        return problems


def unbalancedBooks(gateways: Iterable[ServiceProcess],
                    timeout: float = SETTLE_TIMEOUT) -> list[str]:
    """The running gateways whose /metrics do not show every accepted request ended exactly
    once with none in flight, within `timeout` (for the work of a test to settle). A gateway
    that no longer serves /metrics (it stopped, or is draining) is passed over."""
    problems = []
    for gateway in gateways:
        if not isinstance(gateway, GatewayProcess) or not gateway.running:
            continue
        deadline = time.monotonic() + timeout
        while True:
            try:
                samples = gateway.metrics()
            except OSError:  # urllib's HTTPError too: it stopped serving /metrics
                break
            problem = requestAccounting(samples)
            if not problem:
                break
            if time.monotonic() >= deadline:
                problems.append(f"{gateway.name}: {problem} {timeout:.0f} s after the test "
                                f"(a request ended twice, or never)")
                break
            time.sleep(0.1)
    return problems


def _finish(pool: ProcessPool, checkLogsFrom: LogMark | None) -> None:
    problems = unbalancedBooks(pool.processes)
    problems += pool.shutdown(checkLogsFrom)
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


@pytest.fixture
def processes(request: pytest.FixtureRequest) -> Iterator[ProcessPool]:
    pool = ProcessPool(request.node.name)
    pool.allowLogErrors = request.node.get_closest_marker("log_errors_expected") is not None
    yield pool
    _finish(pool, None)


class Stack:
    """A gateway (or several) and where its handlers run: in-process ("memory") or in
    separate `relaybus-worker` processes on RabbitMQ ("rabbitmq")."""

    def __init__(self, provider: str, pool: ProcessPool, broker: Broker | None = None,
                 prefix: str | None = None) -> None:
        assert provider in ("memory", "rabbitmq")
        self.provider = provider
        self.pool = pool
        self.broker = broker
        self.prefix = prefix
        self.gateways: list[GatewayProcess] = []
        self.workers: list[WorkerProcess] = []

    @property
    def rabbitmq(self) -> bool:
        return self.provider == "rabbitmq"

    @property
    def gateway(self) -> GatewayProcess:
        return self.gateways[0]

    @property
    def url(self) -> str:
        return self.gateway.url

    def _brokerArgs(self) -> list[str]:
        assert self.broker is not None and self.prefix is not None
        return ["--broker", self.broker.url, "--amqp-prefix", self.prefix]

    def startGateway(self, *args: str, wait: bool = True,
                     reactor: str | None = None) -> GatewayProcess:
        full = [*self._brokerArgs(), *args] if self.rabbitmq else list(args)
        gateway = self.pool.start(GatewayProcess(full, name=f"gateway{len(self.gateways) + 1}",
                                                 reactor=reactor))
        self.gateways.append(gateway)
        if wait:
            gateway.waitUntilReady()
        return gateway

    def startWorker(self, *args: str, wait: bool = True,
                    reactor: str | None = None) -> WorkerProcess:
        """A `twistd [--reactor R] relaybus-worker` serving workers.examples and `args`."""
        assert self.rabbitmq, "memory stacks run their handlers in the gateway"
        worker = self.pool.start(WorkerProcess(
            [*self._brokerArgs(), "--handlers", "workers.examples", *args],
            name=f"worker{len(self.workers) + 1}", reactor=reactor))
        self.workers.append(worker)
        if wait:
            worker.waitUntilReady()
        return worker

    @property
    def handlerProcesses(self) -> list[ServiceProcess]:
        """Where the worker runtime logs ("Stopped ...")."""
        return list(self.workers) if self.rabbitmq else list(self.gateways)

    def mark(self) -> LogMark:
        return LogMark([*self.gateways, *self.workers])

    def handlerLogSince(self, mark: LogMark) -> str:
        return "".join(mark.since(p) for p in self.handlerProcesses)

    def waitForHandlerLog(self, pattern: str, since: LogMark, count: int = 1,
                          timeout: float = LOG_TIMEOUT) -> list[str]:
        def found() -> list[str]:
            matches = re.findall(pattern, self.handlerLogSince(since))
            return matches if len(matches) >= count else []

        where = "worker" if self.rabbitmq else "gateway"
        try:
            return waitUntil(found, f"{count} x {pattern!r} in the {where} log", timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; log since the mark:\n"
                                 f"{self.handlerLogSince(since)[-LOG_TAIL_CHARS:]}") from None


def _buildStack(provider: str, pool: ProcessPool, broker: Broker | None, prefix: str | None,
                gatewayArgs: Iterable[str] = (), gateways: int = 1, workers: int = 1,
                workerArgs: Iterable[str] = (), reactor: str | None = None) -> Stack:
    """Start every process first, then wait for them: they boot in parallel."""
    stack = Stack(provider, pool, broker, prefix)
    if stack.rabbitmq:
        for _ in range(workers):
            stack.startWorker(*workerArgs, wait=False, reactor=reactor)
    for _ in range(gateways):
        stack.startGateway(*gatewayArgs, wait=False, reactor=reactor)
    for worker in stack.workers:
        worker.waitUntilReady()  # its queues are declared: no no_handler from here on
    for gateway in stack.gateways:
        gateway.waitUntilReady()
    return stack


PROVIDERS = [
    pytest.param("memory", id="memory"),
    pytest.param("rabbitmq", id="rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def makeStack(request: pytest.FixtureRequest, processes: ProcessPool) -> Callable[..., Stack]:
    """makeStack(provider, gatewayArgs=(), gateways=1, workers=1, workerArgs=(), broker=None,
    reactor=None): fresh processes (twistd --reactor `reactor`), stopped at the end of the
    test."""

    def make(provider: str, gatewayArgs: Iterable[str] = (), gateways: int = 1,
             workers: int = 1, workerArgs: Iterable[str] = (),
             broker: Broker | None = None, reactor: str | None = None) -> Stack:
        if provider == "rabbitmq":
            broker = broker or request.getfixturevalue("broker")
            prefix = broker.newPrefix()
        else:
            broker, prefix = None, None
        return _buildStack(provider, processes, broker, prefix, gatewayArgs, gateways,
                           workers, workerArgs, reactor)

    return make


def moduleStack(request: pytest.FixtureRequest, gatewayArgs: Iterable[str]) -> Iterator[Stack]:
    provider = str(request.param)
    pool = ProcessPool(f"{request.module.__name__}[{provider}]")
    try:
        broker: Broker | None = None
        prefix: str | None = None
        if provider == "rabbitmq":
            broker = request.getfixturevalue("broker")
            prefix = broker.newPrefix()
        stack = _buildStack(provider, pool, broker, prefix, gatewayArgs)
    except BaseException:
        pool.shutdown(None)
        raise
    yield stack
    # Each test checked the log of its own run; here only the shutdown is left to check.
    _finish(pool, LogMark(pool.processes))


@pytest.fixture(scope="module", params=PROVIDERS)
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A default gateway (+ worker), shared by the module's tests that leave it as it was."""
    yield from moduleStack(request, ())


LIMITED_ARGS = ("--max-in-flight", "2", "--max-message-bytes", "4096")


@pytest.fixture(scope="module", params=PROVIDERS)
def limitedStack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A gateway started with LIMITED_ARGS (+ worker), shared by the module's tests."""
    yield from moduleStack(request, LIMITED_ARGS)


@pytest.fixture(autouse=True)
def _balancedBooks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used a shared stack (its function-scoped fixtures, clients included,
    are gone by now): that stack's gateways must balance their books."""
    yield
    for name in ("stack", "limitedStack"):
        if name in request.fixturenames:
            shared = request.getfixturevalue(name)
            problems = unbalancedBooks(shared.gateways)
            if problems:
                pytest.fail("\n".join(problems), pytrace=False)


# Logs in failure reports, and no tracebacks while a test runs

_MARK_KEY = pytest.StashKey[LogMark]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_MARK_KEY] = LogMark(_liveProcesses())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    mark = LogMark(_liveProcesses())
    result = yield  # raises if the test failed: then its own failure is the report
    if item.get_closest_marker("log_errors_expected") is None:
        errors = []
        for process in _liveProcesses():
            start, log = mark.offsets.get(id(process), 0), process.log
            _CHECKED[id(process)] = (start, len(log))
            errors += [f"{process.name} logged an error during the test:\n{e}"
                       for e in logErrors(log[start:])]
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and report.when in ("setup", "call"):
        mark = item.stash.get(_MARK_KEY, None)
        for process in _liveProcesses():
            text = mark.since(process) if mark else process.log
            if len(text) > LOG_TAIL_CHARS:
                text = "[...]\n" + text[-LOG_TAIL_CHARS:]
            report.sections.append((f"{process.name} log ({process.logPath})",
                                    text or "(empty)"))
    return report


# The WebSocket client


class Outcome:
    """The frames of one request: its chunks, in order, and its one terminal frame."""

    def __init__(self, requestId: str, chunks: list[dict[str, Any]],
                 terminal: dict[str, Any]) -> None:
        self.requestId = requestId
        self.chunks = chunks
        self.terminal = terminal

    @property
    def chunkData(self) -> list[Any]:
        return [c["data"] for c in self.chunks]

    @property
    def code(self) -> str | None:
        return self.terminal["error"]["code"] if self.terminal["type"] == "error" else None

    @property
    def data(self) -> Any:
        assert self.terminal["type"] == "response", \
            f"{self.requestId} ended with {self.terminal}, not a response"
        return self.terminal["data"]

    def __repr__(self) -> str:
        return f"Outcome({self.requestId!r}, {len(self.chunks)} chunks, {self.terminal})"


class Client:
    """A WebSocket client over `websockets`' sync API. Frames are kept in `received` (all, in
    order) and consumed from an unread buffer, so requests may interleave freely."""

    def __init__(self, url: str, **handshake: Any) -> None:
        """`handshake`: more of websockets' connect() options (additional_headers,
        subprotocols, origin, ...), e.g. to present a token, or over the defaults below."""
        self.url = url
        self._exits = contextlib.ExitStack()
        self.ws: ClientConnection = self._exits.enter_context(wsConnect(url, **{
            "open_timeout": 10, "close_timeout": 5, "max_size": None, "proxy": None,
            **handshake}))
        self.received: list[dict[str, Any]] = []
        self.rawSizes: list[int] = []  # bytes of each text frame received
        self.unread: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self.hello = self.next(lambda f: f.get("type") == "hello", "the hello frame")
        assert self.received[0] is self.hello, "hello must be the first frame"

    # Sending

    def sendJSON(self, frame: Any) -> None:
        self.ws.send(json.dumps(frame))

    def sendRaw(self, data: str | bytes, text: bool | None = None) -> None:
        self.ws.send(data, text=text)

    def request(self, requestType: str, payload: Any = None, requestId: str | None = None,
                timeoutMs: int | None = None, **extra: Any) -> str:
        requestId = requestId or newRequestId()
        frame: dict[str, Any] = {"type": "request", "requestId": requestId,
                                 "requestType": requestType, "payload": payload, **extra}
        if timeoutMs is not None:
            frame["timeoutMs"] = timeoutMs
        self.sendJSON(frame)
        return requestId

    def cancel(self, requestId: str) -> None:
        self.sendJSON({"type": "cancel", "requestId": requestId})

    def close(self) -> None:
        self._exits.close()

    # Receiving

    def receiveOne(self, timeout: float) -> None:
        """Read at most one frame into `received` and `unread` (none when `timeout` passes)."""
        try:
            raw = self.ws.recv(timeout=max(timeout, 0.001))
        except TimeoutError:
            return
        assert isinstance(raw, str), f"the gateway sent a binary frame: {raw[:200]!r}"
        self.rawSizes.append(len(raw.encode("utf-8")))
        frame = json.loads(raw)
        assert isinstance(frame, dict) and isinstance(frame.get("type"), str), raw[:500]
        self.received.append(frame)
        self.unread.append(frame)

    def next(self, predicate: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = RECV_TIMEOUT, consume: bool = True) -> dict[str, Any]:
        """The first unread frame matching `predicate` (waiting up to `timeout` for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, frame in enumerate(self.unread):
                if predicate(frame):
                    if consume:
                        del self.unread[i]
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {timeout}s; last frames received: "
                                     f"{_short(self.received[-10:])}")
            try:
                self.receiveOne(remaining)
            except ConnectionClosed as e:
                raise AssertionError(f"the connection closed ({e}) while waiting for {what}; "
                                     f"last frames: {_short(self.received[-10:])}") from None

    def waitForChunk(self, requestId: str, seq: int = 0) -> dict[str, Any]:
        """Wait until chunk `seq` of a request arrived, leaving it unread for `collect`."""
        return self.next(lambda f: f.get("requestId") == requestId and f["type"] == "chunk"
                         and f.get("seq") == seq, f"chunk {seq} of {requestId}", consume=False)

    def collect(self, requestId: str, timeout: float = RECV_TIMEOUT) -> Outcome:
        """Consume a request's frames up to its terminal frame, checking that chunks come
        with seq 0, 1, 2, ... and nothing else comes before the end."""
        chunks: list[dict[str, Any]] = []
        while True:
            frame = self.next(lambda f: f.get("requestId") == requestId,
                              f"the next frame of {requestId!r} (after {len(chunks)} chunks)",
                              timeout)
            if frame["type"] == "chunk":
                assert frame["seq"] == len(chunks), \
                    f"{requestId}: chunk seq {frame['seq']}, expected {len(chunks)}"
                assert "data" in frame, frame
                chunks.append(frame)
            elif frame["type"] in ("response", "error"):
                if frame["type"] == "error":
                    assert set(frame["error"]) >= {"code", "message"}, frame
                    assert isinstance(frame["error"]["message"], str), frame
                return Outcome(requestId, chunks, frame)
            else:
                raise AssertionError(f"unexpected frame for {requestId}: {frame}")

    def assertQuiet(self, *requestIds: str, barrierType: str = "echo") -> None:
        """Round-trip a request on this connection (`barrierType` answers its payload back,
        like echo), then check that nothing more came for `requestIds` (their terminal
        frames were collected already)."""
        barrier = newRequestId("barrier")
        self.request(barrierType, {"barrier": barrier}, barrier, timeoutMs=30_000)
        outcome = self.collect(barrier)
        assert outcome.data == {"barrier": barrier}, outcome
        if barrierType == "echo":
            assert not outcome.chunks, outcome
        late = [f for f in self.unread if f.get("requestId") in requestIds]
        assert not late, f"frames after the terminal frame: {_short(late)}"

    def finish(self, requestId: str) -> Outcome:
        """collect(), then check that the request stays finished."""
        outcome = self.collect(requestId)
        self.assertQuiet(requestId)
        return outcome

    def call(self, requestType: str, payload: Any = None, **kwargs: Any) -> Outcome:
        return self.finish(self.request(requestType, payload, **kwargs))

    def expectError(self, requestId: str, code: str) -> Outcome:
        outcome = self.finish(requestId)
        assert outcome.code == code, f"expected error {code}, got {outcome}"
        return outcome

    def waitClosed(self, timeout: float = RECV_TIMEOUT) -> int | None:
        """Read until the gateway closes the connection; return its close code (None when
        it sent no close frame)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the connection is still open after {timeout}s")
            try:
                self.receiveOne(remaining)
            except ConnectionClosed as e:
                self.closed = e
                return e.rcvd.code if e.rcvd is not None else None


def echoStreamAndCancel(stack: Stack, client: Client) -> None:
    """A smoke test of a whole stack: an echo, a streaming testRequest, and a cancel that
    stops the handler where it runs."""
    assert client.call("echo", {"smoke": 1}).data == {"smoke": 1}
    outcome = client.call("testRequest", {"count": 3, "delayMs": 0})
    assert len(outcome.chunks) == 3 and outcome.data["chunks"] == 3, outcome
    mark = stack.mark()
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)
    client.cancel(requestId)
    assert client.collect(requestId).code == "cancelled"
    stack.waitForHandlerLog(r"Stopped testRequest \S+: cancelled by the gateway", mark)
    client.assertQuiet(requestId)


def assertRepliesStopped(gateway: GatewayProcess, watchS: float = 0.5) -> None:
    """After a request ended and its handler was stopped: a chunk still published for it
    reaches the gateway as a late reply (dropped and counted, never sent), so the client
    cannot see it. Once what was in flight at the stop has arrived, no more may come."""
    time.sleep(watchS)
    before = gateway.metrics().get(LATE_REPLIES, 0.0)
    time.sleep(watchS)  # the time of several more chunks
    after = gateway.metrics().get(LATE_REPLIES, 0.0)
    assert after == before, f"{after - before:.0f} replies came after the handler stopped"


def _short(frames: list[dict[str, Any]]) -> str:
    text = json.dumps(frames)
    return text if len(text) < 3000 else text[:3000] + "..."


@pytest.fixture
def connect() -> Iterator[Callable[..., Client]]:
    """connect(gateway_or_stack_or_url, **handshake) -> Client (hello already read)."""
    clients: list[Client] = []

    def open_(target: Any, **handshake: Any) -> Client:
        url = target if isinstance(target, str) else target.url
        client = Client(url, **handshake)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        try:
            client.close()
        except Exception:
            pass


@pytest.fixture
def handlerPath(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started by the test can import handler modules from the test's folder (and
    what those import, this module included)."""
    folders = [str(request.path.parent), str(Path(__file__).parent)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [*folders, os.environ.get("PYTHONPATH")])))


@pytest.fixture(name="waitUntil")
def waitUntilFixture() -> Callable[..., Any]:
    """waitUntil(condition, what, timeout=15): poll until condition() is truthy, return it."""
    return waitUntil
