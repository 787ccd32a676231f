"""Where a handshake's token may travel, with hostile values: the header, the bearer
subprotocol, the query string, a cookie; and no token in any access-log line."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from autobahn.websocket.types import ConnectionRequest
from twisted.web.test.requesthelper import DummyRequest

from relaybus.admission import (
    BEARER_SUBPROTOCOL_PREFIX,
    MalformedCredentials,
    OriginPolicy,
    chosenSubprotocol,
    presentedToken,
    redactingLogFormatter,
    redactSecrets,
)

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"


def handshake(headers: dict[str, str] | None = None, protocols: list[str] | None = None,
              params: dict[str, list[str]] | None = None) -> ConnectionRequest:
    return ConnectionRequest(peer="tcp:127.0.0.1:5000", headers=headers or {},
                             host="127.0.0.1:8080", path="/ws", params=params or {},
                             version=13, origin=None, protocols=protocols or [],
                             extensions=[])


def subprotocolFor(token: str) -> str:
    return BEARER_SUBPROTOCOL_PREFIX + base64.urlsafe_b64encode(
        token.encode()).decode().rstrip("=")


@pytest.mark.parametrize("request_", [
    handshake({"authorization": f"Bearer {TOKEN}"}),
    handshake({"authorization": f"bearer   {TOKEN}  "}),
    handshake(protocols=["relaybus.v1", subprotocolFor(TOKEN)]),
    handshake(params={"access_token": [TOKEN]}),
], ids=["header", "header-lowercase-scheme", "subprotocol", "query"])
def test_each_carrier_presents_the_token(request_: ConnectionRequest) -> None:
    assert presentedToken(request_, cookieName=None) == TOKEN


def test_cookie_only_when_a_cookie_name_is_configured() -> None:
    request = handshake({"cookie": f"theme=dark; relaybus_token={TOKEN}"})
    assert presentedToken(request, cookieName=None) is None
    assert presentedToken(request, cookieName="relaybus_token") == TOKEN
    assert presentedToken(request, cookieName="other") is None


@pytest.mark.parametrize("headers", [{}, {"authorization": "Basic dXNlcjpwYXNz"},
                                     {"authorization": ""}, {"authorization": "Bearer"}])
def test_no_token(headers: dict[str, str]) -> None:
    assert presentedToken(handshake(headers), cookieName="relaybus_token") is None


def test_the_same_token_in_two_carriers_is_one_token() -> None:
    request = handshake({"authorization": f"Bearer {TOKEN}"},
                        params={"access_token": [TOKEN]})
    assert presentedToken(request, cookieName=None) == TOKEN


@pytest.mark.parametrize("request_", [
    handshake({"authorization": f"Bearer {TOKEN}"}, params={"access_token": ["other"]}),
    handshake(params={"access_token": [TOKEN, "other"]}),
    handshake({"authorization": f"Bearer {TOKEN}, Bearer other"},
              protocols=[subprotocolFor("other")]),
    handshake({"cookie": "relaybus_token=other"}, protocols=[subprotocolFor(TOKEN)]),
], ids=["header-and-query", "two-query-values", "header-and-subprotocol", "cookie-and-sub"])
def test_two_different_tokens_are_refused(request_: ConnectionRequest) -> None:
    with pytest.raises(MalformedCredentials):
        presentedToken(request_, cookieName="relaybus_token")


@pytest.mark.parametrize("protocol", [BEARER_SUBPROTOCOL_PREFIX + "!!!!",
                                      BEARER_SUBPROTOCOL_PREFIX + "a",
                                      BEARER_SUBPROTOCOL_PREFIX + "_-8"])
def test_a_bearer_subprotocol_that_is_not_base64url_ascii_is_malformed(protocol: str) -> None:
    with pytest.raises(MalformedCredentials):
        presentedToken(handshake(protocols=[protocol]), cookieName=None)


def test_an_unreadable_cookie_presents_no_token() -> None:
    assert presentedToken(handshake({"cookie": 'relaybus_token="unterminated'}),
                          cookieName="relaybus_token") is None


def test_the_subprotocol_echoed_is_relaybus_v1_never_the_bearer_entry() -> None:
    assert chosenSubprotocol(["relaybus.v1", subprotocolFor(TOKEN)]) == "relaybus.v1"
    assert chosenSubprotocol([subprotocolFor(TOKEN), "relaybus.v1"]) == "relaybus.v1"
    assert chosenSubprotocol([subprotocolFor(TOKEN)]) is None
    assert chosenSubprotocol([]) is None


@pytest.mark.parametrize("text", [
    f"GET /ws?access_token={TOKEN} HTTP/1.1",
    f"GET /ws?x=1&ACCESS_TOKEN={TOKEN}&y=2",
    f"Sec-WebSocket-Protocol: relaybus.v1, {subprotocolFor(TOKEN)}",
    f"Authorization: Bearer {TOKEN}",
    f'"http://evil.example/?access_token={TOKEN}"',
])
def test_redaction_leaves_no_token(text: str) -> None:
    redacted = redactSecrets(text)
    assert TOKEN not in redacted and subprotocolFor(TOKEN) not in redacted
    assert "[redacted]" in redacted


@pytest.mark.parametrize("text", [
    f"my token is {TOKEN}, keep it",
    f"alg none: {TOKEN.rsplit('.', 1)[0]}.",
    f"Bearer\n{TOKEN}",
    f"json {{\"t\":\"{TOKEN}\"}}",
])
def test_a_bare_jwt_is_redacted_wherever_it_stands(text: str) -> None:
    redacted = redactSecrets(text)
    assert TOKEN.split(".")[1] not in redacted and "[redacted]" in redacted


@pytest.mark.parametrize("text", ["eyjafjallajokull.is.loud", "EYJX.y.z", "version 1.2.3",
                                  "eyJonly-one-part", "a.b.c"])
def test_text_that_only_resembles_a_jwt_is_left_alone(text: str) -> None:
    assert redactSecrets(text) == text


def test_the_access_log_line_carries_no_token() -> None:
    request: Any = DummyRequest([b"ws"])
    request.uri = f"/ws?access_token={TOKEN}".encode()
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    request.code = 401
    request.sentLength = 0
    request.requestHeaders.setRawHeaders(
        b"referer", [f"https://app.example/?access_token={TOKEN}".encode()])
    request.requestHeaders.setRawHeaders(b"user-agent", [b"test"])
    line = redactingLogFormatter("[02/Dec/2026:18:00:00 +0000]", request)
    assert TOKEN not in line
    assert '"GET /ws?access_token=[redacted] HTTP/1.1" 401' in line


# Origin and Host


def originHandshake(origin: str, host: str = "gw.example:8080") -> ConnectionRequest:
    return ConnectionRequest(peer="tcp:127.0.0.1:5000", headers={"host": host},
                             host=host.rsplit(":", 1)[0], path="/ws",
                             params={}, version=13, origin=origin, protocols=[],
                             extensions=[])


@pytest.mark.parametrize(("origin", "host"), [
    ("", "gw.example:8080"),  # no Origin header: not a browser
    ("http://gw.example:8080", "gw.example:8080"),
    ("https://GW.example:8080", "gw.example:8080"),
    ("https://gw.example", "gw.example"),  # default port on both sides
    ("https://gw.example:443", "gw.example"),
    ("http://[::1]:8080", "[::1]:8080"),
])
def test_no_origin_and_same_origin_are_always_admitted(origin: str, host: str) -> None:
    assert OriginPolicy().refusal(originHandshake(origin, host)) is None


@pytest.mark.parametrize("origin", [
    "null", "https://evil.example", "http://gw.example:8081", "https://gw.example.evil.io:8080",
    "file://", "http://gw.example:8080/path", "chrome-extension://abc",
])
def test_any_other_origin_is_refused(origin: str) -> None:
    assert OriginPolicy().refusal(originHandshake(origin)) == (
        "origin", "this Origin is not allowed")


def test_allowed_origins_are_case_insensitive_patterns() -> None:
    policy = OriginPolicy(allowedOrigins=("https://*.app.example", "http://localhost:*"))
    assert policy.refusal(originHandshake("https://web.app.example")) is None
    assert policy.refusal(originHandshake("HTTPS://Web.App.Example")) is None
    assert policy.refusal(originHandshake("http://localhost:3000")) is None
    assert policy.refusal(originHandshake("https://app.example.evil.io")) is not None
    assert policy.refusal(originHandshake("null")) is not None
    assert OriginPolicy(allowedOrigins=("*",)).refusal(originHandshake("null")) is None


def test_allowed_hosts_restrict_the_host_header_whatever_the_origin() -> None:
    policy = OriginPolicy(allowedHosts=("gw.example",))
    assert policy.refusal(originHandshake("", "gw.example:8080")) is None
    assert policy.refusal(originHandshake("", "GW.EXAMPLE")) is None
    assert policy.refusal(originHandshake("", "rebound.attacker.example:8080")) == (
        "host", "this Host is not served")
    assert policy.refusal(originHandshake("http://127.0.0.1:8080", "127.0.0.1:8080")) == (
        "host", "this Host is not served")
