"""Worker faults against the real RabbitMQ: a worker SIGKILLed mid-stream (with another worker
and alone), a worker whose connection alone the broker closes, a worker stopped with SIGTERM
while it holds requests, a request queue nobody consumes, and replies the broker refuses.

Each test counts requests sent and terminal frames received (faultload.Tally: lost and
duplicated must be 0; `pytest -s` shows the figures), and counts handler runs in the workers'
logs: the handlers below log every run with the request's token, so a test can tell where a
request ran and whether it ran twice.

This module is also a handler module: the workers load it with --handlers.
"""

from __future__ import annotations

import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from faultload import Tally
from twisted.internet.task import deferLater
from twisted.logger import Logger
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

log = Logger(namespace="relaybus.test")


@implementer(IRequestHandler)
class _LoggedStream:
    """Payload {"token", "count", "delayMs"}: streams 0..count-1 delayMs apart; logs each run
    with its token."""

    def __init__(self, requestType: str, idempotent: bool) -> None:
        self.requestType = requestType
        self.idempotent = idempotent

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, Any]:
        from twisted.internet import reactor  # twistd's, installed before handlers load

        payload = request.payload
        log.info("Ran {requestType} {token} (redelivered: {redelivered})",
                 requestType=self.requestType, token=payload["token"],
                 redelivered=request.redelivered)
        for index in range(payload["count"]):
            await deferLater(reactor, payload["delayMs"] / 1000, lambda: None)
            await stream.sendChunk(index)
        return {"token": payload["token"], "redelivered": request.redelivered}


faultStream = _LoggedStream("faultStream", idempotent=False)
faultStreamIdempotent = _LoggedStream("faultStreamIdempotent", idempotent=True)

WORKER_ARGS = ("--handlers", Path(__file__).stem, "--concurrency", "30")
DEADLINE_MS = 30_000


def _stream(client: Any, requestType: str, count: int, delayMs: int = 100) -> str:
    """A logged stream whose token is its requestId."""
    requestId = f"{requestType}-{len(client.received)}-{time.monotonic_ns()}"
    return client.request(requestType, {"token": requestId, "count": count,
                                        "delayMs": delayMs}, requestId, timeoutMs=DEADLINE_MS)


def _runs(worker: Any, requestId: str) -> int:
    return len(re.findall(rf"Ran \w+ {re.escape(requestId)} ", worker.log))


def _split(workers: list[Any], requestIds: list[str]) -> list[list[str]]:
    """The requests each worker ran, in the order of `workers`."""
    return [[r for r in requestIds if _runs(worker, r)] for worker in workers]


def _assertStreamed(outcome: Any, count: int, redelivered: bool) -> None:
    assert outcome.code is None, outcome
    assert outcome.chunkData == list(range(count)), outcome
    assert outcome.data == {"token": outcome.requestId, "redelivered": redelivered}, outcome


