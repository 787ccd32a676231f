"""--jwks-url against a real `twistd relaybus`: the JWK Set comes from a small HTTP server the
test runs on 127.0.0.1 (http:// is allowed to loopback only), which counts what it is asked.
A rotated key works on its first use; unknown kids get 401 and cost at most one fetch per
30 s however many arrive; a key server that is down, or serves junk, leaves the known keys in
use; before the first set loads, handshakes get 503 and /readyz says not ready. A well-behaved
client on another connection is served throughout."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import InvalidStatus

from relaybus.harness import freePort

pytestmark = [pytest.mark.processes]

KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2", "k3")}


def jwkSet(*kids: str) -> bytes:
    return json.dumps({"keys": [
        {**jwt.algorithms.ECAlgorithm.to_jwk(KEYS[kid].public_key(), as_dict=True), "kid": kid}
        for kid in kids]}).encode()


def token(kid: str, sub: str = "alice", key: Any = None) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + 600)}, key or KEYS[kid], "ES256",
                      headers={"kid": kid})


def bearer(value: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {value}"}}


class KeyServer:
    """/jwks.json from `body`, counting the fetches; stop() takes it off the network."""

    def __init__(self) -> None:
        self.port = freePort()
        self.body = jwkSet("k1")
        self.fetches = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.fetches += 1
                    body = owner.body
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fetched(self) -> int:
        with self._lock:
            return self.fetches


@pytest.fixture
def keyServer() -> Iterator[KeyServer]:
    server = KeyServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gateway(keyServer: KeyServer, handlerPath: None, makeStack: Any, connect: Any) -> Any:
    """A gateway on the key server's set (k1), running whoami, and a well-behaved client."""
    stack = makeStack("memory", ["--jwks-url", keyServer.url, "--handlers", "whoami_handlers",
                                 "--handlers", "workers.examples"])
    stack.good = connect(stack, **bearer(token("k1", sub="bob")))
    return stack


