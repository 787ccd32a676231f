"""Where the gateway listens: any strports endpoint, and with --reuse-port a TCP port shared
by several gateway processes (SO_REUSEPORT: the kernel spreads new connections over them).

Twisted's `tcp:` endpoint strings cannot ask for SO_REUSEPORT; its tcp.Port can, through a
Binding (twisted.internet.tcp.makeBinding), so with --reuse-port the listener is built here.

Under systemd the socket unit binds the port (ReusePort=, Backlog=) and passes the socket;
`--listen systemd:domain=INET:index=0` adopts it (docs/deploying.md).
"""

from __future__ import annotations

import socket
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
    if kind == "systemd":  # SO_REUSEPORT counts only before bind, and systemd bound it
        raise ListenError("--reuse-port is for a tcp: or tcp6: --listen: a systemd: socket is "
                          "shared by its socket unit (ReusePort=yes), drop --reuse-port")
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


def _checkInheritedSocket(description: str) -> None:
    """A systemd: --listen names a socket this process was passed, of the domain it says.

    Left to the start, a missing one is a traceback (IndexError), and one of the other domain
    is adopted anyway: every client's address is then garbled (the per-address limits and
    --trusted-proxy see nonsense). Other descriptions pass unopened.
    """
    if description.split(":", 1)[0].lower() != "systemd":
        return
    try:
        endpoint = endpoints.serverFromString(None, description)  # opens nothing
    except (IndexError, KeyError):
        raise ListenError(
            f"--listen {description[:100]!r}: no such socket was passed to this process: "
            "start it through its socket unit (systemd sets LISTEN_FDS, LISTEN_PID and "
            "LISTEN_FDNAMES; Twisted ignores the sockets without LISTEN_FDNAMES, so "
            "systemd-socket-activate needs --fdname)") from None
    except Exception as e:
        raise ListenError(f"--listen {description[:100]!r}: {e}") from None
    assert isinstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
    try:
        inherited = socket.socket(fileno=endpoint.fileno)  # reads its family from the kernel
    except OSError as e:
        raise ListenError(f"--listen {description[:100]!r}: descriptor {endpoint.fileno} "
                          f"is not a socket ({e.strerror})") from None
    family = inherited.family
    inherited.detach()  # it stays open for the listener
    if family != endpoint.addressFamily:
        passed, said = (socket.AddressFamily(f).name.removeprefix("AF_")
                        for f in (family, endpoint.addressFamily))
        raise ListenError(f"--listen {description[:100]!r}: the socket passed is {passed}, "
                          f"not {said}: say domain={passed} (a ListenStream= of a bare port "
                          "or of [::] is an IPv6 socket)")


def checkListen(description: str, reusePort: bool) -> None:
    """Refuse, before anything starts, a --listen (with or without --reuse-port) that cannot
    work."""
    if reusePort:
        sharedEndpoint(None, description)
    _checkInheritedSocket(description)


def listenerService(description: str, factory: IProtocolFactory, reactor: Any,
                    reusePort: bool = False) -> IService:
    """The service that listens on --listen; a taken port makes twistd exit non-zero."""
    description = withDefaultBacklog(description)
    if not reusePort:
        return strports.service(description, factory, reactor=reactor)
    service = StreamServerEndpointService(sharedEndpoint(reactor, description), factory)
    service._raiseSynchronously = True  # as strports.service does: fail the start, loudly
    return service