def test_worker_killed_mid_stream_is_worker_lost_and_the_other_worker_carries_on(
        handlerPath, makeStack, connect, waitUntil):
    stack = makeStack("rabbitmq", workers=2, workerArgs=WORKER_ARGS)
    victim, survivor = stack.workers
    client = connect(stack)
    plain = [_stream(client, "faultStream", 40) for _ in range(10)]
    idempotent = [_stream(client, "faultStreamIdempotent", 40) for _ in range(4)]
    for requestId in plain + idempotent:
        client.waitForChunk(requestId)  # every one is running, on one worker or the other
    plainOnVictim, plainOnSurvivor = _split([victim, survivor], plain)
    idempotentOnVictim, idempotentOnSurvivor = _split([victim, survivor], idempotent)
    assert plainOnVictim and idempotentOnVictim, "the broker gave the victim none of a kind"

    victim.kill()
    killedAt = time.monotonic()
    # The victim's requests come back to the broker and on to the survivor, which answers
    # worker_lost for the ones that are not idempotent (it never runs them) well before the
    # 30 s deadline: the client does not wait for a timeout.
    for requestId in plainOnVictim:
        outcome = client.collect(requestId)
        assert outcome.code == "worker_lost", outcome
    lostAfter = time.monotonic() - killedAt
    assert lostAfter < 10, f"worker_lost came {lostAfter:.1f} s after the kill"

    # Once the broker has seen the victim go, new requests go to the survivor. (Sent before
    # that, a request can be delivered into the dead worker's socket: it then comes back
    # redelivered, and a plain one is answered worker_lost without ever having run.)
    def consumers() -> list[int]:
        queues = stack.broker.queues()
        return [queues[f"{stack.prefix}requests.{t}"]["consumers"]
                for t in ("echo", "faultStream")]

    waitUntil(lambda: consumers() == [1, 1], "the broker to drop the killed worker's consumers",
              timeout=10, interval=0.1)
    after = [client.request("echo", {"after": i}, timeoutMs=DEADLINE_MS) for i in range(20)]
    after += [_stream(client, "faultStream", 3, delayMs=10) for _ in range(5)]
    # An idempotent one runs again; the client sees each chunk once.
    for requestId in idempotentOnVictim:
        _assertStreamed(client.collect(requestId), 40, redelivered=True)
    for requestId in plainOnSurvivor + idempotentOnSurvivor:
        _assertStreamed(client.collect(requestId), 40, redelivered=False)
    for requestId in after:
        assert client.collect(requestId).code is None, requestId
    client.assertQuiet(*plain, *idempotent, *after)

    for requestId in plain:
        assert _runs(victim, requestId) + _runs(survivor, requestId) == 1, requestId
    for requestId in idempotentOnVictim:
        assert _runs(survivor, requestId) == 1, requestId
    print(f"worker SIGKILL: {len(plainOnVictim)} + {len(idempotentOnVictim)} requests "
          f"(plain + idempotent) were on the killed worker; worker_lost for every plain one "
          f"within {lostAfter * 1000:.0f} ms of the kill, the idempotent ones reran once")
    Tally().add(client, plain + idempotent + after).assertExactlyOnce(
        "worker SIGKILL mid-stream", allowed={"response", "worker_lost"})


def test_the_only_worker_killed_mid_stream_is_worker_lost_long_before_the_deadline(
        handlerPath, makeStack, connect):
    """No other worker can answer worker_lost after the redelivery: the gateway sees the
    queue's consumers drop to 0 (--worker-absent-grace, 2 s here) and ends the request."""
    stack = makeStack("rabbitmq", ["--worker-absent-grace", "2"], workers=1,
                      workerArgs=WORKER_ARGS)
    [victim] = stack.workers
    client = connect(stack)
    running = _stream(client, "faultStream", 600)  # a minute of chunks, 30 s deadline
    client.waitForChunk(running)
    victim.kill()
    killedAt = time.monotonic()
    outcome = client.collect(running)
    lostAfter = time.monotonic() - killedAt
    assert outcome.code == "worker_lost", outcome
    assert outcome.terminal["error"]["message"] == (
        "no worker has consumed requestType 'faultStream' for 2 s")
    assert lostAfter < DEADLINE_MS / 1000 / 2, f"worker_lost came {lostAfter:.1f} s after"
    # A new worker gets the request back (redelivered) and answers worker_lost too: the
    # gateway has ended it, so the client hears nothing more of it.
    replacement = stack.startWorker(*WORKER_ARGS)
    client.assertQuiet(running)
    assert _runs(replacement, running) == 0
    assert "Ended 1 faultStream request(s): no worker has consumed them" in stack.gateway.log
    print(f"the only worker SIGKILLed: worker_lost {lostAfter:.1f} s after the kill "
          f"(grace 2 s), not at the {DEADLINE_MS / 1000:.0f} s deadline")


def test_a_worker_restarted_within_the_grace_serves_what_waited_for_it(
        handlerPath, makeStack, connect, waitUntil):
    stack = makeStack("rabbitmq", ["--worker-absent-grace", "20"], workers=1,
                      workerArgs=WORKER_ARGS)
    [first] = stack.workers
    assert first.stop() in (0, -signal.SIGTERM)
    client = connect(stack)
    queued = _stream(client, "faultStream", 2, delayMs=0)
    queue = f"{stack.prefix}requests.faultStream"
    waitUntil(lambda: stack.broker.messageCount(queue) == 1, "the request to wait in its queue")
    stack.startWorker(*WORKER_ARGS)
    _assertStreamed(client.collect(queued), 2, redelivered=False)


