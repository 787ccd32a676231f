"""End-to-end benchmark: WebSocket client -> gateway -> RabbitMQ -> worker -> back, compared with
the AMQP-only ceiling (publish -> the same worker -> reply, no gateway and no WebSocket) and with
bare pika (plain pika RPC to a plain pika worker: no relaybus code on either side).

    .venv/bin/python benchmarks/e2e.py [--requests N] [--gateway-url ws://...] [--broker amqp://...]

By default it creates a throwaway RabbitMQ vhost (rabbitmqctl), starts one gateway and one worker
as real `twistd` processes and benchmarks/barepika_worker.py, runs the cases and removes
everything again (also on Ctrl-C or failure). It prints figures only: no targets, no pass/fail.
See benchmarks/README.md.

The clients run in this process, separate from the other processes:
- gateway path: the `websockets` library (asyncio client), not relaybus's own client;
- AMQP-only path: pika's AsyncioConnection (the callback API of SelectConnection, on the same
  asyncio loop), publishing exactly as the gateway does (relaybus.amqp.codec, docs/protocol.md);
- bare pika path: the same pika client, with plain RPC properties (BarePikaDriver).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import math
import os
import pstats
import re
import resource
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pika
import pika.spec
from pika.adapters.asyncio_connection import AsyncioConnection
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from relaybus.amqp import codec
from relaybus.amqp.topology import REPLY_QUEUE_EXPIRES_MS, Topology
from relaybus.harness import (
    GatewayProcess,
    ServiceProcess,
    WorkerProcess,
    brokerPid,
    commandRun,
    createVhost,
    discardVhost,
    interruptOnSigterm,
    newVhostName,
    openGatewaySocket,
    stopAndScan,
)
from relaybus.messages import ReplyKind, RequestMessage

DEFAULT_PREFIX = "bench."
REQUEST_TIMEOUT_MS = 30_000  # sent as timeoutMs / AMQP expiration; far above any latency here
LOCAL_TIMEOUT_S = REQUEST_TIMEOUT_MS / 1000 + 5  # a call with no terminal frame by then failed
GRACE_S = 0.2  # after a phase, how long to watch for frames that arrive after a terminal frame

ECHO_PAYLOAD = {"message": "hello relaybus", "n": 42, "ok": True}
STREAM_PAYLOAD = {"count": 5, "delayMs": 0, "chunkBytes": 64}
STREAM_CHUNKS = [{"index": i, "filler": "x" * 64} for i in range(5)]
STREAM_RESPONSE = {"chunks": 5, "chunkBytes": 64, "delayMs": 0, "bytes": 320}


@dataclass(frozen=True)
class Case:
    name: str  # "echo" or "stream"
    requestType: str
    payload: Any
    expectedChunks: list[Any]
    expectedResponse: Any
    concurrency: int
    requests: int

    def check(self, chunks: list[Any], kind: str, data: Any) -> str | None:
        """None when the request succeeded with exactly the expected frames."""
        if kind != "response":
            return f"{kind}: {_short(data)}"
        if chunks != self.expectedChunks:
            return f"got {len(chunks)} chunks, expected {len(self.expectedChunks)} (or wrong data)"
        if data != self.expectedResponse:
            return f"wrong response data: {_short(data)}"
        return None


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _encode(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class CallFailed(Exception):
    pass


# The gateway path: the `websockets` asyncio client


@dataclass(eq=False)
class _WsCall:
    future: asyncio.Future[tuple[float, str, Any]]
    chunks: list[Any] = field(default_factory=list)


class GatewayConnection:
    """One WebSocket to the gateway; many requests in flight, matched by requestId."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.pending: dict[str, _WsCall] = {}
        self.anomalies: list[str] = []  # frames that break the protocol's rules
        self._next = 0
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> GatewayConnection:
        return cls(*await openGatewaySocket(url))

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                kind, requestId = frame.get("type"), frame.get("requestId")
                call = self.pending.get(requestId) if isinstance(requestId, str) else None
                if call is None:
                    self.anomalies.append(f"{kind} frame for a request not in flight "
                                          f"(after its terminal frame?): {_short(frame)}")
                elif kind == "chunk":
                    if frame.get("seq") != len(call.chunks):
                        self.anomalies.append(f"chunk seq {frame.get('seq')}, expected "
                                              f"{len(call.chunks)} for {requestId}")
                    call.chunks.append(frame.get("data"))
                elif kind == "response":
                    del self.pending[requestId]
                    call.future.set_result((now, "response", frame.get("data")))
                elif kind == "error":
                    del self.pending[requestId]
                    call.future.set_result((now, "error", frame.get("error")))
                else:
                    self.anomalies.append(f"unexpected frame: {_short(frame)}")
        except ConnectionClosed:
            pass
        finally:
            why = f"the WebSocket closed ({self.ws.close_code}: {self.ws.close_reason})"
            for call in self.pending.values():
                if not call.future.done():
                    call.future.set_exception(CallFailed(why))
            self.pending.clear()

    async def call(self, case: Case) -> tuple[float, str | None]:
        self._next += 1
        requestId = f"r{self._next}"
        text = _encode({"type": "request", "requestId": requestId,
                        "requestType": case.requestType, "payload": case.payload,
                        "timeoutMs": REQUEST_TIMEOUT_MS})
        call = _WsCall(asyncio.get_running_loop().create_future())
        self.pending[requestId] = call
        started = time.perf_counter()
        try:
            await self.ws.send(text)
            ended, kind, data = await asyncio.wait_for(call.future, LOCAL_TIMEOUT_S)
        except TimeoutError:
            self.pending.pop(requestId, None)
            return 0.0, f"no terminal frame within {LOCAL_TIMEOUT_S:.0f} s"
        except (CallFailed, ConnectionClosed) as e:
            self.pending.pop(requestId, None)
            return 0.0, str(e) or type(e).__name__
        return ended - started, case.check(call.chunks, kind, data)

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.ws.close(), 5)
        except TimeoutError:
            pass
        if not self._reader.done():
            self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


