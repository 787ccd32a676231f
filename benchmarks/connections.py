"""Connections benchmark: what many WebSocket connections cost one gateway.

    .venv/bin/python benchmarks/connections.py [--connections N] [--load-connections M] ...

1. Idle: opens N connections (K handshakes in flight) and lets them sit for a window while the
   gateway's auto-ping pings them: handshakes/s, the gateway's RSS per connection, its CPU while
   idle (per ping round).
2. Low-rate load: M connections, each sending an `echo` every S seconds (jittered) for a window:
   requests sent and answered, error frames, latency percentiles, the gateway's CPU.

By default it starts one gateway as a real twistd process (`twistd relaybus` with no --broker:
the embedded bus and the example handlers, no RabbitMQ) and stops it at the end, also on Ctrl-C
or failure. The client is the `websockets` library's asyncio client, every connection in this
one process. It prints figures only: no targets, no pass/fail. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import resource
import signal
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from e2e import CpuMeter, printProfile, profileOptions
from relaybus.harness import (
    GatewayProcess,
    commandRun,
    endedByOutcome,
    interruptOnSigterm,
    openGatewaySocket,
    parseMetrics,
    stopAndScan,
)

REQUEST_TIMEOUT_MS = 10_000  # sent as timeoutMs; far above any latency a healthy run sees
DRAIN_S = REQUEST_TIMEOUT_MS / 1000 + 5  # after the window, how long answers may still come
HANDSHAKE_TIMEOUT_S = 30  # websockets' open_timeout, per connection (200 wait their turn)
FD_MARGIN = 64  # descriptors this process needs besides its sockets
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+([+-]\d{4}|Z)? ")  # of a twistd log line
NUMBER = re.compile(r"\b[0-9a-f]{8,}\b|\d+")  # ids, ports, counts: blanked to group lines
SETTLE_MAX_S = 15.0  # the longest wait for the gateway to go quiet before reading its RSS


# What /proc says about a process and the machine


def procStatusKiB(pid: int | None, name: str) -> int | None:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def openFileLimit(pid: int) -> str:
    """The soft 'Max open files' of a process, from /proc/<pid>/limits."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
    except OSError:
        pass
    return "?"


def listenCounters() -> dict[str, int]:
    """TcpExt ListenOverflows and ListenDrops (the whole network namespace): a handshake that
    found the gateway's accept queue full waits for a SYN retransmit (1 s, then 3 s...)."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    values = dict(zip(lines[0][1:], (int(v) for v in lines[1][1:]), strict=True))
    return {k: values.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}


def unreadBytes(port: int) -> tuple[int, int]:
    """Bytes that arrived and wait to be read, summed over the TCP sockets of this host's
    connections to `port` (/proc/net/tcp*): (at the gateway's end, at the clients' end). A
    process that falls behind leaves its input in the kernel, where no timer of its own sees
    it."""
    gatewaySide = clientSide = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = [line.split() for line in f][1:]
        except OSError:
            continue
        for row in rows:  # sl, local address:port, remote address:port, st, tx:rx queues
            local, remote = (int(address.rsplit(":", 1)[1], 16) for address in row[1:3])
            unread = int(row[4].split(":")[1], 16)
            if local == port:
                gatewaySide += unread
            elif remote == port:
                clientSide += unread
    return gatewaySide, clientSide


def raiseFileLimit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (each connection is a
    descriptor; the started gateway inherits the limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# The gateway under test


@dataclass
class Target:
    url: str
    pid: int | None  # None: an existing gateway whose pid was not given (no RSS or CPU)

    @property
    def metricsURL(self) -> str:
        parts = urllib.parse.urlsplit(self.url)
        scheme = "https" if parts.scheme == "wss" else "http"
        return urllib.parse.urlunsplit((scheme, parts.netloc, "/metrics", "", ""))

    def metrics(self) -> dict[str, float] | None:
        """The gateway's /metrics, or None when it serves none."""
        try:
            with urllib.request.urlopen(self.metricsURL, timeout=10) as r:
                return parseMetrics(r.read().decode("utf-8"))
        except OSError:
            return None

    def openConnections(self) -> str:
        """The gateway's own count of open connections (relaybus_connections)."""
        samples = self.metrics()
        value = None if samples is None else samples.get("relaybus_connections")
        return "?" if value is None else f"{value:,.0f}"

    def rssKiB(self) -> int | None:
        return procStatusKiB(self.pid, "VmRSS")


