"""Soak: many mixed requests through a real gateway and two real workers while faults are
injected, checking that every request ends with exactly one terminal frame.

    .venv/bin/python benchmarks/soak.py            # 100,000 requests, about 1.5 minutes
    .venv/bin/python benchmarks/soak.py --quick    # 5,000 requests, faults more often

It creates a throwaway RabbitMQ vhost (rabbitmqctl), starts two `twistd relaybus-worker`
processes and one `twistd relaybus` gateway (relaybus.harness), and drives the gateway with the
`websockets` asyncio client over several connections, many requests in flight on each. Faults
at intervals: every connection in the vhost closed by the broker, a worker SIGKILLed (and a
replacement started), a client connection dropped mid-stream. It prints what it sent, what came
back, what went missing or came twice, latency, throughput and the gateway's memory. Exit
status 1 when a request lost its terminal frame, got two, or broke the protocol's frame rules,
or when the gateway still holds requests or connections at the end.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import itertools
import json
import math
import random
import re
import secrets
import signal
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from relaybus.harness import (
    GatewayProcess,
    ServiceProcess,
    WorkerProcess,
    closeConnections,
    commandRun,
    createVhost,
    discardVhost,
    endedByOutcome,
    interruptOnSigterm,
    logFindings,
    newVhostName,
    openGatewaySocket,
    requestAccounting,
    stopAndScan,
)

KINDS = ("echo", "stream", "cancel", "timeout", "no_handler")
DEFAULT_MIX = "echo=40,stream=35,cancel=10,timeout=5,no_handler=10"

# The outcome each kind is meant to get ("success": its latency is measured), and the other
# outcomes the injected faults explain: `unavailable` when the gateway's broker connection
# drops under a request, `worker_lost` when the worker running a non-idempotent testRequest
# dies (or loses its broker connection) and another worker gets the redelivery. echo is
# idempotent: a redelivered echo runs again, so it never gets `worker_lost`.
SUCCESS = {"echo": "response", "stream": "response", "cancel": "cancelled",
           "timeout": "timeout", "no_handler": "no_handler"}
TOLERATED = {
    "echo": {"unavailable"},
    "stream": {"unavailable", "worker_lost"},
    # `response`: the request ended before the cancel reached the gateway (protocol: ignored)
    "cancel": {"unavailable", "worker_lost", "response"},
    "timeout": {"unavailable", "worker_lost"},
    "no_handler": {"unavailable"},
}
ABANDONED = "ended by the client"  # its connection was dropped by the soak itself
LOST = "lost"
CLOSED_BY_GATEWAY = "connection closed by the gateway"

NO_HANDLER_TYPE = "soakNoSuchHandler"
CANCEL_PAYLOAD = {"count": 5, "delayMs": 100, "chunkBytes": 16}  # cancelled after chunk 0
TIMEOUT_PAYLOAD = {"count": 1, "delayMs": 1000, "chunkBytes": 16}
EXAMPLES_KEPT = 10  # details kept per kind of anomaly
ALARM_LINE = re.compile(r"(\S+) \[relaybus\.amqp#warn\] .*: the broker (blocks|unblocked) "
                        r"this connection")
FAULT_WINDOW_S = 10.0  # an outcome this soon after a fault (or during an alarm) is explained


class SoakFailed(Exception):
    """The soak itself could not go on (not a finding about relaybus)."""


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _short(value: Any, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


# The requests


@dataclass(frozen=True)
class SoakRequest:
    index: int
    kind: str
    requestType: str
    payload: Any
    timeoutMs: int
    expectedChunks: list[Any]
    expectedResponse: Any

    @property
    def requestId(self) -> str:
        return f"s{self.index}"


def _chunks(count: int, chunkBytes: int) -> list[Any]:
    return [{"index": i, "filler": "x" * chunkBytes} for i in range(count)]


def _summary(payload: dict[str, int]) -> dict[str, int]:
    """What testRequest answers (workers/examples.py)."""
    return {"chunks": payload["count"], "chunkBytes": payload["chunkBytes"],
            "delayMs": payload["delayMs"], "bytes": payload["count"] * payload["chunkBytes"]}


def makeRequest(index: int, kind: str, rng: random.Random, timeoutMs: int) -> SoakRequest:
    if kind == "echo":
        payload: Any = {"n": index, "text": "e" * rng.randint(0, 64)}
        return SoakRequest(index, kind, "echo", payload, timeoutMs, [], payload)
    if kind == "stream":
        payload = {"count": rng.randint(1, 5), "delayMs": rng.randint(0, 5),
                   "chunkBytes": rng.choice((16, 64, 256))}
    elif kind == "cancel":
        payload = dict(CANCEL_PAYLOAD)
    elif kind == "timeout":
        # The handler's first chunk would come after 1 s; the request's deadline is 100 ms.
        return SoakRequest(index, kind, "testRequest", dict(TIMEOUT_PAYLOAD), 100, [], None)
    else:
        return SoakRequest(index, kind, NO_HANDLER_TYPE, {"n": index}, timeoutMs, [], None)
    return SoakRequest(index, kind, "testRequest", payload, timeoutMs,
                       _chunks(payload["count"], payload["chunkBytes"]), _summary(payload))


def parseMix(text: str) -> dict[str, int]:
    weights: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in KINDS or not value.isdigit():
            raise ValueError(f"--mix: {part!r} is not KIND=WEIGHT with KIND one of "
                             f"{', '.join(KINDS)}")
        weights[name] = int(value)
    if not sum(weights.values()):
        raise ValueError("--mix: the weights add up to 0")
    return weights


def planKinds(total: int, weights: dict[str, int], rng: random.Random) -> list[str]:
    """`total` kinds in the proportions of `weights` (largest remainders), shuffled."""
    whole = sum(weights.values())
    shares = {k: total * w // whole for k, w in weights.items()}
    byRemainder = sorted(weights, key=lambda k: -(total * weights[k] % whole))
    for kind in byRemainder[:total - sum(shares.values())]:
        shares[kind] += 1
    kinds = [k for k, n in shares.items() for _ in range(n)]
    rng.shuffle(kinds)
    return kinds


# What the soak saw


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    startedWall: float = field(default_factory=time.time)
    sent: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: {k: collections.Counter() for k in KINDS})
    latencies: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    terminalFrames: int = 0  # the one terminal frame of a request in flight
    duplicates: int = 0  # a second terminal frame for a request that had ended
    lateTerminals: int = 0  # a terminal frame after the soak gave the request up as lost
    violations: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    # (seconds since the start, kind, outcome) of every outcome other than the kind's success
    others: list[tuple[float, str, str]] = field(default_factory=list)
    faults: list[tuple[float, str]] = field(default_factory=list)
    # (from, to) seconds since the start: the broker blocked the gateway (a resource alarm
    # someone else raised on the shared broker), from the gateway's log
    alarms: list[tuple[float, float]] = field(default_factory=list)
    faultProblems: list[str] = field(default_factory=list)
    connectionsDropped: int = 0
    replacementReadyS: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def note(self, category: str, detail: str) -> None:
        kept = self.examples.setdefault(category, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(f"t={self.now():.1f}s {detail}")

    def violation(self, what: str, detail: str) -> None:
        self.violations[what] += 1
        self.note(what, detail)

    @property
    def totalSent(self) -> int:
        return sum(self.sent.values())

    @property
    def lost(self) -> int:
        return sum(c[LOST] + c[CLOSED_BY_GATEWAY] for c in self.outcomes.values())


@dataclass(eq=False)
class Call:
    request: SoakRequest
    done: asyncio.Future[tuple[float, str, Any]]
    sentAt: float = 0.0
    cancelSentAt: float | None = None
    chunks: list[Any] = field(default_factory=list)
    firstChunk: asyncio.Event = field(default_factory=asyncio.Event)


class SoakConnection:
    """One WebSocket to the gateway with many requests in flight, checking every frame."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any], tally: Tally) -> None:
        self.ws = ws
        self.hello = hello
        self.tally = tally
        self.pending: dict[str, Call] = {}
        self.ended: dict[str, str] = {}  # requestId -> how it ended, for late frames
        self.droppedByUs = False  # by drop() or close(): its requests ended by our hand
        self.closed = asyncio.get_running_loop().create_future()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str, tally: Tally) -> SoakConnection:
        ws, hello = await openGatewaySocket(url)
        return cls(ws, hello, tally)

    @property
    def connectionId(self) -> str:
        return str(self.hello.get("connectionId"))

    async def send(self, call: Call) -> None:
        request = call.request
        self.pending[request.requestId] = call
        call.sentAt = time.monotonic()
        try:
            await self.ws.send(_encode({
                "type": "request", "requestId": request.requestId,
                "requestType": request.requestType, "payload": request.payload,
                "timeoutMs": request.timeoutMs}))
        except ConnectionClosed:
            self.pending.pop(request.requestId, None)
            raise

    async def cancel(self, call: Call) -> None:
        call.cancelSentAt = time.monotonic()
        await self.ws.send(_encode({"type": "cancel", "requestId": call.request.requestId}))

    def giveUp(self, call: Call) -> None:
        """No terminal frame by the local deadline: the request is lost."""
        requestId = call.request.requestId
        if self.pending.pop(requestId, None) is call:
            self.ended[requestId] = LOST

    def drop(self) -> None:
        """End the connection abruptly (no close handshake), as a vanishing browser tab does."""
        self.droppedByUs = True
        self.ws.transport.abort()

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self._frameReceived(time.monotonic(), raw)
        except ConnectionClosed:
            pass
        finally:
            if self.droppedByUs:
                outcome = ABANDONED
            else:
                outcome = CLOSED_BY_GATEWAY
                self.tally.note(CLOSED_BY_GATEWAY, f"{self.connectionId}: "
                                f"{self.ws.close_code} {self.ws.close_reason!r}, "
                                f"{len(self.pending)} requests in flight")
            now = time.monotonic()
            for requestId, call in self.pending.items():
                self.ended[requestId] = outcome
                if not call.done.done():
                    call.done.set_result((now, outcome, None))
            self.pending.clear()
            if not self.closed.done():
                self.closed.set_result(None)

    def _frameReceived(self, now: float, raw: str | bytes) -> None:
        tally = self.tally
        try:
            frame = json.loads(raw)
            kind, requestId = frame.get("type"), frame.get("requestId")
        except (ValueError, AttributeError):
            tally.violation("frame that is not a JSON object", _short(repr(raw)))
            return
        call = self.pending.get(requestId) if isinstance(requestId, str) else None
        if call is None:
            self._lateFrame(kind, requestId, frame)
        elif kind == "chunk":
            if frame.get("seq") != len(call.chunks):
                tally.violation("chunk out of sequence", f"{requestId} ({call.request.kind}): "
                                f"seq {frame.get('seq')}, expected {len(call.chunks)}")
            call.chunks.append(frame.get("data"))
            call.firstChunk.set()
        elif kind in ("response", "error"):
            del self.pending[requestId]
            tally.terminalFrames += 1
            if kind == "response":
                outcome, data = "response", frame.get("data")
            else:
                error = frame.get("error") or {}
                outcome, data = str(error.get("code")), error.get("message")
            self.ended[requestId] = outcome
            call.done.set_result((now, outcome, data))
        else:
            tally.violation("unknown frame type", _short(frame))

    def _lateFrame(self, kind: Any, requestId: Any, frame: dict[str, Any]) -> None:
        tally = self.tally
        ended = self.ended.get(requestId) if isinstance(requestId, str) else None
        terminal = kind in ("response", "error")
        if ended is None:
            tally.violation("frame for a request never sent", _short(frame))
        elif ended == LOST and terminal:
            tally.lateTerminals += 1
            tally.note("terminal frame after the local deadline", _short(frame))
        elif ended == LOST:
            tally.note("chunk after the local deadline", _short(frame))
        elif terminal:
            tally.duplicates += 1
            tally.note("duplicated terminal frame", f"{requestId} ended {ended!r}, then "
                       f"{_short(frame)} on {self.connectionId}")
        else:
            tally.violation("chunk after the terminal frame",
                            f"{requestId} ended {ended!r}, then {_short(frame)}")

    async def close(self) -> None:
        self.droppedByUs = True
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except TimeoutError:
            self.ws.transport.abort()
        await asyncio.gather(self._reader, return_exceptions=True)


