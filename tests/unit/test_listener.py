"""--reuse-port's listener (relaybus.listener): what it accepts and what it refuses."""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactor

from relaybus.listener import ListenError, listenerService, sharedEndpoint


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
