"""The listener (relaybus.listener): what --reuse-port accepts and refuses, and the checks of
a systemd: --listen (the socket its socket unit passed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor
from twisted.python.systemd import ListenFDs

from relaybus.listener import (
    DEFAULT_BACKLOG,
    ListenError,
    checkListen,
    listenerService,
    sharedEndpoint,
    withDefaultBacklog,
)

SYSTEMD_LISTEN = "systemd:domain=INET:index=0"  # docs/systemd/relaybus@.service's --listen


def test_a_tcp_description_keeps_its_port_interface_and_backlog() -> None:
    endpoint = sharedEndpoint(MemoryReactor(), "tcp:8080:interface=0.0.0.0:backlog=512")
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (8080, "0.0.0.0", 512)
    six = sharedEndpoint(MemoryReactor(), r"tcp6:8081:interface=\:\:1")
    assert (six.port, six.interface) == (8081, "::1")


@pytest.mark.parametrize("description", [
    "unix:/run/relaybus.sock", "ssl:8443:privateKey=/nonexistent.pem", "8080", "", "TCPX:1",
])
def test_other_endpoints_are_refused_without_being_opened(description: str) -> None:
    with pytest.raises(ListenError, match="needs a tcp: or tcp6: --listen"):
        sharedEndpoint(MemoryReactor(), description)


@pytest.mark.parametrize("description", ["tcp:notaport", "tcp:8080:nonsense=1", "tcp:99999x"])
def test_a_broken_tcp_description_names_itself(description: str) -> None:
    with pytest.raises(ListenError, match="--listen 'tcp:"):
        sharedEndpoint(MemoryReactor(), description)


def test_the_service_fails_the_start_loudly_like_strports() -> None:
    service = listenerService("tcp:8080", None, MemoryReactor(), reusePort=True)  # type: ignore[arg-type]
    assert isinstance(service, StreamServerEndpointService)
    assert service._raiseSynchronously


@pytest.mark.parametrize(("given", "used"), [
    ("tcp:8080", f"tcp:8080:backlog={DEFAULT_BACKLOG}"),
    ("tcp:8080:interface=0.0.0.0", f"tcp:8080:interface=0.0.0.0:backlog={DEFAULT_BACKLOG}"),
    (r"tcp6:8080:interface=\:\:1", rf"tcp6:8080:interface=\:\:1:backlog={DEFAULT_BACKLOG}"),
    ("tcp:8080:backlog=64", "tcp:8080:backlog=64"),  # an explicit one is kept
    ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem"),  # not ours to change
    ("unix:/run/relaybus.sock", "unix:/run/relaybus.sock"),
    (SYSTEMD_LISTEN, SYSTEMD_LISTEN),  # the socket unit's Backlog= holds
])
def test_tcp_listeners_get_a_deep_accept_queue_unless_told(given: str, used: str) -> None:
    assert withDefaultBacklog(given) == used
    if given.startswith("tcp"):
        assert sharedEndpoint(MemoryReactor(), used).backlog == (
            64 if "backlog=64" in given else DEFAULT_BACKLOG)


def test_reuse_port_with_a_systemd_socket_is_refused_the_socket_unit_shares_it() -> None:
    with pytest.raises(ListenError, match=r"shared by its socket unit \(ReusePort=yes\)"):
        checkListen(SYSTEMD_LISTEN, reusePort=True)


# A systemd: --listen. Twisted reads the passed sockets once, when twisted.internet.endpoints is
# imported; these tests replace what it read.


@pytest.fixture
def passSockets(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def passThem(*fds: int) -> None:
        monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon",
                            ListenFDs(list(fds), [f"relaybus@{i}.socket" for i in range(len(fds))]))

    return passThem


@pytest.fixture
def ipv4Socket() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        yield listening


def test_twisted_ignores_passed_sockets_that_have_no_names() -> None:
    """Why the error below names LISTEN_FDNAMES: systemd always sets it,
    systemd-socket-activate only with --fdname."""
    passed = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert ListenFDs.fromEnvironment(dict(passed)).inheritedDescriptors() == []
    named = ListenFDs.fromEnvironment({**passed, "LISTEN_FDNAMES": "relaybus@1.socket"})
    assert named.inheritedDescriptors() == [3]


def test_no_socket_passed_is_a_listen_error_that_says_what_systemd_passes(
        passSockets: Callable[..., None]) -> None:
    passSockets()
    with pytest.raises(ListenError, match=r"no such socket was passed.*LISTEN_FDNAMES.*--fdname"):
        checkListen(SYSTEMD_LISTEN, reusePort=False)


@pytest.mark.parametrize("description", ["systemd:domain=INET:index=1",
                                         "systemd:domain=INET:name=http"])
def test_a_socket_beyond_those_passed_is_a_listen_error(
        passSockets: Callable[..., None], ipv4Socket: socket.socket, description: str) -> None:
    passSockets(ipv4Socket.fileno())
    with pytest.raises(ListenError, match="no such socket was passed"):
        checkListen(description, reusePort=False)


def test_the_passed_socket_is_checked_and_left_open(passSockets: Callable[..., None],
                                                    ipv4Socket: socket.socket) -> None:
    passSockets(ipv4Socket.fileno())
    checkListen(SYSTEMD_LISTEN, reusePort=False)
    checkListen("systemd:domain=INET:name=relaybus@0.socket", reusePort=False)
    ipv4Socket.bind(("127.0.0.1", 0))  # still open, still ours


def test_a_socket_of_the_other_domain_is_a_listen_error(passSockets: Callable[..., None]) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as ipv6:
        passSockets(ipv6.fileno())
        with pytest.raises(ListenError, match="the socket passed is INET6, not INET: say "
                                              "domain=INET6"):
            checkListen(SYSTEMD_LISTEN, reusePort=False)
        checkListen("systemd:domain=INET6:index=0", reusePort=False)


def test_a_descriptor_that_is_no_socket_is_a_listen_error(
        passSockets: Callable[..., None]) -> None:
    readEnd, writeEnd = os.pipe()
    try:
        passSockets(readEnd)
        with pytest.raises(ListenError, match=f"descriptor {readEnd} is not a socket"):
            checkListen(SYSTEMD_LISTEN, reusePort=False)
    finally:
        os.close(readEnd)
        os.close(writeEnd)


@pytest.mark.parametrize("description", ["systemd:domain=NOPE:index=0", "systemd:index=0",
                                         "systemd:domain=INET"])
def test_a_broken_systemd_description_names_itself(passSockets: Callable[..., None],
                                                   ipv4Socket: socket.socket,
                                                   description: str) -> None:
    passSockets(ipv4Socket.fileno())
    with pytest.raises(ListenError, match="--listen 'systemd:"):
        checkListen(description, reusePort=False)


@pytest.mark.parametrize("description", [
    "tcp:8080", "unix:/run/relaybus.sock", "ssl:8443:privateKey=/nonexistent.pem"])
def test_other_listeners_are_not_opened_by_the_check(description: str) -> None:
    checkListen(description, reusePort=False)
