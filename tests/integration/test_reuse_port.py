"""--reuse-port: two `twistd relaybus` processes listen on one port (SO_REUSEPORT) and both
serve; without it the second cannot start. The kernel spreads new connections over the
processes; each tells which it is by its hello's limits (maxInFlight 7 or 8)."""

from __future__ import annotations

import subprocess
from collections import Counter

import pytest

from relaybus.harness import GatewayProcess, freePort, twistdCommand

pytestmark = [pytest.mark.processes]


def _shared(port: int, maxInFlight: int, reusePort: bool = True) -> GatewayProcess:
    return GatewayProcess(["--max-in-flight", str(maxInFlight),
                           *(["--reuse-port"] if reusePort else [])],
                          port=port, name=f"gateway-shared-{maxInFlight}")


def test_two_gateways_share_one_port_and_both_serve(processes, connect):
    port = freePort()
    first = processes.start(_shared(port, 7))
    first.waitUntilReady()
    second = processes.start(_shared(port, 8))
    second.waitForLog(r"Starting factory|Site starting", timeout=20)
    served: Counter[int] = Counter()
    clients = []
    for _ in range(40):  # the chance that 40 connections all land on one is 2**-39
        client = connect(first.url)
        clients.append(client)
        served[client.hello["limits"]["maxInFlight"]] += 1
    assert set(served) == {7, 8}, served
    for index, client in enumerate(clients):
        requestId = client.request("echo", {"n": index})
        assert client.collect(requestId).terminal["data"] == {"n": index}
    assert first.running and second.running
    print(f"--reuse-port: 40 connections split {served[7]} / {served[8]}")


def test_without_reuse_port_the_second_gateway_cannot_start(processes):
    port = freePort()
    first = processes.start(_shared(port, 7, reusePort=False))
    first.waitUntilReady()
    done = subprocess.run([*twistdCommand(), "--nodaemon", "--pidfile=", "relaybus",
                           "--listen", f"tcp:{port}:interface=127.0.0.1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "Address already in use" in done.stdout + done.stderr


@pytest.mark.parametrize(("listen", "message"), [
    ("unix:/tmp/relaybus.sock", "--reuse-port needs a tcp: or tcp6: --listen"),
    ("ssl:8443:privateKey=k.pem", "--reuse-port needs a tcp: or tcp6: --listen"),
    ("tcp:notaport", "--listen 'tcp:notaport'"),
])
def test_reuse_port_with_another_endpoint_is_a_usage_error(tmp_path, listen, message):
    done = subprocess.run([*twistdCommand(), "--nodaemon", "--pidfile=", "relaybus",
                           "--listen", listen, "--reuse-port"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and message in output, output