async def settle(target: Target, meter: CpuMeter) -> None:
    """Wait until the gateway is quiet (under 5 % of a core over half a second, at most
    SETTLE_MAX_S), so its RSS is read once the handshakes' garbage is collected and its idle
    CPU is not the tail of the handshakes."""
    if target.pid is None:
        await asyncio.sleep(2)
        return
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline:
        before = meter.snapshot()
        await asyncio.sleep(0.5)
        used = CpuMeter.delta(before, meter.snapshot()).get("gateway")
        if used is None or used < 0.025:
            return


# Opening connections


class CountingConnection(ClientConnection):
    """websockets' client connection, counting the gateway's pings. websockets answers a ping
    itself, in data_received, whether or not anyone reads the connection."""

    pingsReceived = 0

    def process_event(self, event: Event) -> None:
        if isinstance(event, Frame) and event.opcode is Opcode.PING:
            self.pingsReceived += 1
        super().process_event(event)


@dataclass
class Quarter:
    """One quarter of the connections, as they opened: how fast, and what CPU it took."""

    handshakes: int
    seconds: float
    cpu: dict[str, float | None]


@dataclass
class Opened:
    connections: list[CountingConnection] = field(default_factory=list)
    handshakes: list[float] = field(default_factory=list)  # connect -> hello, seconds, each
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    quarters: list[Quarter] = field(default_factory=list)
    seconds: float = 0.0  # from the first connect to the last hello (or failure)
    cpu: dict[str, float | None] = field(default_factory=dict)  # over those seconds

    def rate(self) -> float:
        return len(self.connections) / self.seconds if self.seconds else 0.0


