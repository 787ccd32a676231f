"""The example handlers, driven by a Clock and a FakeRequestStream."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.task import Clock
from unitsupport import assertNoResult, failureResultOf, successResultOf
from workers import examples
from workers.examples import EchoHandler, PrimesHandler

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.testing import FakeRequestStream
from relaybus.worker import HandlerRequest

# Not imported by name: pytest would try to collect a class called Test*.
StreamingHandler = examples.TestRequestHandler


def handlerRequest(payload: Any, requestType: str = "testRequest") -> HandlerRequest:
    return HandlerRequest(payload=payload, requestType=requestType, correlationId="c-1",
                          deadline=1e12, redelivered=False, principal=None)


def start(handler: Any, payload: Any) -> tuple[Deferred[Any], FakeRequestStream]:
    stream = FakeRequestStream()
    d = ensureDeferred(handler.handle(handlerRequest(payload, handler.requestType), stream))
    return d, stream


def badRequest(d: Deferred[Any]) -> str:
    error = failureResultOf(d, RelaybusError).value
    assert error.code == ErrorCode.BAD_REQUEST
    return str(error.message)


@pytest.fixture
def clock() -> Clock:
    return Clock()


# testRequest


def test_test_request_sends_n_chunks_d_ms_apart_then_the_summary(clock: Clock) -> None:
    d, stream = start(StreamingHandler(clock), {"count": 3, "delayMs": 100, "chunkBytes": 4})
    assert stream.chunks == []
    clock.advance(0.099)
    assert stream.chunks == []
    for expected in (1, 2):
        clock.advance(0.001 if expected == 1 else 0.1)
        assert len(stream.chunks) == expected
        assertNoResult(d)
    clock.advance(0.1)
    assert stream.chunks == [{"index": i, "filler": "xxxx"} for i in range(3)]
    assert successResultOf(d) == {"chunks": 3, "chunkBytes": 4, "delayMs": 100, "bytes": 12}
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize("payload", [None, {}, {"unrelated": True}])
def test_test_request_defaults(clock: Clock, payload: Any) -> None:
    d, stream = start(StreamingHandler(clock), payload)
    for _ in range(5):
        clock.advance(0.1)
    assert [c["index"] for c in stream.chunks] == [0, 1, 2, 3, 4]
    assert all(c["filler"] == "x" * 16 for c in stream.chunks)
    assert successResultOf(d) == {"chunks": 5, "chunkBytes": 16, "delayMs": 100, "bytes": 80}


def test_test_request_without_delay_finishes_at_once(clock: Clock) -> None:
    d, stream = start(StreamingHandler(clock), {"count": 4, "delayMs": 0, "chunkBytes": 0})
    assert successResultOf(d) == {"chunks": 4, "chunkBytes": 0, "delayMs": 0, "bytes": 0}
    assert stream.chunks == [{"index": i, "filler": ""} for i in range(4)]
    assert clock.getDelayedCalls() == []


def test_test_request_count_zero_is_just_the_summary(clock: Clock) -> None:
    d, stream = start(StreamingHandler(clock), {"count": 0})
    assert successResultOf(d)["chunks"] == 0
    assert stream.chunks == []


def test_test_request_waits_for_each_chunk_to_be_published(clock: Clock) -> None:
    class SlowStream(FakeRequestStream):
        def __init__(self) -> None:
            super().__init__()
            self.pending: list[Deferred[None]] = []

        def sendChunk(self, data: Any) -> Deferred[None]:
            self.chunks.append(data)
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d

    stream = SlowStream()
    d = ensureDeferred(StreamingHandler(clock).handle(
        handlerRequest({"count": 2, "delayMs": 0}), stream))
    assert len(stream.chunks) == 1  # back-pressure: the next waits for the first's publish
    stream.pending[0].callback(None)
    assert len(stream.chunks) == 2
    stream.pending[1].callback(None)
    assert successResultOf(d)["chunks"] == 2


@pytest.mark.parametrize(("payload", "field"), [
    ({"count": -1}, "count"),
    ({"count": examples.MAX_COUNT + 1}, "count"),
    ({"count": "5"}, "count"),
    ({"count": True}, "count"),
    ({"count": 1.5}, "count"),
    ({"count": None}, "count"),
    ({"delayMs": -1}, "delayMs"),
    ({"delayMs": examples.MAX_DELAY_MS + 1}, "delayMs"),
    ({"delayMs": 1.0}, "delayMs"),
    ({"chunkBytes": -1}, "chunkBytes"),
    ({"chunkBytes": examples.MAX_CHUNK_BYTES + 1}, "chunkBytes"),
    ({"chunkBytes": [16]}, "chunkBytes"),
    ([1, 2], "payload"),
    ("count=3", "payload"),
    (3, "payload"),
])
def test_test_request_bad_payload_is_bad_request(clock: Clock, payload: Any,
                                                 field: str) -> None:
    d, stream = start(StreamingHandler(clock), payload)
    assert field in badRequest(d)
    assert stream.chunks == [] and clock.getDelayedCalls() == []


def test_test_request_caps_are_inclusive(clock: Clock) -> None:
    d, stream = start(StreamingHandler(clock), {"count": examples.MAX_COUNT, "delayMs": 0,
                                                  "chunkBytes": 0})
    assert successResultOf(d)["chunks"] == examples.MAX_COUNT
    assert len(stream.chunks) == examples.MAX_COUNT
    d, stream = start(StreamingHandler(clock), {"count": 1, "delayMs": examples.MAX_DELAY_MS,
                                                  "chunkBytes": examples.MAX_CHUNK_BYTES})
    clock.advance(examples.MAX_DELAY_MS / 1000)
    assert len(stream.chunks[0]["filler"]) == examples.MAX_CHUNK_BYTES
    assert successResultOf(d)["bytes"] == examples.MAX_CHUNK_BYTES


def test_cancelling_test_request_stops_further_chunks(clock: Clock) -> None:
    d, stream = start(StreamingHandler(clock), {"count": 10, "delayMs": 100})
    clock.advance(0.1)
    clock.advance(0.1)
    assert len(stream.chunks) == 2
    d.cancel()
    failureResultOf(d, CancelledError)
    assert clock.getDelayedCalls() == []  # the pending delay was cancelled too
    clock.advance(10)
    assert len(stream.chunks) == 2


# primes


def naivePrimes(below: int) -> list[int]:
    return [n for n in range(2, below) if all(n % k for k in range(2, int(n**0.5) + 1))]


def oneTurn(clock: Clock) -> None:
    """Run the calls due now but not the ones they schedule: one reactor iteration.

    (Clock.advance(0) would also run every callLater(0) made while it runs.)
    """
    due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def drive(clock: Clock, d: Deferred[Any], limit: int = 10_000) -> Any:
    for _ in range(limit):
        if d.called:
            break
        clock.advance(0)
    return successResultOf(d)


def test_primes_below_30(clock: Clock) -> None:
    d, stream = start(PrimesHandler(clock), {"below": 30})
    assert drive(clock, d) == {"below": 30, "count": 10}
    assert stream.chunks == [{"primes": [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]}]


def test_primes_are_batched_with_a_reactor_turn_between_batches(clock: Clock) -> None:
    d, stream = start(PrimesHandler(clock), {"below": 30, "batch": 3})
    assert stream.chunks == [{"primes": [2, 3, 5]}]  # then it yields to the reactor
    assertNoResult(d)
    assert len(clock.getDelayedCalls()) == 1
    oneTurn(clock)
    assert stream.chunks[-1] == {"primes": [7, 11, 13]}
    assert drive(clock, d) == {"below": 30, "count": 10}
    assert stream.chunks == [{"primes": [2, 3, 5]}, {"primes": [7, 11, 13]},
                             {"primes": [17, 19, 23]}, {"primes": [29]}]


@pytest.mark.parametrize(("below", "batch"), [(2, 5), (3, 1), (4, 2), (1000, 7), (1000, 168),
                                              (10_000, 10_000)])
def test_primes_match_a_naive_sieve(clock: Clock, below: int, batch: int) -> None:
    d, stream = start(PrimesHandler(clock), {"below": below, "batch": batch})
    expected = naivePrimes(below)
    assert drive(clock, d) == {"below": below, "count": len(expected)}
    assert [p for chunk in stream.chunks for p in chunk["primes"]] == expected
    assert all(len(chunk["primes"]) == batch for chunk in stream.chunks[:-1])
    assert all(0 < len(chunk["primes"]) <= batch for chunk in stream.chunks)


def test_primes_defaults(clock: Clock) -> None:
    d, stream = start(PrimesHandler(clock), None)
    assert drive(clock, d) == {"below": 1000, "count": 168}
    assert [len(c["primes"]) for c in stream.chunks] == [100, 68]


@pytest.mark.parametrize(("payload", "field"), [
    ({"below": 1}, "below"),
    ({"below": examples.MAX_PRIMES_LIMIT + 1}, "below"),
    ({"below": "30"}, "below"),
    ({"below": True}, "below"),
    ({"below": 30.0}, "below"),
    ({"batch": 0}, "batch"),
    ({"batch": 10_001}, "batch"),
    ({"batch": None}, "batch"),
])
def test_primes_bad_payload_is_bad_request(clock: Clock, payload: Any, field: str) -> None:
    d, stream = start(PrimesHandler(clock), payload)
    assert field in badRequest(d)
    assert stream.chunks == []


@pytest.mark.parametrize("payload", [[30], "below=30", 30])
def test_primes_non_object_payload_is_bad_request(clock: Clock, payload: Any) -> None:
    d, _stream = start(PrimesHandler(clock), payload)
    for _ in range(10):
        clock.advance(0)
    assert failureResultOf(d).check(RelaybusError)


def test_cancelling_primes_stops_within_one_batch(clock: Clock) -> None:
    d, stream = start(PrimesHandler(clock), {"below": 100_000, "batch": 10})
    oneTurn(clock)
    assert len(stream.chunks) == 2
    d.cancel()
    failureResultOf(d, CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert len(stream.chunks) == 2


# echo and the module


@pytest.mark.parametrize("payload", [None, 0, "text", [1, {"a": None}], {"deep": {"er": []}}])
def test_echo_returns_its_payload_at_once(payload: Any) -> None:
    stream = FakeRequestStream()
    assert EchoHandler().handle(handlerRequest(payload, "echo"), stream) == payload
    assert stream.chunks == []


def test_module_handlers_and_their_flags() -> None:
    assert (examples.testRequest.requestType, examples.testRequest.idempotent) == (
        "testRequest", False)
    assert (examples.echo.requestType, examples.echo.idempotent) == ("echo", True)
    assert (examples.primes.requestType, examples.primes.idempotent) == ("primes", True)
