"""Broker faults against the real RabbitMQ: broker connections killed under load (by the
broker, and by a proxy that cuts them mid-handshake and mid-setup), the broker stopped and
started, channels and consumers the broker closes while the connection stays up, and resource
alarms (memory, disk) that block the connections that publish.

The invariant every load test checks (faultload.Tally): each request gets exactly one terminal
frame, its chunks come as 0, 1, 2, ... and none after it. `pytest -s` shows the figures.

Tests marked `broker_wide` change the whole RabbitMQ node, not just the test's vhost:
`stop_app` drops every connection of every vhost, and a resource alarm blocks every publishing
connection on the node. They run one at a time on this machine: each holds an exclusive
`flock` on NODE_LOCK for its whole run (a second run waits for it), always undoes its change
in a `finally`, and writes the undo command into the lock file first, so a run killed before
its `finally` is undone by the next one that takes the lock. Other test runs on the same broker
still see those faults (their requests fail or stall for a few seconds): run these sparingly,
or deselect them with `-m "not broker_wide"`.

This module is also a handler module: the worker loads it with --handlers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from faultload import Tally, finishAll, firstOutcomes, inFlight, loadRunning
from zope.interface import implementer

from processfixtures import Broker, waitUntil
from relaybus.harness import freePort
from relaybus.interfaces import IRequestHandler, IRequestStream

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

RABBITMQ_MAX_MESSAGE_SIZE = 134_217_728  # the broker's default max_message_size (3.10)


@implementer(IRequestHandler)
class _TooBigForTheBroker:
    """Answers with a reply one byte over RabbitMQ's max_message_size: the broker closes the
    worker's publishing channel (406 PRECONDITION_FAILED), the connection stays up."""

    requestType = "reviewTooBig"
    idempotent = False

    def handle(self, request: Any, stream: IRequestStream) -> str:
        return "x" * RABBITMQ_MAX_MESSAGE_SIZE


reviewTooBig = _TooBigForTheBroker()


def _echoWorks(client: Any) -> bool:
    outcome = client.collect(client.request("echo", "after", timeoutMs=1500))
    return outcome.code is None and outcome.data == "after"


@pytest.mark.log_errors_expected
def test_gateway_recovers_when_the_broker_cancels_its_reply_consumer(makeStack, connect,
                                                                     waitUntil):
    gatewayId = f"gw-review-{secrets.token_hex(3)}"
    stack = makeStack("rabbitmq", gatewayArgs=("--gateway-id", gatewayId))
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    replyQueue = f"{stack.prefix}replies.{gatewayId}"
    stack.broker.ctl("delete_queue", "-p", stack.broker.vhost, replyQueue)
    waitUntil(lambda: _echoWorks(client), "an echo to succeed after the reply consumer was "
              "cancelled by the broker", timeout=12, interval=0.2)


@pytest.mark.log_errors_expected
def test_worker_recovers_after_the_broker_closes_its_publishing_channel(handlerPath,
                                                                        makeStack, connect,
                                                                        waitUntil):
    stack = makeStack("rabbitmq", workerArgs=("--handlers", Path(__file__).stem))
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    tooBig = client.request("reviewTooBig", None, timeoutMs=5000)
    stack.workers[0].waitForLog(r"PRECONDITION_FAILED|not published", timeout=30)
    client.collect(tooBig, timeout=15)  # timeout (the final reply could not be published)
    waitUntil(lambda: _echoWorks(client), "an echo to succeed after the worker's publishing "
              "channel was closed by the broker", timeout=12, interval=0.2)


# Node-wide faults: one run at a time on this machine, always undone

NODE_LOCK = Path("/tmp/relaybus-broker-faults.lock")
NODE_LOCK_WAIT_S = 60.0
ALARM_WAIT_S = 15.0
START_WAIT_S = 50  # rabbitmqctl await_startup, in seconds


def _status() -> dict[str, Any]:
    return dict(json.loads(Broker.ctl("status", "--formatter", "json")))


def _alarms() -> set[str]:
    return {str(alarm.get("resource")) for alarm in _status().get("alarms") or ()}


