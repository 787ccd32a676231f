"""Who may open a WebSocket: the bearer token a handshake carries, where it may travel, and
keeping it out of every log line.

A token may come in the `Authorization: Bearer` header (non-browser clients), as a WebSocket
subprotocol entry `base64url.bearer.relaybus.<unpadded base64url>` offered beside the real
subprotocol `relaybus.v1` (browsers can send it, and it stays out of URLs: the JS library's
default), in the `access_token` query parameter (SignalR's convention), or in a cookie named by
`--jwt-cookie`. What it proves is decided by relaybus.identity; this module only finds it.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import http.cookies
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.cred.credentials import Anonymous
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import combinedLogFormatter
from twisted.web.server import Request

from relaybus.errors import ErrorCode, RelaybusError
from relaybus.identity import (
    BearerToken,
    IPrincipal,
    JWTChecker,
    KeysUnavailable,
    Principal,
    UnknownKeyId,
    makePortal,
)

log = Logger(namespace="relaybus.admission")

SUBPROTOCOL = "relaybus.v1"
BEARER_SUBPROTOCOL_PREFIX = "base64url.bearer.relaybus."
ACCESS_TOKEN_PARAMETER = "access_token"
UNAUTHORIZED_STATUS = 401
KEYS_UNAVAILABLE_STATUS = 503  # --jwks-url before its first fetch: retry later, not a bad token
# The close code of a connection whose token expired without a refresh (4000-4999: ours).
CLOSE_TOKEN_EXPIRED = 4401

# Anything that looks like a token where a log line could show it: the query parameter (in a
# URI or a Referer), a bearer subprotocol entry, an Authorization header value, and a bare JWT
# (a JWS in compact form: its header is base64url JSON, so it starts with "eyJ"; the signature
# may be empty, as in alg "none").
_SECRETS_IN_TEXT = re.compile(
    r"(?i)(access_token=)[^&\s\"']*"
    r"|(" + re.escape(BEARER_SUBPROTOCOL_PREFIX) + r")[A-Za-z0-9_-]*"
    r"|(bearer\s+)[A-Za-z0-9._~+/=-]+"
    r"|(?-i:eyJ)[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


FORBIDDEN_STATUS = 403
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


@attrs.frozen
class OriginPolicy:
    """Which browsers' pages may open a WebSocket here (against cross-site WebSocket
    hijacking) and under which Host names (against DNS rebinding).

    A handshake without an Origin header (not a browser) and a same-origin page (the Origin's
    host and port are the Host header's) are always admitted; `allowedOrigins` are
    case-insensitive fnmatch patterns for the others (`*` opens it to every origin, `null`
    included). `allowedHosts`, when set, are the only Host names (without port) served.
    """

    allowedOrigins: tuple[str, ...] = ()
    allowedHosts: tuple[str, ...] = ()

    def refusal(self, request: ConnectionRequest) -> tuple[str, str] | None:
        """(the metric's reason, the 403's status text), or None to go on."""
        # The Host header as sent: Autobahn's request.host has its port cut off.
        host = (request.headers.get("host") or request.host or "").strip().lower()
        if self.allowedHosts and _hostname(host) not in {h.lower() for h in self.allowedHosts}:
            return "host", "this Host is not served"
        origin = request.origin  # Autobahn: "" when the handshake has no Origin header
        if not origin or _sameOrigin(origin, host):
            return None
        if any(fnmatch.fnmatchcase(origin.lower(), pattern.lower())
               for pattern in self.allowedOrigins):
            return None
        return "origin", "this Origin is not allowed"


def _hostname(hostAndPort: str) -> str:
    if hostAndPort.startswith("["):  # [::1]:8080
        return hostAndPort[:hostAndPort.find("]") + 1]
    return hostAndPort.rsplit(":", 1)[0] if hostAndPort.count(":") == 1 else hostAndPort


def _withPort(hostAndPort: str, scheme: str) -> str:
    if re.search(r":\d+\Z", hostAndPort) and not hostAndPort.endswith("]"):
        return hostAndPort
    return f"{hostAndPort}:{_DEFAULT_PORTS.get(scheme, 0)}"


def _sameOrigin(origin: str, host: str) -> bool:
    """The page's scheme://host:port names this gateway's Host (default ports filled in)."""
    scheme, separator, rest = origin.lower().partition("://")
    if not separator or scheme not in ("http", "https") or not host or "/" in rest:
        return False
    return _withPort(rest, scheme) in (_withPort(host, "http"), _withPort(host, "https"))


class MalformedCredentials(Exception):
    """The handshake carries something token-like that cannot be read (answered with 401)."""


def presentedToken(request: ConnectionRequest, cookieName: str | None) -> str | None:
    """The one token the handshake presents, or None. Two different tokens are refused: a
    proxy or a page must not be able to add one that wins over the client's."""
    found = {token for token in _tokens(request.headers, request.protocols, request.params,
                                        cookieName) if token}
    if len(found) > 1:
        raise MalformedCredentials("several different tokens")
    return found.pop() if found else None


def _tokens(headers: Mapping[str, str], protocols: Sequence[str],
            params: Mapping[str, Sequence[str]], cookieName: str | None) -> Iterable[str]:
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        yield value.strip()
    for protocol in protocols:
        if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX):
            yield _fromSubprotocol(protocol[len(BEARER_SUBPROTOCOL_PREFIX):])
    yield from params.get(ACCESS_TOKEN_PARAMETER, ())
    if cookieName is not None and "cookie" in headers:
        cookies = http.cookies.SimpleCookie()
        try:
            cookies.load(headers["cookie"])
        except http.cookies.CookieError:
            raise MalformedCredentials("unreadable cookie header") from None
        if cookieName in cookies:
            yield cookies[cookieName].value


