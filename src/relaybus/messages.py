"""What travels on the bus between gateways and workers, independent of any broker.

The AMQP mapping of each field is in docs/protocol.md ("The AMQP contract").
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs


class ReplyKind(enum.StrEnum):
    CHUNK = "chunk"
    RESPONSE = "response"
    ERROR = "error"


@attrs.frozen
class RequestMessage:
    """One client request on its way to a worker."""

    correlationId: str
    requestType: str
    replyTo: str
    body: bytes  # the request payload, JSON
    deadline: float  # seconds since the epoch; the gateway gives up then
    gatewayId: str = ""
    principal: str | None = None
    claims: bytes | None = None  # JSON object: the verified claims the gateway forwards


@attrs.frozen
class ReplyMessage:
    """One chunk, final response or error from a worker, addressed to one gateway."""

    correlationId: str
    replyTo: str
    kind: ReplyKind
    body: bytes  # JSON: chunk/response data, or {"code", "message"} for errors
    seq: int | None = None  # chunks only: 0, 1, 2, ... per request
    # Why a reply that names its request breaks the contract (an unknown type, a seq that is
    # not an integer): the gateway ends that request with handler_error and tells the worker.
    violation: str | None = None


@attrs.frozen
class CancelNotice:
    """The gateway no longer wants the answer to a request (cancel, disconnect, deadline)."""

    correlationId: str
    requestType: str
    reason: str


@attrs.define(eq=False)
class Delivery:
    """A request handed to a worker, with the means to settle it with its bus."""

    message: RequestMessage
    redelivered: bool
    # The bus's ack (requeue=False) or requeue (requeue=True) of this one delivery.
    settle: Callable[[bool], None] = attrs.field(repr=False)

    def ack(self) -> None:
        self.settle(False)

    def requeue(self) -> None:
        self.settle(True)
