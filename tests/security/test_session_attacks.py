"""Attacks from inside an admitted session, on a real `twistd relaybus` gateway: guessing
another connection's requestIds, forging gateway log lines and leaking tokens through
client-log, and a policy reload while requests stream. Each asserts the documented answer and
that a well-behaved client on another connection is served throughout."""

from __future__ import annotations

import base64
import json
import re
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from relaybus.harness import LOG_ERROR_PATTERNS

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-security-suite-secret-0123456789"


def token(sub: str, *roles: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600, "roles": list(roles)},
                      SECRET, "HS256")


def bearer(value: str) -> dict[str, Any]:
    return {"additional_headers": {"Authorization": f"Bearer {value}"}}


def secretFile(tmp_path: Path) -> str:
    path = tmp_path / "secret"
    path.write_bytes(SECRET)
    return str(path)


def stillServed(good: Any) -> None:
    assert good.call("echo", "still here").data == "still here"


# Guessing another connection's requestIds


def test_another_connections_cancel_and_duplicate_of_a_request_id_do_not_touch_it(
        tmp_path: Path, provider: str, handlerPath: None, makeStack: Any,
        connect: Any) -> None:
    """requestIds are per connection (protocol rule 4): a cancel for an id this connection
    does not have is ignored, and a request with that id is the attacker's own request."""
    stack = makeStack(provider, ["--jwt-secret-file", secretFile(tmp_path)])
    victim = connect(stack, **bearer(token("alice")))
    good = connect(stack, **bearer(token("bob")))
    attackers = [connect(stack, **bearer(token("alice"))),  # the same principal
                 connect(stack, **bearer(token("mallory")))]
    mark = stack.mark()
    victimId = victim.request("testRequest", {"count": 30, "delayMs": 100},
                              requestId="job-1", timeoutMs=60_000)
    victim.waitForChunk(victimId)
    for attacker in attackers:
        attacker.cancel(victimId)
        mine = attacker.request("echo", {"mine": True}, requestId=victimId)
        assert attacker.collect(mine).data == {"mine": True}
        # A duplicate of the id while it is in flight on the attacker's own connection:
        # duplicate_request_id there, and only there.
        attacker.request("testRequest", {"count": 2, "delayMs": 100}, requestId=victimId)
        attacker.waitForChunk(victimId)
        attacker.request("echo", 1, requestId=victimId)
        duplicate = attacker.next(lambda f: f.get("requestId") == victimId
                                  and f["type"] == "error", "the duplicate's error")
        assert duplicate["error"]["code"] == "duplicate_request_id"
        assert attacker.collect(victimId).data["chunks"] == 2
        attacker.assertQuiet(victimId)  # the cancel got no answer: nothing was cancelled
    assert stack.gateway.metrics()["relaybus_requests_in_flight"] == 1  # the victim's, still
    outcome = victim.finish(victimId)
    assert [c["data"]["index"] for c in outcome.chunks] == list(range(30))
    assert outcome.data["chunks"] == 30
    assert not [f for f in victim.received if f.get("requestId") not in (victimId, None)
                and not str(f.get("requestId")).startswith("barrier")]
    assert "Stopped testRequest" not in stack.handlerLogSince(mark)  # no handler was stopped
    stillServed(good)
    metrics = stack.gateway.metrics()
    assert metrics.get('relaybus_requests_ended_total{outcome="cancelled"}', 0) == 0
    assert metrics['relaybus_requests_refused_total{code="duplicate_request_id"}'] == 2


# client-log: forged lines and tokens

