"""The four standard requestTypes of the conformance kit, for the Python runtime.

`twistd relaybus-worker --broker URL --handlers relaybus.conformance` serves them; then
`relaybus conformance --broker URL` checks that worker against docs/protocol.md. Their payloads
and answers are defined in docs/workers-any-language.md; a worker in another language serves
the same four (workers/node/conformance.js is the Node.js one).

None is idempotent: a redelivered request must be answered `worker_lost`, which is what the
kit's redelivery scenario checks.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from relaybus.errors import WORKER_ERROR_CODES, ErrorCode, RelaybusError
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

ECHO = "conformance.echo"
STREAM = "conformance.stream"
FAIL = "conformance.fail"
SLOW = "conformance.slow"
REQUEST_TYPES = (ECHO, STREAM, FAIL, SLOW)

MAX_STREAM_COUNT = 1000
MAX_DELAY_MS = 10_000
MAX_CODE_LENGTH = 64
MAX_MESSAGE_LENGTH = 1024


def _defaultClock() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


def _object(payload: Any) -> dict[str, Any]:
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise RelaybusError(ErrorCode.BAD_REQUEST, "payload must be an object")
    return payload


def _integer(payload: dict[str, Any], name: str, low: int, high: int,
             default: int | None = None) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RelaybusError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in {low}..{high}")
    return value


def _string(payload: dict[str, Any], name: str, high: int) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or len(value) > high:
        raise RelaybusError(ErrorCode.BAD_REQUEST, f"{name} must be a string of at most "
                                                   f"{high} characters")
    return value


@implementer(IRequestHandler)
class ConformanceEcho:
    """Any JSON payload: the response is the payload unchanged, no chunks."""

    requestType = ECHO
    idempotent = False

    def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        return request.payload


@implementer(IRequestHandler)
class ConformanceStream:
    """{"count": N, "delayMs": D}: chunks {"index": i} D ms apart (the first at once), then
    {"count": N}."""

    requestType = STREAM
    idempotent = False

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, int]:
        payload = _object(request.payload)
        count = _integer(payload, "count", 0, MAX_STREAM_COUNT)
        delayMs = _integer(payload, "delayMs", 0, MAX_DELAY_MS, 0)
        clock = self._clock or _defaultClock()
        for index in range(count):
            if index and delayMs:
                await deferLater(clock, delayMs / 1000, lambda: None)
            await stream.sendChunk({"index": index})
        return {"count": count}


@implementer(IRequestHandler)
class ConformanceFail:
    """{"code": C, "message": M}: an error reply with that code and message. The Python runtime
    itself sends only the codes a worker may use, so any other code leaves it as
    handler_error (with M): what the gateway makes of such a code anyway."""

    requestType = FAIL
    idempotent = False

    def handle(self, request: HandlerRequest, stream: IRequestStream) -> Any:
        payload = _object(request.payload)
        code = _string(payload, "code", MAX_CODE_LENGTH)
        message = _string(payload, "message", MAX_MESSAGE_LENGTH)
        raise RelaybusError(code if code in WORKER_ERROR_CODES else ErrorCode.HANDLER_ERROR,
                            message)


@implementer(IRequestHandler)
class ConformanceSlow:
    """{} or {"chunkEveryMs": D}: runs (sending a chunk {"index": i} every D ms) until it is
    cancelled or its deadline passes; the runtime then replies cancelled or timeout."""

    requestType = SLOW
    idempotent = False

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self._clock = clock

    async def handle(self, request: HandlerRequest, stream: IRequestStream) -> None:
        payload = _object(request.payload)
        if "chunkEveryMs" not in payload:
            await Deferred()  # until the runtime cancels it
            return
        everyMs = _integer(payload, "chunkEveryMs", 1, MAX_DELAY_MS)
        clock = self._clock or _defaultClock()
        index = 0
        while True:
            await deferLater(clock, everyMs / 1000, lambda: None)
            await stream.sendChunk({"index": index})
            index += 1


echo = ConformanceEcho()
streamHandler = ConformanceStream()
fail = ConformanceFail()
slow = ConformanceSlow()