class GatewayDriver:
    path = "gateway"

    def __init__(self, url: str, connections: int) -> None:
        self.url = url
        self.connectionsWanted = connections
        self.connections: list[GatewayConnection] = []

    async def start(self, case: Case) -> None:
        count = max(1, min(self.connectionsWanted, case.concurrency))
        self.connections = [await GatewayConnection.open(self.url) for _ in range(count)]
        maxInFlight = self.connections[0].hello.get("limits", {}).get("maxInFlight")
        perConnection = math.ceil(case.concurrency / count)
        if isinstance(maxInFlight, int) and perConnection > maxInFlight:
            raise SystemExit(f"{perConnection} requests per connection is above the gateway's "
                             f"maxInFlight={maxInFlight}: use --connections")

    def call(self, case: Case, slot: int) -> Awaitable[tuple[float, str | None]]:
        return self.connections[slot % len(self.connections)].call(case)

    def takeAnomalies(self) -> list[str]:
        found = [a for c in self.connections for a in c.anomalies]
        for c in self.connections:
            c.anomalies.clear()
        return found

    async def stop(self) -> None:
        for connection in self.connections:
            await connection.close()
        self.connections = []


class BareStackDriver(GatewayDriver):
    """The same WebSocket client against benchmarks/bare_stack.py's gateway and worker: the
    design card's stack (Autobahn, pika's Twisted adapter, Twisted) with no relaybus code."""

    path = "bare stack"


# The AMQP-only path: pika, publishing like the gateway


@dataclass(eq=False)
class _AmqpCall:
    future: asyncio.Future[tuple[float, str, Any]]
    chunks: list[Any] = field(default_factory=list)


