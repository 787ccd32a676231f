"""What one client address may cost a real gateway: connections beyond the per-address cap
and handshakes beyond the per-address rate get HTTP 429; X-Forwarded-For is believed only from
a trusted proxy, so a client cannot spread itself over made-up addresses. (Every client here
runs on 127.0.0.1; the addresses in X-Forwarded-For are documentation addresses, never
contacted.)"""

from __future__ import annotations

from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.processes]


def forwardedFor(address: str) -> dict[str, Any]:
    return {"additional_headers": {"X-Forwarded-For": address}}


def refused(connect: Any, target: Any, **handshake: Any) -> Any:
    with pytest.raises(InvalidStatus) as caught:
        connect(target, **handshake)
    return caught.value.response


def test_a_connection_flood_from_one_address_gets_429_and_others_are_served(
        makeStack: Any, connect: Any, waitUntil: Any) -> None:
    stack = makeStack("memory", ["--max-connections-per-ip", "3",
                                 "--trusted-proxy", "127.0.0.1"])
    good = connect(stack, **forwardedFor("192.0.2.1"))
    flood = [connect(stack, **forwardedFor("203.0.113.66")) for _ in range(3)]
    response = refused(connect, stack, **forwardedFor("203.0.113.66"))
    assert (response.status_code, response.reason_phrase) == (
        429, "too many connections from this address")
    assert good.call("echo", "still here").data == "still here"
    flood[0].close()  # a slot comes back once a connection goes
    waitUntil(lambda: stack.gateway.metrics()["relaybus_connections"] == 3,
              "the gateway to see the connection go")
    connect(stack, **forwardedFor("203.0.113.66")).call("echo", 1)
    metrics = stack.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="per_ip_connections"}'] == 1


def test_a_spoofed_x_forwarded_for_from_an_untrusted_peer_is_not_believed(
        makeStack: Any, connect: Any) -> None:
    stack = makeStack("memory", ["--max-connections-per-ip", "3"])  # no trusted proxy
    for i in range(3):
        connect(stack, **forwardedFor(f"203.0.113.{i + 1}"))
    response = refused(connect, stack, **forwardedFor("203.0.113.99"))
    assert response.status_code == 429  # all four are 127.0.0.1


def test_a_handshake_flood_gets_429_with_retry_after(makeStack: Any, connect: Any) -> None:
    stack = makeStack("memory", ["--handshakes-per-ip-per-second", "2",
                                 "--trusted-proxy", "127.0.0.1"])
    good = connect(stack, **forwardedFor("192.0.2.1"))
    statuses = []
    for _ in range(10):
        try:
            connect(stack, **forwardedFor("203.0.113.66")).close()
            statuses.append(101)
        except InvalidStatus as e:
            statuses.append(e.response.status_code)
            assert int(e.response.headers["Retry-After"]) >= 1
    assert statuses[:2] == [101, 101] and 429 in statuses, statuses
    assert good.call("echo", "still here").data == "still here"
