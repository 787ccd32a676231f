"""The HTTP request before a WebSocket handshake is bounded in time, count per peer and size."""

from __future__ import annotations

import collections
import ipaddress

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import Request

from relaybus.httplimits import MAX_BODY_BYTES, GatewaySite, RequestLimits

DEADLINE_S = 10.0
REQUEST = b"GET /hello HTTP/1.1\r\nHost: gw\r\n\r\n"


class Hello(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"hello"


class Connection:
    def __init__(self, site: GatewaySite, peer: str = "10.0.0.1") -> None:
        address = (IPv6Address if ":" in peer else IPv4Address)("TCP", peer, 40_000)
        self.protocol = site.buildProtocol(address)
        assert self.protocol is not None
        self.transport = StringTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def answer(self) -> bytes:
        return self.transport.value()

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        self.protocol.connectionLost(None)  # type: ignore[arg-type]


def makeSite(maxPendingPerPeer: int = 0, trusted: str | None = None) -> tuple[GatewaySite, Clock]:
    clock = Clock()
    limits = RequestLimits(
        deadlineS=DEADLINE_S, maxPendingPerPeer=maxPendingPerPeer,
        trustedProxies=[ipaddress.ip_network(trusted)] if trusted else [], clock=clock,
        refused=collections.Counter())
    site = GatewaySite(Hello(), limits)
    return site, clock


def test_a_request_in_time_is_served() -> None:
    site, clock = makeSite()
    connection = Connection(site)
    clock.advance(DEADLINE_S - 1)
    connection.send(REQUEST)
    assert connection.answer.startswith(b"HTTP/1.1 200 OK") and connection.answer.endswith(
        b"hello")
    clock.advance(DEADLINE_S * 2)  # the deadline is gone once the request is in
    assert connection.answer.count(b"HTTP/1.1 ") == 1 and not site.requestLimits.refused
    assert clock.getDelayedCalls() == []


def test_a_trickled_request_is_cut_at_the_deadline_however_often_it_sends() -> None:
    site, clock = makeSite()
    connection = Connection(site)
    for byte in REQUEST[:-3]:  # one byte a second: an idle timeout would never fire
        connection.send(bytes([byte]))
        clock.advance(DEADLINE_S / len(REQUEST))
    clock.advance(DEADLINE_S)
    assert connection.answer.startswith(b"HTTP/1.1 408 Request Timeout")
    assert connection.closing
    assert site.requestLimits.refused == {"request_timeout": 1}
    connection.send(b"\r\n\r\n")  # what arrives after the answer is ignored
    assert connection.answer.count(b"HTTP/1.1") == 1


def test_a_silent_connection_is_cut_at_the_deadline() -> None:
    site, clock = makeSite()
    connection = Connection(site)
    clock.advance(DEADLINE_S)
    assert connection.closing and connection.answer.startswith(b"HTTP/1.1 408")


def test_an_answered_connection_is_closed_not_kept_alive() -> None:
    """A keep-alive connection between two requests has sent a whole request, so it was in no
    count, and twisted.web closes it only after 60 s idle: one address could hold any number
    of them for one small request a minute each."""
    site, clock = makeSite(maxPendingPerPeer=2)
    connections = []
    for _ in range(10):
        connections.append(Connection(site))
        connections[-1].send(REQUEST + REQUEST)  # the second, pipelined, is not answered
    for connection in connections:
        assert connection.closing and connection.answer.count(b"HTTP/1.1 200 OK") == 1
        assert b"\r\nconnection: close\r\n" in connection.answer.lower()
    assert site.requestLimits.pending == {} and not site.requestLimits.refused
    assert clock.getDelayedCalls() == []


def test_a_peer_may_hold_only_so_many_unfinished_requests() -> None:
    site, _clock = makeSite(maxPendingPerPeer=2)
    first, second = Connection(site), Connection(site)
    third = Connection(site)
    assert third.answer.startswith(b"HTTP/1.1 429 Too Many Requests") and third.closing
    assert not first.closing and not second.closing
    other = Connection(site, peer="10.0.0.2")  # another address is not affected
    assert not other.closing
    first.send(REQUEST)  # a finished request frees its place
    assert not Connection(site).closing
    second.close()
    assert not Connection(site).closing
    assert site.requestLimits.refused == {"per_ip_pending": 1}
    assert site.requestLimits.pending == {"10.0.0.1": 2, "10.0.0.2": 1}


@pytest.mark.parametrize("peer", ["10.0.0.1", "::ffff:10.0.0.1"])  # the second: on tcp6
def test_a_trusted_proxy_is_never_limited_by_the_pending_count(peer: str) -> None:
    site, _clock = makeSite(maxPendingPerPeer=1, trusted="10.0.0.0/8")
    connections = [Connection(site, peer) for _ in range(5)]
    assert not any(connection.closing for connection in connections)


@pytest.mark.parametrize(("headers", "status"), [
    (b"".join(b"X-%d: y\r\n" % n for n in range(101)), b"400"),  # over 100 headers
    (b"X-Big: " + b"y" * 17_000 + b"\r\n", b"431"),  # one line over 16 KiB
    (b"".join(b"X-%d: %s\r\n" % (n, b"y" * 1000) for n in range(20)), b"400"),  # 20 KiB
])
def test_oversized_headers_are_refused(headers: bytes, status: bytes) -> None:
    site, _clock = makeSite()
    connection = Connection(site)
    connection.send(b"GET /hello HTTP/1.1\r\nHost: gw\r\n" + headers + b"\r\n")
    assert connection.closing
    assert b"hello" not in connection.answer
    assert connection.answer.startswith(b"HTTP/1.1 " + status)


def test_a_declared_body_over_the_cap_is_refused_before_it_is_read() -> None:
    site, _clock = makeSite()
    connection = Connection(site)
    connection.send(b"POST /hello HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
                    % (MAX_BODY_BYTES + 1))
    assert connection.answer.startswith(b"HTTP/1.1 413") and connection.closing
    assert site.requestLimits.refused == {"body_too_large": 1}


def test_a_chunked_body_over_the_cap_is_cut() -> None:
    site, _clock = makeSite()
    connection = Connection(site)
    connection.send(b"POST /hello HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"1000\r\n" + b"x" * 0x1000 + b"\r\n"
    for _ in range(MAX_BODY_BYTES // 0x1000 + 1):
        connection.send(chunk)
    assert connection.answer.startswith(b"HTTP/1.1 413") and connection.closing


def test_a_small_body_is_accepted() -> None:
    site, _clock = makeSite()
    connection = Connection(site)
    connection.send(b"POST /hello HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello")
    assert connection.answer.startswith(b"HTTP/1.1 200")


def test_http2_is_never_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the h2 package installed, twisted.web's Site offers h2 over TLS (ALPN), and an h2
    connection is served by twisted.web's H2Connection: none of the limits above."""
    import twisted.web.http

    monkeypatch.setattr(twisted.web.http, "H2_ENABLED", True)
    site, _clock = makeSite()
    assert site.acceptableProtocols() == [b"http/1.1"]
