"""Attacks on a real `twistd relaybus` gateway with JWT authentication, through the
`websockets` library: each asserts the documented refusal, and that a well-behaved client on
another connection is served throughout. (More cases, and the authorization, origin and rate
limits, come with the rest of issue 9.)"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-security-suite-secret-0123456789"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def hs256(claims: dict[str, Any], key: bytes = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, key, "HS256", headers=headers or None)


def claims(sub: str = "alice", expiresIn: float = 600, **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time() + expiresIn), **extra}


def bearer(token: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


@pytest.fixture
def secured(tmp_path: Path, handlerPath: None, makeStack: Any, connect: Any) -> Any:
    """A gateway that needs an HS256 JWT, running the whoami handler in-process, and a
    well-behaved client on it."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    stack = makeStack("memory", ["--jwt-secret-file", str(secret), "--jwt-audience",
                                 "relaybus", "--handlers", "whoami_handlers",
                                 "--handlers", "workers.examples"])
    stack.good = connect(stack, **bearer(hs256(claims(sub="bob", aud="relaybus"))))
    return stack


def refused(connect: Any, stack: Any, **handshake: Any) -> Any:
    with pytest.raises(InvalidStatus) as caught:
        connect(stack, **handshake)
    return caught.value.response


def stillServed(stack: Any) -> None:
    assert stack.good.call("whoami").data == {"principal": "bob"}


@pytest.mark.parametrize(("name", "token", "reason"), [
    ("malformed", "not-a-jwt", "malformed token"),
    ("bad signature", hs256(claims(aud="relaybus"), b"x" * 40), "bad signature"),
    ("expired", hs256(claims(expiresIn=-120, aud="relaybus")), "token expired"),
    ("not yet valid", hs256(claims(aud="relaybus", nbf=int(time.time() + 600))),
     "token not yet valid"),
    ("wrong audience", hs256(claims(aud="another-service")), "wrong audience"),
    ("alg none", b64(b'{"alg":"none","typ":"JWT"}') + "."
     + b64(json.dumps(claims(aud="relaybus")).encode()) + ".", "algorithm not allowed"),
    ("unknown kid ignored by a single secret, bad signature still",
     hs256(claims(aud="relaybus"), b"y" * 40, kid="other"), "bad signature"),
    ("no sub", hs256({"exp": int(time.time() + 600), "aud": "relaybus"}),
     "missing claim: sub"),
])
def test_a_bad_token_gets_401_and_the_good_client_is_served(
        secured: Any, connect: Any, name: str, token: str, reason: str) -> None:
    response = refused(connect, secured, **bearer(token))
    assert (response.status_code, response.reason_phrase) == (401, reason), name
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="relaybus"'
    stillServed(secured)


def test_no_token_gets_401(secured: Any, connect: Any) -> None:
    response = refused(connect, secured)
    assert (response.status_code, response.reason_phrase) == (401, "a bearer token is required")
    stillServed(secured)
    metrics = secured.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="unauthorized"}'] == 1


def test_hs256_signed_with_the_public_key_as_secret_is_refused(
        tmp_path: Path, makeStack: Any, connect: Any) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    publicPem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "public.pem").write_bytes(publicPem)
    stack = makeStack("memory", ["--jwt-public-key-file", str(tmp_path / "public.pem")])
    good = connect(stack, **bearer(jwt.encode(claims(), key, "RS256")))
    header, payload = b64(b'{"alg":"HS256","typ":"JWT"}'), b64(json.dumps(claims()).encode())
    forged = f"{header}.{payload}." + b64(hmac.new(publicPem, f"{header}.{payload}".encode(),
                                                   hashlib.sha256).digest())
    response = refused(connect, stack, **bearer(forged))
    assert (response.status_code, response.reason_phrase) == (401, "algorithm not allowed")
    assert good.call("echo", "still here").data == "still here"


def test_every_carrier_proves_the_same_principal_to_the_worker(secured: Any,
                                                                 connect: Any) -> None:
    token = hs256(claims(aud="relaybus"))
    viaSubprotocol = connect(secured, subprotocols=[
        "relaybus.v1", "base64url.bearer.relaybus." + b64(token.encode())])
    assert viaSubprotocol.ws.subprotocol == "relaybus.v1"
    viaQuery = connect(secured.url + f"?access_token={token}")
    for client in (connect(secured, **bearer(token)), viaSubprotocol, viaQuery):
        assert client.hello["principal"]["sub"] == "alice"
        assert client.call("whoami").data == {"principal": "alice"}


def test_the_principal_cannot_be_spoofed_through_the_request(secured: Any) -> None:
    outcome = secured.good.call("whoami", {"principal": "root", "relaybus-principal": "root"},
                                principal="root", **{"relaybus-principal": "root"})
    assert outcome.data == {"principal": "bob"}