class ConnectionSlot:
    """One of the soak's connections: replaced by a fresh one when dropped or closed."""

    def __init__(self, url: str, tally: Tally, inFlight: int) -> None:
        self.url = url
        self.tally = tally
        self.inFlight = inFlight
        self.current: SoakConnection | None = None
        self.opened = asyncio.Event()
        self._reopening: asyncio.Task[None] | None = None

    async def open(self) -> None:
        for attempt in range(20):
            try:
                connection = await SoakConnection.open(self.url, self.tally)
                break
            except (OSError, TimeoutError, InvalidHandshake) as e:
                if attempt == 19:
                    raise SoakFailed(f"cannot open a connection to the gateway: {e!r}") from e
                await asyncio.sleep(0.5)
        maxInFlight = connection.hello.get("limits", {}).get("maxInFlight")
        if isinstance(maxInFlight, int) and self.inFlight > maxInFlight:
            await connection.close()
            raise SoakFailed(f"--in-flight {self.inFlight} is above the gateway's "
                             f"maxInFlight={maxInFlight}")
        self.current = connection
        self.opened.set()

    async def get(self) -> SoakConnection:
        while True:
            if self._reopening is not None and not self.opened.is_set():
                await self._reopening  # raises SoakFailed when no replacement could be opened
            await self.opened.wait()
            connection = self.current
            assert connection is not None
            if not connection.closed.done():
                return connection
            self.reopen()

    def reopen(self) -> None:
        """Open a replacement for the current connection, which has closed."""
        if self._reopening is None or self._reopening.done():
            self.opened.clear()
            self._reopening = asyncio.get_running_loop().create_task(self.open())

    async def close(self) -> None:
        if self._reopening is not None:
            await asyncio.gather(self._reopening, return_exceptions=True)
        if self.current is not None:
            await self.current.close()


