"""The browser library's token option in a real Chromium, against a gateway that needs a JWT
(`--jwt-secret-file`, `--jwt-leeway 0`), RabbitMQ and a worker running the security suite's
whoami handler: the token travels in the subprotocol list, the worker sees the principal, a
short-lived token is refreshed in-band, and a token the gateway refuses (401 at the handshake,
which the page cannot see) or one that expired (4401) stops the reconnect loop; setToken()
with a token of the same sub refreshes in-band, one of another sub reconnects as that one."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from browsersupport import pretty

pytestmark = [pytest.mark.processes, pytest.mark.rabbitmq]

SECRET = b"relaybus-browser-suite-secret-0123456789"
# Quick retries and polls, so the tests see several of them soon.
BACKOFF = {"initialDelayMs": 100, "maxDelayMs": 300}
REFUSED_METRIC = 'relaybus_handshakes_refused_total{reason="unauthorized"}'


def mint(sub: str = "alice", expiresIn: float = 600, key: bytes = SECRET) -> tuple[str, int]:
    """An HS256 token and its exp (seconds)."""
    exp = int(time.time() + expiresIn)
    return jwt.encode({"sub": sub, "exp": exp}, key, "HS256"), exp


@pytest.fixture
def secured(tmp_path: Path, handlerPath: None, makeStack: Any) -> Any:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    return makeStack("rabbitmq", ["--jwt-secret-file", str(secret), "--jwt-leeway", "0"],
                     workerArgs=["--handlers", "security.whoami_handlers"])


def refusedHandshakes(stack: Any) -> float:
    return stack.gateway.metrics().get(REFUSED_METRIC, 0)


def assertNoTokenIn(text: str, token: str) -> None:
    encoded = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    assert token not in text and encoded not in text, "a token reached a log"


def whoami(tab: Any, name: str) -> dict[str, Any]:
    tab.start(name, "whoami")
    return tab.waitForRun(name)


def test_token_function_connects_and_the_worker_sees_the_principal(secured, tab):
    token, exp = mint()
    tab.openHarness(secured.gateway)
    tab.evaluate("token => { harness.token = token; }", token)
    tab.evaluate("options => harness.connectWithToken(options)", BACKOFF)
    tab.waitFor("() => harness.client.state === 'open'", "the client to open with its token")
    assert tab.evaluate("() => harness.client.principal") == {"sub": "alice",
                                                              "expiresAt": exp * 1000}
    assert tab.evaluate("() => harness.tokenCalls") == [{"forceRefresh": False,
                                                         "reason": "connect"}]
    run = whoami(tab, "who")
    assert run["error"] is None and run["data"] == {"principal": "alice"}, pretty(run)
    assertNoTokenIn(secured.gateway.log, token)
    assertNoTokenIn("\n".join(tab.console), token)


def test_short_lived_token_is_refreshed_in_band_and_outlives_its_first_token(secured, tab):
    first, firstExp = mint(expiresIn=6)
    second, secondExp = mint(expiresIn=600)
    tab.openHarness(secured.gateway)
    tab.evaluate("token => { harness.token = token; }", first)
    tab.evaluate("options => harness.connectWithToken(options)", BACKOFF)
    connectionId = tab.waitFor(
        "() => harness.client.state === 'open' && harness.client.connectionId",
        "the client to open with the short-lived token")
    tab.evaluate("token => { harness.token = token; }", second)
    tab.waitFor("exp => harness.authEvents.some(e => e.ok && e.expiresAt === exp)",
                "the auth-ok for the refreshed token", secondExp * 1000)
    # Past the first token's exp (+ the gateway's leeway of 0): without the refresh the
    # gateway would have closed the connection with 4401 by now.
    tab.waitFor("exp => Date.now() > exp + 1000", "the first token's expiry to pass",
                firstExp * 1000)
    assert tab.evaluate("() => [harness.client.state, harness.client.connectionId]") == [
        "open", connectionId]
    states = tab.evaluate("() => harness.states")
    assert all(s["code"] != 4401 for s in states), pretty(states)
    assert tab.evaluate("() => harness.tokenCalls.map(c => c.reason)")[:2] == [
        "connect", "refresh"]
    run = whoami(tab, "after")
    assert run["error"] is None and run["data"] == {"principal": "alice"}, pretty(run)
    assert secured.gateway.metrics()["relaybus_tokens_expired_total"] == 0
    for token in (first, second):
        assertNoTokenIn(secured.gateway.log, token)


def test_a_refused_token_stops_the_reconnect_loop_until_a_new_one(secured, tab):
    bad, _ = mint(key=b"not-the-gateway-secret-0123456789abcdef")
    tab.openHarness(secured.gateway)
    tab.evaluate("token => { harness.token = token; }", bad)
    tab.evaluate("options => harness.connectWithToken(options)",
                 {**BACKOFF, "unauthorizedAfterMs": 0})
    tab.waitFor("() => harness.client.state === 'unauthorized'",
                "the client to give up the refused token")
    [entered] = tab.evaluate("() => harness.unauthorized")
    assert entered["reason"] == "refused", pretty(entered)
    assert refusedHandshakes(secured) == 2  # unauthorizedAfter: two handshakes, no more
    # The token function is polled at the backoff cadence; no handshake goes out meanwhile.
    tab.waitFor("() => harness.tokenCalls.filter(c => c.reason === 'unauthorized').length >= 3",
                "three polls of the token function")
    assert refusedHandshakes(secured) == 2
    assert tab.evaluate("() => harness.client.state") == "unauthorized"

    good, _ = mint()
    tab.evaluate("token => { harness.token = token; }", good)
    tab.waitFor("() => harness.client.state === 'open'", "the client to open with the new token")
    run = whoami(tab, "resumed")
    assert run["error"] is None and run["data"] == {"principal": "alice"}, pretty(run)
    for token in (bad, good):
        assertNoTokenIn(secured.gateway.log, token)


def test_an_expired_string_token_closes_4401_and_the_client_stops(secured, tab):
    token, _ = mint(expiresIn=4)
    tab.openHarness(secured.gateway)
    tab.connect(token=token, **BACKOFF)
    tab.waitFor("() => harness.client.state === 'unauthorized'",
                "the client to stop once its token expired")
    states = tab.evaluate("() => harness.states")
    assert {"state": "reconnecting", "code": 4401} in states, pretty(states)
    assert [u["reason"] for u in tab.evaluate("() => harness.unauthorized")] == ["expired"]
    assert secured.gateway.metrics()["relaybus_tokens_expired_total"] == 1
    assert refusedHandshakes(secured) == 0  # the expired token was not offered again


def test_set_token_of_the_same_sub_refreshes_in_band_and_of_another_sub_reconnects(secured, tab):
    alice, _ = mint("alice")
    aliceAgain, aliceAgainExp = mint("alice", expiresIn=900)
    bob, bobExp = mint("bob")
    tab.openHarness(secured.gateway)
    connectionId = tab.connect(token=alice, **BACKOFF)
    tab.evaluate("token => harness.client.setToken(token)", aliceAgain)
    tab.waitFor("exp => harness.authEvents.some(e => e.ok && e.expiresAt === exp)",
                "the auth-ok for alice's new token", aliceAgainExp * 1000)
    assert tab.evaluate("() => harness.client.connectionId") == connectionId

    tab.evaluate("token => harness.client.setToken(token)", bob)
    tab.waitFor("id => harness.client.state === 'open' && harness.client.connectionId !== id",
                "a new connection with bob's token", connectionId)
    assert tab.evaluate("() => harness.client.principal") == {"sub": "bob",
                                                              "expiresAt": bobExp * 1000}
    run = whoami(tab, "as-bob")
    assert run["error"] is None and run["data"] == {"principal": "bob"}, pretty(run)
    # bob's token never went in-band (the gateway would have refused it: another sub)
    assert secured.gateway.metrics()["relaybus_token_refreshes_refused_total"] == 0
    for token in (alice, aliceAgain, bob):
        assertNoTokenIn(secured.gateway.log, token)
        assertNoTokenIn("\n".join(tab.console), token)