def test_request_queued_without_a_consumer_times_out_and_is_never_run(
        handlerPath, makeStack, connect, waitUntil):
    # Without the absent-worker watch, a request nobody consumes waits for its deadline.
    stack = makeStack("rabbitmq", ["--worker-absent-grace", "0"], workers=0)
    # A worker declares the request queues and goes: the queue exists, nobody consumes it.
    declaring = stack.startWorker(*WORKER_ARGS)
    assert declaring.stop() in (0, -signal.SIGTERM)
    queue = f"{stack.prefix}requests.faultStream"
    assert stack.broker.queues()[queue]["consumers"] == 0
    client = connect(stack)
    # The queue is read over AMQP (milliseconds), not with rabbitmqctl (a second or more
    # when the machine is busy), well inside the message's TTL.
    timeoutS = 5.0
    started = time.monotonic()
    requestId = client.request("faultStream", {"token": "queued", "count": 1, "delayMs": 0},
                               "queued", timeoutMs=int(timeoutS * 1000))
    waitUntil(lambda: stack.broker.messageCount(queue) == 1,
              "the request to wait in its queue", timeout=timeoutS - 1)
    outcome = client.collect(requestId)
    elapsed = time.monotonic() - started
    assert outcome.code == "timeout" and not outcome.chunks, outcome
    assert timeoutS - 0.05 <= elapsed < timeoutS + 5, f"timeout after {elapsed:.2f} s"
    # Its per-message TTL (the time left to its deadline) expires: the broker itself drops
    # it, with no consumer on the queue.
    waitUntil(lambda: stack.broker.queues()[queue]["messages"] == 0,
              "the broker to drop the expired request", timeout=10)
    worker = stack.startWorker(*WORKER_ARGS)
    later = client.finish(_stream(client, "faultStream", 1, delayMs=0))
    assert later.code is None  # the new worker consumes that queue...
    assert _runs(worker, "queued") == 0  # ...and never saw the expired request
    assert "Skipped" not in worker.log
    client.assertQuiet(requestId)
    print(f"no consumer: timeout after {elapsed:.2f} s of a {timeoutS:.0f} s deadline; "
          "the broker expired the message; a worker started later never ran it")


def test_worker_sigterm_finishes_or_hands_back_what_it_holds(handlerPath, makeStack,
                                                             connect):
    stack = makeStack("rabbitmq", workers=2, workerArgs=(*WORKER_ARGS, "--drain-timeout", "2"))
    stopping, survivor = stack.workers
    client = connect(stack)
    short = [_stream(client, "faultStream", 5) for _ in range(8)]  # 0.5 s: within the drain
    long = [_stream(client, "faultStream", 50) for _ in range(6)]  # 5 s: beyond it
    longIdempotent = [_stream(client, "faultStreamIdempotent", 50) for _ in range(4)]
    held = short + long + longIdempotent
    for requestId in held:
        client.waitForChunk(requestId)
    shortHeld, longHeld, longIdempotentHeld = (
        _split([stopping], group)[0] for group in (short, long, longIdempotent))
    assert shortHeld and longHeld and longIdempotentHeld, "the worker got none of a kind"
    mark = stack.mark()

    stopping.signal(signal.SIGTERM)
    # While it drains, new requests go to the other worker (echo and faultStreamIdempotent
    # are idempotent: pika hands back what arrives before the broker's cancel-ok, see
    # docs/protocol.md, and the other worker runs it again).
    during = [client.request("echo", {"during": i}, timeoutMs=DEADLINE_MS) for i in range(10)]
    during += [_stream(client, "faultStreamIdempotent", 3, delayMs=10) for _ in range(4)]
    assert stopping.process is not None
    code = stopping.process.wait(30)

    for requestId in shortHeld:  # finished within the drain timeout
        _assertStreamed(client.collect(requestId), 5, redelivered=False)
    for requestId in longHeld:  # handed back, and not run again
        assert client.collect(requestId).code == "worker_lost", requestId
        assert _runs(survivor, requestId) == 0, requestId
    for requestId in longIdempotentHeld:  # handed back, and run again from the start
        _assertStreamed(client.collect(requestId), 50, redelivered=True)
        assert _runs(survivor, requestId) == 1, requestId
    for requestId in set(held) - {*shortHeld, *longHeld, *longIdempotentHeld}:
        assert client.collect(requestId).code is None, requestId
    for requestId in during:
        assert client.collect(requestId).code is None, requestId
    client.assertQuiet(*held, *during)
    handedBack = stack.waitForHandlerLog(
        r"Stopped faultStream(?:Idempotent)? [0-9a-f]{32}: the worker is shutting down", mark,
        count=len(longHeld) + len(longIdempotentHeld))
    print(f"worker SIGTERM: held {len(shortHeld)} short (finished) and "
          f"{len(longHeld)} + {len(longIdempotentHeld)} long (handed back); exit code {code}")
    Tally().add(client, held + during).assertExactlyOnce(
        "worker SIGTERM with requests in hand", allowed={"response", "worker_lost"})
    assert len(handedBack) == len(longHeld) + len(longIdempotentHeld)
    assert "Server Shut Down." in stopping.log
    assert code == 0, f"the worker exited {code} after SIGTERM"