def test_a_token_in_the_query_string_never_reaches_a_log(secured: Any, connect: Any) -> None:
    token = hs256(claims(expiresIn=-600, aud="relaybus"))
    refused(connect, secured.url + f"?access_token={token}")
    valid = hs256(claims(aud="relaybus"))
    connect(secured.url + f"?access_token={valid}").call("echo", 1)
    stillServed(secured)
    log = secured.gateway.log
    for secret in (token, valid):
        assert secret not in log and secret.split(".")[2] not in log


def test_an_expired_token_closes_the_connection_with_4401(
        tmp_path: Path, provider: str, makeStack: Any, connect: Any) -> None:
    """On RabbitMQ the handler runs in a real relaybus-worker, told by a cancel notice."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    stack = makeStack(provider, ["--jwt-secret-file", str(secret), "--jwt-leeway", "0"])
    good = connect(stack, **bearer(hs256(claims(sub="bob", expiresIn=600))))
    client = connect(stack, **bearer(hs256(claims(expiresIn=3))))
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100},
                               timeoutMs=60_000)
    client.waitForChunk(requestId)
    mark = stack.mark()
    assert client.waitClosed(timeout=15) == 4401
    stack.waitForHandlerLog(r"Stopped testRequest [0-9a-f]{32}: cancelled by the gateway "
                            r"\(disconnected\)", mark)
    assert good.call("echo", "still here").data == "still here"
    assert stack.gateway.metrics()["relaybus_tokens_expired_total"] == 1


def test_a_refresh_with_another_sub_is_refused(secured: Any) -> None:
    secured.good.sendJSON({"type": "auth", "token": hs256(claims(sub="mallory",
                                                                 aud="relaybus"))})
    error = secured.good.next(lambda f: f["type"] == "error", "the refusal")
    assert error["error"] == {"code": "unauthorized",
                              "message": "a refresh must keep the same sub"}
    secured.good.sendJSON({"type": "auth", "token": hs256(claims(sub="bob", aud="relaybus",
                                                                 expiresIn=3600))})
    ok = secured.good.next(lambda f: f["type"] == "auth-ok", "auth-ok")
    assert ok["expiresAt"] > (time.time() + 3000) * 1000
    stillServed(secured)


def relaybusCall(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[Any]]:
    result = subprocess.run([str(Path(sys.executable).parent / "relaybus"), "call", *args],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, **(env or {})})
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]


def test_the_cli_sends_its_token_and_says_unauthorized_without_one(secured: Any) -> None:
    token = hs256(claims(aud="relaybus"))
    assert relaybusCall("whoami", "--url", secured.url, "--token", token) == (
        0, [{"type": "response", "data": {"principal": "alice"}}])
    assert relaybusCall("whoami", "--url", secured.url, env={"RELAYBUS_TOKEN": token})[0] == 0
    code, lines = relaybusCall("whoami", "--url", secured.url)
    assert code == 1
    assert lines == [{"type": "error", "code": "unauthorized",
                      "message": "a bearer token is required"}]
    stillServed(secured)


def test_a_request_flood_beyond_the_rate_is_refused_and_others_are_served(
        makeStack: Any, connect: Any) -> None:
    stack = makeStack("memory", ["--requests-per-second", "20", "--requests-burst", "20"])
    good, flooder = connect(stack), connect(stack)
    started = time.monotonic()
    ids = [flooder.request("echo", i) for i in range(200)]
    outcomes = [flooder.collect(requestId) for requestId in ids]
    elapsed = time.monotonic() - started  # the bucket refills 20 a second meanwhile
    refused = [o for o in outcomes if o.code == "overloaded"]
    admitted = [o for o in outcomes if o.code is None]
    assert len(refused) + len(admitted) == 200
    assert refused and 20 <= len(admitted) <= 20 + 20 * elapsed + 1, (len(admitted), elapsed)
    assert all(o.terminal["error"]["retryAfterMs"] > 0 for o in refused)
    assert good.call("echo", "still here").data == "still here"
    assert stack.gateway.metrics()["relaybus_requests_rate_limited_total"] == len(refused)


def test_a_wrong_or_missing_issuer_gets_401(tmp_path: Path, makeStack: Any,
                                            connect: Any) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    stack = makeStack("memory", ["--jwt-secret-file", str(secret),
                                 "--jwt-issuer", "https://idp.example"])
    good = connect(stack, **bearer(hs256(claims(iss="https://idp.example"))))
    for token, reason in [
            (hs256(claims(iss="https://evil.example")), "wrong issuer"),
            (hs256(claims(iss="https://idp.example.evil.io")), "wrong issuer"),
            (hs256(claims(iss="HTTPS://IDP.EXAMPLE")), "wrong issuer"),
            (hs256(claims()), "missing claim: iss")]:
        response = refused(connect, stack, **bearer(token))
        assert (response.status_code, response.reason_phrase) == (401, reason), token
    assert good.call("echo", "still here").data == "still here"
    metrics = stack.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="unauthorized"}'] == 4