async def openConnections(url: str, count: int, concurrency: int, meter: CpuMeter) -> Opened:
    """`count` connections, `concurrency` handshakes at a time; each is done when its hello
    frame is in. A failed handshake is counted, not fatal. The figures of each quarter show
    whether a handshake costs more as the connections add up."""
    opened = Opened()
    remaining = count
    quarter = max(1, count // 4)
    start = time.perf_counter()
    first = mark = meter.snapshot()
    markedAt = start

    def endQuarter(now: float) -> None:
        nonlocal mark, markedAt
        snapshot = meter.snapshot()
        done = len(opened.connections) - sum(q.handshakes for q in opened.quarters)
        opened.quarters.append(Quarter(done, now - markedAt, CpuMeter.delta(mark, snapshot)))
        mark, markedAt = snapshot, now

    async def opener() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            began = time.perf_counter()
            try:
                ws, _hello = await openGatewaySocket(
                    url, ping_interval=None, open_timeout=HANDSHAKE_TIMEOUT_S,
                    create_connection=CountingConnection)
            except Exception as e:  # any kind of refusal or failure is a figure of the run
                opened.failures[f"{type(e).__name__}: {e}"[:160]] += 1
                continue
            now = time.perf_counter()
            assert isinstance(ws, CountingConnection)
            opened.connections.append(ws)
            opened.handshakes.append(now - began)
            if len(opened.connections) % quarter == 0 and len(opened.quarters) < 3:
                endQuarter(now)

    await asyncio.gather(*(opener() for _ in range(min(concurrency, count))))
    now = time.perf_counter()
    endQuarter(now)
    opened.seconds = now - start
    opened.cpu = CpuMeter.delta(first, mark)
    return opened


async def closeAll(connections: list[CountingConnection]) -> float:
    """Close them all (the close handshake, at once); returns the seconds it took."""
    began = time.perf_counter()
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    return time.perf_counter() - began


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def spread(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    return " / ".join(f"{percentile(ordered, p) * 1000:,.1f}" for p in (50, 90, 99, 100))


def cpuLine(used: dict[str, float | None], seconds: float) -> str:
    """CPU over a window as % of one core: the gateway, this client, and the rest of the
    machine (someone else on the shared machine)."""
    parts = [f"{name} {value / seconds * 100:.1f} %" for name in ("gateway", "client", "other")
             if (value := used.get(name)) is not None]
    return ", ".join(parts)


def perHandshake(cpu: dict[str, float | None], count: int, name: str) -> str:
    value = cpu.get(name)
    return "?" if value is None or not count else f"{value / count * 1000:.2f}"


def printOpened(opened: Opened, wanted: int, listen: dict[str, int]) -> None:
    count = len(opened.connections)
    print(f"  opened {count:,} of {wanted:,} in {opened.seconds:.1f} s: "
          f"{opened.rate():,.0f} handshakes/s")
    print(f"  one handshake, connect to hello, p50 / p90 / p99 / max ms: "
          f"{spread(opened.handshakes)}")
    print(f"  CPU per handshake: gateway {perHandshake(opened.cpu, count, 'gateway')} ms, "
          f"client {perHandshake(opened.cpu, count, 'client')} ms "
          f"({cpuLine(opened.cpu, opened.seconds)} while opening)")
    quarters = opened.quarters
    cpu = ("" if opened.cpu.get("gateway") is None else "; gateway ms per handshake: "
           + " / ".join(perHandshake(q.cpu, q.handshakes, "gateway") for q in quarters))
    print("  by quarter, handshakes/s: "
          + " / ".join(f"{q.handshakes / q.seconds:,.0f}" if q.seconds else "?" for q in quarters)
          + cpu)
    if any(listen.values()):
        print(f"  the accept queue overflowed: ListenOverflows +{listen['ListenOverflows']:,}, "
              f"ListenDrops +{listen['ListenDrops']:,} (machine-wide counters; those handshakes "
              f"waited for a SYN retransmit, 1 s or more)")
    for text, n in opened.failures.most_common(5):
        print(f"  FAILED {n:,} x {text}")


def listenDelta(before: dict[str, int]) -> dict[str, int]:
    after = listenCounters()
    return {k: after[k] - before[k] for k in before}


# Phase 1: idle connections


async def idlePhase(args: argparse.Namespace, target: Target) -> int:
    """Returns the failures: handshakes that failed, connections lost during the window."""
    meter = CpuMeter({"gateway": target.pid})
    print(f"\nIdle: {args.connections:,} connections, {args.handshake_concurrency} handshakes "
          f"in flight, then {args.idle_seconds:g} s idle", flush=True)
    await settle(target, meter)
    rssBefore = target.rssKiB()
    listen = listenCounters()
    opened = await openConnections(target.url, args.connections, args.handshake_concurrency,
                                   meter)
    printOpened(opened, args.connections, listenDelta(listen))
    connections = opened.connections
    count = len(connections)

    await settle(target, meter)
    rssAfter = target.rssKiB()
    clientRss = procStatusKiB(os.getpid(), "VmRSS") or 0
    if rssBefore is not None and rssAfter is not None and count:
        print(f"  gateway RSS {rssBefore / 1024:,.1f} -> {rssAfter / 1024:,.1f} MiB: "
              f"{(rssAfter - rssBefore) / count:.1f} KiB per connection (client RSS "
              f"{clientRss / 1024:,.0f} MiB, {clientRss / max(count, 1):.1f} KiB per "
              f"connection)")
    print(f"  the gateway counts {target.openConnections()} connections open", flush=True)

    pingsBefore = sum(c.pingsReceived for c in connections)
    cpuBefore = meter.snapshot()
    await asyncio.sleep(args.idle_seconds)
    used = CpuMeter.delta(cpuBefore, meter.snapshot())
    pings = sum(c.pingsReceived for c in connections) - pingsBefore
    stillOpen = sum(1 for c in connections if c.state is State.OPEN)
    rounds = pings / count if count else 0.0
    print(f"  idle {args.idle_seconds:g} s: {cpuLine(used, args.idle_seconds)}; "
          f"{pings:,} pings answered ({rounds:.2f} per connection)")
    gatewayCpu = used.get("gateway")
    if gatewayCpu is not None and pings:
        print(f"  gateway CPU per ping round ({count:,} pings): {gatewayCpu / rounds * 1000:,.0f}"
              f" ms, {gatewayCpu / pings * 1e6:.1f} us per ping (every idle cost included)")
    lost = count - stillOpen
    if lost:
        print(f"  FAILED: {lost:,} connections closed during the idle window")
    print(f"  {stillOpen:,} still open at the end; closing them ...", flush=True)
    closing = await closeAll(connections)
    await settle(target, meter)
    rssClosed = target.rssKiB()
    memory = f", gateway RSS now {rssClosed / 1024:,.1f} MiB" if rssClosed is not None else ""
    print(f"  closed in {closing:.1f} s{memory}; the gateway counts "
          f"{target.openConnections()} open")
    return sum(opened.failures.values()) + lost


# Phase 2: low-rate load


def echoPayload(n: int) -> dict[str, Any]:
    return {"message": "hello relaybus", "n": n}


@dataclass
class LoadTally:
    sent: int = 0
    answered: int = 0  # responses with the right data
    answeredBy: float = 0.0  # answers counted until this time (perf_counter) go in
    answeredInWindow: int = 0  # ... this count: does the gateway keep up with the sends?
    latencies: list[float] = field(default_factory=list)  # request frame -> response, seconds
    lags: list[float] = field(default_factory=list)  # how late each send left, seconds
    errorFrames: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: collections.Counter[str] = field(default_factory=collections.Counter)


class EchoConnection:
    """One connection of the load: sends an echo every `interval` seconds on average (uniform
    in 0.5-1.5 times it, from a random phase: an open loop, not waiting for answers)."""

    def __init__(self, ws: ClientConnection, tally: LoadTally) -> None:
        self.ws = ws
        self.tally = tally
        self.pending: dict[str, tuple[float, int]] = {}  # requestId -> (sent at, n)
        self.closing = False
        self._next = 0
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        tally = self.tally
        try:
            async for raw in self.ws:
                now = time.perf_counter()
                frame = json.loads(raw)
                kind, requestId = frame.get("type"), frame.get("requestId")
                entry = self.pending.pop(requestId, None) if isinstance(requestId, str) else None
                if kind == "error":
                    error = frame.get("error") or {}
                    tally.errorFrames[str(error.get("code"))] += 1
                elif entry is None:
                    tally.failures[f"a {kind} frame for no request in flight"] += 1
                elif kind != "response":
                    tally.failures[f"an unexpected {kind} frame"] += 1
                elif frame.get("data") != echoPayload(entry[1]):
                    tally.failures["a response with the wrong data"] += 1
                else:
                    tally.answered += 1
                    tally.latencies.append(now - entry[0])
                    if now <= tally.answeredBy:
                        tally.answeredInWindow += 1
        except ConnectionClosed:
            pass
        finally:
            if not self.closing:
                tally.failures["the gateway closed the connection during the load"] += 1
            if self.pending:
                tally.failures["the connection closed under the request"] += len(self.pending)
                self.pending.clear()

    async def send(self, startAt: float, endAt: float, interval: float,
                   rng: random.Random) -> None:
        loop = asyncio.get_running_loop()
        due = startAt + rng.uniform(0, interval)
        while due < endAt:
            await asyncio.sleep(due - loop.time())
            self.tally.lags.append(loop.time() - due)
            self._next += 1
            requestId = f"e{self._next}"
            text = json.dumps({"type": "request", "requestId": requestId, "requestType": "echo",
                               "payload": echoPayload(self._next),
                               "timeoutMs": REQUEST_TIMEOUT_MS}, separators=(",", ":"))
            self.pending[requestId] = (time.perf_counter(), self._next)
            try:
                await self.ws.send(text)
            except ConnectionClosed:
                self.pending.pop(requestId, None)
                self.tally.failures["could not send: the connection is closed"] += 1
                return
            self.tally.sent += 1
            due += interval * rng.uniform(0.5, 1.5)

    async def close(self) -> None:
        self.closing = True
        await self.ws.close()
        await asyncio.gather(self.reader, return_exceptions=True)


async def loadPhase(args: argparse.Namespace, target: Target) -> int:
    """Returns the failed requests (error frames included) and lost connections."""
    meter = CpuMeter({"gateway": target.pid})
    count, interval, seconds = args.load_connections, args.interval, args.load_seconds
    print(f"\nLoad: {count:,} connections, each an echo every {interval:g} s (jittered, "
          f"{count / interval:,.0f} req/s in all) for {seconds:g} s", flush=True)
    await settle(target, meter)
    listen = listenCounters()
    opened = await openConnections(target.url, count, args.handshake_concurrency, meter)
    printOpened(opened, count, listenDelta(listen))
    tally = LoadTally()
    connections = [EchoConnection(ws, tally) for ws in opened.connections]
    await settle(target, meter)
    endedBefore = endedByOutcome(target.metrics() or {})

    loop = asyncio.get_running_loop()
    startAt = loop.time() + 0.5
    endAt = startAt + seconds
    rng = random.Random()
    senders = [loop.create_task(c.send(startAt, endAt, interval, rng)) for c in connections]
    await asyncio.sleep(startAt - loop.time())
    cpuBefore = meter.snapshot()
    tally.answeredBy = time.perf_counter() + seconds
    await asyncio.sleep(endAt - loop.time())
    used = CpuMeter.delta(cpuBefore, meter.snapshot())
    inFlight = sum(len(c.pending) for c in connections)
    port = urllib.parse.urlsplit(target.url).port
    local = urllib.parse.urlsplit(target.url).hostname in ("127.0.0.1", "localhost", "::1")
    unread = unreadBytes(port) if port and local else None
    await asyncio.gather(*senders)
    deadline = loop.time() + DRAIN_S
    while loop.time() < deadline and any(c.pending for c in connections):
        await asyncio.sleep(0.1)
    unanswered = sum(len(c.pending) for c in connections)
    if unanswered:
        tally.failures[f"no answer within {DRAIN_S:.0f} s of the window's end"] += unanswered
    for c in connections:
        c.pending.clear()
    endedAfter = endedByOutcome(target.metrics() or {})

    errors = sum(tally.errorFrames.values())
    failed = errors + sum(tally.failures.values())
    print(f"  requests sent {tally.sent:,} ({tally.sent / seconds:,.0f}/s), answered "
          f"{tally.answered:,}, error frames {errors:,}, other failures "
          f"{sum(tally.failures.values()):,}")
    print(f"  latency p50 / p90 / p99 / max ms: {spread(tally.latencies)} (send lag, how late "
          f"the client sent against its schedule: {spread(tally.lags)})")
    print(f"  answered during the window {tally.answeredInWindow / seconds:,.0f}/s; at its end "
          f"{inFlight:,} requests in flight"
          + ("" if unread is None else f", unread in the kernel: {unread[0] / 1024:,.0f} KiB at "
             f"the gateway's end, {unread[1] / 1024:,.0f} KiB at the client's"))
    print(f"  CPU during the window: {cpuLine(used, seconds)}")
    gatewayCpu = used.get("gateway")
    if gatewayCpu is not None and tally.answeredInWindow:
        # per answer, not per send: a gateway that falls behind spends its CPU on fewer
        print(f"  gateway CPU per request answered in the window: "
              f"{gatewayCpu / tally.answeredInWindow * 1000:.2f} ms (its pings included)")
    ended = {k: v - endedBefore.get(k, 0) for k, v in endedAfter.items()
             if v - endedBefore.get(k, 0)}
    if ended:
        print("  the gateway ended: "
              + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(ended.items())))
    for text, n in tally.errorFrames.most_common(5):
        print(f"  FAILED {n:,} x error frame {text}")
    for text, n in tally.failures.most_common(5):
        print(f"  FAILED {n:,} x {text}")
    began = time.perf_counter()
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)
    print(f"  closed in {time.perf_counter() - began:.1f} s; the gateway counts "
          f"{target.openConnections()} open")
    return failed + sum(opened.failures.values())