FAKE_LINE = "2026-11-26T10:00:00+0000 [relaybus.gateway#critical] Unhandled Error"
# A line of twistd's log: its timestamp, then [namespace#level].
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[([\w.]+)#(\w+)\] ")


@pytest.mark.log_errors_expected  # the escaped fake lines say "Unhandled Error" (checked below)
def test_client_log_cannot_forge_gateway_log_lines(tmp_path: Path, makeStack: Any,
                                                   connect: Any) -> None:
    stack = makeStack("memory", ["--jwt-secret-file", secretFile(tmp_path)])
    client = connect(stack, **bearer(token("alice")))
    good = connect(stack, **bearer(token("bob")))
    tag = secrets.token_hex(4)
    messages = [
        f"{tag}-1 ok\n{FAKE_LINE}\nTraceback (most recent call last):\n  boom",
        f"{tag}-2 \x1b[2J\x1b[31mred\x1b[0m\r{FAKE_LINE}\u2028{FAKE_LINE}\x9b2K\x00\x7f",
        f"{tag}-3 \r\n\r\n{FAKE_LINE}",
    ]
    client.sendJSON({"type": "client-log", "level": "error", "message": messages[0]})
    client.sendJSON({"type": "client-log", "entries": [
        {"level": "warn", "message": m, "context": {"fake": FAKE_LINE + "\n"}}
        for m in messages[1:]]})
    stillServed(client)  # frames are handled in order: the entries are logged by now
    stack.gateway.waitForLog(f"{tag}-3")
    stillServed(good)
    log = stack.gateway.log
    for raw in ("\x1b", "\x9b", "\u2028", "\r", "\x00", "\x7f"):
        assert raw not in log, repr(raw)
    connectionId = client.hello["connectionId"]
    for i in (1, 2, 3):
        [line] = [line for line in log.splitlines() if f"{tag}-{i}" in line]
        match = LOG_LINE.match(line)
        assert match and match.groups()[0] == "relaybus.clientlog", line
        assert line[match.end():].startswith(f"[{connectionId} tcp4:127.0.0.1:"), line
        assert FAKE_LINE in line  # escaped, on the client's own line
    assert "\\x0a2026-11-26T10:00:00+0000" in log and "\\x1b[2J" in log
    for line in log.splitlines():
        assert not line.startswith(("2026-11-26T10:00:00", "Traceback")), line
        if LOG_ERROR_PATTERNS.search(line):  # only the client's own, attributed text
            match = LOG_LINE.match(line)
            assert match and match.groups()[0] == "relaybus.clientlog", line


def test_client_log_never_writes_a_token_to_the_gateway_log(tmp_path: Path, makeStack: Any,
                                                            connect: Any) -> None:
    stack = makeStack("memory", ["--jwt-secret-file", secretFile(tmp_path)])
    own = token("alice")
    client = connect(stack, **bearer(own))
    good = connect(stack, **bearer(token("bob")))
    other = token("mallory", "admin")
    algNone = (base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip("=") + "."
               + base64.urlsafe_b64encode(json.dumps({"sub": "root"}).encode()).decode()
               .rstrip("=") + ".")
    subprotocol = "base64url.bearer.relaybus." + base64.urlsafe_b64encode(
        own.encode()).decode().rstrip("=")
    tag = secrets.token_hex(4)
    messages = [f"{tag}-1 my token is {own}, and another: {other}",
                f"{tag}-2 Authorization: Bearer {own}",
                f"{tag}-3 headers\nauthorization: bearer\n{own}",
                f"{tag}-4 alg none {algNone} trailing",
                f"{tag}-5 offered {subprotocol}",
                f"{tag}-6 url /ws?access_token={own}&x=1"]
    client.sendJSON({"type": "client-log", "entries": [
        {"level": "info", "message": m, "context": {"token": own, own: [other]}}
        for m in messages]})
    stillServed(client)
    stack.gateway.waitForLog(f"{tag}-6")
    stillServed(good)
    log = stack.gateway.log
    encoded = subprotocol.rsplit(".", 1)[1]
    for secret in (own, other, algNone, encoded):
        for part in filter(None, secret.split(".")):
            assert part not in log, part
    lines = [line for line in log.splitlines() if tag in line]
    assert len(lines) == 6 and all("[redacted]" in line for line in lines), lines


# A policy reload under load

OLD_POLICY = {"roles": {"user": ["testRequest", "echo", "slow"]}}
NEW_POLICY = {"roles": {"user": ["testRequest", "echo"]}}  # `slow` is no longer allowed
IN_FLIGHT = 6
AFTER_RELOAD = 30  # requests sent after the reload was logged


def test_a_policy_reload_under_load_loses_and_doubles_nothing(
        tmp_path: Path, handlerPath: None, makeStack: Any, connect: Any) -> None:
    """SIGHUP while one connection keeps several requests in flight: those in flight finish
    (the policy is checked when a request is accepted), requests sent after the reload follow
    the new policy, every request ends exactly once (and the fixture checks /metrics)."""
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(OLD_POLICY))
    stack = makeStack("memory", ["--jwt-secret-file", secretFile(tmp_path),
                                 "--authz-policy", str(policy), "--handlers",
                                 "whoami_handlers", "--handlers", "workers.examples"])
    client = connect(stack, **bearer(token("alice", "user")))
    good = connect(stack, **bearer(token("bob", "user")))
    kinds = [("slow", {"count": 4, "delayMs": 40}), ("testRequest", {"count": 3, "delayMs": 30}),
             ("echo", "e")]
    sent: dict[str, tuple[str, str]] = {}  # requestId -> (requestType, phase)
    chunks: dict[str, int] = {}
    ended: dict[str, dict[str, Any]] = {}
    phase, n, afterCount = "before", 0, 0
    atReload: list[str] = []
    deadline = time.monotonic() + 60
    while afterCount < AFTER_RELOAD or len(ended) < len(sent):
        assert time.monotonic() < deadline, f"{len(ended)} of {len(sent)} ended"
        while len(sent) - len(ended) < IN_FLIGHT and afterCount < AFTER_RELOAD:
            requestType, payload = kinds[n % len(kinds)]
            requestId = client.request(requestType, payload, requestId=f"q{n}")
            sent[requestId] = (requestType, phase)
            afterCount += phase == "after"
            n += 1
        client.receiveOne(0.05)
        for frame in client.unread:
            requestId = frame.get("requestId")
            assert requestId in sent and requestId not in ended, frame
            if frame["type"] == "chunk":
                assert frame["seq"] == chunks.get(requestId, 0), frame
                chunks[requestId] = frame["seq"] + 1
            else:
                ended[requestId] = frame
        client.unread.clear()
        if phase == "before" and n >= 30:
            atReload = [r for r in sent if r not in ended and sent[r][0] == "slow"]
            policy.write_text(json.dumps(NEW_POLICY))
            stack.gateway.signal(signal.SIGHUP)
            phase = "during"
        elif phase == "during" and "Reloaded the authorization policy" in stack.gateway.log:
            phase = "after"
    client.assertQuiet(*sent)
    assert atReload, "no slow request was in flight at the reload"
    for requestId, (requestType, sentIn) in sent.items():
        frame = ended[requestId]
        if requestType == "slow" and sentIn == "after":
            assert frame["error"]["code"] == "forbidden", frame
            assert requestId not in chunks
        elif requestType != "slow" or sentIn == "before":
            assert frame["type"] == "response", frame  # in flight at the reload: finished
        else:  # sent between the signal and its log line: either policy, cleanly
            assert frame["type"] == "response" or frame["error"]["code"] == "forbidden", frame
    assert all(ended[r]["type"] == "response" for r in atReload)
    stillServed(good)
    metrics = stack.gateway.metrics()
    forbidden = sum(1 for f in ended.values() if f["type"] == "error")
    assert metrics['relaybus_requests_refused_total{code="forbidden"}'] == forbidden >= 10