def refused(connect: Any, stack: Any, value: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        connect(stack, **bearer(value))
    return caught.value.response.status_code, caught.value.response.reason_phrase


def stillServed(stack: Any) -> None:
    assert stack.good.call("whoami").data == {"principal": "bob"}


def test_a_known_kid_is_admitted_and_a_rotated_key_works_on_first_use(
        gateway: Any, keyServer: KeyServer, connect: Any) -> None:
    assert connect(gateway, **bearer(token("k1"))).call("whoami").data == {"principal": "alice"}
    assert keyServer.fetched() == 1  # the fetch at start
    keyServer.body = jwkSet("k1", "k2")  # the identity provider rotates: k2 published
    rotated = connect(gateway, **bearer(token("k2", sub="carol")))
    assert rotated.call("whoami").data == {"principal": "carol"}
    assert keyServer.fetched() == 2
    stillServed(gateway)
    metrics = gateway.gateway.metrics()
    assert metrics['relaybus_jwks_refreshes_total{outcome="ok"}'] == 2
    assert metrics["relaybus_jwks_keys"] == 2


def test_unknown_kids_get_401_and_at_most_one_fetch_per_30_s(
        gateway: Any, keyServer: KeyServer, connect: Any) -> None:
    started = time.monotonic()
    forged = ec.generate_private_key(ec.SECP256R1())
    for i in range(30):  # a flood of made-up kids
        assert refused(connect, gateway, token(f"made-up-{i}", key=forged)) == (
            401, "unknown key id")
    assert refused(connect, gateway, token("k1", key=forged)) == (401, "bad signature")
    elapsed = time.monotonic() - started
    assert keyServer.fetched() <= 2 + int(elapsed // 30), elapsed  # start, one refetch
    stillServed(gateway)
    assert gateway.gateway.metrics()[
        'relaybus_handshakes_refused_total{reason="unauthorized"}'] == 31
    assert "made-up-" not in gateway.gateway.log


def test_while_the_key_server_is_down_known_kids_still_verify(
        gateway: Any, keyServer: KeyServer, connect: Any, waitUntil: Any) -> None:
    keyServer.stop()
    assert refused(connect, gateway, token("k2")) == (401, "unknown key id")  # refetch fails
    waitUntil(lambda: gateway.gateway.metrics().get(
        'relaybus_jwks_refreshes_total{outcome="failed"}', 0) == 1, "the failed refetch")
    assert connect(gateway, **bearer(token("k1"))).call("whoami").data == {"principal": "alice"}
    stillServed(gateway)
    assert "Could not refresh the JWK Set from http://127.0.0.1:" in gateway.gateway.log
    assert "keeping the 1 key(s) loaded before" in gateway.gateway.log


def test_a_junk_set_is_refused_and_the_periodic_refresh_picks_up_the_next(
        keyServer: KeyServer, handlerPath: None, makeStack: Any, connect: Any,
        waitUntil: Any) -> None:
    stack = makeStack("memory", ["--jwks-url", keyServer.url, "--jwks-refresh", "1",
                                 "--handlers", "whoami_handlers",
                                 "--handlers", "workers.examples"])
    good = connect(stack, **bearer(token("k1", sub="bob")))
    secret = b"an-hmac-secret-that-must-never-be-used-or-logged"
    # An RSA d without its primes over a prime "modulus": PyJWT would search for the factors
    # on the reactor (seconds per 1 KiB set), at every refresh.
    prime = rsa.generate_private_key(65537, 2048).private_numbers().p
    exponent = jwt.utils.to_base64url_uint(2 * (prime - 1) + 1).decode()
    factorSearch = {"kty": "RSA", "kid": "k2", "n": jwt.utils.to_base64url_uint(prime).decode(),
                    "e": exponent, "d": exponent}
    for junk in (b"{]", b'{"keys": []}', b" " * (2 * 1024 * 1024),
                 json.dumps({"keys": [{"kty": "oct", "kid": "k2",
                                       "k": jwt.utils.base64url_encode(secret).decode()}]})
                 .encode(), json.dumps({"keys": [factorSearch]}).encode()):
        before = stack.gateway.metrics().get('relaybus_jwks_refreshes_total{outcome="failed"}',
                                             0)
        keyServer.body = junk
        waitUntil(lambda b=before: stack.gateway.metrics().get(
            'relaybus_jwks_refreshes_total{outcome="failed"}', 0) > b, "a refused set")
        assert good.call("whoami").data == {"principal": "bob"}
        assert connect(stack, **bearer(token("k1"))).call("whoami").data == {
            "principal": "alice"}
    hs256 = jwt.encode({"sub": "mallory", "exp": int(time.time() + 600)}, secret, "HS256",
                       headers={"kid": "k2"})
    assert refused(connect, stack, hs256)[0] == 401
    loaded = stack.gateway.metrics()['relaybus_jwks_refreshes_total{outcome="ok"}']
    keyServer.body = jwkSet("k3")  # k1 retired, k3 published: found by the periodic refresh
    waitUntil(lambda: stack.gateway.metrics()['relaybus_jwks_refreshes_total{outcome="ok"}']
              > loaded, "the periodic refresh")
    assert connect(stack, **bearer(token("k3"))).call("whoami").data == {"principal": "alice"}
    assert refused(connect, stack, token("k1")) == (401, "unknown key id")
    assert good.call("whoami").data == {"principal": "bob"}  # an open connection stays
    log = stack.gateway.log
    assert "symmetric (oct) keys are refused" in log and "larger than 1048576 bytes" in log
    assert "private key material is refused" in log and exponent not in log
    assert secret.decode() not in log and jwt.utils.base64url_encode(secret).decode() not in log


def test_until_the_first_set_loads_handshakes_get_503_and_readyz_says_not_ready(
        handlerPath: None, makeStack: Any, connect: Any) -> None:
    keyServer = KeyServer()  # not started: nothing listens on its port yet
    stack = makeStack("memory", gateways=0)
    gateway = stack.startGateway("--jwks-url", keyServer.url, "--handlers", "whoami_handlers",
                                 "--handlers", "workers.examples", "--allow-anonymous",
                                 wait=False)
    try:
        gateway.waitForLog(r"Could not load the JWK Set from http://127\.0\.0\.1:\d+/jwks\.json",
                           20)
        assert gateway.httpStatus("/readyz") == 503
        with pytest.raises(InvalidStatus) as caught:
            connect(stack, **bearer(token("k1")))
        response = caught.value.response
        assert (response.status_code, response.reason_phrase) == (
            503, "signing keys not loaded yet")
        assert response.headers["Retry-After"] == "5"
        anonymous = connect(stack)  # needs no key
        assert anonymous.call("whoami").data == {"principal": "anonymous"}
        keyServer.start()
        gateway.waitUntilReady(timeout=45)  # the retries back off to 30 s
        assert connect(stack, **bearer(token("k1"))).call("whoami").data == {
            "principal": "alice"}
        assert anonymous.call("whoami").data == {"principal": "anonymous"}
    finally:
        keyServer.stop()