# Driving the load


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, stack: Stack) -> None:
        self.args = args
        self.url = url
        self.stack = stack
        self.tally = Tally()
        rng = random.Random(args.seed)
        self.kinds = planKinds(args.requests, parseMix(args.mix), rng)
        self.seed = args.seed
        self.backlog: collections.deque[SoakRequest] = collections.deque()  # sent on no socket
        self.nextIndex = 0
        self.slots = [ConnectionSlot(url, self.tally, args.in_flight)
                      for _ in range(args.connections)]
        self.finished = asyncio.Event()
        self.elapsed = 0.0

    def takeRequest(self) -> SoakRequest | None:
        if self.backlog:
            return self.backlog.popleft()
        if self.nextIndex >= len(self.kinds):
            return None
        index, self.nextIndex = self.nextIndex, self.nextIndex + 1
        rng = random.Random(self.seed * 1_000_003 + index)
        return makeRequest(index, self.kinds[index], rng, self.args.timeout_ms)

    async def caller(self, slot: ConnectionSlot) -> None:
        """A closed loop: send the next request as soon as the last one ended."""
        while (request := self.takeRequest()) is not None:
            connection = await slot.get()
            call = Call(request, asyncio.get_running_loop().create_future())
            try:
                await connection.send(call)
            except ConnectionClosed:
                self.backlog.append(request)  # never reached the socket: send it again
                # websockets raises this without yielding to the loop: wait for the reader to
                # see the close (get() then opens another connection) rather than spin.
                await asyncio.wait([connection.closed], timeout=10)
                if not connection.closed.done():
                    raise SoakFailed("a closed connection whose reader goes on") from None
                continue
            self.tally.sent[request.kind] += 1
            if request.kind == "cancel":
                firstChunk: asyncio.Future[Any] = asyncio.ensure_future(call.firstChunk.wait())
                await asyncio.wait([call.done, firstChunk], timeout=self._remaining(call),
                                   return_when=asyncio.FIRST_COMPLETED)
                firstChunk.cancel()
                if not call.done.done() and call.firstChunk.is_set():
                    try:
                        await connection.cancel(call)
                    except ConnectionClosed:
                        pass
            await asyncio.wait([call.done], timeout=max(0.0, self._remaining(call)))
            if call.done.done():
                ended, outcome, data = call.done.result()
            else:
                connection.giveUp(call)
                ended, outcome, data = time.monotonic(), LOST, None
                self.tally.note(LOST, f"{request.requestId} {request.kind} "
                                f"{_short(request.payload, 80)} timeoutMs={request.timeoutMs} "
                                f"on {connection.connectionId}, sent at "
                                f"t={call.sentAt - self.tally.started:.1f}s, "
                                f"{len(call.chunks)} chunks received")
            self.record(call, ended, outcome, data)
            if outcome == "unavailable":
                await asyncio.sleep(self.args.unavailable_backoff_ms / 1000)

    def _remaining(self, call: Call) -> float:
        deadline = call.sentAt + call.request.timeoutMs / 1000 + self.args.grace
        return deadline - time.monotonic()

    def record(self, call: Call, ended: float, outcome: str, data: Any) -> None:
        tally, request = self.tally, call.request
        tally.outcomes[request.kind][outcome] += 1
        if outcome in (ABANDONED, LOST, CLOSED_BY_GATEWAY):
            return
        expected = request.expectedChunks
        problem = None
        if call.chunks != expected[:len(call.chunks)]:
            problem = f"wrong chunks: {_short(call.chunks, 120)}"
        elif outcome == SUCCESS[request.kind]:
            if outcome == "response" and (call.chunks != expected
                                          or data != request.expectedResponse):
                problem = (f"wrong response: {len(call.chunks)} chunks, data "
                           f"{_short(data, 120)}")
        elif outcome not in TOLERATED[request.kind]:
            problem = f"{outcome}: {_short(data, 160)}"
        if problem is not None:
            key = f"{request.kind}: {outcome}"
            tally.unexpected[key] += 1
            tally.note(f"unexpected {key}", f"{request.requestId} "
                       f"{_short(request.payload, 80)}: {problem}")
        if outcome == SUCCESS[request.kind]:
            start = call.cancelSentAt if request.kind == "cancel" else call.sentAt
            if start is not None:
                tally.latencies[request.kind].append(ended - start)
        else:
            tally.others.append((ended - tally.started, request.kind, outcome))

    async def run(self) -> None:
        for slot in self.slots:
            await slot.open()
        faults = [asyncio.ensure_future(self.every(self.args.broker_drop_every,
                                                   self.dropBrokerConnections)),
                  asyncio.ensure_future(self.every(self.args.worker_kill_every,
                                                   self.killWorker)),
                  asyncio.ensure_future(self.every(self.args.client_drop_every,
                                                   self.dropClientConnection)),
                  asyncio.ensure_future(self.every(self.args.progress_every, self.progress))]
        try:
            await asyncio.gather(*(self.caller(slot) for slot in self.slots
                                   for _ in range(self.args.in_flight)))
        finally:
            self.finished.set()
            await asyncio.gather(*faults, return_exceptions=True)
        self.elapsed = self.tally.now()
        self.tally.faults.sort()
        await asyncio.sleep(self.args.settle)  # late and duplicated frames would come now

    async def close(self) -> None:
        for slot in self.slots:
            await slot.close()

    async def every(self, seconds: float, action: Any) -> None:
        if seconds <= 0:
            return
        while True:
            try:
                await asyncio.wait_for(self.finished.wait(), seconds)
                return
            except TimeoutError:
                pass
            try:
                await action()
            except Exception as e:  # a fault that failed to happen is the soak's problem
                self.tally.faultProblems.append(f"t={self.tally.now():.1f}s {action.__name__}: "
                                                f"{type(e).__name__}: {e}")

    async def dropBrokerConnections(self) -> None:
        self.tally.faults.append((self.tally.now(), "broker drop"))
        await asyncio.to_thread(closeConnections, self.stack.vhost,
                                "relaybus soak: fault injection")

    async def killWorker(self) -> None:
        self.tally.faults.append((self.tally.now(), "worker kill"))
        started = time.monotonic()
        await asyncio.to_thread(self.stack.replaceOldestWorker)
        self.tally.replacementReadyS.append(time.monotonic() - started)

    async def dropClientConnection(self) -> None:
        """Drop a connection with a stream under way (chunks received, no terminal frame)."""
        candidates = [s.current for s in self.slots
                      if s.opened.is_set() and s.current and not s.current.closed.done()]
        streaming = [c for c in candidates if any(
            call.chunks for call in c.pending.values())]
        if not candidates:
            return
        chosen = random.choice(streaming or candidates)
        self.tally.faults.append((self.tally.now(), "client drop"))
        self.tally.connectionsDropped += 1
        chosen.drop()

    async def progress(self) -> None:
        tally = self.tally
        inFlight = sum(len(s.current.pending) for s in self.slots if s.current)
        done = sum(sum(c.values()) for c in tally.outcomes.values())
        faults = collections.Counter(kind for _, kind in tally.faults)
        print(f"  t={tally.now():5.0f}s  sent {tally.totalSent:>7,}  ended {done:>7,}  "
              f"in flight {inFlight:>3}  lost {tally.lost}  dup {tally.duplicates}  "
              f"faults: {faults['broker drop']} broker, {faults['worker kill']} worker, "
              f"{faults['client drop']} client  gateway RSS {self.stack.gatewayRSS()}",
              flush=True)