def _callbackFuture(register: Callable[[Callable[..., None]], Any]) -> asyncio.Future[Any]:
    """Await a pika method whose completion is reported to a callback."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def done(*args: Any) -> None:
        if not future.done():
            future.set_result(args[0] if args else None)

    register(done)
    return future


def _declareExchange(channel: Any, name: str, callback: Callable[..., None]) -> None:
    channel.exchange_declare(exchange=name, exchange_type="direct", durable=True,
                             callback=callback)


class AmqpDriver:
    """A stand-in gateway: one connection, a consuming channel on its own reply queue and a
    publishing channel with confirms, `mandatory` publishes, properties and headers from
    relaybus.amqp.codec (as AmqpRequestBus.publishRequest sends them)."""

    path = "amqp-only"
    sequencedChunks = True  # relaybus numbers its chunks (relaybus-seq): check the numbers

    def __init__(self, url: str, topology: Topology) -> None:
        self.url = url
        self.topology = topology
        self.replyTo = f"bench-{secrets.token_hex(4)}"
        self.replyQueue = ""  # where the replies arrive, and
        self.replyAddress = ""  # the reply_to that routes them there (set by open())
        self.pending: dict[str, _AmqpCall] = {}
        self.anomalies: list[str] = []
        self.unconfirmed: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.confirmedAll: asyncio.Event | None = None
        self._published = 0
        self._connection: Any = None
        self._publishing: Any = None
        self._consuming: Any = None
        self._closed: asyncio.Future[Any] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Any] = loop.create_future()
        self._closed = loop.create_future()
        self.confirmedAll = asyncio.Event()
        self.confirmedAll.set()
        parameters = pika.URLParameters(self.url)
        parameters.client_properties = {"connection_name": f"relaybus benchmark {self.replyTo}"}

        def openFailed(_connection: Any, error: BaseException) -> None:
            if not opened.done():
                opened.set_exception(RuntimeError(f"AMQP connection failed: {error!r}"))

        def closed(_connection: Any, reason: BaseException) -> None:
            assert self._closed is not None
            if not self._closed.done():
                self._closed.set_result(reason)
            openFailed(_connection, reason)
            self._failAll(f"the AMQP connection closed: {reason!r}")

        def openedOK(connection: Any) -> None:
            if not opened.done():
                opened.set_result(connection)

        self._connection = AsyncioConnection(
            parameters, on_open_callback=openedOK,
            on_open_error_callback=openFailed, on_close_callback=closed, custom_ioloop=loop)
        await opened
        consuming = await self._channel()
        self.replyQueue, self.replyAddress = await self._declareReplyQueue(consuming)
        publishing = await self._channel()
        await _callbackFuture(lambda cb: publishing.confirm_delivery(
            ack_nack_callback=self._confirmed, callback=cb))
        publishing.add_on_return_callback(self._returned)
        await _callbackFuture(lambda cb: consuming.basic_consume(
            queue=self.replyQueue, on_message_callback=self._replyArrived, auto_ack=True,
            callback=cb))
        self._consuming, self._publishing = consuming, publishing

    # What relaybus's wire format decides; BarePikaDriver overrides these four.

    async def _declareReplyQueue(self, channel: Any) -> tuple[str, str]:
        """The gateway's topology: the three exchanges, and a reply queue bound to the
        responses exchange by the gateway id (the reply_to)."""
        topology = self.topology
        for name in (topology.requestsExchange, topology.responsesExchange,
                     topology.cancelsExchange):
            await _callbackFuture(functools.partial(_declareExchange, channel, name))
        queue = topology.replyQueue(self.replyTo)
        await _callbackFuture(lambda cb: channel.queue_declare(
            queue=queue, durable=False, exclusive=False, auto_delete=False,
            arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS}, callback=cb))
        await _callbackFuture(lambda cb: channel.queue_bind(
            queue=queue, exchange=topology.responsesExchange, routing_key=self.replyTo,
            callback=cb))
        return queue, self.replyTo

    def _requestTarget(self, case: Case) -> tuple[str, str]:
        """The exchange and routing key of a request."""
        return self.topology.requestsExchange, case.requestType

    def _requestProperties(self, correlationId: str, case: Case, body: bytes,
                           now: float) -> pika.BasicProperties:
        return codec.requestProperties(RequestMessage(
            correlationId=correlationId, requestType=case.requestType,
            replyTo=self.replyAddress, body=body, deadline=now + REQUEST_TIMEOUT_MS / 1000,
            gatewayId=self.replyTo), now)

    def _parseReply(self, properties: pika.BasicProperties,
                    body: bytes) -> tuple[str, str, int | None] | None:
        """(correlation id, kind, seq), or None when no correlation id names the request."""
        reply = codec.replyFromAmqp(properties, body, self.replyTo)
        return None if reply is None else (reply.correlationId, str(reply.kind), reply.seq)

    async def _channel(self) -> Any:
        channel = await _callbackFuture(lambda cb: self._connection.channel(on_open_callback=cb))
        channel.add_on_close_callback(self._channelClosed)
        return channel

    def _channelClosed(self, _channel: Any, reason: BaseException) -> None:
        if self._connection is not None and self._connection.is_open:
            self.anomalies.append(f"an AMQP channel closed: {reason!r}")
            self._failAll(f"an AMQP channel closed: {reason!r}")

    def _failAll(self, why: str) -> None:
        for call in self.pending.values():
            if not call.future.done():
                call.future.set_exception(CallFailed(why))
        self.pending.clear()

    async def start(self, case: Case) -> None:
        pass

    async def call(self, case: Case, slot: int) -> tuple[float, str | None]:
        channel = self._publishing
        if channel is None or not channel.is_open:
            return 0.0, "the AMQP publishing channel is not open"
        correlationId = secrets.token_hex(16)
        body = _encode(case.payload).encode("utf-8")
        properties = self._requestProperties(correlationId, case, body, time.time())
        exchange, routingKey = self._requestTarget(case)
        call = _AmqpCall(asyncio.get_running_loop().create_future())
        self.pending[correlationId] = call
        self._published += 1
        self.unconfirmed[self._published] = correlationId
        assert self.confirmedAll is not None
        self.confirmedAll.clear()
        started = time.perf_counter()
        channel.basic_publish(exchange=exchange, routing_key=routingKey, body=body,
                              properties=properties, mandatory=True)
        try:
            ended, kind, data = await asyncio.wait_for(call.future, LOCAL_TIMEOUT_S)
        except TimeoutError:
            self.pending.pop(correlationId, None)
            return 0.0, f"no terminal reply within {LOCAL_TIMEOUT_S:.0f} s"
        except CallFailed as e:
            return 0.0, str(e)
        return ended - started, case.check(call.chunks, kind, data)

    def _replyArrived(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        now = time.perf_counter()
        parsed = self._parseReply(properties, body)
        if parsed is None:
            self.anomalies.append(f"reply with type {properties.type!r} and no "
                                  f"correlation_id: {_short(body)}")
            return
        correlationId, kind, seq = parsed
        call = self.pending.get(correlationId)
        if call is None:
            self.anomalies.append(f"{kind} reply for a request not in flight "
                                  f"(after its terminal reply?): {correlationId}")
            return
        try:
            data = json.loads(body)
        except ValueError:
            data = f"<not JSON: {body[:60]!r}>"
        if kind == ReplyKind.CHUNK:
            if self.sequencedChunks and seq != len(call.chunks):
                self.anomalies.append(f"chunk {codec.HEADER_SEQ}={seq}, "
                                      f"expected {len(call.chunks)}")
            call.chunks.append(data)
        else:
            del self.pending[correlationId]
            call.future.set_result((now, kind, data))

    def _returned(self, _channel: Any, method: Any, properties: Any, _body: bytes) -> None:
        call = self.pending.pop(properties.correlation_id, None)
        if call is not None and not call.future.done():
            call.future.set_result((time.perf_counter(), "error", {
                "code": "no_handler (basic.return)",
                "message": f"{method.reply_code} {method.reply_text}"}))

    def _confirmed(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = ([t for t in self.unconfirmed if t <= method.delivery_tag] if method.multiple
                else [method.delivery_tag])
        for tag in tags:
            correlationId = self.unconfirmed.pop(tag, None)
            if not acked and correlationId is not None:
                self.anomalies.append(f"publish of {correlationId} was nacked by the broker")
        if not self.unconfirmed and self.confirmedAll is not None:
            self.confirmedAll.set()

    def takeAnomalies(self) -> list[str]:
        found, self.anomalies = self.anomalies, []
        return found

    async def settle(self) -> None:
        """Wait for the confirms of everything published (they may trail the replies)."""
        assert self.confirmedAll is not None
        try:
            await asyncio.wait_for(self.confirmedAll.wait(), 10)
        except TimeoutError:
            self.anomalies.append(f"{len(self.unconfirmed)} publishes never confirmed")

    async def stop(self) -> None:
        pass

    async def close(self) -> None:
        if self._connection is None or not self._connection.is_open:
            return
        if self._consuming is not None and self._consuming.is_open:
            await asyncio.wait_for(_callbackFuture(
                lambda cb: self._consuming.queue_delete(queue=self.replyQueue, callback=cb)), 5)
        self._connection.close()
        assert self._closed is not None
        await asyncio.wait_for(self._closed, 5)


class BarePikaDriver(AmqpDriver):
    """The same client (connection, confirms, `mandatory`, matching, checks), speaking plain
    pika RPC to benchmarks/barepika_worker.py instead of relaybus's wire format: each request
    goes to the worker's queue through the default exchange with only `correlation_id`,
    `reply_to` (a server-named exclusive reply queue) and `type` (the requestType); replies
    carry `correlation_id` and `type` (chunk/response) and nothing else, so chunks are not
    numbered (their data still shows the order)."""

    path = "bare pika"
    sequencedChunks = False

    def __init__(self, url: str, queue: str) -> None:
        super().__init__(url, Topology())
        self.queue = queue

    async def _declareReplyQueue(self, channel: Any) -> tuple[str, str]:
        declared = await _callbackFuture(lambda cb: channel.queue_declare(
            queue="", exclusive=True, callback=cb))
        queue: str = declared.method.queue
        return queue, queue

    def _requestTarget(self, case: Case) -> tuple[str, str]:
        return "", self.queue

    def _requestProperties(self, correlationId: str, case: Case, body: bytes,
                           now: float) -> pika.BasicProperties:
        return pika.BasicProperties(correlation_id=correlationId, reply_to=self.replyAddress,
                                    type=case.requestType)

    def _parseReply(self, properties: pika.BasicProperties,
                    body: bytes) -> tuple[str, str, int | None] | None:
        if not properties.correlation_id:
            return None
        return properties.correlation_id, str(properties.type), None


class BarePikaWorkerProcess(ServiceProcess):
    """benchmarks/barepika_worker.py as a process: not twistd, but the harness's log file,
    SIGTERM and log scan all the same."""

    def __init__(self, url: str, queue: str) -> None:
        super().__init__("barepika_worker", ["--url", url, "--queue", queue],
                         name="bench-bare-pika-worker")
        self.logPath = self.logPath.with_name("worker.log")

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("barepika_worker.py")), *self.args]

    def waitUntilReady(self, timeout: float = 20.0) -> BarePikaWorkerProcess:
        self.waitForLog(r"(?m)^ready$", timeout)
        return self


class BareStackProcess(ServiceProcess):
    """benchmarks/bare_stack.py's worker or gateway as a process (log, SIGTERM, log scan)."""

    def __init__(self, role: str, args: list[str]) -> None:
        super().__init__("bare_stack", [role, *args], name=f"bench-bare-stack-{role}")
        self.logPath = self.logPath.with_name(f"{role}.log")

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("bare_stack.py")), *self.args]

    def waitUntilReady(self, timeout: float = 20.0) -> BareStackProcess:
        self.waitForLog(r"(?m)^ready", timeout)
        return self

    @property
    def url(self) -> str:
        found = re.search(r"(?m)^ready (\d+)$", self.log)
        assert found, f"{self.name} printed no port"
        return f"ws://127.0.0.1:{found.group(1)}/ws"


