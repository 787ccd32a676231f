"""A blocking example handler: `slowDigest` does CPU work in a thread (runsIn = "thread").

Plain blocking code (requests, psycopg, hashlib, numpy) runs unchanged in the worker's bounded
thread pool (`--threads N`, default 10), on any reactor:

    twistd relaybus-worker --broker amqp://... --handlers workers.blocking_examples --threads 4

A thread cannot be stopped from outside: when its request ends (cancel, deadline, shutdown)
the runtime answers it at once, `stream.cancelled` (a threading.Event) is set and the next
`stream.sendChunk` raises CancelledError, so this handler stops within one step; one that never
sends or checks holds its thread until it returns, and its result is dropped.
"""

from __future__ import annotations

import hashlib
from typing import Any

from zope.interface import implementer

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import IRequestHandler, IRequestStream
from relaybus.worker import HandlerRequest

MAX_STEPS = 1_000
MAX_ROUNDS_PER_STEP = 1_000_000
MAX_TEXT_CHARS = 4096


def _field(payload: Any, name: str, default: int, high: int) -> int:
    value = payload.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise RelaybusError(ErrorCode.BAD_REQUEST, f"{name} must be an integer in 1..{high}")
    return value


@implementer(IRequestHandler)
class SlowDigestHandler:
    """Payload {"text": T, "steps": S, "roundsPerStep": R}: S steps of R PBKDF2-SHA256 rounds
    over T, one {"step": i, "digest": hex} chunk per step, then the final digest."""

    requestType = "slowDigest"
    idempotent = True
    runsIn = "thread"

    def handle(self, request: HandlerRequest, stream: IRequestStream) -> dict[str, Any]:
        payload = {} if request.payload is None else request.payload
        if not isinstance(payload, dict):
            raise RelaybusError(ErrorCode.BAD_REQUEST, "payload must be an object")
        text = payload.get("text", "relaybus")
        if not isinstance(text, str) or len(text) > MAX_TEXT_CHARS:
            raise RelaybusError(ErrorCode.BAD_REQUEST,
                                f"text must be a string of at most {MAX_TEXT_CHARS} characters")
        steps = _field(payload, "steps", 4, MAX_STEPS)
        rounds = _field(payload, "roundsPerStep", 10_000, MAX_ROUNDS_PER_STEP)
        digest = text.encode("utf-8")
        for step in range(steps):
            digest = hashlib.pbkdf2_hmac("sha256", digest, b"relaybus", rounds)
            # Blocks until published; raises CancelledError once the request has ended.
            stream.sendChunk({"step": step, "digest": digest.hex()})
        return {"steps": steps, "digest": digest.hex()}


slowDigest = SlowDigestHandler()