# The processes


class Stack:
    """The vhost, the gateway and the workers (the live ones, and the ones killed so far)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.vhost = ""
        self.brokerURL = ""
        self.prefix = f"soak{secrets.token_hex(4)}."
        self.gateway: GatewayProcess | None = None
        self.workers: list[WorkerProcess] = []
        self.killed: list[WorkerProcess] = []
        self._workerNames = itertools.count(1)

    def start(self) -> None:
        self.vhost = newVhostName("relaybus-soak")
        print(f"Creating RabbitMQ vhost {self.vhost} ...", flush=True)
        self.brokerURL = createVhost(self.vhost)
        for _ in range(self.args.workers):
            self.workers.append(self._startWorker())
        for worker in self.workers:
            worker.waitUntilReady(timeout=30)
        self.gateway = GatewayProcess(["--broker", self.brokerURL,
                                       "--amqp-prefix", self.prefix], name="soak-gateway")
        print("Starting the gateway ...", flush=True)
        self.gateway.start()
        self.gateway.waitUntilReady(timeout=30)

    def _startWorker(self) -> WorkerProcess:
        name = f"soak-worker-{next(self._workerNames)}"
        worker = WorkerProcess(["--broker", self.brokerURL, "--amqp-prefix", self.prefix,
                                "--handlers", "workers.examples",
                                "--concurrency", str(self.args.worker_concurrency)], name=name)
        print(f"Starting {name} ...", flush=True)
        worker.start()
        return worker

    def replaceOldestWorker(self) -> None:
        """SIGKILL the worker that has run longest and start another (blocking)."""
        if self.workers:
            victim = self.workers.pop(0)
            victim.kill()
            self.killed.append(victim)
        replacement = self._startWorker()
        self.workers.append(replacement)
        replacement.waitUntilReady(timeout=30)

    def gatewayRSS(self) -> str:
        status = self.gatewayStatus()
        return f"{status.get('VmRSS', 0) / 1024:.1f} MiB"

    def gatewayStatus(self) -> dict[str, int]:
        """VmRSS and VmHWM of the gateway, in KiB (from /proc/<pid>/status)."""
        if self.gateway is None or self.gateway.process is None:
            return {}
        values = {}
        try:
            with open(f"/proc/{self.gateway.process.pid}/status") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in ("VmRSS", "VmHWM"):
                        values[name] = int(rest.split()[0])
        except OSError:
            pass
        return values

    def alarms(self, since: float) -> list[tuple[float, float]]:
        """When the broker blocked the gateway's connection (resource alarms), from its log:
        (from, to) in seconds after `since` (a time.time())."""
        if self.gateway is None:
            return []
        intervals: list[tuple[float, float]] = []
        blockedAt: float | None = None
        for line in self.gateway.log.splitlines():
            match = ALARM_LINE.match(line)
            if not match:
                continue
            at = datetime.datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            if match[2] == "blocks" and blockedAt is None:
                blockedAt = at
            elif match[2] == "unblocked" and blockedAt is not None:
                # the log has whole seconds: the unblock came up to a second later
                intervals.append((blockedAt - since, at + 1 - since))
                blockedAt = None
        if blockedAt is not None:
            intervals.append((blockedAt - since, math.inf))
        return [(a, b) for a, b in intervals if b >= 0]

    def metrics(self) -> dict[str, float] | None:
        """The gateway's /metrics samples (name{labels} -> value); None when not served."""
        if self.gateway is None:
            return None
        try:
            return self.gateway.metrics()
        except urllib.error.HTTPError:
            return None

    def settledMetrics(self, timeout: float = 10.0) -> dict[str, float] | None:
        """/metrics once the gateway has no connections and no requests left (or at the
        timeout: what it still holds then is a leak)."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            if samples is None or time.monotonic() > deadline or not (
                    samples.get("relaybus_connections")
                    or samples.get("relaybus_requests_in_flight")):
                return samples
            time.sleep(0.1)

    def stop(self) -> list[str]:
        """Stop everything (the gateway first), delete the vhost; the anomalies found."""
        findings: list[str] = []
        for process in [p for p in (self.gateway, *self.workers) if p is not None]:
            findings += stopAndScan(process)
        for process in self.killed:  # SIGKILLed: only their logs until then
            findings += [f"{process.name} log: {line}" for line in logFindings(process.log)]
        for each in self.processes:
            findings += [f"{each.name} log: a traceback ends with: {line}"
                         for line in tracebackEnds(each.log)]
        if self.vhost:
            findings += discardVhost(self.vhost)
        return findings

    @property
    def processes(self) -> list[ServiceProcess]:
        return [p for p in (self.gateway, *self.killed, *self.workers) if p is not None]


@dataclass
class GatewayFigures:
    rssStart: dict[str, int]
    metricsStart: dict[str, float] | None
    rssEnd: dict[str, int] = field(default_factory=dict)
    metricsEnd: dict[str, float] | None = None

    @property
    def leaked(self) -> str:
        """What the gateway still holds after every connection of the soak closed."""
        end = self.metricsEnd
        if end is None:
            return ""
        held = [requestAccounting(end)] if requestAccounting(end) else []
        if end.get("relaybus_connections", 0):
            held.append(f"{end['relaybus_connections']:.0f} connections still open")
        return ", ".join(held)


# Output


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def printReport(soak: Soak, figures: GatewayFigures) -> None:
    tally = soak.tally
    sent = tally.totalSent
    abandoned = sum(c[ABANDONED] for c in tally.outcomes.values())
    lost = sum(c[LOST] for c in tally.outcomes.values())
    closed = sum(c[CLOSED_BY_GATEWAY] for c in tally.outcomes.values())
    print("\nResults")
    rows = [
        ("requests sent", f"{sent:,}"),
        ("terminal frames received",
         f"{tally.terminalFrames + tally.duplicates + tally.lateTerminals:,} "
         f"({tally.terminalFrames:,} first, {tally.duplicates} duplicated, "
         f"{tally.lateTerminals} after the local deadline)"),
        ("ended by the client's own hand", f"{abandoned:,} (in flight on the "
         f"{tally.connectionsDropped} connections the soak dropped; not lost)"),
        ("lost", f"{lost + closed:,} (no terminal frame within timeoutMs + "
         f"{soak.args.grace:g} s: {lost}; connection closed by the gateway: {closed})"),
        ("duplicated", f"{tally.duplicates:,}"),
        ("protocol violations", f"{sum(tally.violations.values()):,}"
         + "".join(f"; {n} {what}" for what, n in tally.violations.most_common())),
        ("unexpected outcomes", f"{sum(tally.unexpected.values()):,}"
         + "".join(f"; {n} {what}" for what, n in tally.unexpected.most_common())),
    ]
    accounted = tally.terminalFrames + abandoned + lost + closed
    if accounted != sent:
        rows.append(("accounting", f"sent {sent} != first terminal + ended by the client + "
                     f"lost = {accounted}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")

    print("\nOutcomes by kind (the first column after `sent` is the kind's intended outcome):")
    columns = sorted({o for c in tally.outcomes.values() for o in c} - set(SUCCESS.values()))
    header = ("kind", "sent", "intended", *columns)
    table = []
    for kind in KINDS:
        if not tally.sent[kind]:
            continue
        counts = tally.outcomes[kind]
        table.append((kind, f"{tally.sent[kind]:,}", f"{SUCCESS[kind]} {counts[SUCCESS[kind]]:,}",
                      *(f"{counts[o]:,}" if counts[o] else "." for o in columns)))
    _table(header, table)

    print("\nLatency of the requests that got their intended outcome (ms; cancel: from the "
          "cancel frame to `cancelled`):")
    table = []
    for kind in KINDS:
        values = tally.latencies[kind]
        if values:
            table.append((kind, f"{len(values):,}", f"{percentile(values, 50) * 1000:.1f}",
                          f"{percentile(values, 99) * 1000:.1f}",
                          f"{max(values) * 1000:.1f}"))
    _table(("kind", "count", "p50", "p99", "max"), table)

    print(f"\nThroughput: {sent:,} requests in {soak.elapsed:.1f} s = "
          f"{sent / soak.elapsed:,.0f} requests/s ({soak.args.connections} connections x "
          f"{soak.args.in_flight} in flight)")
    print(f"Gateway RSS: {figures.rssStart.get('VmRSS', 0) / 1024:.1f} MiB at the start, "
          f"{figures.rssEnd.get('VmRSS', 0) / 1024:.1f} MiB at the end (peak "
          f"{figures.rssEnd.get('VmHWM', 0) / 1024:.1f} MiB)")
    printGatewayMetrics(figures)

    counts = collections.Counter(kind for _, kind in tally.faults)
    print(f"Faults: {counts['broker drop']} broker drops (every "
          f"{soak.args.broker_drop_every:g} s), {counts['worker kill']} worker kills (every "
          f"{soak.args.worker_kill_every:g} s; replacements ready in "
          + (f"{min(tally.replacementReadyS):.1f}-{max(tally.replacementReadyS):.1f} s"
             if tally.replacementReadyS else "-")
          + f"), {counts['client drop']} client connections dropped (every "
          f"{soak.args.client_drop_every:g} s)")
    for kind in ("broker drop", "worker kill", "client drop"):
        times = [f"{t:.0f}" for t, k in tally.faults if k == kind]
        if times:
            print(f"  {kind} at t = {', '.join(times)} s")
    if tally.alarms:
        print(f"  and {len(tally.alarms)} resource alarms on the shared broker (raised by "
              f"someone else; the gateway's log says it was blocked) at t = "
              + ", ".join(f"{a:.0f}-{b:.0f}" for a, b in tally.alarms) + " s")
    for problem in tally.faultProblems:
        print(f"  fault injection failed: {problem}")
    printFaultProximity(tally)
    for category, lines in tally.examples.items():
        print(f"\nExamples: {category}")
        for line in lines:
            print(f"  {line}")


def printGatewayMetrics(figures: GatewayFigures) -> None:
    """The gateway's own count (its /metrics), once every connection of the soak has closed."""
    start, end = figures.metricsStart, figures.metricsEnd
    if start is None or end is None:
        print("Gateway /metrics: not served by this gateway")
        return
    ended = {outcome: int(value) for outcome, value in endedByOutcome(end).items()}
    print(f"Gateway /metrics after the soak's connections closed: "
          f"{end.get('relaybus_requests_in_flight', math.nan):.0f} requests in flight, "
          f"{end.get('relaybus_connections', math.nan):.0f} connections, "
          f"{end.get('relaybus_requests_accepted_total', math.nan):,.0f} requests accepted "
          f"(the others were refused at once), {sum(ended.values()):,} ended, "
          f"{end.get('relaybus_late_replies_total', math.nan):,.0f} late replies dropped, "
          f"{end.get('relaybus_slow_clients_closed_total', math.nan):.0f} slow clients closed, "
          f"reactor timers {start.get('relaybus_reactor_delayed_calls', math.nan):.0f} before "
          f"and {end.get('relaybus_reactor_delayed_calls', math.nan):.0f} after")
    print("  ended by outcome: " + ", ".join(f"{k} {v:,}" for k, v in sorted(ended.items())))
    if figures.leaked:
        print(f"  LEAK: {figures.leaked}")