def test_the_only_worker_killed_mid_stream_leaves_the_client_to_its_deadline(
        handlerPath, makeStack, connect):
    """docs/protocol.md, step 4: with the gateway's absent-worker watch off, worker_lost needs
    another worker to take the redelivery; nobody does, so the deadline ends it."""
    stack = makeStack("rabbitmq", ["--worker-absent-grace", "0"], workerArgs=WORKER_ARGS)
    client = connect(stack)
    requestId = client.request("faultStream", {"token": "alone", "count": 100, "delayMs": 100},
                               timeoutMs=3000)
    client.waitForChunk(requestId)
    stack.workers[0].kill()
    outcome = client.collect(requestId)
    assert outcome.code == "timeout", outcome
    assert len(outcome.chunks) < 100


def test_only_the_workers_connection_closed_is_worker_lost_for_the_client(
        handlerPath, isolatedBroker, makeStack, connect):
    """docs/protocol.md, step 7: the gateway kept its connection, so the request is still open
    when the reconnected worker gets it back redelivered, and the client gets worker_lost."""
    stack = makeStack("rabbitmq", broker=isolatedBroker, workerArgs=WORKER_ARGS)
    worker = stack.workers[0]
    client = connect(stack)
    requestId = _stream(client, "faultStream", 100)
    client.waitForChunk(requestId)
    mark = stack.mark()
    assert isolatedBroker.closeConnectionsNamed("relaybus worker", "worker-only fault") == 1
    outcome = client.collect(requestId)
    assert outcome.code == "worker_lost", outcome
    assert _runs(worker, requestId) == 1  # the reconnected worker did not run it again
    worker.waitUntilReady(count=2)
    assert "connection lost" not in mark.since(stack.gateway)
    _assertStreamed(client.finish(_stream(client, "faultStream", 2, delayMs=0)), 2, False)
    client.assertQuiet(requestId)


# A policy that makes the broker refuse (nack) every publish to the queue it applies to.
REJECT_EVERY_PUBLISH = {"max-length": 0, "overflow": "reject-publish"}


def test_replies_the_broker_refuses_are_acked_and_the_worker_serves_on(
        handlerPath, makeStack, connect, waitUntil):
    """docs/protocol.md, step 4: a final reply the broker nacks (a full reply queue) gets the
    request acked, so its prefetch slot (the only one: --concurrency 1) is free at once; a
    nacked chunk ends the request with a handler_error attempt, nacked too. The clients get
    timeout from the gateway, and the worker serves the next requests."""
    gatewayId = f"gw-nack-{secrets.token_hex(3)}"
    stack = makeStack("rabbitmq", gatewayArgs=("--gateway-id", gatewayId),
                      workerArgs=("--handlers", Path(__file__).stem, "--concurrency", "1"))
    worker, broker = stack.workers[0], stack.broker
    assert broker is not None
    client = connect(stack)
    mark = stack.mark()
    with broker.policy(f"{stack.prefix}replies.{gatewayId}", REJECT_EVERY_PUBLISH):
        final = client.request("echo", "refused", timeoutMs=8000)
        chunked = client.request("faultStream", {"token": "refused", "count": 3, "delayMs": 0},
                                 timeoutMs=8000)
        stack.waitForHandlerLog(r"The broker refused the final reply for [0-9a-f]{32} "
                                r"\(.*publisher nack\)\): acked the request", mark, count=2)
        stack.waitForHandlerLog(r"The broker refused a chunk of [0-9a-f]{32}: ending", mark)
        for requestType in ("echo", "faultStream"):  # acked: nothing held
            queue = f"{stack.prefix}requests.{requestType}"
            waitUntil(lambda q=queue: broker.unacked(q) == 0, f"nothing unacked in {queue}")
        for requestId in (final, chunked):
            outcome = client.collect(requestId)
            assert outcome.code == "timeout" and not outcome.chunks, outcome
    # The same worker, one request of each type at a time, serves the next ones.
    assert client.call("echo", "served").data == "served"
    _assertStreamed(client.finish(_stream(client, "faultStream", 3, delayMs=0)), 3, False)
    assert _runs(worker, "refused") == 1
    assert "Traceback" not in mark.since(worker)