class NodeFaults:
    """Changes to the whole node, made while holding NODE_LOCK. The lock file holds the
    rabbitmqctl commands that undo the change in force (a JSON list), until they have run."""

    def __init__(self, lockFile: IO[str]) -> None:
        self._file = lockFile

    def _pendingUndo(self) -> list[list[str]]:
        self._file.seek(0)
        text = self._file.read()
        return list(json.loads(text)) if text.strip() else []

    def _recordUndo(self, commands: list[list[str]]) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(commands))
        self._file.flush()
        os.fsync(self._file.fileno())

    def undoLeftovers(self) -> None:
        """Undo what a run that was killed midway left in force."""
        for command in self._pendingUndo():
            Broker.ctl(*command)
        self._recordUndo([])

    @contextlib.contextmanager
    def _changed(self, do: list[str], undo: list[list[str]]) -> Iterator[None]:
        self._recordUndo(undo)
        try:
            Broker.ctl(*do)
            yield
        finally:
            for command in undo:
                Broker.ctl(*command)
            self._recordUndo([])

    @contextlib.contextmanager
    def appStopped(self) -> Iterator[None]:
        """`rabbitmqctl stop_app`; start_app (and await_startup) on the way out."""
        with self._changed(["stop_app"],
                           [["start_app"], ["await_startup", "--timeout", str(START_WAIT_S)]]):
            yield

    @contextlib.contextmanager
    def _alarm(self, resource: str, do: list[str], restore: list[str]) -> Iterator[None]:
        """`do` raises the `resource` alarm; `restore` is run on the way out, then the alarm
        has cleared."""
        with self._changed(do, [restore]):
            waitUntil(lambda: resource in _alarms(), f"the {resource} alarm to be raised",
                      timeout=ALARM_WAIT_S, interval=0.2)
            yield
        waitUntil(lambda: resource not in _alarms(), f"the {resource} alarm to clear",
                  timeout=ALARM_WAIT_S, interval=0.2)

    def memoryAlarm(self) -> contextlib.AbstractContextManager[None]:
        """A vm_memory_high_watermark far below what the node uses; the setting it had is
        restored on the way out."""
        setting = _status()["vm_memory_high_watermark_setting"]
        if "relative" in setting:
            restore = ["set_vm_memory_high_watermark", str(setting["relative"])]
        else:
            restore = ["set_vm_memory_high_watermark", "absolute", str(setting["absolute"])]
        return self._alarm("memory", ["set_vm_memory_high_watermark", "0.0000001"], restore)

    def diskAlarm(self) -> contextlib.AbstractContextManager[None]:
        """A disk_free_limit far above the free disk space; the limit it had (in bytes) is
        restored on the way out."""
        restore = ["set_disk_free_limit", str(int(_status()["disk_free_limit"]))]
        return self._alarm("disk", ["set_disk_free_limit", "1000000GB"], restore)


@pytest.fixture
def nodeFaults(broker: Broker) -> Iterator[NodeFaults]:
    """NODE_LOCK, held for the whole test (for tests marked broker_wide)."""
    broker.requireCtl()
    with open(NODE_LOCK, "a+") as lockFile:
        deadline = time.monotonic() + NODE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lockFile, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run held {NODE_LOCK} for over {NODE_LOCK_WAIT_S} s")
                time.sleep(0.2)
        try:
            faults = NodeFaults(lockFile)
            faults.undoLeftovers()
            Broker.ctl("await_startup", "--timeout", str(START_WAIT_S))
            yield faults
        finally:
            fcntl.flock(lockFile, fcntl.LOCK_UN)


# Load: a few connections, each with many requests in flight

STREAM = {"count": 8, "delayMs": 500, "chunkBytes": 8}  # a 4 s stream of 8 chunks


def _mixedRequest(n: int) -> tuple[str, Any]:
    """One echo in four, the rest streaming testRequests."""
    return ("echo", {"n": n}) if n % 4 == 0 else ("testRequest", STREAM)


def _readyz(stack: Any) -> int | None:
    try:
        return int(stack.gateway.httpStatus("/readyz"))
    except OSError:
        return None