def printFaultProximity(tally: Tally) -> None:
    """Each outcome other than the intended one, and how many came long after anything
    that explains it: a broker drop, a worker kill, or a resource alarm on the broker."""
    explaining = [(t, t) for t, k in tally.faults if k in ("broker drop", "worker kill")]
    explaining += tally.alarms
    counts: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    for ended, kind, outcome in tally.others:
        if kind == "cancel" and outcome == "response":
            continue  # the request ended before its cancel reached the gateway: no fault
        explained = any(start <= ended <= end + FAULT_WINDOW_S for start, end in explaining)
        counts[(kind, outcome)][0] += 1
        counts[(kind, outcome)][1] += 0 if explained else 1
    if not counts:
        return
    print(f"\nOutcomes other than the intended one, and how many of them came more than "
          f"{FAULT_WINDOW_S:g} s after any broker drop, worker kill or resource alarm (those "
          f"no fault explains):")
    for (kind, outcome), (total, unexplained) in sorted(counts.items()):
        print(f"  {kind:<10} {outcome:<12} {total:>6,}   {unexplained:,} unexplained")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    print("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                           for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for row in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def tracebackEnds(log: str) -> list[str]:
    """The exception line of each traceback in a twistd log (its lines are tab-indented;
    the frames are indented further)."""
    ends, inside, last = [], False, ""
    for line in log.splitlines():
        if "Traceback (most recent call last)" in line:
            inside, last = True, ""
        elif inside and line.startswith("\t") and line.strip():
            if not line.startswith("\t "):
                last = line.strip()
        elif inside:
            ends.append(last or "(no exception line)")
            inside = False
    if inside:
        ends.append(last or "(no exception line)")
    return ends


def summarizeFindings(findings: list[str]) -> list[str]:
    """Log findings with ids, numbers and timestamps blanked out, counted."""
    counts: collections.Counter[str] = collections.Counter()
    for line in findings:
        text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.+-]+ ", "", line)
        text = re.sub(r"soak-worker-\d+", "soak-worker-N", text)
        text = re.sub(r"\b[0-9a-f]{8,}\b|\b\d+(\.\d+)?\b", "#", text)
        counts[text] += 1
    return [f"{n:>6} x {text}" for text, n in counts.most_common()]


