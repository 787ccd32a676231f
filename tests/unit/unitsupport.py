"""Small helpers shared by the unit tests: synchronous Deferred inspection and message builders.

Every unit test runs without the reactor: a Deferred is expected to have fired by the time the
test looks at it (after advancing a Clock), and these helpers fail loudly when it has not.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from relaybus.errors import RelaybusError
from relaybus.messages import RequestMessage
from relaybus.strictjson import encodeJSON


def successResultOf(d: Deferred[Any]) -> Any:
    """The result of a Deferred that has already succeeded."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    result = results[0]
    if isinstance(result, Failure):
        d.addErrback(lambda _: None)
        raise AssertionError(f"{d!r} failed: {result.getTraceback()}")
    return result


def failureResultOf(d: Deferred[Any], *errorTypes: type[BaseException]) -> Failure:
    """The Failure of a Deferred that has already failed (consumed, so nothing is unhandled)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    result = results[0]
    assert isinstance(result, Failure), f"{d!r} succeeded with {result!r}"
    if errorTypes:
        assert result.check(*errorTypes), f"unexpected failure: {result.getTraceback()}"
    return result


def assertNoResult(d: Deferred[Any]) -> None:
    results: list[Any] = []

    def passThrough(result: Any) -> Any:
        results.append(result)
        return result

    d.addBoth(passThrough)
    assert not results, f"{d!r} has already fired with {results[0]!r}"


def errorCode(d: Deferred[Any]) -> str:
    """The RelaybusError code a Deferred failed with."""
    return str(failureResultOf(d, RelaybusError).value.code)


def requestMessage(correlationId: str = "corr-1", requestType: str = "fake",
                   payload: Any = None, deadline: float = 1_000_030.0,
                   replyTo: str = "gw-test", body: bytes | None = None,
                   gatewayId: str = "gw-test") -> RequestMessage:
    return RequestMessage(
        correlationId=correlationId, requestType=requestType, replyTo=replyTo,
        body=encodeJSON(payload) if body is None else body, deadline=deadline,
        gatewayId=gatewayId)
