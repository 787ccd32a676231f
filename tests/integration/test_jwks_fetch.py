"""The real twisted.web Agent of --jwks-url against a real twisted.web server on 127.0.0.1, in
the test's reactor (pytest-twisted): a set loads; a redirect, an oversized chunked body, a
server that never answers and an HTTPS server whose certificate nobody trusts all fail with
their short reason."""

from __future__ import annotations

import datetime
import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as globalReactor
from twisted.internet.ssl import PrivateCertificate
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.util import Redirect

from relaybus.identity import BearerToken, JWTSettings, loadChecker
from relaybus.jwks import AgentJWKSFetcher, JWKSFetchError, RemoteJWKS, checkJWKSURL

reactor: Any = globalReactor
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [{**jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key(),
                                                                  as_dict=True), "kid": "k1"}]})


class Leaf(Resource):
    isLeaf = True

    def __init__(self, body: bytes = b"", chunks: int = 0, hang: bool = False) -> None:
        super().__init__()
        self.body, self.chunks, self.hang = body, chunks, hang
        self.requests = 0

    def render_GET(self, request: Request) -> Any:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        if self.hang:
            return NOT_DONE_YET
        if self.chunks:  # no Content-Length: chunked, and more than the cap
            for _ in range(self.chunks):
                request.write(b" " * 65536)
            request.finish()
            return NOT_DONE_YET
        return self.body


@pytest_twisted.async_yield_fixture
async def server() -> AsyncIterator[tuple[str, dict[str, Leaf]]]:
    leaves = {"jwks.json": Leaf(JWKS.encode()), "big.json": Leaf(chunks=40),
              "slow.json": Leaf(hang=True)}
    root = Resource()
    for name, leaf in leaves.items():
        root.putChild(name.encode(), leaf)
    root.putChild(b"moved.json", Redirect(b"/jwks.json"))
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}", leaves
    finally:
        await port.stopListening()


def selfSigned() -> PrivateCertificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                                  critical=False)
                   .sign(key, hashes.SHA256()))
    return PrivateCertificate.loadPEM(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()
        + certificate.public_bytes(serialization.Encoding.PEM).decode())


async def fetchError(url: str, timeoutS: float = 10.0) -> str:
    with pytest.raises(JWKSFetchError) as caught:
        await AgentJWKSFetcher(reactor, url, timeoutS=timeoutS).fetch()
    return str(caught.value)


@pytest_twisted.ensureDeferred
async def test_the_agent_loads_a_set_that_verifies_a_token(server: Any) -> None:
    base, leaves = server
    body = await AgentJWKSFetcher(reactor, f"{base}/jwks.json").fetch()
    assert json.loads(body) == json.loads(JWKS)
    url = f"{base}/jwks.json"
    checker = loadChecker(JWTSettings(jwksUrl=url), reactor)
    remote = RemoteJWKS(checker, AgentJWKSFetcher(reactor, url), reactor, checkJWKSURL(url))
    remote.startService()
    try:
        token = jwt.encode({"sub": "alice", "exp": reactor.seconds() + 60}, KEY, "ES256",
                           headers={"kid": "k1"})
        principal = await checker.requestAvatarId(BearerToken(token))  # waits for the load
        assert principal.sub == "alice" and remote.keyCount == 1
        assert leaves["jwks.json"].requests == 2
    finally:
        remote.stopService()


@pytest_twisted.ensureDeferred
async def test_the_agent_refuses_redirects_big_bodies_and_slow_servers(server: Any) -> None:
    base, leaves = server
    assert await fetchError(f"{base}/moved.json") == "HTTP status 302"
    assert await fetchError(f"{base}/missing.json") == "HTTP status 404"
    assert await fetchError(f"{base}/big.json") == "the response is larger than 1048576 bytes"
    assert await fetchError(f"{base}/slow.json", timeoutS=0.5) == "no answer within 0.5 s"
    assert leaves["slow.json"].requests == 1


@pytest_twisted.ensureDeferred
async def test_https_with_a_certificate_nobody_trusts_is_refused() -> None:
    root = Resource()
    root.putChild(b"jwks.json", Leaf(JWKS.encode()))
    port = reactor.listenSSL(0, Site(root), selfSigned().options(), interface="127.0.0.1")
    try:
        reason = await fetchError(f"https://localhost:{port.getHost().port}/jwks.json")
        assert reason.startswith("the connection failed ("), reason
    finally:
        await port.stopListening()
