"""Asyncio example handlers: `asyncTicker` streams what an asyncio producer puts on a queue;
`asyncEcho` answers its payload (the yardstick for what running as a Task costs).

It runs as an asyncio Task (runsIn = "asyncio"), so the worker must run the asyncio reactor:

    twistd -r asyncio relaybus-worker --broker amqp://... --handlers workers.asyncio_examples

The producer stands in for any asyncio source (an aiohttp/httpx stream, a database cursor, an
LLM SDK's token stream). Cancellation (client cancel, disconnect, deadline, shutdown) arrives
as asyncio.CancelledError at the handler's current await; its `finally` stops the producer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from zope.interface import implementer

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

MAX_TICKS = 10_000
MAX_INTERVAL_MS = 60_000
_DONE = object()


def _intField(payload: Any, name: str, default: int, high: int) -> int:
    value = payload.get(name, default) if isinstance(payload, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise RelaybusError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in 0..{high}")
    return value


@implementer(IRequestHandler)
class AsyncTickerHandler:
    """Payload {"count": N, "intervalMs": D}: N chunks {"tick": i}, D ms apart, then
    {"ticks": N}."""

    requestType = "asyncTicker"
    idempotent = True
    runsIn = "asyncio"

    def __init__(self) -> None:
        self.producersRunning = 0  # what a test reads to see the finally blocks ran

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, int]:
        payload = {} if request.payload is None else request.payload
        count = _intField(payload, "count", 5, MAX_TICKS)
        intervalMs = _intField(payload, "intervalMs", 100, MAX_INTERVAL_MS)
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=8)
        producer = asyncio.create_task(self._produce(queue, count, intervalMs / 1000))
        try:
            sent = 0
            while (item := await queue.get()) is not _DONE:
                await stream.sendChunk({"tick": item})
                sent += 1
            return {"ticks": sent}
        finally:
            producer.cancel()  # a cancelled request stops its source too

    async def _produce(self, queue: asyncio.Queue[Any], count: int, intervalS: float) -> None:
        self.producersRunning += 1
        try:
            for tick in range(count):
                await asyncio.sleep(intervalS)
                await queue.put(tick)
            await queue.put(_DONE)
        finally:
            self.producersRunning -= 1


@implementer(IRequestHandler)
class AsyncEchoHandler:
    """Returns its payload from an asyncio Task: echo's twin, for benchmarks/e2e.py."""

    requestType = "asyncEcho"
    idempotent = True
    runsIn = "asyncio"

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        return request.payload


asyncTicker = AsyncTickerHandler()
asyncEcho = AsyncEchoHandler()
