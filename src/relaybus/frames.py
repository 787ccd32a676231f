"""Client frames in, gateway frames out: the WebSocket half of the wire contract.

Parsing never raises anything but FrameError, so one bad frame can only ever cost the client
one `error` frame (see docs/protocol.md).
"""

from __future__ import annotations

import re
from typing import Any

import attrs

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.strictjson import decodeJSON, encodeJSON

MAX_REQUEST_ID_LENGTH = 128
MAX_REQUEST_TYPE_LENGTH = 128
MAX_LOG_MESSAGE_LENGTH = 8192
MAX_LOG_CONTEXT_BYTES = 16384
MAX_LOG_ENTRIES_PER_FRAME = 50
LOG_LEVELS = ("debug", "info", "warn", "error")

_REQUEST_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")
# C0, DEL and C1 controls, Unicode line/paragraph separators, and lone surrogates (which
# cannot be encoded as UTF-8 at all): none may reach a log line or an id.
_UNSAFE_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class FrameError(RelaybusError):
    """A client frame the gateway cannot accept; `requestId` is set when it was readable."""

    def __init__(self, message: str, requestId: str | None = None,
                 code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(code, message)
        self.requestId = requestId


@attrs.frozen
class RequestFrame:
    requestId: str
    requestType: str
    payload: Any
    timeoutMs: int | None = None


@attrs.frozen
class CancelFrame:
    requestId: str


@attrs.frozen
class ClientLogEntry:
    level: str
    message: str
    context: dict[str, Any] | None = None
    timestamp: float | None = None


@attrs.frozen
class ClientLogFrame:
    """One `client-log` frame: a single entry, or a batch of up to MAX_LOG_ENTRIES_PER_FRAME."""

    entries: tuple[ClientLogEntry, ...]


@attrs.frozen
class AuthFrame:
    """A fresh token for this connection, before the one it opened with expires."""

    token: str = attrs.field(repr=False)


ClientFrame = RequestFrame | CancelFrame | ClientLogFrame | AuthFrame


def _requestId(frame: dict[str, Any]) -> str:
    requestId = frame.get("requestId")
    if not isinstance(requestId, str) or not 1 <= len(requestId) <= MAX_REQUEST_ID_LENGTH:
        raise FrameError(
            f"requestId must be a string of 1..{MAX_REQUEST_ID_LENGTH} characters")
    if _UNSAFE_CHARACTERS.search(requestId):
        raise FrameError("requestId must not contain control characters or lone surrogates")
    return requestId


def _parseRequest(frame: dict[str, Any]) -> RequestFrame:
    requestId = _requestId(frame)
    requestType = frame.get("requestType")
    if (not isinstance(requestType, str) or len(requestType) > MAX_REQUEST_TYPE_LENGTH
            or not _REQUEST_TYPE.match(requestType)):
        raise FrameError(
            "requestType must be 1..128 characters of letters, digits and _ . : - "
            "starting with a letter or digit", requestId)
    timeoutMs = frame.get("timeoutMs")
    if timeoutMs is not None and (
            isinstance(timeoutMs, bool) or not isinstance(timeoutMs, int) or timeoutMs <= 0):
        raise FrameError("timeoutMs must be a positive integer", requestId)
    return RequestFrame(requestId, requestType, frame.get("payload"), timeoutMs)


def _parseClientLog(frame: dict[str, Any]) -> ClientLogFrame:
    if "entries" not in frame:
        return ClientLogFrame((_parseClientLogEntry(frame),))
    entries = frame["entries"]
    if (not isinstance(entries, list)
            or not 1 <= len(entries) <= MAX_LOG_ENTRIES_PER_FRAME):
        raise FrameError("client-log entries must be a list of 1.."
                         f"{MAX_LOG_ENTRIES_PER_FRAME} entries")
    if not all(isinstance(entry, dict) for entry in entries):
        raise FrameError("client-log entries must be objects")
    # All or nothing: a batch with one bad entry is refused whole, so the error is unambiguous.
    return ClientLogFrame(tuple(_parseClientLogEntry(entry) for entry in entries))


def _parseClientLogEntry(frame: dict[str, Any]) -> ClientLogEntry:
    level = frame.get("level")
    if level not in LOG_LEVELS:
        raise FrameError(f"client-log level must be one of {', '.join(LOG_LEVELS)}")
    message = frame.get("message")
    if not isinstance(message, str) or len(message) > MAX_LOG_MESSAGE_LENGTH:
        raise FrameError(
            f"client-log message must be a string of at most {MAX_LOG_MESSAGE_LENGTH} characters")
    context = frame.get("context")
    if context is not None:
        if not isinstance(context, dict):
            raise FrameError("client-log context must be an object")
        if len(encodeJSON(context)) > MAX_LOG_CONTEXT_BYTES:
            raise FrameError(f"client-log context must be at most {MAX_LOG_CONTEXT_BYTES} bytes")
    timestamp = frame.get("timestamp")
    if timestamp is not None and (
            isinstance(timestamp, bool) or not isinstance(timestamp, int | float)):
        raise FrameError("client-log timestamp must be a number (milliseconds since the epoch)")
    return ClientLogEntry(level, message, context, timestamp)


def _parseAuth(frame: dict[str, Any]) -> AuthFrame:
    token = frame.get("token")
    if not isinstance(token, str) or not token:
        raise FrameError("auth token must be a non-empty string")
    return AuthFrame(token)


def parseClientFrame(data: bytes, isBinary: bool) -> ClientFrame:
    """Turn one WebSocket message into a typed frame or raise FrameError."""
    if isBinary:
        raise FrameError("binary frames are not supported; send JSON text frames")
    try:
        frame = decodeJSON(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise FrameError(f"frame is not valid JSON: {e}") from None
    if not isinstance(frame, dict):
        raise FrameError("frame must be a JSON object")
    kind = frame.get("type")
    try:
        if kind == "request":
            return _parseRequest(frame)
        if kind == "cancel":
            return CancelFrame(_requestId(frame))
        if kind == "auth":
            return _parseAuth(frame)
        if kind == "client-log":
            return _parseClientLog(frame)
    except ValueError as e:  # context too deep to re-encode
        raise FrameError(str(e)) from None
    raise FrameError('frame type must be one of "request", "cancel", "client-log", "auth"')


def escapeControlCharacters(text: str) -> str:
    """Make client text safe for one log line: no forged newlines or terminal escapes."""
    return _UNSAFE_CHARACTERS.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


# Gateway -> client frames. Each returns the encoded text frame.

def helloFrame(connectionId: str, limits: dict[str, int],
               principal: dict[str, Any] | None = None) -> bytes:
    """`principal` is who the handshake's token proved; null when the gateway has no keys."""
    return encodeJSON({"type": "hello", "connectionId": connectionId,
                       "protocol": 1, "limits": limits, "principal": principal})


def authOkFrame(expiresAt: int | None) -> bytes:
    return encodeJSON({"type": "auth-ok", "expiresAt": expiresAt})


def chunkFrame(requestId: str, seq: int, data: Any) -> bytes:
    return encodeJSON({"type": "chunk", "requestId": requestId, "seq": seq, "data": data})


def responseFrame(requestId: str, data: Any) -> bytes:
    return encodeJSON({"type": "response", "requestId": requestId, "data": data})


def errorFrame(requestId: str | None, error: RelaybusError) -> bytes:
    return encodeJSON({"type": "error", "requestId": requestId, "error": error.asDict()})


@attrs.frozen
class ClientFrames:
    """A request's chunks, response and error as frames for one client, within its limit.

    What the WebSocket edge sends through IClientConnection (the fake in relaybus.testing uses
    it too, so both refuse alike): a chunk or response that cannot be a frame raises the
    RelaybusError to end its request with; an error frame is always made sendable.
    """

    maxMessageBytes: int

    def chunk(self, requestId: str, seq: int, data: Any) -> bytes:
        return self._withinLimit(chunkFrame, requestId, seq, data)

    def response(self, requestId: str, data: Any) -> bytes:
        return self._withinLimit(responseFrame, requestId, data)

    def error(self, requestId: str | None, error: RelaybusError) -> bytes:
        frame = errorFrame(requestId, error)
        if len(frame) > self.maxMessageBytes:  # keep the code, drop the long message
            frame = errorFrame(requestId, RelaybusError(
                error.code, "the error message was too long to send"))
        return frame

    def _withinLimit(self, encoder: Any, requestId: str, *args: Any) -> bytes:
        try:
            frame: bytes = encoder(requestId, *args)
        except ValueError:  # NaN or a lone surrogate that got this far, or too deep
            raise RelaybusError(ErrorCode.HANDLER_ERROR,
                                "the worker's reply cannot be sent as JSON") from None
        if len(frame) > self.maxMessageBytes:
            raise RelaybusError(ErrorCode.PAYLOAD_TOO_LARGE,
                                f"the worker's reply is larger than the client's limit of "
                                f"{self.maxMessageBytes} bytes")
        return frame
