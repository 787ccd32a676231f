"""Per-address limits and the client address behind trusted proxies, with hostile values."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.task import Clock

from relaybus.ratelimits import MAX_TRACKED_ADDRESSES, PerAddressLimits, clientAddress

PROXIES = [ipaddress.ip_network("198.51.100.0/24"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize(("peer", "forwardedFor", "expected"), [
    ("192.0.2.7", None, "192.0.2.7"),
    ("192.0.2.7", "203.0.113.9", "192.0.2.7"),  # an untrusted peer's header is not believed
    ("198.51.100.1", "203.0.113.9", "203.0.113.9"),
    ("198.51.100.1", "6.6.6.6, 203.0.113.9", "203.0.113.9"),  # the client wrote the left part
    ("198.51.100.1", "203.0.113.9, 198.51.100.2", "203.0.113.9"),  # two proxies deep
    ("198.51.100.1", "198.51.100.2", "198.51.100.1"),  # only proxies: the peer counts
    ("198.51.100.1", "not-an-address", "198.51.100.1"),
    ("198.51.100.1", "", "198.51.100.1"),
    ("2001:db8::1", "2001:db9::5", "2001:db9::5"),
    # an IPv4 proxy as a dual-stack (tcp6) listener sees it, and as another proxy may write it
    ("::ffff:198.51.100.1", "203.0.113.9", "203.0.113.9"),
    ("198.51.100.1", "203.0.113.9, ::ffff:198.51.100.2", "203.0.113.9"),
])
def test_the_client_address(peer: str, forwardedFor: str | None, expected: str) -> None:
    assert clientAddress(peer, forwardedFor, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert clientAddress("192.0.2.7", "203.0.113.9", []) == "192.0.2.7"


def test_connections_per_address_are_capped_and_released() -> None:
    limits = PerAddressLimits(2, 0, Clock())
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == ("connections", None)
    assert limits.admit("b") is None  # another address has its own
    limits.release("a")
    assert limits.admit("a") is None
    for _ in range(2):
        limits.release("a")
    assert "a" not in limits.open  # nothing kept for an address with nothing open


def test_handshakes_per_address_per_second_with_retry_after() -> None:
    clock = Clock()
    limits = PerAddressLimits(0, 2, clock)
    assert limits.admit("a") is None and limits.admit("a") is None
    assert limits.admit("a") == ("handshakes", 1)
    clock.advance(0.5)
    assert limits.admit("a") is None


def test_handshake_buckets_stay_bounded_whatever_the_addresses() -> None:
    clock = Clock()
    limits = PerAddressLimits(0, 1, clock)
    for i in range(3 * MAX_TRACKED_ADDRESSES):
        limits.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        limits.release(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert 0 < limits.trackedAddresses <= MAX_TRACKED_ADDRESSES