def _fromSubprotocol(encoded: str) -> str:
    try:
        padded = encoded + "=" * (-len(encoded) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise MalformedCredentials("the bearer subprotocol is not base64url") from None


def chosenSubprotocol(offered: Sequence[str]) -> str | None:
    """Echo `relaybus.v1` when offered (a browser closes a socket whose server picks none of
    the subprotocols it offered); never a bearer entry, which would echo the token."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


def redactSecrets(text: str) -> str:
    """`text` with every token-looking value replaced by `[redacted]` (for log lines)."""
    return _SECRETS_IN_TEXT.sub(
        lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "[redacted]", text)


def redactingLogFormatter(timestamp: str, request: Request) -> str:
    """twisted.web's access log line (combined format) with tokens taken out: it writes the
    whole URI and the Referer, query string included."""
    return redactSecrets(combinedLogFormatter(timestamp, request))


class Authenticator:
    """The verdicts on one gateway's tokens: at the handshake (through the twisted.cred
    portal) and for the in-band refresh of a connection's token."""

    def __init__(self, checker: JWTChecker, allowAnonymous: bool, leewayS: float,
                 cookieName: str | None = None) -> None:
        self._checker = checker
        self._portal = makePortal(checker, allowAnonymous)
        self._leewayS = leewayS
        self._cookieName = cookieName

    def admit(self, request: ConnectionRequest) -> Deferred[Principal]:
        """The principal a handshake proves, or a failure with ConnectionDeny(401, reason):
        the reason is short and fixed (it is the HTTP status text, and it is logged)."""
        try:
            token = presentedToken(request, self._cookieName)
        except MalformedCredentials as e:
            return fail(ConnectionDeny(UNAUTHORIZED_STATUS, str(e)))
        credentials = BearerToken(token) if token is not None else Anonymous()

        def admitted(result: tuple[Any, Principal, Any]) -> Principal:
            return result[1]

        def refused(failure: Failure) -> Failure:
            if failure.check(KeysUnavailable):
                return Failure(ConnectionDeny(KEYS_UNAVAILABLE_STATUS,
                                              failure.getErrorMessage()))
            if failure.check(UnhandledCredentials):
                reason = "a bearer token is required"
            elif failure.check(UnauthorizedLogin):
                reason = failure.getErrorMessage()
            else:  # a bug of ours: still a refusal, never an open door
                log.failure("Checking a handshake's token failed", failure)
                reason = "the token could not be checked"
            return Failure(ConnectionDeny(UNAUTHORIZED_STATUS, reason))

        return self._portal.login(credentials, None, IPrincipal).addCallbacks(
            admitted, refused)

    def refreshed(self, current: Principal, token: str) -> Principal:
        """The principal of a fresh token for a connection already open as `current`."""
        try:
            principal = self._checker.verify(token)
        except UnauthorizedLogin as e:
            if isinstance(e, UnknownKeyId) and self._checker.onUnknownKey is not None:
                # Answered at once; the refetch (rate-limited) lets a retry find the key.
                self._checker.onUnknownKey()
            raise RelaybusError(ErrorCode.UNAUTHORIZED, str(e)) from None
        if principal.sub != current.sub:
            raise RelaybusError(ErrorCode.UNAUTHORIZED, "a refresh must keep the same sub")
        return principal

    def closesAt(self, principal: Principal) -> float | None:
        """When a connection that proved `principal` must close, unless it refreshes."""
        if principal.expiresAt is None:
            return None
        return principal.expiresAt + self._leewayS
