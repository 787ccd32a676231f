"""--jwks-url on a Clock: the first load, the periodic refresh, the refetch an unknown kid
causes (rate-limited, joined by the handshakes that wait, capped), failures that keep the old
keys, and the Agent fetcher's limits (size, status, timeout) against a fake IAgent. A real
Agent against a real local server: tests/integration/test_jwks_fetch.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.utils import to_base64url_uint
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from unitsupport import assertNoResult, failureResultOf, successResultOf

from relaybus.identity import (
    MAX_JWKS_KEYS,
    BearerToken,
    JWTChecker,
    JWTSettings,
    KeysUnavailable,
    Principal,
    loadChecker,
)
from relaybus.jwks import (
    MAX_HEAD_BYTES,
    MAX_JWKS_BYTES,
    AgentJWKSFetcher,
    JWKSFetchError,
    RemoteJWKS,
    checkJWKSURL,
)
from relaybus.testing import FakeJWKSFetcher

NOW = 1_764_000_000
URL = "https://idp.example/.well-known/jwks.json?tenant=secret-ish"
REFRESH_S = 300.0


def ecKey() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


KEY1, KEY2, KEY3 = ecKey(), ecKey(), ecKey()


def jwks(*keys: tuple[str, Any], **extra: Any) -> str:
    entries = []
    for kid, private in keys:
        entry = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
        entries.append({**entry, "kid": kid, **extra})
    return json.dumps({"keys": entries})


def token(key: Any, kid: str | None, sub: str = "alice") -> str:
    return jwt.encode({"sub": sub, "exp": NOW + 600}, key, "ES256",
                      headers={"kid": kid} if kid else None)


class Remote:
    """A checker fed by a RemoteJWKS whose server is a FakeJWKSFetcher, on a Clock."""

    def __init__(self, maxWaiters: int = 1000) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.checker = loadChecker(JWTSettings(jwksUrl=URL), self.clock)
        self.server = FakeJWKSFetcher()
        self.remote = RemoteJWKS(self.checker, self.server, self.clock, checkJWKSURL(URL),
                                 REFRESH_S, maxWaiters=maxWaiters)

    def start(self, body: str | None = None) -> None:
        self.remote.startService()
        if body is not None:
            self.server.respond(body)

    def login(self, value: str) -> Deferred[Principal]:
        return self.checker.requestAvatarId(BearerToken(value))


@pytest.fixture
def remote() -> Iterator[Remote]:
    remote = Remote()
    yield remote
    if remote.remote.running:
        remote.remote.stopService()
    assert remote.clock.getDelayedCalls() == []


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def text(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events if e.get("log_namespace") == "relaybus.jwks")


def refusal(d: Deferred[Any]) -> str:
    return str(failureResultOf(d, UnauthorizedLogin).value)


# The URL


@pytest.mark.parametrize("url", [
    "http://idp.example/jwks.json",  # clear text over a network
    "http://10.0.0.1/jwks.json",
    "http://127.0.0.1.evil.example/jwks.json",
    "ftp://idp.example/jwks.json",
    "file:///etc/passwd",
    "https://user:s3cr3t@idp.example/jwks.json",
    "https://idp.example/jwks.json#x",
    "https:///jwks.json",
    "https://idp.example:99999/jwks.json",
    "https://idp.example/\njwks.json",
    "https://idp.example/ jwks.json",
    "https://idp.éxample/jwks.json",
    "https://idp.example/" + "a" * 3000,
    "jwks.json",
    "",
])
def test_a_hostile_or_unsafe_url_is_refused_at_start(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        loadChecker(JWTSettings(jwksUrl=url), Clock())
    assert "s3cr3t" not in str(caught.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("https://idp.example/jwks.json?key=1", "https://idp.example/jwks.json"),
    ("http://127.0.0.1:8080/jwks.json", "http://127.0.0.1:8080/jwks.json"),
    ("http://127.0.0.2/jwks.json", "http://127.0.0.2/jwks.json"),
    ("http://[::1]:81/k", "http://[::1]:81/k"),
    ("http://localhost/k", "http://localhost/k"),
])
def test_https_or_loopback_http_is_accepted_and_logged_without_its_query(
        url: str, shown: str) -> None:
    assert checkJWKSURL(url) == shown
    loadChecker(JWTSettings(jwksUrl=url), Clock())


@pytest.mark.parametrize("refreshS", [0.0, 0.5, -1.0, 86_401.0])
def test_the_refresh_interval_is_bounded(refreshS: float) -> None:
    with pytest.raises(ValueError, match="--jwks-refresh"):
        loadChecker(JWTSettings(jwksUrl=URL, jwksRefreshS=refreshS), Clock())


# Loading and refreshing


def test_handshakes_wait_for_the_first_load_then_verify(remote: Remote,
                                                        logged: list[Any]) -> None:
    remote.start()
    with pytest.raises(KeysUnavailable):
        remote.checker.verify(token(KEY1, "k1"))
    waiting = remote.login(token(KEY1, "k1"))
    assertNoResult(waiting)
    assert remote.server.fetches == 1  # joined the fetch in flight
    remote.server.respond(jwks(("k1", KEY1)))
    assert successResultOf(waiting).sub == "alice"
    assert remote.remote.loaded and remote.remote.keyCount == 1
    assert remote.remote.refreshes == {"ok": 1, "failed": 0}
    assert "Loaded the JWK Set from https://idp.example/.well-known/jwks.json: 1 key(s)" in \
        text(logged)
    assert "secret-ish" not in text(logged)


def test_the_set_is_refreshed_periodically(remote: Remote) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S - 1)
    assert remote.server.fetches == 1
    remote.clock.advance(1)
    assert remote.server.fetches == 2
    remote.server.respond(jwks(("k2", KEY2)))  # k1 retired, k2 published
    assert remote.checker.verify(token(KEY2, "k2")).sub == "alice"
    retired = remote.login(token(KEY1, "k1"))  # unknown now: one refetch, which agrees
    remote.server.respond(jwks(("k2", KEY2)))
    assert refusal(retired) == "unknown key id"
    assert remote.server.fetches == 3


def test_an_unknown_kid_refetches_and_the_handshake_waits_for_it(remote: Remote) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(5)
    waiting = remote.login(token(KEY2, "k2"))
    assert remote.server.fetches == 2
    assertNoResult(waiting)
    remote.server.respond(jwks(("k1", KEY1), ("k2", KEY2)))
    assert successResultOf(waiting).sub == "alice"  # the rotated key works on first use
    assert remote.checker.verify(token(KEY1, "k1")).sub == "alice"


def test_unknown_kids_refetch_at_most_once_per_30_s(remote: Remote) -> None:
    remote.start(jwks(("k1", KEY1)))
    first = remote.login(token(KEY3, "nope"))
    remote.server.respond(jwks(("k1", KEY1)))
    assert refusal(first) == "unknown key id"
    for kid in ("a", "b", "c", "k2"):  # within 30 s: refused at once, nothing fetched
        remote.clock.advance(7)
        assert refusal(remote.login(token(KEY2, kid))) == "unknown key id"
    assert remote.server.fetches == 2
    remote.clock.advance(2)  # 30 s after the first refetch
    later = remote.login(token(KEY2, "k2"))
    assert remote.server.fetches == 3
    remote.server.respond(jwks(("k1", KEY1), ("k2", KEY2)))
    assert successResultOf(later).sub == "alice"


def test_a_flood_of_unknown_kids_shares_one_fetch_and_the_waiters_are_capped() -> None:
    remote = Remote(maxWaiters=5)
    remote.start(jwks(("k1", KEY1)))
    tokens = [token(KEY2, f"kid-{i}") for i in range(3)]
    waiting = [remote.login(tokens[i % 3]) for i in range(20)]
    assert remote.server.fetches == 2
    for d in waiting[5:]:  # beyond the cap: refused at once
        assert refusal(d) == "unknown key id"
    remote.server.respond(jwks(("k1", KEY1), ("kid-0", KEY2)))
    results = [d for d in waiting[:5]]
    assert successResultOf(results[0]).sub == "alice"
    assert refusal(results[1]) == "unknown key id"
    assert remote.server.fetches == 2
    remote.remote.stopService()


def test_a_token_without_kid_against_several_keys_does_not_refetch(remote: Remote) -> None:
    remote.start(jwks(("k1", KEY1), ("k2", KEY2)))
    assert refusal(remote.login(token(KEY1, None))) == "unknown key id"
    assert remote.server.fetches == 1


@pytest.mark.parametrize(("name", "body", "reason"), [
    ("not JSON", "{]", "--jwks-url: not JSON"),
    ("not UTF-8", b"\xff\xfe{}", "the response is not UTF-8"),
    ("NaN", '{"keys": [NaN]}', "--jwks-url: not JSON"),
    ("no keys member", '{"kids": []}', "not a JWK Set"),
    ("a list", "[]", "not a JWK Set"),
    ("empty set", '{"keys": []}', "not a JWK Set with usable keys"),
    ("unusable keys", '{"keys": [{"kty": "nope"}, 5]}', "not a JWK Set with usable keys"),
    ("only encryption keys", jwks(("k1", KEY2), use="enc"), "not a JWK Set with usable keys"),
    ("oct key", json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ",
                                      "kid": "k2"}]}), "symmetric (oct) keys are refused"),
    ("too many keys", jwks(*[(f"k{i}", KEY2) for i in range(MAX_JWKS_KEYS + 1)]),
     f"more than {MAX_JWKS_KEYS} keys"),
    ("duplicate kid", jwks(("k2", KEY2), ("k2", KEY3)), "two keys share a kid"),
    ("a kid that is a list", json.dumps({"keys": [
        {**json.loads(jwks(("k2", KEY2)))["keys"][0], "kid": ["k2"]}]}), "a kid must be a string"),
    ("a kid that is an object", json.dumps({"keys": [
        *json.loads(jwks(("k2", KEY2)))["keys"],
        {**json.loads(jwks(("k3", KEY3)))["keys"][0], "kid": {"k": 3}}]}),
     "a kid must be a string"),
])
def test_a_bad_set_is_logged_and_the_old_keys_are_kept(
        remote: Remote, logged: list[Any], name: str, body: Any, reason: str) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S)
    remote.server.respond(body)
    assert remote.checker.verify(token(KEY1, "k1")).sub == "alice", name
    assert remote.remote.refreshes == {"ok": 1, "failed": 1}
    logText = text(logged)
    assert reason in logText and "keeping the 1 key(s) loaded before" in logText
    assert "c2VjcmV0" not in logText and '"x"' not in logText


def test_an_unexpected_error_loading_a_set_is_logged_and_counted(
        remote: Remote, logged: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S)

    def broken(text: str, option: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(remote.checker, "replaceKeys", broken)
    remote.server.respond(jwks(("k1", KEY1)))
    assert remote.remote.refreshes == {"ok": 1, "failed": 1}
    assert "Fetching the JWK Set failed unexpectedly" in text(logged)
    assert "keeping the 1 key(s) loaded before" in text(logged)
    [call] = remote.clock.getDelayedCalls()
    assert call.getTime() - remote.clock.seconds() == 1  # retried as any failure


def privateRSAWithoutPrimes() -> dict[str, Any]:
    """An RSA JWK with a private exponent but no primes, over a prime "modulus": PyJWT searches
    for the factors (500 rounds of modular powers, on the reactor) and never finds them. Measured
    before the fix: 3.2 s for a 409-byte set with a 2048-bit prime, 72 s for 1093 bytes with a
    4096-bit one. A 512-bit prime keeps this test fast."""
    prime = rsa.generate_private_key(65537, 1024).private_numbers().p
    exponent = to_base64url_uint(2 * (prime - 1) + 1).decode()
    return {"kty": "RSA", "kid": "k2", "n": to_base64url_uint(prime).decode(), "e": exponent,
            "d": exponent}


@pytest.mark.parametrize("name", ["RSA d without primes", "RSA private", "EC private",
                                  "Ed25519 private"])
def test_a_set_with_private_key_material_is_refused_before_parsing(
        remote: Remote, logged: list[Any], monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    recoveries: list[Any] = []
    monkeypatch.setattr(jwt.algorithms, "rsa_recover_prime_factors",
                        lambda *args: recoveries.append(args) or (1, 1))
    private = {
        "RSA d without primes": privateRSAWithoutPrimes,
        "RSA private": lambda: jwt.algorithms.RSAAlgorithm.to_jwk(
            rsa.generate_private_key(65537, 2048), as_dict=True),
        "EC private": lambda: jwt.algorithms.ECAlgorithm.to_jwk(KEY2, as_dict=True),
        "Ed25519 private": lambda: jwt.algorithms.OKPAlgorithm.to_jwk(
            ed25519.Ed25519PrivateKey.generate(), as_dict=True),
    }[name]()
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S)
    public = json.loads(jwks(("k1", KEY1)))["keys"]
    remote.server.respond(json.dumps({"keys": [*public, {**private, "kid": "k2"}]}))
    assert recoveries == []
    assert remote.remote.refreshes == {"ok": 1, "failed": 1}
    logText = text(logged)
    assert "--jwks-url: private key material is refused; publish public keys only" in logText
    assert private["d"] not in logText
    assert remote.checker.verify(token(KEY1, "k1")).sub == "alice"


def test_while_the_server_is_down_known_kids_verify_and_retries_back_off(
        remote: Remote, logged: list[Any]) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S)
    remote.server.fail("cannot connect")
    assert remote.checker.verify(token(KEY1, "k1")).sub == "alice"
    delays = []
    for _ in range(7):
        [call] = remote.clock.getDelayedCalls()
        delays.append(call.getTime() - remote.clock.seconds())
        remote.clock.advance(delays[-1])
        remote.server.fail("HTTP status 502")
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert remote.remote.refreshes == {"ok": 1, "failed": 8}
    assert "Could not refresh the JWK Set from https://idp.example/.well-known/jwks.json: " \
           "HTTP status 502; keeping the 1 key(s)" in text(logged)
    [call] = remote.clock.getDelayedCalls()
    remote.clock.advance(call.getTime() - remote.clock.seconds())
    remote.server.respond(jwks(("k1", KEY1)))
    [call] = remote.clock.getDelayedCalls()
    assert call.getTime() - remote.clock.seconds() == REFRESH_S  # back to the interval


def test_a_failed_first_load_leaves_handshakes_at_503_and_is_retried(
        remote: Remote, logged: list[Any]) -> None:
    remote.start()
    waiting = remote.login(token(KEY1, "k1"))
    remote.server.fail("no answer within 10 s")
    failureResultOf(waiting, KeysUnavailable)
    assert "Could not load the JWK Set" in text(logged)
    assert "handshakes with a token get HTTP 503" in text(logged)
    remote.clock.advance(1)
    assert remote.server.fetches == 2
    remote.server.respond(jwks(("k1", KEY1)))
    assert successResultOf(remote.login(token(KEY1, "k1"))).sub == "alice"


def test_stopping_cancels_the_fetch_in_flight_and_the_timer(remote: Remote) -> None:
    remote.start(jwks(("k1", KEY1)))
    remote.clock.advance(REFRESH_S)
    waiting = remote.login(token(KEY2, "k2"))  # joins the periodic fetch
    remote.remote.stopService()
    assert remote.server.cancelled == 1 and remote.server.pending == []
    assert refusal(waiting) == "unknown key id"
    assert remote.clock.getDelayedCalls() == []
    assert remote.remote.refreshes == {"ok": 1, "failed": 0}
    assert remote.remote.keyUnknown() is None


def test_an_in_band_refresh_with_an_unknown_kid_starts_a_refetch(remote: Remote) -> None:
    from relaybus.admission import Authenticator
    from relaybus.errors import RelaybusError

    remote.start(jwks(("k1", KEY1)))
    authenticator = Authenticator(remote.checker, False, 30)
    current = remote.checker.verify(token(KEY1, "k1"))
    with pytest.raises(RelaybusError, match="unknown key id"):
        authenticator.refreshed(current, token(KEY2, "k2"))
    assert remote.server.fetches == 2
    remote.server.respond(jwks(("k1", KEY1), ("k2", KEY2)))
    assert authenticator.refreshed(current, token(KEY2, "k2")).sub == "alice"


def test_the_checker_without_a_remote_set_answers_at_once(tmp_path: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks(("k1", KEY1)))
    checker: JWTChecker = loadChecker(JWTSettings(jwksFile=str(path)), Clock())
    assert refusal(checker.requestAvatarId(BearerToken(token(KEY2, "k2")))) == "unknown key id"


# The Agent fetcher, against a fake IAgent


class FakeResponse:
    def __init__(self, code: int = 200, chunks: tuple[bytes, ...] = (),
                 length: Any = UNKNOWN_LENGTH, end: bool = True) -> None:
        self.code, self.length = code, length
        self.phrase, self.version, self.headers = b"OK", (b"HTTP", 1, 1), Headers()
        self.transport = StringTransport()
        self._chunks, self._end = chunks, end
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        for chunk in self._chunks:
            if self.transport.producerState == "stopped":
                return
            protocol.dataReceived(chunk)
        if self._end and self.transport.producerState != "stopped":
            protocol.connectionLost(Failure(ResponseDone()))


class FakeAgent:
    def __init__(self) -> None:
        self.requests: list[tuple[bytes, bytes, Headers, Deferred[Any]]] = []
        self.cancelled = 0

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
        self.requests.append((method, uri, headers or Headers(), d))
        return d


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


def fetcher(agent: FakeAgent, clock: Clock | None = None) -> AgentJWKSFetcher:
    return AgentJWKSFetcher(clock or Clock(), "https://idp.example/jwks.json", agent=agent)


def fetchError(d: Deferred[bytes]) -> str:
    return str(failureResultOf(d, JWKSFetchError).value)


def test_the_agent_gets_the_url_and_reads_the_body(agent: FakeAgent) -> None:
    d = fetcher(agent).fetch()
    [(method, uri, headers, request)] = agent.requests
    assert (method, uri) == (b"GET", b"https://idp.example/jwks.json")
    assert b"application/jwk-set+json" in headers.getRawHeaders(b"accept")[0]
    request.callback(FakeResponse(chunks=(b'{"keys"', b": []}")))
    assert successResultOf(d) == b'{"keys": []}'


@pytest.mark.parametrize("code", [301, 302, 304, 404, 500, 503])
def test_a_status_other_than_200_is_refused_redirects_included(agent: FakeAgent,
                                                                code: int) -> None:
    d = fetcher(agent).fetch()
    response = FakeResponse(code, chunks=(b"<html>" * 100,))
    agent.requests[0][3].callback(response)
    assert fetchError(d) == f"HTTP status {code}"
    assert response.transport.producerState == "stopped"  # the body is not read


def test_a_declared_length_over_the_cap_is_refused_before_reading(agent: FakeAgent) -> None:
    d = fetcher(agent).fetch()
    response = FakeResponse(length=MAX_JWKS_BYTES + 1, chunks=(b"x",))
    agent.requests[0][3].callback(response)
    assert fetchError(d) == f"the response is larger than {MAX_JWKS_BYTES} bytes"
    assert response.transport.producerState == "stopped"


def test_a_streamed_body_over_the_cap_aborts_the_transfer(agent: FakeAgent) -> None:
    d = fetcher(agent).fetch()
    chunk = b" " * 65536
    response = FakeResponse(chunks=(chunk,) * 40, end=False)  # 2.5 MiB, never ends
    agent.requests[0][3].callback(response)
    assert fetchError(d) == f"the response is larger than {MAX_JWKS_BYTES} bytes"
    assert response.transport.producerState == "stopped"


def test_a_body_cut_short_fails(agent: FakeAgent) -> None:
    from twisted.internet.error import ConnectionLost

    d = fetcher(agent).fetch()
    response = FakeResponse(chunks=(b'{"ke',), end=False)
    agent.requests[0][3].callback(response)
    response.protocol.connectionLost(Failure(ConnectionLost()))
    assert fetchError(d) == "the connection was lost during the response"


def test_no_answer_in_time_times_out(agent: FakeAgent) -> None:
    clock = Clock()
    d = fetcher(agent, clock).fetch()
    clock.advance(9.9)
    assertNoResult(d)
    clock.advance(0.1)
    assert fetchError(d) == "no answer within 10 s"
    assert agent.cancelled == 1


def test_a_body_that_trickles_past_the_timeout_is_aborted(agent: FakeAgent) -> None:
    clock = Clock()
    d = fetcher(agent, clock).fetch()
    response = FakeResponse(chunks=(b'{"keys": [',), end=False)
    agent.requests[0][3].callback(response)
    clock.advance(10)
    assert fetchError(d) == "no answer within 10 s"
    assert response.transport.producerState == "stopped"
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(("error", "reason"), [
    ("dns", "the host name does not resolve"),
    ("refused", "cannot connect"),
    ("never", "the connection failed (Error)"),
])
def test_connection_failures_have_short_reasons(agent: FakeAgent, error: str,
                                                reason: str) -> None:
    from OpenSSL import SSL
    from twisted.internet.error import ConnectionRefusedError, DNSLookupError
    from twisted.web.client import ResponseNeverReceived

    d = fetcher(agent).fetch()
    value: Exception = {"dns": DNSLookupError("idp.example"),
                        "refused": ConnectionRefusedError(),
                        "never": ResponseNeverReceived([Failure(SSL.Error("certificate "
                                                                          "verify failed"))])
                        }[error]
    agent.requests[0][3].errback(value)
    assert fetchError(d) == reason


def test_cancelling_a_fetch_cancels_the_request(agent: FakeAgent) -> None:
    from twisted.internet.defer import CancelledError

    d = fetcher(agent).fetch()
    d.cancel()
    failureResultOf(d, CancelledError)
    assert agent.cancelled == 1


class Wire:
    """The real Agent of AgentJWKSFetcher on a MemoryReactorClock: the server's bytes go to the
    connection the fetch opened."""

    def __init__(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.fetched = AgentJWKSFetcher(self.reactor, "http://127.0.0.1:8000/jwks.json").fetch()
        [(_host, _port, factory, _timeout, _bind)] = self.reactor.tcpClients
        self.protocol = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.received = 0

    def send(self, data: bytes) -> None:
        self.received += len(data)
        self.protocol.dataReceived(data)

    def lost(self) -> None:
        from twisted.internet.error import ConnectionAborted

        self.protocol.connectionLost(Failure(ConnectionAborted()))


def test_a_response_whose_headers_never_end_is_cut_at_the_cap() -> None:
    """twisted.web's client bounds neither the number nor the size of response headers: a
    server sending them for the 10 s of a fetch grew the gateway to 3.4 GB (measured)."""
    wire = Wire()
    assert wire.transport.value().startswith(b"GET /jwks.json HTTP/1.1\r\n")
    wire.send(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Pad: " + b"a" * 16_000 + b"\r\n"
    while not wire.transport.disconnecting and wire.received < 8 * MAX_JWKS_BYTES:
        wire.send(line)
    assert wire.transport.disconnecting
    assert wire.received <= MAX_JWKS_BYTES + MAX_HEAD_BYTES + len(line)
    wire.lost()
    assert fetchError(wire.fetched) == (
        f"the response is larger than {MAX_JWKS_BYTES + MAX_HEAD_BYTES} bytes, headers included")
    assert wire.reactor.getDelayedCalls() == []


def test_a_body_in_tiny_chunks_is_cut_at_the_cap() -> None:
    wire = Wire()
    wire.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while not wire.transport.disconnecting and wire.received < 8 * MAX_JWKS_BYTES:
        wire.send(b"1\r\n \r\n" * 1024)  # 6 bytes on the wire for each byte of body
    assert wire.transport.disconnecting
    wire.lost()
    assert "the response is larger than" in fetchError(wire.fetched)


def test_the_endpoints_know_http_and_https_only() -> None:
    """checkJWKSURL refuses other schemes at start; the endpoint factory, which picks TLS by
    the scheme, never falls back to clear text for one it does not know."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    fetched = AgentJWKSFetcher(reactor, "wss://idp.example/jwks.json").fetch()
    assert fetchError(fetched) == "the request failed (SchemeNotSupported)"
    assert reactor.tcpClients == [] and reactor.sslClients == []


