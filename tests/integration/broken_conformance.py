"""A deliberately broken conformance worker (loaded with --handlers by test_conformance.py):
conformance.echo answers something else, and conformance.stream claims to be idempotent, so
it runs a redelivered request again instead of answering worker_lost. The kit must say so."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from relaybus.conformance import ECHO, ConformanceStream, fail, slow
from relaybus.interfaces import IRequestHandler, IRequestStream

__all__ = ["echo", "fail", "slow", "stream"]


@implementer(IRequestHandler)
class WrongEcho:
    requestType = ECHO
    idempotent = False

    def handle(self, request: Any, stream: IRequestStream) -> Any:
        return {"not": "the payload"}


class RerunningStream(ConformanceStream):
    idempotent = True


echo = WrongEcho()
stream = RerunningStream()