# CPU accounting: who spent the machine's two cores during a phase


class CpuMeter:
    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.ticks = os.sysconf("SC_CLK_TCK")

    def _process(self, pid: int | None) -> float | None:
        if pid is None:
            return None
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / self.ticks
        except (OSError, IndexError, ValueError):
            return None

    def _machineBusy(self) -> float:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return (sum(values[:8]) - idle) / self.ticks

    def snapshot(self) -> dict[str, float | None]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result: dict[str, float | None] = {name: self._process(pid)
                                           for name, pid in self.pids.items()}
        result["client"] = usage.ru_utime + usage.ru_stime
        result["machine"] = self._machineBusy()
        return result

    @staticmethod
    def delta(before: dict[str, float | None],
              after: dict[str, float | None]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, value in after.items():
            start = before.get(name)
            out[name] = None if value is None or start is None else value - start
        known = [v for k, v in out.items() if k != "machine" and v is not None]
        machine = out.get("machine")
        out["other"] = None if machine is None else max(0.0, machine - sum(known))
        return out


# Running the cases


@dataclass
class Result:
    case: Case
    path: str
    latencies: list[float]
    errors: collections.Counter[str]
    elapsed: float
    cpu: dict[str, float | None]

    @property
    def completed(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    def add(self, part: Result) -> None:
        self.latencies += part.latencies
        self.errors.update(part.errors)
        self.elapsed += part.elapsed
        for name, value in part.cpu.items():
            mine = self.cpu.get(name, 0.0)
            self.cpu[name] = None if value is None or mine is None else mine + value

    @property
    def meanMs(self) -> float:
        return sum(self.latencies) / len(self.latencies) * 1000 if self.latencies else math.nan

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] * 1000


async def runPhase(driver: Any, case: Case, count: int, meter: CpuMeter | None
                   ) -> tuple[list[float], collections.Counter[str], float, dict[str, Any]]:
    """A closed loop: `case.concurrency` callers, each sends its next request when its last
    one ended, until `count` requests have been sent."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    remaining = count

    async def caller(slot: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latency, error = await driver.call(case, slot)
            if error is None:
                latencies.append(latency)
            else:
                errors[error] += 1

    before = meter.snapshot() if meter else {}
    started = time.perf_counter()
    await asyncio.gather(*(caller(slot) for slot in range(min(case.concurrency, count))))
    elapsed = time.perf_counter() - started
    cpu = CpuMeter.delta(before, meter.snapshot()) if meter else {}
    if isinstance(driver, AmqpDriver):
        await driver.settle()
    await asyncio.sleep(GRACE_S)  # frames after a terminal frame would show up now
    for anomaly in driver.takeAnomalies():
        errors[f"protocol: {anomaly}"] += 1
    return latencies, errors, elapsed, cpu


async def runCase(driver: Any, case: Case, warmup: int, meter: CpuMeter) -> Result:
    await driver.start(case)
    try:
        if warmup:
            _, warmErrors, _, _ = await runPhase(driver, case, warmup, None)
            if warmErrors:
                print(f"    warm-up errors: {dict(warmErrors)}", flush=True)
        latencies, errors, elapsed, cpu = await runPhase(driver, case, case.requests, meter)
    finally:
        await driver.stop()
    return Result(case, driver.path, latencies, errors, elapsed, cpu)


async def runAll(cases: list[Case], gatewayURL: str | None, amqpURL: str | None,
                 bare: tuple[str, str] | None, bareStackURL: str | None, topology: Topology,
                 connections: int, warmup: int, rounds: int,
                 pids: dict[str, int | None]) -> list[Result]:
    """Every case on every path, in `rounds` rounds of requests/rounds each, the paths'
    order alternating between rounds: a burst of noise from other users of the machine then
    lands on both paths rather than on whichever happened to run at that moment."""
    # SIGTERM cancels this task, as asyncio.run does for SIGINT (Ctrl-C): the cleanup below and
    # in main() then runs from a well-defined point (an exception raised from a plain signal
    # handler could land inside the websockets or pika internals and wedge them).
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    meter = CpuMeter(pids)
    drivers: list[Any] = []
    if gatewayURL:
        drivers.append(GatewayDriver(gatewayURL, connections))
    amqps: list[AmqpDriver] = []
    if amqpURL:
        amqps.append(AmqpDriver(amqpURL, topology))
    if bare:
        amqps.append(BarePikaDriver(*bare))
    if bareStackURL:
        drivers.append(BareStackDriver(bareStackURL, connections))
    results: dict[tuple[str, int, str], Result] = {}
    try:
        for amqp in amqps:
            await amqp.open()
            drivers.append(amqp)
        for round in range(rounds):
            print(f" round {round + 1}/{rounds}", flush=True)
            for case in cases:
                share = case.requests // rounds + (1 if round < case.requests % rounds else 0)
                if share == 0:
                    continue
                ordered = drivers if round % 2 == 0 else drivers[::-1]
                for driver in ordered:
                    print(f"  {case.name:6} c={case.concurrency:<3} {driver.path:9} "
                          f"{share:>6} requests:", end="", flush=True)
                    part = await runCase(driver, replace(case, requests=share), warmup, meter)
                    print(f" {part.rate:>7,.0f} req/s  p50 {part.percentile(50):6.2f} ms  "
                          f"{sum(part.errors.values())} errors", flush=True)
                    key = (case.name, case.concurrency, driver.path)
                    if key not in results:
                        results[key] = Result(case, driver.path, [], collections.Counter(),
                                              0.0, {})
                    results[key].add(part)
    finally:
        for amqp in amqps:
            await amqp.close()
    order = [d.path for d in drivers]
    return sorted(results.values(), key=lambda r: (cases.index(r.case), order.index(r.path)))


# Output


def printTable(results: list[Result], connections: int) -> None:
    rates = {(r.case.name, r.case.concurrency, r.path): r.rate for r in results}
    header: tuple[str, ...] = ("case", "path", "conc", "requests", "req/s", "p50 ms", "p99 ms",
                               "errors", "gw/amqp")
    rows: list[tuple[str, ...]] = []
    for r in results:
        ceiling = rates.get((r.case.name, r.case.concurrency, "amqp-only"))
        ratio = (f"{r.rate / ceiling:.2f}" if r.path == "gateway" and ceiling else "")
        rows.append((r.case.name, r.path, str(r.case.concurrency), str(r.completed),
                     f"{r.rate:,.0f}", f"{r.percentile(50):.2f}", f"{r.percentile(99):.2f}",
                     str(sum(r.errors.values())), ratio))
    _table(header, rows)
    print(f"(gateway path: concurrency c over min(c, {connections}) WebSocket connection(s); "
          "latency = request frame sent -> terminal frame received)")

    cpuNames = [n for n in ("gateway", "worker", "bare-worker", "bare-stack-gw",
                            "bare-stack-worker", "broker", "client")
                if any(r.cpu.get(n) is not None for r in results)]
    header = ("case", "path", "conc", *(f"{n} ms/req" for n in cpuNames), "other load")
    rows = []
    for r in results:
        n = max(1, r.completed)
        cells = []
        for name in cpuNames:
            value = r.cpu.get(name)
            cells.append("" if value is None else f"{value * 1000 / n:.3f}")
        other = r.cpu.get("other")
        cells.append("" if other is None or not r.elapsed else f"{other / r.elapsed:.0%} core")
        rows.append((r.case.name, r.path, str(r.case.concurrency), *cells))
    print()
    print("CPU time per request (from /proc; 'other load' = busy CPU not used by the "
          "processes listed, i.e. other users of this machine):")
    _table(header, rows)


def printRatios(results: list[Result]) -> None:
    """The whole stack against the floor: what relaybus costs over plain pika RPC on the same
    broker (gateway path), and how much of that is the relaybus worker and wire format alone
    (amqp-only path)."""
    rates = {(r.case.name, r.case.concurrency, r.path): r.rate for r in results}
    keys = sorted({(r.case.name, r.case.concurrency) for r in results if r.path == "bare pika"},
                  key=lambda k: (k[0] != "echo", k[1]))
    rows = []
    for name, concurrency in keys:
        floor = rates[(name, concurrency, "bare pika")]
        cells = [f"{rates[(name, concurrency, p)] / floor:.2f}"
                 if floor and (name, concurrency, p) in rates else ""
                 for p in ("gateway", "amqp-only", "bare stack")]
        stack = rates.get((name, concurrency, "bare stack"))
        gateway = rates.get((name, concurrency, "gateway"))
        cells.append(f"{gateway / stack:.2f}" if stack and gateway else "")
        rows.append((name, str(concurrency), *cells))
    if rows:
        print("\nThroughput (req/s) against bare pika, same case and concurrency:")
        _table(("case", "conc", "whole stack (gateway path) / bare pika",
                "amqp-only / bare pika", "bare stack / bare pika",
                "whole stack / bare stack"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in
                     enumerate(zip(header, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in
                        enumerate(zip(row, widths, strict=True))))


def printOutliers(results: list[Result]) -> None:
    """One at a time, nothing should take 20 ms; when something does, it is worth a look
    (40 ms is the signature of Nagle's algorithm meeting a delayed ACK)."""
    slow = [(r, [x for x in r.latencies if x > 0.020]) for r in results
            if r.case.concurrency == 1]
    slow = [(r, s) for r, s in slow if s]
    if slow:
        print("\nOutliers at concurrency 1 (requests over 20 ms):")
        for r, s in slow:
            print(f"  {r.case.name} {r.path}: {len(s)} of {len(r.latencies)} "
                  f"({len(s) / len(r.latencies):.2%}), median of those "
                  f"{sorted(s)[len(s) // 2] * 1000:.1f} ms, max {max(s) * 1000:.1f} ms")


def printErrors(results: list[Result]) -> None:
    failing = [r for r in results if r.errors]
    if not failing:
        print("\nEvery measured request got exactly one terminal frame, and it was a success.")
        return
    print("\nErrors:")
    for r in failing:
        print(f"  {r.case.name} c={r.case.concurrency} {r.path}:")
        for text, count in r.errors.most_common(5):
            print(f"    {count} x {text}")
        if len(r.errors) > 5:
            print(f"    ... and {len(r.errors) - 5} other kinds")


def drawChart(results: list[Result], path: str) -> None:
    """Per case, req/s and latency (p50 solid, p99 dashed) against concurrency, a line per
    path: where each path saturates, and what its queueing costs in latency."""
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    caseNames = list(dict.fromkeys(r.case.name for r in results))
    paths = list(dict.fromkeys(r.path for r in results))
    figure, axes = plt.subplots(len(caseNames), 2, figsize=(11, 4 * len(caseNames)),
                                squeeze=False)
    for row, name in enumerate(caseNames):
        throughput, latency = axes[row]
        for index, pathName in enumerate(paths):
            points = sorted(((r.case.concurrency, r) for r in results
                             if r.case.name == name and r.path == pathName),
                            key=lambda point: point[0])
            if not points:
                continue
            levels = [c for c, _ in points]
            colour = f"C{index}"
            throughput.plot(levels, [r.rate for _, r in points], "o-", color=colour,
                            label=pathName)
            latency.plot(levels, [r.percentile(50) for _, r in points], "o-", color=colour,
                         label=f"{pathName} p50")
            latency.plot(levels, [r.percentile(99) for _, r in points], "x--", color=colour,
                         label=f"{pathName} p99")
        throughput.set(title=f"{name}: throughput", xlabel="requests in flight",
                       ylabel="requests/s", xscale="log")
        latency.set(title=f"{name}: latency", xlabel="requests in flight", ylabel="ms",
                    xscale="log", yscale="log")
        for axis in (throughput, latency):
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize="small")
    figure.suptitle("relaybus e2e.py: one run on this machine (compare paths, not runs)")
    figure.tight_layout()
    figure.savefig(path)
    print(f"Chart written to {path}")


def profileOptions(process: ServiceProcess) -> list[str]:
    """twistd's own options to run `process` under cProfile, its stats in its log folder."""
    return [f"--profile={process.logPath.with_name('profile.pstats')}", "--profiler=cprofile",
            "--savestats"]


def _where(file: str, line: int, function: str) -> str:
    if file == "~":  # a built-in: "<method 'poll' of 'select.epoll' objects>"
        return function
    for marker in ("/site-packages/", "/src/", f"/python{sys.version_info[0]}."
                   f"{sys.version_info[1]}/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({function})"


def printProfile(process: ServiceProcess, top: int = 25) -> None:
    """The `top` functions by cumulative and by own (total) time. cProfile counts wall time,
    over the process's whole life: start-up, warm-up, and the phases of the other paths,
    when it waits in epoll (the poll line)."""
    path = process.logPath.with_name("profile.pstats")
    if not path.exists():
        print(f"\n{process.name}: no profile in {path} (it did not shut down cleanly?)")
        return
    # {(file, line, function): (primitive calls, calls, own time, cumulative time, callers)}
    stats: dict[tuple[str, int, str], tuple[Any, ...]]
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]  # not in typeshed
    for column, title in ((3, "cumulative"), (2, "total (own)")):
        print(f"\n{process.name}: top {top} functions by {title} time ({path})")
        print(f"{'ncalls':>10} {'tottime':>8} {'cumtime':>8}  function")
        ranked = sorted(stats.items(), key=lambda item: item[1][column], reverse=True)
        for (file, line, function), (_primitive, calls, own, cumulative, _) in ranked[:top]:
            print(f"{calls:>10} {own:8.3f} {cumulative:8.3f}  {_where(file, line, function)}")


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="relaybus end-to-end benchmark: gateway path vs the AMQP-only ceiling "
                    "and bare pika.")
    parser.add_argument("--requests", type=int, default=None,
                        help="measured requests for every case (overrides the two below)")
    parser.add_argument("--requests-serial", type=int, default=6000,
                        help="measured requests for the concurrency-1 cases (default 6000)")
    parser.add_argument("--requests-concurrent", type=int, default=20000,
                        help="measured requests for the concurrent cases (default 20000)")
    parser.add_argument("--concurrency", type=int, default=50,
                        help="requests in flight in the concurrent cases (default 50)")
    parser.add_argument("--connections", type=int, default=1,
                        help="WebSocket connections the concurrent gateway cases spread over "
                             "(default 1: all in flight on one connection)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="split each case's requests over this many rounds, alternating "
                             "the order of the paths (default 3)")
    parser.add_argument("--warmup", type=int, default=200,
                        help="uncounted requests before each case, per path (default 200)")
    parser.add_argument("--cases", default="echo,stream",
                        help="comma-separated subset of: echo, stream, asyncEcho (echo run "
                             "as an asyncio Task; needs --worker-reactor asyncio)")
    parser.add_argument("--gateway-url", default=None,
                        help="drive this existing gateway (ws://HOST:PORT/ws) instead of "
                             "starting one; the AMQP-only and bare pika paths then run only with "
                             "--broker")
    parser.add_argument("--broker", default=None,
                        help="use this broker URL (amqp://...) instead of a throwaway vhost")
    parser.add_argument("--amqp-prefix", default=DEFAULT_PREFIX,
                        help=f"exchange/queue prefix (default {DEFAULT_PREFIX!r})")
    parser.add_argument("--no-worker", action="store_true",
                        help="start no worker (one already serves echo and testRequest on the "
                             "broker with this prefix)")
    parser.add_argument("--worker-concurrency", type=int, default=100,
                        help="the started worker's --concurrency (default 100)")
    parser.add_argument("--no-amqp", action="store_true", help="skip the AMQP-only path")
    parser.add_argument("--no-bare", action="store_true",
                        help="skip the bare pika path (and its worker, "
                             "benchmarks/barepika_worker.py)")
    parser.add_argument("--no-bare-stack", action="store_true",
                        help="skip the bare stack path (benchmarks/bare_stack.py: an Autobahn "
                             "gateway and a Twisted pika worker with no relaybus code)")
    parser.add_argument("--worker-reactor", default=None, metavar="NAME",
                        help="start the relaybus worker and the gateway with twistd --reactor "
                             "NAME (e.g. asyncio; default: twistd's default)")
    parser.add_argument("--profile", action="store_true",
                        help="run the started gateway and relaybus worker under cProfile and "
                             "print their top 25 functions (cumulative and own time) at the end")
    parser.add_argument("--sweep", default=None, metavar="C1,C2,...",
                        help="run every case at each of these concurrencies (e.g. "
                             "1,5,10,25,50,100) instead of 1 and --concurrency")
    parser.add_argument("--chart", default=None, metavar="FILE.svg",
                        help="draw req/s and latency (p50, p99) against concurrency for each "
                             "case and path (needs matplotlib: pip install -e '.[bench]'); "
                             "most useful with --sweep")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.requests is not None:
        args.requests_serial = args.requests_concurrent = args.requests
    if min(args.requests_serial, args.requests_concurrent, args.concurrency,
           args.connections, args.rounds) < 1 or args.warmup < 0:
        parser.error("request counts, concurrency and connections must be positive")
    try:
        args.levels = sorted({1, args.concurrency} if args.sweep is None else
                             {int(level) for level in args.sweep.split(",") if level.strip()})
    except ValueError:
        parser.error("--sweep takes comma-separated integers")
    if not args.levels or min(args.levels) < 1 or max(args.levels) > 1000:
        parser.error("--sweep concurrencies must be 1..1000")
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--chart needs matplotlib: .venv/bin/pip install -e '.[bench]'")
    return args