def _refusedAtOnce(client: Any, count: int, codes: set[str]) -> float:
    """Send `count` requests one after the other, each with a 20 s deadline; each must end
    with one of `codes` well before it (5 s). Returns the slowest answer, in seconds."""
    slowest = 0.0
    for i in range(count):
        started = time.monotonic()
        outcome = client.collect(client.request("echo", {"refused": i}, timeoutMs=20_000),
                                 timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        assert outcome.code in codes and not outcome.chunks, outcome
    assert slowest < 5, f"a refusal took {slowest:.1f} s of its 20 s deadline"
    return slowest


def _loadAfter(loads: list[Any], marks: list[int]) -> dict[str, int]:
    """Outcomes of the requests each load sent after its mark."""
    counts: dict[str, int] = {}
    for load, mark in zip(loads, marks, strict=True):
        outcomes = firstOutcomes(load.client)
        for requestId in load.sent[mark:]:
            outcome = outcomes[requestId]
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _inFlightNow(loads: list[Any]) -> set[str]:
    return set().union(*(load.snapshot() for load in loads))


def _endedAs(loads: list[Any], requestIds: set[str]) -> dict[str, int]:
    """How the requests `requestIds` ended, by outcome."""
    outcomes: dict[str, str] = {}
    for load in loads:
        outcomes.update(firstOutcomes(load.client))
    counts: dict[str, int] = {}
    for requestId in requestIds:
        counts[outcomes[requestId]] = counts.get(outcomes[requestId], 0) + 1
    return counts


def _keepLoading(loads: list[Any], requests: int) -> dict[str, int]:
    """Let the loads send `requests` more between them, wait for those to end, and return
    their outcomes."""
    marks = [len(load.sent) for load in loads]
    waitUntil(lambda: sum(len(load.sent) for load in loads) >= sum(marks) + requests,
              f"{requests} more requests sent", timeout=15)
    finishAll(loads)
    return _loadAfter(loads, marks)


KILLS = 3


def test_every_request_ends_once_while_broker_connections_are_killed_under_load(
        isolatedBroker, makeStack, connect, waitUntil):
    stack = makeStack("rabbitmq", broker=isolatedBroker, workerArgs=("--concurrency", "300"))
    probe = connect(stack)
    with loadRunning([connect(stack) for _ in range(4)], _mixedRequest, inFlight=50,
                     perSecond=40, timeoutMs=20_000) as loads:
        atKill: list[set[str]] = []
        for kill in range(1, KILLS + 1):
            waitUntil(lambda: inFlight(loads) >= 150, "150 requests in flight", timeout=15)
            atKill.append(_inFlightNow(loads))
            killedAt = time.monotonic()
            isolatedBroker.closeAllConnections(f"relaybus fault test, kill {kill}")
            # Both reconnect on their own, and requests work again within a bounded wait.
            waitUntil(lambda: _echoWorks(probe), f"an echo to succeed after kill {kill}",
                      timeout=15, interval=0.1)
            recovered = time.monotonic() - killedAt
            stack.gateway.waitForLog("connected and set up", count=kill + 1)
            stack.workers[0].waitUntilReady(count=kill + 1)
            assert _readyz(stack) == 200
            print(f"kill {kill}: {len(atKill[-1])} requests in flight, an echo worked again "
                  f"{recovered:.1f} s later")
        after = _keepLoading(loads, 200)
    print(f"after the last reconnect: {after}")
    assert set(after) == {"response"}, after
    Tally.of(loads).assertExactlyOnce(f"{KILLS} broker connection kills",
                                      allowed={"response", "unavailable", "worker_lost"})
    for kill, requestIds in enumerate(atKill, 1):
        ended = _endedAs(loads, requestIds)
        print(f"kill {kill}: the {len(requestIds)} requests in flight ended {ended}")
        assert ended.get("unavailable"), f"kill {kill} ended no request in flight"


class CuttingProxy:
    """A TCP proxy in front of RabbitMQ that resets the connections it carries when told: all
    of them at once, or each of the next few once it has sent a given number of bytes to the
    broker. Byte counts place a cut in the AMQP handshake (about 430 bytes here) or the setup
    that follows (about 400 more for a gateway, 1100 for a worker), which
    `close_all_connections` is far too slow to hit."""

    def __init__(self) -> None:
        self.port = freePort()
        self.carried = 0
        self.cuts: list[int] = []  # where each planned cut happened, in bytes sent
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._clientSides: set[socket.socket] = set()  # of the open connections
        self._frozen: set[socket.socket] = set()
        self._orphaned: set[socket.socket] = set()  # frozen, and the client side to reset
        self._plan: list[int] = []  # bytes after which to cut, for the next connections
        threading.Thread(target=self._accept, name="cutting-proxy", daemon=True).start()

    def url(self, broker: Broker) -> str:
        return broker.url.replace(":5672/", f":{self.port}/")

    def cutNext(self, afterBytes: list[int]) -> None:
        with self._lock:
            self._plan = list(afterBytes)

    def cutAll(self) -> None:
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            _reset(sock)

    def freezeAll(self) -> None:
        """Stop carrying bytes on the open connections without closing them: a network
        partition (no FIN, no RST), which only heartbeats can tell from a quiet broker."""
        with self._lock:
            self._frozen |= self._open

    def orphanAll(self) -> None:
        """Reset the processes' side of the open connections and leave the broker's side open
        and silent: the processes notice at once and reconnect, while the broker keeps the
        old connections (and their consumers) until its heartbeats give up on them."""
        with self._lock:
            self._orphaned |= self._clientSides
            self._frozen |= self._clientSides

    def close(self) -> None:
        self._listener.close()
        self.cutAll()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", 5672), timeout=5)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self.carried += 1
                cutAfter = self._plan.pop(0) if self._plan else None
                self._open |= {client, upstream}
                self._clientSides.add(client)
            threading.Thread(target=self._pipe, args=(client, upstream, cutAfter),
                             daemon=True).start()

    def _pipe(self, client: socket.socket, upstream: socket.socket,
              cutAfter: int | None) -> None:
        peer = {client: upstream, upstream: client}
        sent = 0
        try:
            while True:
                if client in self._frozen:
                    if client in self._orphaned and client.fileno() != -1:
                        _reset(client)  # here: closed under this thread's select, the
                        # select would fail, and the finally below reset the broker's side
                    time.sleep(0.1)
                    continue
                readable, _, _ = select.select([client, upstream], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client and cutAfter is not None and sent + len(data) >= cutAfter:
                        upstream.sendall(data[:cutAfter - sent])  # mid-frame, as likely as not
                        with self._lock:
                            self.cuts.append(cutAfter)
                        return
                    if sock is client:
                        sent += len(data)
                    peer[sock].sendall(data)
        except (OSError, ValueError):
            return  # cut by cutAll(), or the other side went
        finally:
            with self._lock:
                self._open -= {client, upstream}
                self._clientSides.discard(client)
            _reset(client)
            _reset(upstream)


def _reset(sock: socket.socket) -> None:
    """Close with an RST, as a dying network or host would."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@pytest.fixture
def cuttingProxy() -> Iterator[CuttingProxy]:
    proxy = CuttingProxy()
    yield proxy
    proxy.close()


def test_connections_cut_during_handshake_and_setup_come_back_without_errors(
        broker, cuttingProxy, makeStack, connect, waitUntil):
    # The processes connect through the proxy; the vhost and prefix are the usual ones.
    throughProxy = Broker(cuttingProxy.url(broker), broker.vhost, managed=True)
    stack = makeStack("rabbitmq", broker=throughProxy, workerArgs=("--concurrency", "100"))
    probe = connect(stack)
    with loadRunning([connect(stack) for _ in range(2)], _mixedRequest, inFlight=30,
                     perSecond=30, timeoutMs=20_000) as loads:
        waitUntil(lambda: inFlight(loads) >= 40, "40 requests in flight", timeout=15)
        mark = stack.mark()
        plan = [300, 700, 1200]  # in the handshake, in setup, late in a worker's setup
        cuttingProxy.cutNext(plan)
        cuttingProxy.cutAll()
        cutAt = time.monotonic()
        waitUntil(lambda: len(cuttingProxy.cuts) == len(plan),
                  f"the next {len(plan)} connections to be cut", timeout=40, interval=0.1)
        waitUntil(lambda: _echoWorks(probe), "an echo to succeed after the cuts", timeout=30,
                  interval=0.1)
        print(f"proxy: {cuttingProxy.carried} connections carried; after one cut of all, the "
              f"next {len(plan)} were cut after {plan} bytes; requests worked again "
              f"{time.monotonic() - cutAt:.1f} s after the first cut")
        after = _keepLoading(loads, 60)
    assert set(after) == {"response"}, after
    Tally.of(loads).assertExactlyOnce("connections cut during handshake and setup",
                                      allowed={"response", "unavailable", "worker_lost"})
    # A connection that is lost is logged as lost, not as a consumer the broker cancelled.
    logs = "".join(mark.since(p) for p in (*stack.gateways, *stack.workers))
    assert "connection lost" in logs
    assert "cancelled the" not in logs and "channel closed" not in logs, logs[-5000:]


def test_a_silent_network_partition_is_noticed_by_heartbeats(broker, cuttingProxy, makeStack,
                                                             connect, waitUntil):
    # heartbeat=2 in the URL (the default is 15 s) keeps the test short. pika checks every
    # heartbeat + 5 s and closes a connection that heard nothing since the last check;
    # relaybus handles that like any other loss.
    throughProxy = Broker(cuttingProxy.url(broker) + "?heartbeat=2", broker.vhost, managed=True)
    stack = makeStack("rabbitmq", broker=throughProxy)
    client, probe = connect(stack), connect(stack)
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)
    cuttingProxy.freezeAll()
    frozeAt = time.monotonic()
    outcome = client.collect(requestId, timeout=40)
    endedAfter = time.monotonic() - frozeAt
    assert outcome.code == "unavailable", outcome
    waitUntil(lambda: _echoWorks(probe), "an echo to succeed after the partition", timeout=40,
              interval=0.2)
    print(f"silent partition: the request in flight ended `unavailable` {endedAfter:.1f} s "
          f"after the freeze (deadline 60 s); served again "
          f"{time.monotonic() - frozeAt:.1f} s after it")
    assert endedAfter < 30  # noticed by the heartbeat, not by the request's deadline


def test_a_gateway_cut_off_takes_its_reply_queue_back_once_the_broker_drops_the_old_link(
        broker, cuttingProxy, makeStack, connect, waitUntil):
    """The gateway hears of the cut at once and reconnects; the broker still holds the old
    connection and its exclusive reply consumer, so the gateway is refused, until the broker's
    heartbeat check gives up on the old one: 2 to 3 heartbeats after its last bytes (at
    heartbeat=2, 4-6 s; at the default 15 s, 30-45 s). Then the next retry takes over."""
    gatewayId = f"gw-cut-{secrets.token_hex(3)}"
    throughProxy = Broker(cuttingProxy.url(broker) + "?heartbeat=2", broker.vhost, managed=True)
    stack = makeStack("rabbitmq", broker=throughProxy, gatewayArgs=("--gateway-id", gatewayId))
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    mark = stack.mark()
    cuttingProxy.orphanAll()
    cutAt = time.monotonic()
    waitUntil(lambda: "another connection consumes this gateway's reply queue"
              in mark.since(stack.gateway), "the gateway to be refused its reply queue")
    refusedAfter = time.monotonic() - cutAt
    waitUntil(lambda: _echoWorks(client), "an echo to succeed after the broker dropped the "
              "old connection", timeout=40, interval=0.2)
    servedAfter = time.monotonic() - cutAt
    since = mark.since(stack.gateway)
    print(f"orphaned connections at heartbeat=2: refused {refusedAfter:.1f} s after the cut, "
          f"served again after {servedAfter:.1f} s")
    assert since.count("another connection consumes") == 1, since[-5000:]
    assert re.search(r"connected and set up, after \d+ refused setups", since), since[-5000:]


@pytest.mark.broker_wide
def test_broker_stopped_and_started_under_load(nodeFaults, makeStack, connect, waitUntil):
    stack = makeStack("rabbitmq", workerArgs=("--concurrency", "200"))
    probe = connect(stack)
    with loadRunning([connect(stack) for _ in range(3)], _mixedRequest, inFlight=40,
                     perSecond=30, timeoutMs=20_000) as loads:
        waitUntil(lambda: inFlight(loads) >= 80, "80 requests in flight", timeout=15)
        atStop = _inFlightNow(loads)
        with nodeFaults.appStopped():
            waitUntil(lambda: _readyz(stack) == 503, "/readyz 503 while the broker is down",
                      timeout=10)
            slowest = _refusedAtOnce(probe, 10, {"unavailable"})
            print(f"broker down: /readyz 503; 10 new requests refused, the slowest after "
                  f"{slowest * 1000:.0f} ms of its 20 s deadline")
        startedAt = time.monotonic()
        waitUntil(lambda: _readyz(stack) == 200, "/readyz 200 after the broker started",
                  timeout=30, interval=0.2)
        stack.workers[0].waitUntilReady(timeout=30, count=2)
        waitUntil(lambda: _echoWorks(probe), "an echo to succeed after the broker started",
                  timeout=15, interval=0.1)
        print(f"broker started: /readyz 200, an echo worked again "
              f"{time.monotonic() - startedAt:.1f} s after start_app returned")
        after = _keepLoading(loads, 100)
    print(f"after the restart: {after}")
    assert set(after) == {"response"}, after
    Tally.of(loads).assertExactlyOnce("broker stop_app/start_app",
                                      allowed={"response", "unavailable", "worker_lost"})
    ended = _endedAs(loads, atStop)
    print(f"the {len(atStop)} requests in flight at stop_app ended {ended}")
    assert ended.get("unavailable"), "stopping the broker ended no request in flight"


@pytest.mark.broker_wide
def test_memory_alarm_refuses_new_requests_at_once_and_recovers(nodeFaults, makeStack,
                                                                connect, waitUntil):
    stack = makeStack("rabbitmq", workerArgs=("--concurrency", "100"))
    probe = connect(stack)
    with loadRunning([connect(stack) for _ in range(2)], _mixedRequest, inFlight=30,
                     perSecond=30, timeoutMs=6_000) as loads:
        waitUntil(lambda: inFlight(loads) >= 40, "40 requests in flight", timeout=15)
        with nodeFaults.memoryAlarm():
            # The load publishes on: the broker blocks the gateway's connection.
            waitUntil(lambda: _readyz(stack) == 503, "/readyz 503 while the broker blocks "
                      "the gateway", timeout=10)
            slowest = _refusedAtOnce(probe, 10, {"unavailable", "overloaded"})
            print(f"memory alarm: /readyz 503; 10 new requests refused, the slowest after "
                  f"{slowest * 1000:.0f} ms of its 20 s deadline")
        waitUntil(lambda: _readyz(stack) == 200, "/readyz 200 after the alarm cleared",
                  timeout=15, interval=0.1)
        waitUntil(lambda: _echoWorks(probe), "an echo to succeed after the alarm cleared",
                  timeout=15, interval=0.1)
        after = _keepLoading(loads, 60)
    print(f"after the alarm: {after}")
    assert set(after) == {"response"}, after
    # What was published before the block waits for its deadline (timeout), or finishes once
    # the alarm clears; either way once.
    Tally.of(loads).assertExactlyOnce(
        "memory alarm", allowed={"response", "unavailable", "overloaded", "timeout"})


def _waitUntilBlocked(stack: Any) -> None:
    waitUntil(lambda: "blocked" in stack.broker.ctl("list_connections", "-p",
                                                     stack.broker.vhost, "state"),
              "the broker to block the gateway's connection", timeout=15, interval=0.2)


@pytest.mark.broker_wide
@pytest.mark.log_errors_expected
def test_gateway_exits_on_sigterm_while_the_broker_blocks_it(nodeFaults, makeStack, connect):
    stack = makeStack("rabbitmq", gatewayArgs=("--drain-timeout", "1"))
    gateway = stack.gateway
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    try:
        with nodeFaults.diskAlarm():
            payload = "x" * (900 * 1024)
            for _ in range(40):  # ~36 MB: more than the socket buffers can hold
                client.request("echo", payload, timeoutMs=60_000)
            _waitUntilBlocked(stack)
            started = time.monotonic()
            gateway.signal(signal.SIGTERM)
            try:
                code = gateway.process.wait(20)  # drain 1 s + close 3 s + slack
            except subprocess.TimeoutExpired:
                code = None
            assert code is not None, (f"still running {time.monotonic() - started:.0f} s "
                                      "after SIGTERM")
    finally:
        gateway.kill()  # before the alarm clears, so this test never passes by accident


@pytest.mark.broker_wide
@pytest.mark.log_errors_expected
def test_gateway_is_not_ready_while_the_broker_blocks_it(nodeFaults, makeStack, connect):
    stack = makeStack("rabbitmq")
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    with nodeFaults.diskAlarm():
        client.request("echo", "x" * 1024, timeoutMs=60_000)  # the publish that blocks it
        _waitUntilBlocked(stack)
        waitUntil(lambda: stack.gateway.httpStatus("/readyz") == 503,
                  "/readyz to say 503 while blocked", timeout=10)