def test_a_set_over_the_real_agent_loads() -> None:
    wire = Wire()
    body = jwks(("k1", KEY1)).encode()
    wire.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert successResultOf(wire.fetched) == body


# Through the gateway: 503 until the first load, /readyz, /metrics


@pytest.fixture
def gateway() -> Iterator[Any]:
    import txaio
    from twisted.internet.testing import MemoryReactorClock

    from relaybus.config import GatewayConfig
    from relaybus.service import GatewayService

    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    txaio.use_twisted()
    previous, txaio.config.loop = txaio.config.loop, reactor
    settings = JWTSettings(jwksUrl=URL)
    server = FakeJWKSFetcher()
    service = GatewayService(
        GatewayConfig(listen="tcp:8080:interface=127.0.0.1", gatewayId="gw-test",
                      jwt=settings), {}, reactor, checker=loadChecker(settings, reactor),
        jwksFetcher=server)
    service.server = server  # type: ignore[attr-defined]
    service.startService()
    try:
        yield service
    finally:
        service.stopService()
        txaio.config.loop = previous


def handshake(service: Any, value: str) -> Any:
    from websupport import Client

    client = Client(service.factory)
    client.handshake(headers={"Authorization": f"Bearer {value}"})
    return client.transport


def metrics(service: Any) -> str:
    from websupport import get

    return get(service.site, b"/metrics")[1].decode()


