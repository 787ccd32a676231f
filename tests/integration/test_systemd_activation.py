"""The gateway started the way systemd starts relaybus@N.service from relaybus@N.socket
(docs/deploying.md): the socket unit binds the port and passes the socket as fd 3 (LISTEN_FDS,
LISTEN_PID, LISTEN_FDNAMES), and `--listen systemd:domain=INET:index=0` adopts it. One
instance under the real `systemd-socket-activate`; then two instances on one port, each with
its own SO_REUSEPORT socket bound here as two socket units bind theirs, told apart by their
hello's limits (maxInFlight 7 or 8)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import pytest

from processfixtures import Client, waitUntil
from relaybus.harness import (
    SYSTEMD_LISTEN,
    ActivatedGatewayProcess,
    stopProcess,
    twistdCommand,
)

pytestmark = [pytest.mark.processes]


def _socketUnitSocket(port: int) -> socket.socket:
    """What relaybus@N.socket binds: ListenStream=127.0.0.1:PORT with ReusePort=yes."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listening.bind(("127.0.0.1", port))
    listening.listen(128)
    return listening


def _servedBy(clients: Iterable[Client]) -> Counter[int]:
    return Counter(client.hello["limits"]["maxInFlight"] for client in clients)


def _echoes(clients: Iterable[Client]) -> None:
    for index, client in enumerate(clients):
        assert client.call("echo", {"n": index}).data == {"n": index}


def test_under_systemd_socket_activate_it_serves_and_a_reload_keeps_it_serving(
        processes, connect):
    if shutil.which("systemd-socket-activate") is None:
        pytest.fail("systemd-socket-activate is missing: apt-get install systemd "
                    "(./dev test does)")
    gateway = processes.start(ActivatedGatewayProcess([], name="gateway-activated"))
    gateway.waitUntilReady()  # the first connection makes systemd-socket-activate exec twistd
    assert f"GatewaySite starting on {gateway.port}" in gateway.log
    client = connect(gateway)
    _echoes([client])
    gateway.signal(signal.SIGHUP)  # what `systemctl reload` (ExecReload=) sends
    gateway.waitForLog("SIGHUP: no --authz-policy to re-read")
    assert client.call("echo", "after the reload").data == "after the reload"
    assert gateway.running


def test_two_instances_share_one_port_and_a_restart_or_stop_of_one_leaves_the_other_serving(
        processes, connect):
    with contextlib.ExitStack() as sockets:
        first = sockets.enter_context(_socketUnitSocket(0))
        port = first.getsockname()[1]
        second = sockets.enter_context(_socketUnitSocket(port))

        def instance(listening: socket.socket, maxInFlight: int) -> ActivatedGatewayProcess:
            gateway = ActivatedGatewayProcess(["--max-in-flight", str(maxInFlight)], listening,
                                              name=f"gateway-instance-{maxInFlight}")
            return processes.start(gateway)

        one, two = instance(first, 7), instance(second, 8)
        for gateway in (one, two):  # each adopted its own socket (readiness would ask either)
            gateway.waitForLog(f"GatewaySite starting on {port}")
        clients = [connect(two) for _ in range(40)]  # all 40 on one: a chance of 2**-39
        assert set(_servedBy(clients)) == {7, 8}, _servedBy(clients)
        _echoes(clients)

        # `systemctl restart relaybus@1.service`: its socket stays open (systemd keeps its
        # copy, as this test does), so the kernel still gives it its share of connections
        assert stopProcess(one) is None
        with ThreadPoolExecutor(20) as pool:
            opening = [pool.submit(connect, two.url, open_timeout=60) for _ in range(20)]
            waitUntil(lambda: any(f.done() for f in opening), "a connection while one is down")
            assert {f.result().hello["limits"]["maxInFlight"] for f in opening
                    if f.done()} == {8}  # the other serves; the first's share waits queued
            restarted = instance(first, 7)
            during = [f.result(timeout=90) for f in opening]
        assert set(_servedBy(during)) == {7, 8}, _servedBy(during)  # none refused
        _echoes(during)

        # `systemctl stop relaybus@1.socket relaybus@1.service`: with its socket closed, every
        # new connection goes to the other
        assert stopProcess(restarted) is None
        first.close()
        after = [connect(two) for _ in range(20)]
        assert _servedBy(after) == {8: 20}
        _echoes(after)
    print(f"two instances: 40 connections split {dict(_servedBy(clients))}, 20 during a "
          f"restart of one {dict(_servedBy(during))}")


def test_started_without_its_socket_it_says_how_it_must_be_started(tmp_path):
    done = subprocess.run([*twistdCommand(), "--nodaemon", "--pidfile=", "relaybus",
                           "--listen", SYSTEMD_LISTEN],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "no such socket was passed to this process: start it through its socket unit" \
        in output and "Traceback" not in output, output
