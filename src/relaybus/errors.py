"""The stable list of error codes a client can receive, and the exception that carries one.

The codes are part of the wire contract (docs/protocol.md): add new ones, never rename.
"""

from __future__ import annotations

import enum
import re


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "bad_request"
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NO_HANDLER = "no_handler"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    OVERLOADED = "overloaded"
    UNAVAILABLE = "unavailable"
    HANDLER_ERROR = "handler_error"
    WORKER_LOST = "worker_lost"
    SHUTTING_DOWN = "shutting_down"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"


# Codes a worker may put in an `error` reply; anything else is reported as handler_error.
WORKER_ERROR_CODES = frozenset(
    {
        ErrorCode.BAD_REQUEST,
        ErrorCode.HANDLER_ERROR,
        ErrorCode.WORKER_LOST,
        ErrorCode.CANCELLED,
        ErrorCode.TIMEOUT,
        ErrorCode.OVERLOADED,
        ErrorCode.SHUTTING_DOWN,
    }
)


MAX_ERROR_MESSAGE_LENGTH = 1024
_LONE_SURROGATES = re.compile("[\ud800-\udfff]")


class RelaybusError(Exception):
    """A failure that ends one request with a protocol error code.

    The message travels to clients, so it is cut to MAX_ERROR_MESSAGE_LENGTH characters and
    anything that cannot be UTF-8 (lone surrogates) becomes U+FFFD: an error must always be
    sendable.
    """

    def __init__(self, code: ErrorCode | str, message: str,
                 retryAfterMs: int | None = None) -> None:
        message = _LONE_SURROGATES.sub("\ufffd", str(message)[:MAX_ERROR_MESSAGE_LENGTH])
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code) if code in ErrorCode._value2member_map_ else code
        self.message = message
        self.retryAfterMs = retryAfterMs  # when the client may try again (rate limits)

    def asDict(self) -> dict[str, str | int]:
        error: dict[str, str | int] = {"code": str(self.code), "message": self.message}
        if self.retryAfterMs is not None:
            error["retryAfterMs"] = self.retryAfterMs
        return error


class ReplyRefusedError(RelaybusError):
    """The broker received a worker's reply and refused it (a publisher nack: e.g. the
    gateway's reply queue is full with overflow reject-publish). Publishing it again would only
    repeat the refusal, unlike a reply lost with its channel (code unavailable)."""

    def __init__(self, message: str = "the broker refused the reply") -> None:
        super().__init__(ErrorCode.OVERLOADED, message)
