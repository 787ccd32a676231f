"""The example handlers: testRequest (streaming), echo (the plain-request yardstick), primes.

Each is an instance of a class providing IRequestHandler, so `--handlers workers.examples`
registers all three.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

MAX_COUNT = 10_000
MAX_DELAY_MS = 60_000
MAX_CHUNK_BYTES = 256 * 1024
MAX_PRIMES_LIMIT = 10_000_000


def _defaultClock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


def _payloadObject(request: HandlerRequest) -> dict[str, Any]:
    """The payload as an object; a missing payload means all defaults."""
    payload = {} if request.payload is None else request.payload
    if not isinstance(payload, dict):
        raise RelaybusError(ErrorCode.BAD_REQUEST, "payload must be an object")
    return payload


def _intField(payload: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RelaybusError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in {low}..{high}")
    return value


@implementer(IRequestHandler)
class TestRequestHandler:
    """Payload {"count": N, "delayMs": D, "chunkBytes": B}: N chunks D ms apart, then a summary."""

    requestType = "testRequest"
    idempotent = False

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, int]:
        payload = _payloadObject(request)
        count = _intField(payload, "count", 5, 0, MAX_COUNT)
        delayMs = _intField(payload, "delayMs", 100, 0, MAX_DELAY_MS)
        chunkBytes = _intField(payload, "chunkBytes", 16, 0, MAX_CHUNK_BYTES)
        clock = self._clock or _defaultClock()
        filler = "x" * chunkBytes
        for index in range(count):
            if delayMs:
                await deferLater(clock, delayMs / 1000, lambda: None)
            await stream.sendChunk({"index": index, "filler": filler})
        return {"chunks": count, "chunkBytes": chunkBytes, "delayMs": delayMs,
                "bytes": count * chunkBytes}


@implementer(IRequestHandler)
class EchoHandler:
    """Returns its payload at once: the yardstick for plain requests."""

    requestType = "echo"
    idempotent = True

    def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        return request.payload


@implementer(IRequestHandler)
class PrimesHandler:
    """Payload {"below": N, "batch": K}: streams the primes below N in batches of K.

    CPU-bound work done in slices with a reactor turn between batches, so one big request
    never stalls the worker's other requests, and a cancel stops it within one slice.
    """

    requestType = "primes"
    idempotent = True

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, int]:
        payload = _payloadObject(request)
        below = _intField(payload, "below", 1000, 2, MAX_PRIMES_LIMIT)
        batch = _intField(payload, "batch", 100, 1, 10_000)
        clock = self._clock or _defaultClock()
        sieve = bytearray([1]) * below
        sieve[0:2] = b"\x00\x00"
        found: list[int] = []
        total = 0
        for candidate in range(2, below):
            if sieve[candidate]:
                sieve[candidate * candidate::candidate] = bytes(
                    len(range(candidate * candidate, below, candidate)))
                found.append(candidate)
                if len(found) == batch:
                    total += len(found)
                    await stream.sendChunk({"primes": found})
                    found = []
                    await _yieldToReactor(clock)
        if found:
            total += len(found)
            await stream.sendChunk({"primes": found})
        return {"below": below, "count": total}


def _yieldToReactor(clock: IReactorTime) -> Deferred[None]:
    return deferLater(clock, 0, lambda: None)


testRequest = TestRequestHandler()
echo = EchoHandler()
primes = PrimesHandler()
