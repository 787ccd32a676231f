"""The authorization policy: which requestTypes a principal's roles may call, hostile policy
files refused at start, and a reload that keeps the old policy when the new one is bad."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from relaybus.authorization import Authorizer, loadPolicy
from relaybus.config import Limits
from relaybus.correlation import CorrelationTable
from relaybus.frames import RequestFrame
from relaybus.identity import ANONYMOUS_PRINCIPAL, Principal
from relaybus.testing import FakeClientConnection, FakeRequestBus

POLICY = {"roles": {"admin": ["*"], "user": ["testRequest", "echo", "report.*"]},
          "anonymous": ["echo"]}


def policyFile(tmp_path: Path, document: Any) -> str:
    path = tmp_path / "policy.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def principal(*roles: str, claim: str = "roles") -> Principal:
    return Principal("alice", {"sub": "alice", claim: list(roles)}, None)


@pytest.mark.parametrize(("who", "requestType", "allowed"), [
    (principal("admin"), "anything.at.all", True),
    (principal("user"), "echo", True),
    (principal("user"), "report.daily", True),
    (principal("user"), "report", False),
    (principal("user"), "primes", False),
    (principal("user", "admin"), "primes", True),
    (principal(), "echo", False),
    (Principal("alice", {"roles": "user"}, None), "echo", True),  # one role as a string
    (Principal("alice", {"roles": [5, None, {"x": 1}]}, None), "echo", False),
    (Principal("anonymous", {"sub": "anonymous"}, None), "echo", False),  # a token's sub
    (ANONYMOUS_PRINCIPAL, "echo", True),
    (ANONYMOUS_PRINCIPAL, "testRequest", False),
    (principal("Admin"), "echo", False),  # roles and patterns are case-sensitive
])
def test_who_may_call_what(tmp_path: Path, who: Principal, requestType: str,
                           allowed: bool) -> None:
    assert Authorizer(policyFile(tmp_path, POLICY)).allows(who, requestType) is allowed


def test_the_roles_claim_is_configurable(tmp_path: Path) -> None:
    authorizer = Authorizer(policyFile(tmp_path, POLICY), rolesClaim="groups")
    assert authorizer.allows(principal("user", claim="groups"), "echo")
    assert not authorizer.allows(principal("user"), "echo")


def test_without_a_policy_everything_is_allowed() -> None:
    assert Authorizer(None).allows(principal(), "anything")


@pytest.mark.parametrize(("document", "message"), [
    ("{not json", "is not JSON"),
    ([], "must be a JSON object"),
    ({"roles": {}, "admins": []}, "unknown keys"),
    ({"roles": []}, "roles must be an object"),
    ({"roles": {"user": "echo"}}, "roles.user must be a list"),
    ({"roles": {"user": [""]}}, "roles.user must be a list"),
    ({"roles": {"user": ["x" * 257]}}, "roles.user must be a list"),
    ({"anonymous": [1]}, "anonymous must be a list"),
])
def test_a_bad_policy_is_refused_with_a_clear_message(tmp_path: Path, document: Any,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        loadPolicy(policyFile(tmp_path, document))


def test_an_unreadable_or_huge_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        loadPolicy(str(tmp_path / "missing.json"))
    huge = tmp_path / "huge.json"
    huge.write_text(" " * (1024 * 1024 + 1))
    with pytest.raises(ValueError, match="over"):
        loadPolicy(str(huge))


def test_a_reload_takes_a_good_policy_and_keeps_the_old_one_for_a_bad_one(
        tmp_path: Path) -> None:
    path = policyFile(tmp_path, POLICY)
    authorizer = Authorizer(path)
    assert not authorizer.allows(principal("user"), "primes")
    Path(path).write_text(json.dumps({"roles": {"user": ["primes"]}}))
    assert authorizer.reload() is True
    assert authorizer.allows(principal("user"), "primes")
    Path(path).write_text("{broken")
    with capturedLogs() as events:
        assert authorizer.reload() is False
    assert [e["log_level"] for e in events] == [LogLevel.error]
    assert authorizer.allows(principal("user"), "primes")  # the old policy still holds


# The correlation table refuses what the policy forbids, and forwards only the named claims


def test_a_forbidden_request_ends_at_once_and_nothing_is_published(tmp_path: Path) -> None:
    bus = FakeRequestBus()
    table = CorrelationTable(bus, Clock(), Limits(), "gw", Authorizer(policyFile(tmp_path,
                                                                                 POLICY)))
    connection = FakeClientConnection(principal=principal("user"))
    assert table.submit(connection, RequestFrame("r-1", "primes", None)) is None
    assert connection.frames == [{"type": "error", "requestId": "r-1", "error": {
        "code": "forbidden", "message": "'alice' may not call 'primes'"}}]
    assert bus.published == [] and len(table) == 0 and table.refused["forbidden"] == 1
    table.submit(connection, RequestFrame("r-2", "echo", None))
    assert len(bus.published) == 1


def test_workers_see_only_the_forwarded_claims(tmp_path: Path) -> None:
    bus = FakeRequestBus()
    table = CorrelationTable(bus, Clock(), Limits(), "gw", forwardClaims=("sub", "tenant"))
    who = Principal("alice", {"sub": "alice", "tenant": "t-1", "email": "a@x", "roles": []},
                    None)
    table.submit(FakeClientConnection(principal=who), RequestFrame("r-1", "echo", None))
    [(message, _)] = bus.published
    assert (message.principal, json.loads(message.claims or b"")) == (
        "alice", {"sub": "alice", "tenant": "t-1"})
    table.submit(FakeClientConnection("c-2"), RequestFrame("r-2", "echo", None))
    assert bus.published[1][0].claims is None  # no principal: no claims
