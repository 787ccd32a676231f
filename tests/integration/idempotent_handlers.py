"""A handler module for the integration tests only (loaded with --handlers by a worker)."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream


@implementer(IRequestHandler)
class SlowCounter:
    """Streams 0..count-1, delayMs apart: deterministic, so safe to run again."""

    requestType = "slowCount"
    idempotent = True

    async def handle(self, request: Any, stream: IRequestStream) -> dict[str, int]:
        count, delayMs = request.payload["count"], request.payload["delayMs"]
        for index in range(count):
            await deferLater(reactor, delayMs / 1000, lambda: None)  # type: ignore[arg-type]
            await stream.sendChunk(index)
        return {"count": count, "rerun": int(request.redelivered)}


slowCounter = SlowCounter()