def test_the_gateway_answers_503_until_the_first_set_loads(gateway: Any) -> None:
    from websupport import get

    assert get(gateway.site, b"/readyz")[0] == 503
    first = handshake(gateway, token(KEY1, "k1"))
    assert first.value() == b""  # waits on the first fetch
    gateway.server.fail("HTTP status 500")
    assert first.value().startswith(b"HTTP/1.1 503 signing keys not loaded yet\r\n")
    second = handshake(gateway, token(KEY1, "k1"))  # starts a fetch (no refetch for 30 s)
    gateway.server.fail("HTTP status 500")
    third = handshake(gateway, token(KEY1, "k1"))  # refused at once
    for response in (second.value(), third.value()):
        assert response.startswith(b"HTTP/1.1 503 signing keys not loaded yet\r\n")
        assert b"Retry-After: 5\r\n" in response and b"WWW-Authenticate" not in response
    assert 'relaybus_handshakes_refused_total{reason="keys_unavailable"} 3.0' in \
        metrics(gateway)
    assert "relaybus_jwks_keys 0.0" in metrics(gateway)
    assert "relaybus_jwks_age_seconds" not in metrics(gateway)

    gateway.factory.clock.advance(2)  # the retry, backing off
    gateway.server.respond(jwks(("k1", KEY1)))
    assert get(gateway.site, b"/readyz")[0] == 200
    assert handshake(gateway, token(KEY1, "k1")).value().startswith(b"HTTP/1.1 101 ")
    gateway.factory.clock.advance(30)
    rotated = handshake(gateway, token(KEY2, "k2"))
    assert rotated.value() == b""  # unknown: waits on the refetch
    gateway.server.respond(jwks(("k1", KEY1), ("k2", KEY2)))
    assert rotated.value().startswith(b"HTTP/1.1 101 ")
    gateway.factory.clock.advance(12)
    text = metrics(gateway)
    assert 'relaybus_jwks_refreshes_total{outcome="ok"} 2.0' in text
    assert 'relaybus_jwks_refreshes_total{outcome="failed"} 2.0' in text
    assert "relaybus_jwks_keys 2.0" in text and "relaybus_jwks_age_seconds 12.0" in text
    assert "idp.example" not in text
