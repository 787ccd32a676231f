"""`relaybus conformance`: check a running worker (any language) against docs/protocol.md.

It starts nothing of the author's. It starts a real gateway (`twistd relaybus`, a subprocess on
a free port, against the author's broker and prefix) and talks to it over a WebSocket, and it
opens an AMQP connection of its own on which it acts as a gateway, to see exactly what the
worker sends. The worker must serve the four standard requestTypes (conformance.echo, .stream,
.fail, .slow; docs/workers-any-language.md). Each scenario checks sentences of
docs/protocol.md, quoted verbatim in SCENARIOS (a unit test keeps them in sync with the page).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from relaybus.conformance import ECHO, FAIL, REQUEST_TYPES, SLOW, STREAM
from relaybus.conformance.wire import (
    AmqpInteger,
    KitBroker,
    KitError,
    KitSocket,
    ReactorThread,
    Reply,
    safeURL,
)

LATE_REPLIES = "relaybus_late_replies_total"
WORKER_CODES = ("bad_request", "handler_error", "worker_lost", "timeout", "overloaded",
                "shutting_down")
FORBIDDEN_CODES = ("no_handler", "unavailable", "payload_too_large", "unauthorized",
                   "forbidden", "duplicate_request_id", "not_a_relaybus_code")
UNANSWERABLE_BURST = 30  # more than any usual prefetch: a worker that holds them stalls


@attrs.define
class Context:
    """What a scenario works with."""

    broker: KitBroker
    socket: KitSocket
    gateway: Any  # relaybus.harness.GatewayProcess
    openSocket: Callable[[], KitSocket]
    timeoutS: float
    workerPid: int | None
    prefix: str

    def queue(self, requestType: str) -> str:
        return f"{self.prefix}requests.{requestType}"

    def pumpAll(self, seconds: float = 0.0) -> None:
        self.broker.pump(seconds)
        self.socket.pump(0.0)

    def lateReplies(self) -> float:
        return float(self.gateway.metrics().get(LATE_REPLIES, 0.0))

    def settle(self, seconds: float) -> None:
        self.broker.quietFor(seconds, lambda: self.socket.pump(0.0))

    def waitForStableLateReplies(self, what: str) -> None:
        """The gateway's late-reply count stops growing: the worker stopped sending for a
        request the gateway ended (a running stream would keep adding to it)."""
        deadline = time.monotonic() + self.timeoutS
        last = self.lateReplies()
        while True:
            self.settle(0.6)
            now = self.lateReplies()
            if now == last:
                return
            if time.monotonic() >= deadline:
                raise KitError(f"{what}: the worker still sends replies for it "
                               f"{self.timeoutS:g} s later (relaybus_late_replies_total "
                               f"went {last:.0f} -> {now:.0f} in the last 0.6 s)")
            last = now


Check = Callable[[Context], str | None]


@attrs.frozen
class Scenario:
    name: str
    sentences: tuple[str, ...]  # quoted verbatim from docs/protocol.md
    check: Check
    needsPid: bool = False


SCENARIOS: list[Scenario] = []


def scenario(name: str, *sentences: str, needsPid: bool = False) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        SCENARIOS.append(Scenario(name, sentences, check, needsPid))
        return check

    return register


def expect(condition: bool, seen: str) -> None:
    if not condition:
        raise KitError(seen)


def expectCode(outcome: Any, code: str, what: str) -> None:
    expect(outcome.code == code, f"{what}: expected error {code}, got {outcome.describe()}")


def sameJSON(a: Any, b: Any) -> bool:
    """Equal as JSON values: a boolean is not a number, 1 and 1.0 are the same number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(sameJSON(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(sameJSON(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# The scenarios, in the order they run (the last one stops the worker)


@scenario("topology",
          "Gateways and workers both declare all three on every connect, with exactly these "
          "arguments (RabbitMQ refuses a redeclaration that differs, with PRECONDITION_FAILED): "
          "type `direct`, durable, not auto-delete, not internal, no arguments; not passive.",
          "durable, not exclusive, not auto-delete, **no arguments** (every worker must declare "
          "it identically, or RabbitMQ refuses with PRECONDITION_FAILED)",
          "Set `basic.qos(prefetch_count = N)` and consume each request queue with manual acks.")
def topology(ctx: Context) -> str | None:
    topo = ctx.broker.topology
    for exchange in (topo.requestsExchange, topo.responsesExchange, topo.cancelsExchange):
        ctx.broker.exchangeExists(exchange)
        ctx.broker.redeclareExchange(exchange)
    for requestType in REQUEST_TYPES:
        name = ctx.queue(requestType)
        _ready, consumers = ctx.broker.queueCounts(name)
        expect(consumers >= 1, f"queue {name!r} exists but nobody consumes it")
        ctx.broker.redeclareRequestQueue(name)
    return None


ODD_JSON: list[Any] = [
    None, 0, -1, 9007199254740991, -9007199254740991, 1.5e300, -2.5e-300, 5e-324, 0.1,
    "", "plain", True, False, [], {},
    "héllo ✓ \u2603 \U0001f600 e\u0301 \u0000 \u001f \u007f \u2028 \u2029 \"quoted\" \\ /",
    {"ключ": "值", "\U0001f511": ["\U0001f600"], "": "empty key", "a b": {"c.d": None}},
    {"list": [1, 2.5, None, True, "x", [], {}], "nested": {"a": {"b": {"c": [[[]]]}}}},
    {"many": {f"k{i}": i for i in range(300)}},
    "x" * 200_000,
]


def _deep(levels: int) -> Any:
    value: Any = {"bottom": True}
    for i in range(levels):
        value = [value] if i % 2 else {"d": value}
    return value


@scenario("echo",
          "the request's `payload`, JSON, UTF-8",
          "JSON, UTF-8: for `chunk` and `response` the data to hand the client")
def echo(ctx: Context) -> str | None:
    payloads = [*ODD_JSON, _deep(100)]
    ids = [(ctx.socket.request(ECHO, payload, timeoutMs=30_000), payload)
           for payload in payloads]
    for requestId, payload in ids:
        outcome = ctx.socket.collect(requestId)
        expect(outcome.terminal["type"] == "response",
               f"payload {short(payload, 60)}: {outcome.describe()}")
        expect(not outcome.chunks, f"payload {short(payload, 60)}: {len(outcome.chunks)} "
                                   "chunks before the response (conformance.echo sends none)")
        expect(sameJSON(outcome.terminal.get("data"), payload),
               f"sent {short(payload)}, got back {short(outcome.terminal.get('data'))}")
    return f"{len(payloads)} payloads"


@scenario("stream",
          "`seq` counts from 0 and is contiguous per request: 0, 1, 2, ...",
          "Frames for different requests interleave freely; frames of one request arrive in "
          "order.")
def stream(ctx: Context) -> str | None:
    counts = {ctx.socket.request(STREAM, {"count": n, "delayMs": 10}, 30_000): n
              for n in (5, 0, 1, 12)}
    for requestId, n in counts.items():
        outcome = ctx.socket.collect(requestId)
        data = [c.get("data") for c in outcome.chunks]
        expect(data == [{"index": i} for i in range(n)],
               f"count {n}: chunks {short(data)}")
        expect(outcome.terminal.get("type") == "response"
               and outcome.terminal.get("data") == {"count": n},
               f"count {n}: {outcome.describe()}")
    return None


@scenario("reply-format",
          "A worker sends zero or more `chunk`s, then **exactly one** `response` or `error`, "
          "and nothing after it.",
          "chunks only: integer 0, 1, 2, ... per request",
          "Echo it on every reply.",
          "The reply's `content_type` and `delivery_mode` are not looked at (send "
          "`application/json` and 1 anyway).")
def replyFormat(ctx: Context) -> str | None:
    count = 4
    correlationId = ctx.broker.publishRequest(STREAM, {"count": count, "delayMs": 5})
    final = ctx.broker.finalReply(correlationId)
    ctx.settle(0.5)  # anything after the final reply arrives meanwhile
    replies = ctx.broker.repliesOf(correlationId)
    kinds = [r.kind for r in replies]
    expect(kinds == ["chunk"] * count + ["response"],
           f"reply types {kinds}, expected {count} chunks then one response")
    seqs = [r.seq for r in replies[:count]]
    expect(seqs == list(range(count)) and all(type(s) is int for s in seqs),
           f"relaybus-seq headers {seqs}, expected {list(range(count))}")
    expect(final.data == {"count": count}, f"response {final.describe()}")
    for reply in replies:
        expect(reply.properties.content_type == "application/json"
               and reply.properties.delivery_mode == 1,
               f"a {reply.kind} with content_type {reply.properties.content_type!r}, "
               f"delivery_mode {reply.properties.delivery_mode!r}")
    stray = [r.describe() for r in ctx.broker.replies.get("", [])]
    expect(not stray, f"replies without a correlation_id: {stray}")
    return None


@scenario("errors",
          "`error` with code C when C is one a worker may use (`bad_request`, `handler_error`, "
          "`worker_lost`, `timeout`, `overloaded`, `shutting_down`), `handler_error` for any "
          "other code or none; the message M when it is a string",
          "`error` `handler_error` \"the worker cancelled the request by itself: M\"",
          "A body that is not JSON, or a payload the handler rejects: reply `error` "
          "`bad_request`, ack.")
def errors(ctx: Context) -> str | None:
    asked = {}
    for code in (*WORKER_CODES, *FORBIDDEN_CODES, "cancelled"):
        message = f"conformance says {code} ✓"
        asked[ctx.socket.request(FAIL, {"code": code, "message": message}, 30_000)] = (
            code, message)
    for requestId, (code, message) in asked.items():
        outcome = ctx.socket.collect(requestId)
        if code in WORKER_CODES:
            expected, expectedMessage = code, message
        elif code == "cancelled":
            expected = "handler_error"
            expectedMessage = f"the worker cancelled the request by itself: {message}"
        else:
            expected, expectedMessage = "handler_error", message
        expect(outcome.code == expected and outcome.message == expectedMessage,
               f"conformance.fail with {code}: expected {expected} {expectedMessage!r}, "
               f"got {outcome.describe()}")
    for payload in ({"count": "three"}, {"count": -1}, [1, 2], "x"):
        outcome = ctx.socket.collect(ctx.socket.request(STREAM, payload, 30_000))
        expectCode(outcome, "bad_request", f"conformance.stream with payload {short(payload)}")
    # A body that is not JSON at all can only come straight from the broker.
    correlationId = ctx.broker.publishRequest(ECHO, body=b"{not json")
    final = ctx.broker.finalReply(correlationId)
    expect(final.kind == "error" and isinstance(final.data, dict)
           and final.data.get("code") == "bad_request",
           f"a request body that is not JSON: {final.describe()}")
    return None


@scenario("unanswerable",
          "No `correlation_id` or no `reply_to`: it cannot be answered; ack it and drop it.")
def unanswerable(ctx: Context) -> str | None:
    for i in range(UNANSWERABLE_BURST):
        if i % 2:
            ctx.broker.publishRequest(ECHO, {"i": i}, correlationId="")
        else:
            ctx.broker.publishRequest(ECHO, {"i": i}, replyTo="")
    barrier = ctx.broker.publishRequest(ECHO, {"barrier": True})
    try:
        final = ctx.broker.finalReply(barrier)
    except KitError as e:
        raise KitError(f"after {UNANSWERABLE_BURST} requests without correlation_id or "
                       f"reply_to, the next request got no answer ({e}): are they held "
                       "unacked?") from None
    expect(final.kind == "response" and final.data == {"barrier": True},
           f"the request after them: {final.describe()}")
    return None


def _headerCases() -> list[tuple[str, dict[str, Any], bool]]:
    """(case, publishRequest arguments, answered?) for the headers scenario."""
    future = int(time.time() * 1000) + 60_000
    cases: list[tuple[str, dict[str, Any], bool]] = [
        ("deadline as signed 64-bit", {"deadlineMs": AmqpInteger(b"l", future)}, True),
        ("deadline missing", {"dropHeaders": ("relaybus-deadline-ms",)}, True),
        ("deadline void", {"deadlineMs": None}, True),
        ("deadline a string", {"deadlineMs": str(future)}, True),
        ("deadline a double", {"deadlineMs": float(future)}, True),
        ("no expiration, timestamp or type", {"expiration": None,
                                              "dropHeaders": ("relaybus-gateway-id",)}, True),
        ("principal a long string", {"headers": {"relaybus-principal": "alice" * 50}}, True),
        ("principal missing", {"dropHeaders": ("relaybus-principal",)}, True),
        ("claims not JSON", {"headers": {"relaybus-claims": "{not json"}}, True),
        ("claims a JSON array", {"headers": {"relaybus-claims": "[1,2]"}}, True),
        ("claims a table", {"headers": {"relaybus-claims": {"sub": "x"}}}, True),
        ("unknown headers of every type", {"headers": {
            "x-table": {"a": [1, "b", None]}, "x-array": [1, 2], "x-bool": True,
            "x-double": 2.5, "x-bytes": b"\x00\xff", "x-int8": AmqpInteger(b"b", -1),
            "x-void": None}}, True),
    ]
    for kind, value in ((b"b", 1), (b"B", 1), (b"s", 1000), (b"u", 1000), (b"I", 100_000),
                        (b"i", 3_000_000_000), (b"l", 1_000_000_000_000)):
        cases.append((f"deadline in the past as AMQP type {kind.decode()}",
                      {"deadlineMs": AmqpInteger(kind, value), "expiration": None}, False))
    return cases


@scenario("headers",
          "integers may arrive as any AMQP integer type (8 to 64 bits, signed or not), strings "
          "as long strings, and a void/absent value means \"not set\".",
          "A missing or non-integer deadline header means \"no deadline\".",
          "`relaybus-deadline-ms` in the past: ack it and do nothing (the client already got "
          "`timeout`).",
          "A worker that cannot parse it as a JSON object treats it as no claims",
          "Receivers must ignore fields they do not know.")
def headers(ctx: Context) -> str | None:
    sent = []
    for case, arguments, answered in _headerCases():
        payload = {"case": case}
        sent.append((case, ctx.broker.publishRequest(ECHO, payload, **arguments), payload,
                     answered))
    # A request published after all of them, on the same queue, answered: the others have
    # been handled by then (or are held: a worker that runs one at a time would be slower).
    barrier = ctx.broker.publishRequest(ECHO, {"barrier": True})
    ctx.broker.finalReply(barrier)
    for case, correlationId, payload, answered in sent:
        if answered:
            try:
                final = ctx.broker.finalReply(correlationId)
            except KitError:
                raise KitError(f"{case}: no answer") from None
            expect(final.kind == "response" and sameJSON(final.data, payload),
                   f"{case}: {final.describe()}")
    ctx.settle(0.5)
    for case, correlationId, _payload, answered in sent:
        replies = ctx.broker.repliesOf(correlationId)
        if not answered:
            expect(not replies, f"{case}: answered {[r.describe() for r in replies]}, "
                                "expected nothing")
    _ready, _consumers = ctx.broker.queueCounts(ctx.queue(ECHO))
    expect(_ready == 0, f"{_ready} requests still ready in {ctx.queue(ECHO)}")
    return None


@scenario("deadline",
          "At the deadline, stop the work and reply `error` `timeout`.",
          "The request ends with `timeout` when this much time has passed since the gateway "
          "accepted it.")
def deadline(ctx: Context) -> str | None:
    # Straight to the worker: no gateway sends it a cancel notice, its own deadline must act.
    correlationId = ctx.broker.publishRequest(SLOW, {}, timeoutS=0.8)
    final = ctx.broker.finalReply(correlationId, timeoutS=0.8 + ctx.timeoutS)
    expect(final.kind == "error" and isinstance(final.data, dict)
           and final.data.get("code") == "timeout",
           f"conformance.slow with a deadline 0.8 s away: {final.describe()}")
    # Through the gateway, with chunks: the client gets timeout and the chunks stop.
    requestId = ctx.socket.request(SLOW, {"chunkEveryMs": 50}, timeoutMs=800)
    outcome = ctx.socket.collect(requestId, timeoutS=0.8 + ctx.timeoutS)
    expectCode(outcome, "timeout", "conformance.slow with timeoutMs 800")
    ctx.waitForStableLateReplies("after its deadline")
    return None


@scenario("cancel-running",
          "On a notice for a request it is running, the worker stops it, publishes an `error` "
          "`cancelled` (the gateway drops it), and acks the *request's* delivery after that "
          "reply's confirm.")
def cancelRunning(ctx: Context) -> str | None:
    correlationId = ctx.broker.publishRequest(SLOW, {"chunkEveryMs": 50}, timeoutS=60)
    ctx.broker.waitFor(lambda: ctx.broker.repliesOf(correlationId),
                       "first chunk of conformance.slow", pumps=ctx.socket.pump)
    ctx.broker.publishCancel(SLOW, correlationId)
    final = ctx.broker.finalReply(correlationId)
    expect(final.kind == "error" and isinstance(final.data, dict)
           and final.data.get("code") == "cancelled",
           f"after the cancel notice: {final.describe()}")
    ctx.settle(0.5)
    after = ctx.broker.repliesOf(correlationId)
    expect(after[-1] is final, f"replies after the final one: "
                               f"{[r.describe() for r in after[after.index(final) + 1:]]}")
    return None


@scenario("cancel-via-gateway",
          "Ends the request with an `error` frame of code `cancelled` and tells the worker to "
          "stop.",
          "When the connection closes, the gateway cancels every request it had in flight "
          "(workers are told).")
def cancelViaGateway(ctx: Context) -> str | None:
    requestId = ctx.socket.request(SLOW, {"chunkEveryMs": 50}, timeoutMs=60_000)
    ctx.socket.waitForChunks(requestId)
    ctx.socket.cancel(requestId)
    expectCode(ctx.socket.collect(requestId), "cancelled", "the client's cancel")
    ctx.waitForStableLateReplies("after the client's cancel")
    other = ctx.openSocket()
    requestId = other.request(SLOW, {"chunkEveryMs": 50}, timeoutMs=60_000)
    other.waitForChunks(requestId)
    other.close()
    ctx.waitForStableLateReplies("after the client disconnected")
    return None


@scenario("cancel-queued",
          "A notice may arrive before its request (still queued): remember recent notices for "
          "a while (the Python runtime keeps up to 10,000 for 5 minutes) and skip the request "
          "when it arrives.",
          "(replying `cancelled` first is allowed and harmless)")
def cancelQueued(ctx: Context) -> str | None:
    correlationId = "c" * 8 + os.urandom(12).hex()
    ctx.broker.publishCancel(STREAM, correlationId)
    # Best effort: the notice and the request travel through different queues, so nothing
    # orders them; half a second is ample for a notice to be consumed on a quiet broker.
    ctx.settle(0.5)
    ctx.broker.publishRequest(STREAM, {"count": 3}, correlationId=correlationId)
    ctx.broker.waitFor(lambda: ctx.broker.queueCounts(ctx.queue(STREAM))[0] == 0,
                       "the request taken from its queue", pumps=ctx.socket.pump)
    ctx.settle(1.0)
    replies = ctx.broker.repliesOf(correlationId)
    cancelledOnly = all(r.kind == "error" and _code(r) == "cancelled" for r in replies)
    expect(cancelledOnly and len(replies) <= 1,
           f"the worker ran a request cancelled before it arrived: "
           f"{[r.describe() for r in replies]}")
    return "best effort: nothing orders a notice before its request"


def _code(reply: Reply) -> Any:
    data = reply.data
    return data.get("code") if isinstance(data, dict) else None


@scenario("redelivered",
          "`redelivered = true`: a worker may have died while running it. Unless the handler "
          "is idempotent, **do not run it again**: publish an `error` reply with code "
          "`worker_lost`, then ack.")
def redelivered(ctx: Context) -> str | None:
    queueName = ctx.queue(STREAM)
    with ctx.broker.interceptor(queueName) as taken:
        correlationId = ctx.broker.publishRequest(STREAM, {"count": 3})
        ctx.broker.waitFor(lambda: taken, "the request at the kit's own consumer",
                           pumps=ctx.socket.pump)
        expect(not ctx.broker.repliesOf(correlationId),
               "the worker answered a request it was never given")
        method, properties = taken[0]
        expect(properties.correlation_id == correlationId and not method.redelivered,
               f"the kit's consumer got another request ({properties.correlation_id})")
    # Its channel is closed without an ack: the broker hands it to the worker, redelivered.
    final = ctx.broker.finalReply(correlationId)
    replies = ctx.broker.repliesOf(correlationId)
    expect(final.kind == "error" and _code(final) == "worker_lost" and len(replies) == 1,
           f"a redelivered conformance.stream: {[r.describe() for r in replies]}")
    return None


@scenario("sigterm-drain",
          "Shutdown (SIGTERM): `basic.cancel` the request consumers (keep the cancel-notice "
          "consumer), keep running what is in hand",
          "Close the connection and exit 0.",
          needsPid=True)
def sigtermDrain(ctx: Context) -> str | None:
    assert ctx.workerPid is not None
    count = 5
    requestId = ctx.socket.request(STREAM, {"count": count, "delayMs": 300}, timeoutMs=60_000)
    ctx.socket.waitForChunks(requestId)
    os.kill(ctx.workerPid, signal.SIGTERM)
    outcome = ctx.socket.collect(requestId, timeoutS=count * 0.3 + ctx.timeoutS)
    expect(outcome.terminal.get("type") == "response"
           and outcome.terminal.get("data") == {"count": count}
           and len(outcome.chunks) == count,
           f"the stream running at SIGTERM: {outcome.describe()}")
    state = ctx.broker.waitFor(lambda: processExit(ctx.workerPid or 0),
                               f"the exit of process {ctx.workerPid}", pumps=ctx.socket.pump)
    if state == "reaped":
        return "exit status not visible to the kit (its parent reaped it)"
    expect(state == "exit 0", f"the worker ended with {state}")
    return None


def processExit(pid: int) -> str | None:
    """None while the process runs; else "exit N", "killed by signal N", or "reaped" (gone,
    its status collected by its parent). A zombie (not yet reaped) shows its status in
    /proc/PID/stat (Linux)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return "reaped"
    except OSError:
        fields = []
    if fields and fields[0] == "Z":
        status = int(fields[49]) if len(fields) > 49 else 0
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exit {os.WEXITSTATUS(status)}"
    if not fields:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "reaped"
        except PermissionError:
            pass
    return None


# Running them


@attrs.define
class Result:
    scenario: Scenario
    status: str  # "pass", "FAIL", "skipped"
    detail: str | None = None


def runScenarios(ctx: Context, skip: frozenset[str] = frozenset(),
                 scenarios: list[Scenario] | None = None) -> list[Result]:
    """Each in order; a failed topology (no worker there) fails the rest without running
    them, rather than let each wait out its timeouts."""
    results = []
    stopRest: str | None = None
    for each in SCENARIOS if scenarios is None else scenarios:
        if stopRest is not None:
            results.append(Result(each, "FAIL", stopRest))
            continue
        if each.name in skip:
            results.append(Result(each, "skipped", "--skip"))
            continue
        if each.needsPid and ctx.workerPid is None:
            results.append(Result(each, "skipped", "needs --worker-pid"))
            continue
        try:
            note = each.check(ctx)
        except KitError as e:
            results.append(Result(each, "FAIL", str(e)))
        except Exception as e:  # the kit's own failure still names the scenario
            results.append(Result(each, "FAIL", f"{type(e).__name__}: {e}"))
        else:
            results.append(Result(each, "pass", note))
        if each.name == "topology" and results[-1].status == "FAIL":
            stopRest = "not run: the topology is not there (is the worker running?)"
    return results


def formatTable(results: list[Result], width: int = 100) -> str:
    lines = []
    nameWidth = max(len(r.scenario.name) for r in results)
    for result in results:
        lines.append((f"{result.status:<8} {result.scenario.name:<{nameWidth}}"
                      + (f"  ({result.detail})" if result.detail and result.status != "FAIL"
                         else "")).rstrip())
        indent = " " * (9 + nameWidth + 2)
        for sentence in result.scenario.sentences:
            lines.extend(textwrap.wrap(f"\u201c{sentence}\u201d", width, initial_indent=indent,
                                       subsequent_indent=indent + " "))
        if result.status == "FAIL":
            lines.extend(textwrap.wrap(f"seen: {result.detail}", width, initial_indent=indent,
                                       subsequent_indent=indent + "  "))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "FAIL", "skipped")}
    lines.append(f"{len(results)} scenarios: {counts['pass']} passed, {counts['FAIL']} failed, "
                 f"{counts['skipped']} skipped")
    return "\n".join(lines)


def _print(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _gateway(brokerURL: str, prefix: str, timeoutS: float) -> Iterator[Any]:
    from relaybus.harness import GatewayProcess, stopProcess

    gateway = GatewayProcess(["--broker", brokerURL, "--amqp-prefix", prefix,
                              "--drain-timeout", "2"], name="conformance-gateway")
    gateway.start()
    keepLog = True
    try:
        gateway.waitUntilReady(timeout=max(timeoutS, 20.0))
        yield gateway
        keepLog = False
    finally:
        problem = stopProcess(gateway, timeout=15)
        if problem is not None:
            _print(f"The kit's gateway: {problem}")
            keepLog = True
        if keepLog:
            _print(f"The kit's gateway log: {gateway.logPath}")
        else:
            shutil.rmtree(gateway.logPath.parent, ignore_errors=True)


def run(brokerURL: str, prefix: str = "", workerPid: int | None = None,
        timeoutS: float = 10.0, skip: frozenset[str] = frozenset()) -> int:
    """The whole kit: 0 when every scenario passed (or was skipped), 1 when one failed, 2 when
    the kit could not start (no broker, the gateway would not start)."""
    from relaybus.harness import interruptOnSigterm

    _print(f"relaybus conformance: broker {safeURL(brokerURL)}, prefix {prefix!r}"
           + (f", worker pid {workerPid}" if workerPid else ""))
    interruptOnSigterm()  # SIGTERM and Ctrl-C still stop the kit's gateway on the way out
    reactorThread = ReactorThread()
    try:
        with contextlib.ExitStack() as stack:
            try:
                # The broker first: without one, say so at once rather than after the
                # gateway's start timeout.
                broker = KitBroker(brokerURL, prefix, timeoutS)
                stack.callback(broker.close)
                gateway = stack.enter_context(_gateway(brokerURL, prefix, timeoutS))
                broker.listen()
                sockets: list[KitSocket] = []

                def openSocket() -> KitSocket:
                    socket = KitSocket(reactorThread, gateway.url, timeoutS, broker.pump)
                    sockets.append(socket)
                    return socket

                socket = openSocket()

                def closeSockets() -> None:
                    for each in sockets:
                        each.close()

                stack.callback(closeSockets)
            except Exception as e:
                _print(f"The kit could not start: {type(e).__name__}: {e}")
                return 2
            ctx = Context(broker, socket, gateway, openSocket, timeoutS, workerPid, prefix)
            results = runScenarios(ctx, skip)
        _print(formatTable(results))
        return 1 if any(r.status == "FAIL" for r in results) else 0
    except KeyboardInterrupt:
        _print("Interrupted: the kit's gateway and connections are closed.")
        return 130
    finally:
        reactorThread.stop()
