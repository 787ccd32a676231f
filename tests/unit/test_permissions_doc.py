"""The RabbitMQ permissions docs/security.md gives are the ones relaybus.amqp.topology builds
(and tests/integration/test_broker_permissions.py runs a gateway and a worker with)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relaybus.amqp.topology import Permissions, Topology

SECURITY_MD = Path(__file__).parents[2] / "docs" / "security.md"
SET_PERMISSIONS = re.compile(r"rabbitmqctl set_permissions -p VHOST (\S+)"
                             r"\s*\\?\s*'([^']*)'\s*\\?\s*'([^']*)'\s*\\?\s*'([^']*)'")


def documented() -> list[tuple[str, Permissions]]:
    return [(user, Permissions(*regexes))
            for user, *regexes in SET_PERMISSIONS.findall(SECURITY_MD.read_text())]


def test_the_documented_permissions_are_what_topology_builds() -> None:
    assert documented() == [
        ("relaybus-gateway", Topology().gatewayPermissions("gw1")),
        ("relaybus-worker", Topology().workerPermissions(["echo", "testRequest"])),
        ("relaybus-gateway", Topology("prod.").gatewayPermissions("gw1")),
    ]


@pytest.mark.parametrize(("name", "gateway", "worker"), [
    ("requests", "cw", "cr"), ("responses", "cr", "cw"), ("cancels", "cw", "cr"),
    ("replies.gw1", "cwr", ""), ("replies.gw2", "", ""),
    ("requests.echo", "", "cwr"), ("requests.admin", "", ""),
    ("amq.gen-Xy_1", "", "cwr"), ("amq.default", "", ""),
    ("other.requests", "", ""), ("requestsX", "", ""), ("requests.echoX", "", ""),
])
def test_what_each_user_may_do_with_a_name(name: str, gateway: str, worker: str) -> None:
    """RabbitMQ matches a resource's whole name against each regex (PCRE; Python's re agrees
    on these)."""

    def may(permissions: Permissions) -> str:
        return "".join(letter for letter, regex in zip(
            "cwr", (permissions.configure, permissions.write, permissions.read), strict=True)
            if re.search(regex, name))

    assert may(Topology().gatewayPermissions("gw1")) == gateway
    assert may(Topology().workerPermissions(["echo", "testRequest"])) == worker


def test_names_with_regex_metacharacters_are_literal() -> None:
    permissions = Topology("a+b.").workerPermissions(["x.y", "(z)|*"])
    assert re.search(permissions.read, "a+b.requests.(z)|*")
    assert not re.search(permissions.read, "aab.requests.x.y")
    assert not re.search(permissions.read, "a+b.requests.xzy")
