"""Authentication at the WebSocket edge, on a Clock through a StringTransport: the 401, the
principal in hello and on the bus, the relaybus.v1 echo, the refresh, and the close at expiry."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from twisted.internet.task import Clock
from websupport import OPCODE_CLOSE, Client, autobahnOn

from relaybus.admission import Authenticator
from relaybus.config import GatewayConfig, Limits
from relaybus.correlation import CorrelationTable
from relaybus.gateway import GatewayFactory
from relaybus.identity import JWTSettings, loadChecker
from relaybus.testing import FakeRequestBus

NOW = 1_764_000_000
SECRET = b"k" * 32
LEEWAY_S = 30


@pytest.fixture
def clock() -> Iterator[Clock]:
    with autobahnOn(NOW) as clock:
        yield clock


def token(sub: str = "alice", exp: int = NOW + 600, key: bytes = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": exp}, key, "HS256")


class Gateway:
    def __init__(self, clock: Clock, tmp: Path, allowAnonymous: bool = False) -> None:
        secret = tmp / "secret"
        secret.write_bytes(SECRET)
        settings = JWTSettings(secretFile=str(secret), leewayS=LEEWAY_S)
        self.clock = clock
        self.bus = FakeRequestBus(replyTo="gw-test")
        self.table = CorrelationTable(self.bus, clock, Limits(), "gw-test")
        config = GatewayConfig(gatewayId="gw-test", jwt=settings, allowAnonymous=allowAnonymous)
        self.factory = GatewayFactory(config, self.table, clock, Authenticator(
            loadChecker(settings, clock), allowAnonymous, LEEWAY_S))

    def handshake(self, path: bytes = b"/ws", **headers: str) -> tuple[Client, bytes]:
        client = Client(self.factory)
        response = client.handshake(path, {k.replace("_", "-"): v for k, v in headers.items()})
        return client, response


@pytest.fixture
def gw(clock: Clock, tmp_path: Path) -> Gateway:
    return Gateway(clock, tmp_path)


def test_no_token_is_401_with_www_authenticate(gw: Gateway) -> None:
    client, response = gw.handshake()
    assert response.startswith(b"HTTP/1.1 401 a bearer token is required\r\n")
    assert b'WWW-Authenticate: Bearer realm="relaybus"' in response
    assert gw.factory.handshakesRefused["unauthorized"] == 1
    assert not client.isOpen


@pytest.mark.parametrize(("value", "status"), [
    (token(exp=NOW - 31), b"token expired"),
    (token(key=b"x" * 32), b"bad signature"),
    ("not.a.jwt", b"malformed token"),
])
def test_a_bad_token_is_401_with_its_reason(gw: Gateway, value: str, status: bytes) -> None:
    _client, response = gw.handshake(Authorization=f"Bearer {value}")
    assert response.startswith(b"HTTP/1.1 401 " + status + b"\r\n")
    assert value.encode() not in response


def test_a_valid_token_opens_with_the_principal_in_hello(gw: Gateway) -> None:
    client, response = gw.handshake(Authorization=f"Bearer {token()}")
    assert response.startswith(b"HTTP/1.1 101 ")
    [hello] = client.messages()
    assert hello["principal"] == {"sub": "alice", "expiresAt": (NOW + 600) * 1000}


def test_the_bearer_subprotocol_is_accepted_and_relaybus_v1_echoed(gw: Gateway) -> None:
    entry = "base64url.bearer.relaybus." + base64.urlsafe_b64encode(
        token().encode()).decode().rstrip("=")
    _client, response = gw.handshake(Sec_WebSocket_Protocol=f"relaybus.v1, {entry}")
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Protocol: relaybus.v1\r\n" in response
    assert entry.encode() not in response.split(b"\r\n\r\n")[0]


def test_the_query_parameter_is_accepted(gw: Gateway) -> None:
    client, response = gw.handshake(f"/ws?access_token={token()}".encode())
    assert response.startswith(b"HTTP/1.1 101 ")
    assert client.messages()[0]["principal"]["sub"] == "alice"


def test_workers_learn_the_principal_from_the_gateway_only(gw: Gateway) -> None:
    client, _ = gw.handshake(Authorization=f"Bearer {token()}")
    client.messages()
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "echo",
                     "payload": {"principal": "root", "relaybus-principal": "root"},
                     "relaybus-principal": "root", "principal": "root"})
    [(message, _published)] = gw.bus.published
    assert message.principal == "alice"


def test_anonymous_when_allowed(clock: Clock, tmp_path: Path) -> None:
    gw = Gateway(clock, tmp_path, allowAnonymous=True)
    client, response = gw.handshake()
    assert response.startswith(b"HTTP/1.1 101 ")
    assert client.messages()[0]["principal"] == {"sub": "anonymous", "expiresAt": None}
    _client, bad = gw.handshake(Authorization="Bearer junk")  # a token present must be valid
    assert bad.startswith(b"HTTP/1.1 401 malformed token")


def test_an_expired_token_closes_the_connection_with_4401_and_ends_its_requests(
        gw: Gateway, clock: Clock) -> None:
    client, _ = gw.handshake(Authorization=f"Bearer {token(exp=NOW + 60)}")
    client.messages()
    client.sendJSON({"type": "request", "requestId": "r-1", "requestType": "echo",
                     "timeoutMs": 200_000})
    assert len(gw.table) == 1
    clock.advance(60 + LEEWAY_S - 0.001)
    assert client.isOpen and len(gw.table) == 1
    clock.advance(0.002)
    frames = client.frames()
    closes = [payload for opcode, payload in frames if opcode == OPCODE_CLOSE]
    assert closes and int.from_bytes(closes[0][:2], "big") == 4401
    assert len(gw.table) == 0  # ended (cancelled) and the worker told
    assert [n.reason for n in gw.bus.cancels] == ["disconnected"]
    assert gw.factory.tokensExpired == 1


def test_a_refresh_moves_the_expiry(gw: Gateway, clock: Clock) -> None:
    client, _ = gw.handshake(Authorization=f"Bearer {token(exp=NOW + 60)}")
    client.messages()
    client.sendJSON({"type": "auth", "token": token(exp=NOW + 3600)})
    assert client.messages() == [{"type": "auth-ok", "expiresAt": (NOW + 3600) * 1000}]
    clock.advance(120)
    assert client.isOpen


@pytest.mark.parametrize(("value", "reason"), [
    (token(sub="mallory"), "a refresh must keep the same sub"),
    (token(exp=NOW - 60), "token expired"),
    ("junk", "malformed token"),
])
def test_a_refresh_that_is_refused_keeps_the_connection_as_it_was(
        gw: Gateway, clock: Clock, value: str, reason: str) -> None:
    client, _ = gw.handshake(Authorization=f"Bearer {token(exp=NOW + 60)}")
    client.messages()
    client.sendJSON({"type": "auth", "token": value})
    [error] = client.messages()
    assert error == {"type": "error", "requestId": None,
                     "error": {"code": "unauthorized", "message": reason}}
    assert client.isOpen
    clock.advance(60 + LEEWAY_S + 1)
    assert not client.isOpen  # the old expiry still holds


def test_auth_frames_on_a_gateway_without_keys_are_bad_requests(clock: Clock) -> None:
    table = CorrelationTable(FakeRequestBus(), clock, Limits(), "gw")
    factory = GatewayFactory(GatewayConfig(gatewayId="gw"), table, clock)
    client = Client(factory)
    assert client.handshake().startswith(b"HTTP/1.1 101 ")
    assert client.messages()[0]["principal"] is None
    client.sendJSON({"type": "auth", "token": token()})
    [error] = client.messages()
    assert error["error"]["code"] == "bad_request" and error["requestId"] is None


def test_refusals_never_log_the_token(gw: Gateway) -> None:
    from twisted.logger import formatEvent, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        secret = token(exp=NOW - 600)
        gw.handshake(Authorization=f"Bearer {secret}")
        gw.handshake(f"/ws?access_token={secret}".encode())
    finally:
        globalLogPublisher.removeObserver(events.append)
    text = json.dumps([formatEvent(e) for e in events])
    assert secret not in text and secret.split(".")[1] not in text
