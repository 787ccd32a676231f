"""Where the gateway listens: any strports endpoint, and with --reuse-port a TCP port shared
by several gateway processes (SO_REUSEPORT: the kernel spreads new connections over them).

Twisted's `tcp:` endpoint strings cannot ask for SO_REUSEPORT; its tcp.Port can, through a
Binding (twisted.internet.tcp.makeBinding), so with --reuse-port the listener is built here.
"""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet import endpoints, tcp
from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

# The kernel's queue of connections not yet accepted. Twisted's default, 50, overflows when a
# few hundred clients (re)connect at once (a gateway restart): their SYNs are dropped and
# retried after 1 s, 3 s... (benchmarks/connections.py: backlog 1024 took the handshake p99
# from 1.16 s to 0.22 s). Linux caps it at net.core.somaxconn.
DEFAULT_BACKLOG = 1024


def withDefaultBacklog(description: str) -> str:
    """A tcp:/tcp6: description that names no backlog gets DEFAULT_BACKLOG."""
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class ListenError(ValueError):
    """A --listen / --reuse-port combination that cannot work; the message says why."""


@implementer(IStreamServerEndpoint)
class SharedTCPServerEndpoint:
    """A TCP listening port with SO_REUSEPORT (and SO_REUSEADDR) set before bind."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = 50) -> None:
        self._reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        def bind() -> IListeningPort:
            binding = tcp.makeBinding(self.interface, self.port, reuseAddress=True,
                                      reusePort=True)
            listening = tcp.Port(binding, protocolFactory, self.backlog,  # type: ignore[arg-type]
                                 self.interface, self._reactor)
            listening.startListening()
            return listening

        return execute(bind)


def sharedEndpoint(reactor: Any, description: str) -> SharedTCPServerEndpoint:
    """The SO_REUSEPORT twin of a `tcp:` / `tcp6:` strports description."""
    kind = description.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6"):  # before parsing: an ssl: description reads key files
        raise ListenError("--reuse-port needs a tcp: or tcp6: --listen (TLS belongs in front "
                          "of the shared port: a reverse proxy, or one port per process)")
    try:
        parsed = endpoints.serverFromString(reactor, description)
    except Exception as e:
        raise ListenError(f"--listen {description[:100]!r}: {e}") from None
    assert isinstance(parsed, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint)
    # Read back what Twisted parsed (its endpoints keep it in private attributes).
    return SharedTCPServerEndpoint(reactor, parsed._port, parsed._interface, parsed._backlog)


def listenerService(description: str, factory: IProtocolFactory, reactor: Any,
                    reusePort: bool = False) -> IService:
    """The service that listens on --listen; a taken port makes twistd exit non-zero."""
    description = withDefaultBacklog(description)
    if not reusePort:
        return strports.service(description, factory, reactor=reactor)
    service = StreamServerEndpointService(sharedEndpoint(reactor, description), factory)
    service._raiseSynchronously = True  # as strports.service does: fail the start, loudly
    return service
