"""A handler that answers with what the worker learned about who asked (the gateway's verified
principal), for the security tests."""

from __future__ import annotations

from typing import Any

from workers.examples import TestRequestHandler
from zope.interface import implementer

from relaybus.interfaces import IRequestHandler, IRequestStream


@implementer(IRequestHandler)
class WhoAmI:
    requestType = "whoami"
    idempotent = True

    def handle(self, request: Any, stream: IRequestStream) -> dict[str, Any]:
        return {"principal": request.principal}


whoami = WhoAmI()


@implementer(IRequestHandler)
class MyClaims:
    requestType = "myclaims"
    idempotent = True

    def handle(self, request: Any, stream: IRequestStream) -> dict[str, Any]:
        return dict(request.claims)


myclaims = MyClaims()


class Slow(TestRequestHandler):
    """testRequest under another name: a slow stream that a policy can forbid on its own."""

    requestType = "slow"


slow = Slow()
