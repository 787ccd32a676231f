"""What a principal may call: requestType patterns per role, from a JSON policy file.

    {"roles": {"admin": ["*"], "user": ["testRequest", "echo", "report.*"]},
     "anonymous": ["echo"]}

A principal's roles come from one claim of its token (`--roles-claim`, default `roles`: a list
of strings, or one string). It may call a requestType when one pattern of one of its roles
matches it (fnmatch, case-sensitive); the principal `anonymous` (`--allow-anonymous`) has the
patterns of `"anonymous"` instead. Without a policy every principal may call everything. The
policy is read at start (a bad one is a usage error) and again on SIGHUP (a bad new one is
logged and the old one kept).
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

from relaybus.identity import ANONYMOUS_PRINCIPAL, Principal

log = Logger(namespace="relaybus.authorization")

MAX_POLICY_BYTES = 1024 * 1024
MAX_PATTERN_LENGTH = 256


@attrs.frozen
class Policy:
    roles: Mapping[str, tuple[str, ...]]
    anonymous: tuple[str, ...] = ()

    def allows(self, principal: Principal, requestType: str, rolesClaim: str) -> bool:
        if principal is ANONYMOUS_PRINCIPAL:  # admitted without a token (--allow-anonymous)
            patterns: Sequence[str] = self.anonymous
        else:
            patterns = [p for role in _roles(principal.claims.get(rolesClaim))
                        for p in self.roles.get(role, ())]
        return any(fnmatch.fnmatchcase(requestType, pattern) for pattern in patterns)


def _roles(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [role for role in value if isinstance(role, str)]
    return []


def loadPolicy(path: str) -> Policy:
    """The policy in `path`; ValueError with a clear message when it does not parse."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"--authz-policy: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_POLICY_BYTES:
        raise ValueError(f"--authz-policy: {path} is over {MAX_POLICY_BYTES} bytes")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"--authz-policy: {path} is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ValueError("--authz-policy: the policy must be a JSON object")
    unknown = set(document) - {"roles", "anonymous"}
    if unknown:
        raise ValueError(f"--authz-policy: unknown keys {sorted(unknown)} (known: roles, "
                         "anonymous)")
    roles = document.get("roles", {})
    if not isinstance(roles, dict):
        raise ValueError("--authz-policy: roles must be an object of role -> patterns")
    return Policy({str(role): _patterns(patterns, f"roles.{role}")
                   for role, patterns in roles.items()},
                  _patterns(document.get("anonymous", []), "anonymous"))


def _patterns(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
            isinstance(p, str) and 0 < len(p) <= MAX_PATTERN_LENGTH for p in value):
        raise ValueError(f"--authz-policy: {where} must be a list of requestType patterns "
                         f"(strings of 1..{MAX_PATTERN_LENGTH} characters)")
    return tuple(value)


class Authorizer:
    """The gateway's current policy (None: everything is allowed), reloadable."""

    def __init__(self, path: str | None, rolesClaim: str = "roles") -> None:
        self._path = path
        self._rolesClaim = rolesClaim
        self._policy = loadPolicy(path) if path is not None else None

    def allows(self, principal: Principal | None, requestType: str) -> bool:
        if self._policy is None or principal is None:
            return True
        return self._policy.allows(principal, requestType, self._rolesClaim)

    def reload(self) -> bool:
        """Read the policy file again; a bad one is logged and the old one kept."""
        if self._path is None:
            return False
        try:
            self._policy = loadPolicy(self._path)
        except ValueError as e:
            log.error("Kept the old authorization policy: {why}", why=str(e))
            return False
        log.info("Reloaded the authorization policy from {path}", path=self._path)
        return True
