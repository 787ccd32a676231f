"""Cross-site WebSocket hijacking and DNS rebinding against a real gateway: a foreign Origin
(`null` included) and a Host the gateway does not serve get HTTP 403, before any token is
looked at; same-origin pages and non-browser clients are admitted; a well-behaved client is
served throughout."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-security-suite-secret-0123456789"


def refused(connect: Any, target: Any, **handshake: Any) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        connect(target, **handshake)
    return caught.value.response.status_code, caught.value.response.reason_phrase


@pytest.fixture
def guarded(makeStack: Any, connect: Any) -> Any:
    stack = makeStack("memory", ["--allowed-origin", "https://*.app.example",
                                 "--allowed-host", "127.0.0.1"])
    stack.good = connect(stack)
    return stack


def stillServed(stack: Any) -> None:
    assert stack.good.call("echo", "still here").data == "still here"


@pytest.mark.parametrize("origin", ["https://evil.example", "null",
                                    "https://app.example.evil.io"])
def test_a_foreign_origin_gets_403(guarded: Any, connect: Any, origin: str) -> None:
    assert refused(connect, guarded, origin=origin) == (403, "this Origin is not allowed")
    stillServed(guarded)


def test_same_origin_and_allowed_origins_and_no_origin_are_admitted(guarded: Any,
                                                                     connect: Any) -> None:
    port = guarded.gateway.port
    for origin in (f"http://127.0.0.1:{port}", "https://web.app.example", None):
        client = connect(guarded, origin=origin)
        assert client.call("echo", origin).data == origin


def test_a_host_the_gateway_does_not_serve_gets_403(guarded: Any, connect: Any) -> None:
    rebound = guarded.url.replace("127.0.0.1", "localhost")  # DNS rebinding's Host header
    assert refused(connect, rebound) == (403, "this Host is not served")
    assert guarded.gateway.metrics()['relaybus_handshakes_refused_total{reason="host"}'] == 1
    stillServed(guarded)


def test_origin_is_refused_before_the_token_is_looked_at(tmp_path: Path, makeStack: Any,
                                                          connect: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    stack = makeStack("memory", ["--jwt-secret-file", str(secret)])
    assert refused(connect, stack, origin="https://evil.example") == (
        403, "this Origin is not allowed")
    assert refused(connect, stack) == (401, "a bearer token is required")


def test_a_cookie_token_from_a_foreign_origin_is_refused(tmp_path: Path, makeStack: Any,
                                                          connect: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    stack = makeStack("memory", ["--jwt-secret-file", str(secret), "--jwt-cookie", "rb_token",
                                 "--allowed-origin", "https://app.example"])
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, "HS256")
    cookie = {"additional_headers": {"Cookie": f"rb_token={token}"}}
    assert refused(connect, stack, origin="https://evil.example", **cookie) == (
        403, "this Origin is not allowed")
    client = connect(stack, origin="https://app.example", **cookie)
    assert client.hello["principal"]["sub"] == "alice"