async def runPhases(args: argparse.Namespace, target: Target) -> int:
    # SIGTERM cancels this task, as asyncio.run does for SIGINT (Ctrl-C), so the cleanup runs
    # from a well-defined point (as in e2e.py: not an exception inside websockets' internals)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    failures = 0
    if not args.skip_idle:
        failures += await idlePhase(args, target)
    if not args.skip_load:
        failures += await loadPhase(args, target)
    return failures


# The command line


def _positiveInt(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positiveFloat(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def parseArguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="relaybus connections benchmark: many idle WebSocket connections, then "
                    "many connections under a low request rate.")
    parser.add_argument("--connections", type=_positiveInt, default=19_000,
                        help="idle connections to open (default 19000)")
    parser.add_argument("--handshake-concurrency", type=_positiveInt, default=200,
                        help="handshakes in flight while opening (default 200)")
    parser.add_argument("--idle-seconds", type=_positiveFloat, default=30.0,
                        help="how long the idle connections sit (default 30)")
    parser.add_argument("--auto-ping-interval", type=_positiveFloat, default=5.0,
                        help="the started gateway's --auto-ping-interval, so the idle window "
                             "sees pings (default 5)")
    parser.add_argument("--listen-backlog", type=_positiveInt, default=None,
                        help="the started gateway listens with this backlog (its accept queue; "
                             "default: twistd's, 50)")
    parser.add_argument("--load-connections", type=_positiveInt, default=10_000,
                        help="connections of the load phase (default 10000)")
    parser.add_argument("--interval", type=_positiveFloat, default=3.0,
                        help="mean seconds between one connection's requests (default 3)")
    parser.add_argument("--load-seconds", type=_positiveFloat, default=30.0,
                        help="how long the load runs (default 30)")
    parser.add_argument("--gateway-url", default=None,
                        help="drive this existing gateway (ws://HOST:PORT/ws) instead of "
                             "starting one; it must serve echo and admit enough connections")
    parser.add_argument("--gateway-pid", type=int, default=None,
                        help="with --gateway-url: its process id, for its RSS and CPU")
    parser.add_argument("--profile", action="store_true",
                        help="run the started gateway under cProfile and print its top 25 "
                             "functions at the end (slows it several-fold)")
    parser.add_argument("--skip-idle", action="store_true", help="skip the idle phase")
    parser.add_argument("--skip-load", action="store_true", help="skip the load phase")
    args = parser.parse_args(argv)
    if args.skip_idle and args.skip_load:
        parser.error("--skip-idle and --skip-load leave nothing to do")
    if args.gateway_pid is not None and args.gateway_url is None:
        parser.error("--gateway-pid goes with --gateway-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parseArguments(argv)
    interruptOnSigterm()
    limit = raiseFileLimit()
    needed = max(0 if args.skip_idle else args.connections,
                 0 if args.skip_load else args.load_connections)
    if needed + FD_MARGIN > limit:
        raise SystemExit(f"{needed:,} connections need {needed + FD_MARGIN:,} descriptors; this "
                         f"process may open {limit:,} (its hard RLIMIT_NOFILE, and a started "
                         f"gateway's too)")
    gateway: GatewayProcess | None = None
    findings: list[str] = []
    started = time.monotonic()

    def cleanUp() -> None:
        if gateway is not None:
            findings.extend(stopAndScan(gateway))

    with commandRun("The benchmark", cleanUp) as run:
        if args.gateway_url is not None:
            target = Target(args.gateway_url, args.gateway_pid)
            if target.pid is None:
                print("No --gateway-pid: the gateway's RSS and CPU are not measured.")
        else:
            # an absent --broker would read RELAYBUS_BROKER: keep the embedded bus
            env = {k: v for k, v in os.environ.items() if k != "RELAYBUS_BROKER"}
            options = ["--max-connections", str(needed + 1000),
                       "--auto-ping-interval", str(args.auto_ping_interval)]
            gateway = GatewayProcess(options, env=env, name="conn-gateway")
            if args.listen_backlog is not None:  # a second --listen overrides the harness's
                gateway.args += ["--listen", f"tcp:{gateway.port}:interface=127.0.0.1:"
                                             f"backlog={args.listen_backlog}"]
            if args.profile:
                gateway.twistdOptions = profileOptions(gateway)
            print("Starting the gateway (embedded bus) ...", flush=True)
            gateway.start()
            gateway.waitUntilReady(timeout=30)
            assert gateway.process is not None
            target = Target(gateway.url, gateway.process.pid)
            print(f"Gateway pid {gateway.process.pid}, open files limit "
                  f"{openFileLimit(gateway.process.pid)}, {' '.join(gateway.args)}")
        print(f"Client pid {os.getpid()}, open files limit {limit:,}; load average "
              f"{os.getloadavg()[0]:.2f}", flush=True)
        try:
            failures = asyncio.run(runPhases(args, target))
        finally:  # closing the loop reset SIGTERM to its default (die without cleaning up)
            interruptOnSigterm()
        print(f"\nLoad average after: {os.getloadavg()[0]:.2f}")
        if failures:
            print(f"{failures:,} failures (above): exit status 1")
            run.status = 1
    if findings:
        # the same warning for many connections: the first one, counted
        grouped: dict[str, tuple[str, int]] = {}
        for line in findings:
            line = TIMESTAMP.sub("", line)
            key = NUMBER.sub("#", line)
            first, n = grouped.get(key, (line, 0))
            grouped[key] = (first, n + 1)
        print("\nAnomalies in the gateway's log and state (the first of each kind, counted):")
        for line, n in list(grouped.values())[:40]:
            print(f"  {n:,} x {line}")
        if len(grouped) > 40:
            print(f"  ... and {len(grouped) - 40} other kinds")
    if gateway is not None:
        if args.profile:
            printProfile(gateway)
        print(f"{gateway.name} log: {gateway.logPath}")
    print(f"Total time {time.monotonic() - started:.0f} s.")
    return run.status


if __name__ == "__main__":
    sys.exit(main())
