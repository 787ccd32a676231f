"""How much one client may do: token buckets (per connection, per IP), and the per-IP caps on
connections and handshakes that bound what a single address can cost the gateway."""

from __future__ import annotations

import collections
import ipaddress
import math
from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

MAX_TRACKED_ADDRESSES = 10_000  # handshake buckets kept; full (idle) ones go first


@attrs.define
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; time from an injected clock."""

    rate: float
    burst: float
    clock: IReactorTime
    tokens: float = attrs.field(init=False)
    refilledAt: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.tokens = self.burst
        self.refilledAt = self.clock.seconds()

    def take(self, wanted: int) -> int:
        """Take up to `wanted` whole tokens; returns how many were granted."""
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.refilledAt) * self.rate)
        self.refilledAt = now
        granted = min(wanted, int(self.tokens))
        self.tokens -= granted
        return granted

    def secondsUntilOne(self) -> float:
        """How long until a whole token is back (after a take that got none)."""
        return max(0.0, (1 - self.tokens) / self.rate)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def clientAddress(peerHost: str, forwardedFor: str | None,
                  trustedProxies: Sequence[IPNetwork]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the
    rightmost X-Forwarded-For entry that is not a trusted proxy (entries left of it could
    have been written by the client itself)."""
    if not trustedProxies or not within(peerHost, trustedProxies):
        return peerHost
    for entry in reversed([e.strip() for e in (forwardedFor or "").split(",") if e.strip()]):
        if not within(entry, trustedProxies):
            return entry if _isAddress(entry) else peerHost
    return peerHost


def _isAddress(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def within(host: str, networks: Sequence[IPNetwork]) -> bool:
    """An IPv4-mapped IPv6 address (how a dual-stack tcp6 listener sees an IPv4 peer) is
    matched as the IPv4 address it is, too."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        forms.append(address.ipv4_mapped)
    return any(form in network for form in forms for network in networks)


@attrs.define
class PerAddressLimits:
    """Connections open (handshakes in progress included) and handshakes a second, per client
    address; 0 turns either off."""

    maxConnections: int
    handshakesPerSecond: float
    clock: IReactorTime
    open: collections.Counter[str] = attrs.field(factory=collections.Counter)
    _buckets: dict[str, TokenBucket] = attrs.field(factory=dict)

    def admit(self, address: str) -> tuple[str, int | None] | None:
        """Count a handshake in: None, or (what is over, seconds to retry after)."""
        if self.maxConnections and self.open[address] >= self.maxConnections:
            return "connections", None
        if self.handshakesPerSecond:
            bucket = self._bucketFor(address)
            if not bucket.take(1):
                return "handshakes", max(1, math.ceil(bucket.secondsUntilOne()))
        self.open[address] += 1
        return None

    @property
    def trackedAddresses(self) -> int:
        """Handshake buckets kept (bounded by MAX_TRACKED_ADDRESSES)."""
        return len(self._buckets)

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]

    def _bucketFor(self, address: str) -> TokenBucket:
        bucket = self._buckets.get(address)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_ADDRESSES:
                self._forgetIdle()
            bucket = self._buckets[address] = TokenBucket(
                self.handshakesPerSecond, self.handshakesPerSecond, self.clock)
        return bucket

    def _forgetIdle(self) -> None:
        """Drop the buckets that have refilled (their addresses start afresh anyway), or the
        oldest half when none has: memory stays bounded whatever the addresses."""
        for address, bucket in list(self._buckets.items()):
            bucket.take(0)  # refill to now
            if bucket.tokens >= bucket.burst:
                del self._buckets[address]
        if len(self._buckets) >= MAX_TRACKED_ADDRESSES:
            for address in list(self._buckets)[:MAX_TRACKED_ADDRESSES // 2]:
                del self._buckets[address]