# Running it


# The options, in --help's order: (flag, type, default, help); type None: a flag
# (store_true); default None: it depends on --quick (see parseArguments).
OPTIONS: list[tuple[str, type | None, Any, str]] = [
    ("--requests", int, None, "requests to send (default 100000; 5000 with --quick)"),
    ("--quick", None, False, "a smoke run of about 15 s: 5,000 requests, 20 in flight, a "
                             "fault every second or so"),
    ("--mix", str, DEFAULT_MIX,
     f"relative weights of the request kinds (default {DEFAULT_MIX})"),
    ("--connections", int, None, "WebSocket connections (default 4; 2 with --quick)"),
    ("--in-flight", int, None,
     "requests in flight per connection (default 50; 10 with --quick)"),
    ("--timeout-ms", int, 10_000,
     "timeoutMs of every request but the `timeout` kind's (100 ms); default 10000"),
    ("--grace", float, 5.0,
     "seconds past a request's timeoutMs before it counts as lost (default 5)"),
    ("--broker-drop-every", float, None,
     "seconds between `rabbitmqctl close_all_connections` on the soak's vhost (default 10; "
     "2 with --quick; 0: never)"),
    ("--worker-kill-every", float, None,
     "seconds between SIGKILLs of a worker, each replaced at once (default 15; 3 with "
     "--quick; 0: never)"),
    ("--client-drop-every", float, None,
     "seconds between dropping a client connection mid-stream (default 5; 1 with --quick; "
     "0: never)"),
    ("--no-faults", None, False, "inject no faults at all"),
    ("--workers", int, 2, "worker processes (default 2)"),
    ("--worker-concurrency", int, 100, "each worker's --concurrency (default 100)"),
    ("--unavailable-backoff-ms", int, 100,
     "a caller that got `unavailable` waits this long before its next request, as a client "
     "should (default 100)"),
    ("--settle", float, 2.0,
     "seconds to watch for late frames after the last request ended (default 2)"),
    ("--progress-every", float, 15.0,
     "seconds between progress lines (default 15; 0: none)"),
    ("--seed", int, 1, "random seed (default 1)"),
]


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="relaybus soak: mixed requests under injected faults, checking that every "
                    "request gets exactly one terminal frame.")
    for flag, kind, default, text in OPTIONS:
        if kind is None:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            parser.add_argument(flag, type=kind, default=default, help=text)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"requests": (100_000, 5_000), "connections": (4, 2), "in_flight": (50, 10),
                "broker_drop_every": (10.0, 2.0), "worker_kill_every": (15.0, 3.0),
                "client_drop_every": (5.0, 1.0)}
    for name, (normal, short) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if quick else normal)
    if args.no_faults:
        args.broker_drop_every = args.worker_kill_every = args.client_drop_every = 0
    if min(args.requests, args.connections, args.in_flight, args.workers,
           args.timeout_ms) < 1:
        parser.error("--requests, --connections, --in-flight, --workers and --timeout-ms "
                     "must be positive")
    try:
        parseMix(args.mix)
    except ValueError as e:
        parser.error(str(e))
    return args