def makeCases(args: argparse.Namespace) -> list[Case]:
    wanted = {c.strip() for c in args.cases.split(",") if c.strip()}
    cases = []
    for concurrency in args.levels:
        count = args.requests_serial if concurrency == 1 else args.requests_concurrent
        if "echo" in wanted:
            cases.append(Case("echo", "echo", ECHO_PAYLOAD, [], ECHO_PAYLOAD, concurrency,
                              count))
        if "asyncEcho" in wanted:  # echo as an asyncio Task (needs --worker-reactor asyncio)
            cases.append(Case("asyncEcho", "asyncEcho", ECHO_PAYLOAD, [], ECHO_PAYLOAD,
                              concurrency, count))
        if "stream" in wanted:
            cases.append(Case("stream", "testRequest", STREAM_PAYLOAD, STREAM_CHUNKS,
                              STREAM_RESPONSE, concurrency, count))
    if not cases:
        raise SystemExit("--cases names none of: echo, asyncEcho, stream")
    if "asyncEcho" in wanted and args.worker_reactor != "asyncio":
        raise SystemExit("--cases asyncEcho needs --worker-reactor asyncio (an asyncio handler)")
    order = {"echo": 0, "asyncEcho": 1, "stream": 2}
    return sorted(cases, key=lambda c: (order[c.name], c.concurrency))


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    cases = makeCases(args)
    interruptOnSigterm()
    topology = Topology(args.amqp_prefix)
    vhost: str | None = None
    gateway: GatewayProcess | None = None
    worker: WorkerProcess | None = None
    bareWorker: BarePikaWorkerProcess | None = None
    stackGateway: BareStackProcess | None = None
    stackWorker: BareStackProcess | None = None
    results: list[Result] = []
    findings: list[str] = []
    started = time.monotonic()

    def cleanUp() -> None:
        # the gateway first: it must not see workers vanish
        for process in (gateway, stackGateway, worker, bareWorker, stackWorker):
            if process is not None:
                findings.extend(stopAndScan(process))
        if vhost is not None:
            findings.extend(discardVhost(vhost))

    with commandRun("The benchmark", cleanUp) as run:
        brokerURL = args.broker
        if brokerURL is None and args.gateway_url is None:
            vhost = newVhostName("relaybus-bench")
            print(f"Creating RabbitMQ vhost {vhost} ...", flush=True)
            brokerURL = createVhost(vhost)
        common = ["--broker", brokerURL or "", "--amqp-prefix", args.amqp_prefix]
        if brokerURL and not args.no_worker:
            asyncioHandlers = (["--handlers", "workers.asyncio_examples"]
                               if args.worker_reactor == "asyncio" else [])
            worker = WorkerProcess([*common, "--handlers", "workers.examples", *asyncioHandlers,
                                    "--concurrency", str(args.worker_concurrency)],
                                   name="bench-worker", reactor=args.worker_reactor)
            if args.profile:
                worker.twistdOptions = profileOptions(worker)
            print("Starting the worker ...", flush=True)
            worker.start()
            worker.waitUntilReady(timeout=30)
        bare: tuple[str, str] | None = None
        if brokerURL and not args.no_bare:
            bare = (brokerURL, f"bench-bare-pika-{secrets.token_hex(4)}")
            bareWorker = BarePikaWorkerProcess(*bare)
            print("Starting the bare pika worker ...", flush=True)
            bareWorker.start()
            bareWorker.waitUntilReady(timeout=30)
        bareStackURL: str | None = None
        if brokerURL and not args.no_bare_stack:
            stackArgs = ["--url", brokerURL, "--queue", f"bench-bare-stack-{secrets.token_hex(4)}"]
            stackWorker = BareStackProcess("worker", stackArgs)
            stackGateway = BareStackProcess("gateway", stackArgs)
            print("Starting the bare stack's worker and gateway ...", flush=True)
            stackWorker.start()
            stackWorker.waitUntilReady(timeout=30)
            stackGateway.start()
            stackGateway.waitUntilReady(timeout=30)
            bareStackURL = stackGateway.url
        gatewayURL = args.gateway_url
        if gatewayURL is None:
            gateway = GatewayProcess(common, name="bench-gateway", reactor=args.worker_reactor)
            if args.profile:
                gateway.twistdOptions = profileOptions(gateway)
            print("Starting the gateway ...", flush=True)
            gateway.start()
            gateway.waitUntilReady(timeout=30)
            gatewayURL = gateway.url
        elif not brokerURL:
            print("No --broker: the AMQP-only and bare pika paths are skipped (they need the "
                  "gateway's broker).")
        pids: dict[str, int | None] = {
            name: process.process.pid if process and process.process else None
            for name, process in (("gateway", gateway), ("worker", worker),
                                  ("bare-worker", bareWorker),
                                  ("bare-stack-gw", stackGateway),
                                  ("bare-stack-worker", stackWorker))}
        pids["broker"] = brokerPid()
        amqpURL = None if args.no_amqp else brokerURL
        paths = [p for p, on in (("gateway", True), ("amqp-only", amqpURL), ("bare pika", bare),
                                 ("bare stack", bareStackURL)) if on]
        print(f"Load average before: {os.getloadavg()[0]:.2f}. Running {len(cases)} cases x "
              f"{len(paths)} paths ({', '.join(paths)}; twistd reactor: "
              f"{args.worker_reactor or 'default'}{', profiled' if args.profile else ''}):",
              flush=True)
        try:
            results = asyncio.run(runAll(cases, gatewayURL, amqpURL, bare, bareStackURL, topology,
                                         args.connections, args.warmup, args.rounds, pids))
        finally:  # closing the loop reset SIGTERM to its default (die without cleaning up)
            interruptOnSigterm()
        print(f"Load average after: {os.getloadavg()[0]:.2f}\n")
        printTable(results, args.connections)
        printRatios(results)
        printOutliers(results)
        printErrors(results)
        if args.chart:
            drawChart(results, args.chart)
        if any(r.errors for r in results):
            run.status = 1
        if args.json:
            with open(args.json, "w") as f:
                json.dump([{"case": r.case.name, "path": r.path,
                            "concurrency": r.case.concurrency, "requests": r.completed,
                            "reqPerS": r.rate, "meanMs": r.meanMs,
                            "p50Ms": r.percentile(50), "p90Ms": r.percentile(90),
                            "p99Ms": r.percentile(99), "p999Ms": r.percentile(99.9),
                            "maxMs": r.percentile(100),
                            "over20Ms": sum(1 for x in r.latencies if x > 0.020),
                            "errors": dict(r.errors),
                            "cpuS": r.cpu} for r in results], f, indent=2)
    if findings:
        print("\nAnomalies in the processes' logs and state:")
        for line in findings[:40]:
            print(f"  {line}")
        if len(findings) > 40:
            print(f"  ... and {len(findings) - 40} more")
    if args.profile:
        for profiled in (gateway, worker):
            if profiled is not None:
                printProfile(profiled)
    for launched in (gateway, worker, bareWorker, stackGateway, stackWorker):
        if launched is not None:
            print(f"{launched.name} log: {launched.logPath}")
    print(f"Total time {time.monotonic() - started:.0f} s.")
    return run.status


if __name__ == "__main__":
    sys.exit(main())
