"""--reuse-port's listener (relaybus.listener): what it accepts and what it refuses."""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactor

from relaybus.listener import (
    DEFAULT_BACKLOG,
    ListenError,
    listenerService,
    sharedEndpoint,
    withDefaultBacklog,
)


def test_a_tcp_description_keeps_its_port_interface_and_backlog() -> None:
    endpoint = sharedEndpoint(MemoryReactor(), "tcp:8080:interface=0.0.0.0:backlog=512")
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (8080, "0.0.0.0", 512)
    six = sharedEndpoint(MemoryReactor(), r"tcp6:8081:interface=\:\:1")
    assert (six.port, six.interface) == (8081, "::1")


@pytest.mark.parametrize("description", [
    "unix:/run/relaybus.sock", "ssl:8443:privateKey=/nonexistent.pem",
    "systemd:domain=INET:index=0", "8080", "", "TCPX:1",
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
])
def test_tcp_listeners_get_a_deep_accept_queue_unless_told(given: str, used: str) -> None:
    assert withDefaultBacklog(given) == used
    if given.startswith("tcp"):
        assert sharedEndpoint(MemoryReactor(), used).backlog == (
            64 if "backlog=64" in given else DEFAULT_BACKLOG)