async def runSoak(soak: Soak) -> GatewayFigures:
    # SIGTERM cancels this task, as asyncio.run does for SIGINT: the cleanup then runs from a
    # well-defined point rather than from inside the websockets internals.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    stack = soak.stack
    figures = GatewayFigures(stack.gatewayStatus(), await asyncio.to_thread(stack.metrics))
    try:
        await soak.run()
        figures.rssEnd = stack.gatewayStatus()
    finally:
        await soak.close()
    soak.tally.alarms = stack.alarms(soak.tally.startedWall)
    figures.metricsEnd = await asyncio.to_thread(stack.settledMetrics)
    return figures


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    interruptOnSigterm()
    stack = Stack(args)
    started = time.monotonic()
    findings: list[str] = []

    def cleanUp() -> None:
        findings.extend(stack.stop())

    print(f"relaybus soak: {args.requests:,} requests ({args.mix}) over {args.connections} "
          f"connections x {args.in_flight} in flight, {args.workers} workers; seed "
          f"{args.seed}", flush=True)
    with commandRun("The soak", cleanUp) as run:
        stack.start()
        soak = Soak(args, stack.gateway.url if stack.gateway else "", stack)
        print("Running:", flush=True)
        try:
            figures = asyncio.run(runSoak(soak))
        finally:  # closing the loop reset SIGTERM to its default (die without cleaning up)
            interruptOnSigterm()
        printReport(soak, figures)
        tally = soak.tally
        if tally.lost or tally.duplicates or tally.violations or figures.leaked:
            run.status = 1
    if findings:
        tracebacks = sum(1 for line in findings if "Traceback (most recent" in line)
        print(f"\nWarnings and errors in the processes' logs (and their exit), counted "
              f"({tracebacks} tracebacks):")
        summary = summarizeFindings(findings)
        for line in summary[:40]:
            print(f"  {line}")
        if len(summary) > 40:
            print(f"  ... and {len(summary) - 40} other kinds")
    print("\nLogs:")
    for process in stack.processes:
        print(f"  {process.name}: {process.logPath}")
    print(f"Total time {time.monotonic() - started:.0f} s; exit status {run.status}.")
    return run.status


if __name__ == "__main__":
    sys.exit(main())
