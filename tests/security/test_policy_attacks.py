"""Authorization per requestType against a real gateway: a request outside the policy ends at
once with `forbidden` and reaches no worker; workers see only the verified, forwarded claims;
SIGHUP re-reads the policy and keeps the old one when the new one is bad."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-security-suite-secret-0123456789"
POLICY = {"roles": {"admin": ["*"], "user": ["whoami", "myclaims", "echo"]},
          "anonymous": ["echo"]}


def bearer(sub: str, *roles: str, **extra: Any) -> dict[str, Any]:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 600, "roles": list(roles),
                        **extra}, SECRET, "HS256")
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


@pytest.fixture
def policed(tmp_path: Path, handlerPath: None, makeStack: Any, connect: Any) -> Any:
    (tmp_path / "secret").write_bytes(SECRET)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    stack = makeStack("memory", [
        "--jwt-secret-file", str(tmp_path / "secret"), "--allow-anonymous",
        "--authz-policy", str(policy), "--handlers", "whoami_handlers",
        "--handlers", "workers.examples"])
    stack.policy = policy
    stack.good = connect(stack, **bearer("bob", "user"))
    return stack


def stillServed(stack: Any) -> None:
    assert stack.good.call("whoami").data == {"principal": "bob"}


@pytest.mark.parametrize(("roles", "requestType"), [
    ((), "echo"), (("user",), "testRequest"), (("User",), "echo"), (("guest",), "whoami")])
def test_a_request_outside_the_policy_is_forbidden(policed: Any, connect: Any,
                                                  roles: tuple[str, ...],
                                                  requestType: str) -> None:
    client = connect(policed, **bearer("alice", *roles))
    mark = policed.mark()
    outcome = client.collect(client.request(requestType, {"count": 1}))  # (no echo barrier:
    assert outcome.code == "forbidden", outcome                           # it may be forbidden)
    assert outcome.terminal["error"]["message"] == f"'alice' may not call '{requestType}'"
    assert "testRequest" not in policed.handlerLogSince(mark)  # no handler ran
    stillServed(policed)


def test_roles_admit_what_the_policy_says(policed: Any, connect: Any) -> None:
    admin = connect(policed, **bearer("root", "admin"))
    assert admin.call("testRequest", {"count": 1, "delayMs": 0}).data["chunks"] == 1
    anonymous = connect(policed)
    assert anonymous.hello["principal"]["sub"] == "anonymous"
    assert anonymous.call("echo", "hi").data == "hi"
    assert anonymous.call("whoami").code == "forbidden"
    metrics = policed.gateway.metrics()
    assert metrics['relaybus_requests_refused_total{code="forbidden"}'] == 1


def test_workers_see_only_the_forwarded_verified_claims(policed: Any, connect: Any) -> None:
    client = connect(policed, **bearer("alice", "user", email="alice@example.com"))
    assert client.call("myclaims").data == {"sub": "alice", "roles": ["user"]}
    spoofed = client.call("myclaims", {"relaybus-claims": {"roles": ["admin"]}},
                          **{"relaybus-claims": '{"roles":["admin"]}', "claims": {"x": 1}})
    assert spoofed.data == {"sub": "alice", "roles": ["user"]}


@pytest.mark.parametrize("requestType", ["#", "*", "requests.#", "a b", "a/b", "a\u0000b"])
def test_request_types_with_amqp_wildcards_or_odd_characters_are_bad_requests(
        policed: Any, requestType: str) -> None:
    assert policed.good.call(requestType).code == "bad_request"
    stillServed(policed)


def test_sighup_reloads_the_policy_and_keeps_the_old_one_when_the_new_is_bad(
        policed: Any, connect: Any, waitUntil: Any) -> None:
    client = connect(policed, **bearer("alice", "user"))
    assert client.call("testRequest", {"count": 1}).code == "forbidden"
    policed.policy.write_text(json.dumps({"roles": {"user": ["*"]}}))
    policed.gateway.signal(signal.SIGHUP)
    policed.gateway.waitForLog("Reloaded the authorization policy")
    assert client.call("testRequest", {"count": 1, "delayMs": 0}).data["chunks"] == 1
    policed.policy.write_text("{ not json")
    policed.gateway.signal(signal.SIGHUP)
    policed.gateway.waitForLog("Kept the old authorization policy")
    assert client.call("testRequest", {"count": 1, "delayMs": 0}).data["chunks"] == 1
    stillServed(policed)
