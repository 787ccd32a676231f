"""The testing kit for handler authors (relaybus.testing.runHandler), used the ways the worker
guide shows: on a Clock, under pytest-asyncio, under pytest-twisted with the real reactor, and
under trial; the example handlers in workers/ are tested with it here."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from workers import asyncio_examples, blocking_examples, examples
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.testing import runHandler

TIMEOUT_S = 10.0

# Not imported by name: pytest would try to collect a class called Test*.
StreamingHandler = examples.TestRequestHandler


# On a Clock: deterministic, nothing runs until the test says


def test_echo_answers_at_once() -> None:
    outcome = runHandler(examples.echo, {"a": [1, None]}).outcome
    assert outcome.ok and outcome.result == {"a": [1, None]} and outcome.chunks == []


def test_test_request_streams_on_the_clock() -> None:
    clock = Clock()
    run = runHandler(StreamingHandler(clock), {"count": 3, "delayMs": 100}, clock=clock)
    assert run.chunks == [] and not run.ended
    clock.advance(0.1)
    assert [c["index"] for c in run.chunks] == [0]
    clock.pump([0.1, 0.1])
    assert run.outcome.result == {"chunks": 3, "chunkBytes": 16, "delayMs": 100, "bytes": 48}
    assert len(run.outcome.chunks) == 3


def test_primes_stream_in_batches() -> None:
    clock = Clock()
    run = runHandler(examples.PrimesHandler(clock), {"below": 30, "batch": 4}, clock=clock)
    while not run.ended:
        clock.advance(0)
    assert run.outcome.chunks == [{"primes": [2, 3, 5, 7]}, {"primes": [11, 13, 17, 19]},
                                  {"primes": [23, 29]}]
    assert run.outcome.result == {"below": 30, "count": 10}


@pytest.mark.parametrize(("handler", "payload", "field"), [
    (examples.testRequest, {"count": -1}, "count"),
    (examples.primes, {"below": "30"}, "below"),
    (asyncio_examples.asyncTicker, {"count": True}, "count"),
    (blocking_examples.slowDigest, {"steps": 0}, "steps"),
    (blocking_examples.slowDigest, {"text": "x" * 5000}, "text"),
    (blocking_examples.slowDigest, [1], "payload"),
])
def test_bad_payloads_get_bad_request(handler: Any, payload: Any, field: str) -> None:
    async def scenario() -> Any:
        return await asyncio.wait_for(runHandler(handler, payload).finished(), TIMEOUT_S)

    outcome = asyncio.run(scenario())  # the asyncio example needs a loop; the others ignore it
    assert outcome.errorCode == "bad_request" and field in outcome.errorMessage
    assert outcome.chunks == []


def test_cancel_ends_the_request_with_cancelled_and_stops_the_handler() -> None:
    clock = Clock()
    run = runHandler(StreamingHandler(clock), {"count": 10, "delayMs": 100}, clock=clock)
    clock.pump([0.1, 0.1])
    run.cancel()
    assert run.outcome.errorCode == "cancelled" and len(run.outcome.chunks) == 2
    clock.advance(5)
    assert len(run.chunks) == 2 and clock.getDelayedCalls() == []


def test_the_deadline_ends_the_request_with_timeout() -> None:
    clock = Clock()
    run = runHandler(StreamingHandler(clock), {"count": 10, "delayMs": 1000}, clock=clock,
                     timeoutS=2.5)
    clock.pump([1, 1])
    assert not run.ended
    run.passDeadline()
    assert run.outcome.errorCode == "timeout" and len(run.outcome.chunks) == 2


def test_a_request_whose_deadline_passed_in_the_queue_is_skipped() -> None:
    outcome = runHandler(examples.echo, 1, timeoutS=0).outcome
    assert outcome.final is None and outcome.settled == "ack" and not outcome.ok


def test_redelivery_gets_worker_lost_unless_the_handler_is_idempotent() -> None:
    lost = runHandler(examples.testRequest, {"count": 1}, redelivered=True).outcome
    assert lost.errorCode == "worker_lost" and lost.chunks == []
    assert runHandler(examples.echo, 7, redelivered=True).outcome.result == 7


def test_a_shutdown_drains_then_hands_the_rest_back() -> None:
    clock = Clock()
    run = runHandler(StreamingHandler(clock), {"count": 100, "delayMs": 250}, clock=clock,
                     drainTimeoutS=1)
    stopped = run.shutDown()
    clock.pump([0.25] * 2)
    assert len(run.chunks) == 2 and not run.ended  # still draining
    clock.pump([0.25] * 2)
    assert run.outcome.final is None and run.outcome.settled == "requeue"
    assert stopped.called


@implementer(IRequestHandler)
class WhoAsks:
    requestType = "whoAsks"
    idempotent = True

    def handle(self, request: Any, stream: IRequestStream) -> Any:
        return {"principal": request.principal, "claims": dict(request.claims),
                "redelivered": request.redelivered, "requestType": request.requestType}


def test_the_handler_sees_the_principal_and_claims() -> None:
    outcome = runHandler(WhoAsks(), None, principal="alice",
                         claims={"sub": "alice", "roles": ["ops"]}).outcome
    assert outcome.result == {"principal": "alice", "claims": {"sub": "alice", "roles": ["ops"]},
                              "redelivered": False, "requestType": "whoAsks"}
    anonymous = runHandler(WhoAsks(), None).outcome.result
    assert anonymous["principal"] is None and anonymous["claims"] == {}


def test_a_handler_bug_is_handler_error_and_a_result_that_is_not_json_too() -> None:
    @implementer(IRequestHandler)
    class Broken:
        requestType = "broken"
        idempotent = False

        def __init__(self, result: Any) -> None:
            self.result = result

        def handle(self, request: Any, stream: IRequestStream) -> Any:
            if isinstance(self.result, Exception):
                raise self.result
            return self.result

    assert runHandler(Broken(KeyError("x")), None).outcome.errorCode == "handler_error"
    assert runHandler(Broken({1, 2}), None).outcome.errorCode == "handler_error"


def test_a_blocking_handler_runs_inline_on_a_clock() -> None:
    outcome = runHandler(blocking_examples.slowDigest,
                         {"text": "t", "steps": 3, "roundsPerStep": 10}).outcome
    assert [c["step"] for c in outcome.chunks] == [0, 1, 2]
    assert outcome.result["digest"] == outcome.chunks[-1]["digest"]


# Under pytest-asyncio: asyncio handlers on its loop, `await run.finished()`


@pytest.mark.asyncio
async def test_async_ticker_under_pytest_asyncio() -> None:
    handler = asyncio_examples.AsyncTickerHandler()
    run = runHandler(handler, {"count": 4, "intervalMs": 1})
    outcome = await asyncio.wait_for(run.finished(), TIMEOUT_S)
    assert outcome.chunks == [{"tick": n} for n in range(4)] and outcome.result == {"ticks": 4}
    assert handler.producersRunning == 0


@pytest.mark.asyncio
async def test_cancelling_async_ticker_stops_its_producer() -> None:
    handler = asyncio_examples.AsyncTickerHandler()
    run = runHandler(handler, {"count": 1000, "intervalMs": 1})
    while len(run.chunks) < 2:
        await asyncio.sleep(0.001)
    assert handler.producersRunning == 1
    run.cancel()
    assert run.outcome.errorCode == "cancelled"
    await asyncio.wait_for(run.handlerDone(), TIMEOUT_S)
    await asyncio.sleep(0)  # the producer's own cancellation lands one loop turn later
    assert handler.producersRunning == 0


@pytest.mark.asyncio
async def test_a_shutdown_is_awaitable_under_pytest_asyncio() -> None:
    handler = asyncio_examples.AsyncTickerHandler()
    run = runHandler(handler, {"count": 1000, "intervalMs": 1}, drainTimeoutS=1)
    while len(run.chunks) < 2:
        await asyncio.sleep(0.001)
    stopped = run.shutDown()
    run.clock.advance(1)  # the drain timeout, on the kit's Clock
    await asyncio.wait_for(stopped, TIMEOUT_S)
    assert run.outcome.settled == "requeue"
    await asyncio.sleep(0)  # the producer's own cancellation lands one loop turn later
    assert handler.producersRunning == 0


# Under pytest-twisted, with the real reactor: real time, real threads


@pytest_twisted.ensureDeferred
async def test_test_request_in_real_time_under_pytest_twisted() -> None:
    from twisted.internet import reactor

    run = runHandler(StreamingHandler(reactor), {"count": 3, "delayMs": 5}, clock=reactor)
    outcome = await run.finished().addTimeout(TIMEOUT_S, reactor)
    assert outcome.ok and len(outcome.chunks) == 3


@pytest_twisted.ensureDeferred
async def test_slow_digest_in_a_real_thread_under_pytest_twisted() -> None:
    from twisted.internet import reactor

    run = runHandler(blocking_examples.slowDigest, {"steps": 2, "roundsPerStep": 1000},
                     clock=reactor, threads=1)
    outcome = await run.finished().addTimeout(TIMEOUT_S, reactor)
    assert [c["step"] for c in outcome.chunks] == [0, 1] and outcome.ok


# Under trial


def test_the_kit_works_under_trial(tmp_path: Path) -> None:
    here = Path(__file__).parent
    root = here.parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(root / "src"),
                                                       str(root)]))
    result = subprocess.run(
        [sys.executable, "-m", "twisted.trial", "--temp-directory", str(tmp_path / "trial"),
         "trial_kit_cases"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASSED (successes=4)" in result.stdout, result.stdout
