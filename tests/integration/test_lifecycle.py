"""Starting and stopping: SIGTERM drains, bad options, a taken port, relaybus.tac, and a gateway
whose broker is unreachable."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from relaybus.harness import (
    GatewayProcess,
    ServiceProcess,
    freePort,
    portRefuses,
    twistdCommand,
)

pytestmark = [pytest.mark.processes]

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a gateway may take past its drain timeout to close its sockets and its broker connection
# and exit, on a busy 2-core machine. Far below the 20 s a request that outlasts the drain
# timeout would keep it running if the drain timeout were ignored.
EXIT_MARGIN_S = 8.0


def waitForCleanExit(process: ServiceProcess, timeout: float = 30) -> int:
    """Wait for a process we sent SIGTERM: after its drain it exits 0 (relaybus stops twistd
    from re-raising the signal), and "Server Shut Down." shows the shutdown ran in full."""
    assert process.process is not None
    code = process.process.wait(timeout)
    assert code == 0, f"{process.name} exited {code}:\n{process.log[-5000:]}"
    assert "Server Shut Down." in process.log, process.log[-5000:]
    return code




def test_sigterm_drains_requests_in_flight(provider, makeStack, connect, waitUntil):
    stack = makeStack(provider)
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 3, "delayMs": 300, "chunkBytes": 2})
    client.waitForChunk(requestId)
    stack.gateway.signal(signal.SIGTERM)
    # Draining: the listener is gone and new requests are refused...
    waitUntil(lambda: portRefuses(stack.gateway.port), "the gateway to stop listening")
    refused = client.request("echo", "too late")
    assert client.collect(refused).code == "shutting_down"
    # ...while the one in flight goes on.
    client.waitForChunk(requestId, seq=1)
    waitForCleanExit(stack.gateway)


def test_sigterm_lets_the_request_in_flight_finish_then_closes_1001(provider, makeStack,
                                                                     connect):
    stack = makeStack(provider)
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 3, "delayMs": 300, "chunkBytes": 2})
    client.waitForChunk(requestId)
    stack.gateway.signal(signal.SIGTERM)
    # The request needs ~0.6 s more of the 10 s drain timeout.
    outcome = client.collect(requestId)
    assert outcome.data == {"chunks": 3, "chunkBytes": 2, "delayMs": 300, "bytes": 6}
    assert len(outcome.chunks) == 3
    assert client.waitClosed() == 1001
    waitForCleanExit(stack.gateway)


def test_sigterm_ends_what_outlasts_the_drain_timeout(provider, makeStack, connect):
    drainS = 1
    stack = makeStack(provider, ["--drain-timeout", str(drainS)],
                      workerArgs=["--drain-timeout", str(drainS)])
    client = connect(stack)
    mark = stack.mark()
    requestId = client.request("testRequest", {"count": 100, "delayMs": 200})  # 20 s of work
    client.waitForChunk(requestId)
    signalled = time.monotonic()
    stack.gateway.signal(signal.SIGTERM)
    outcome = client.collect(requestId)
    assert outcome.code == "shutting_down"
    assert client.waitClosed() == 1001
    stack.waitForHandlerLog(
        r"Stopped testRequest [0-9a-f]{32}: "
        r"(cancelled by the gateway \(shutting_down\)|the worker is shutting down)", mark)
    waitForCleanExit(stack.gateway)
    exitedAfter = time.monotonic() - signalled
    assert exitedAfter < drainS + EXIT_MARGIN_S, \
        f"exited {exitedAfter:.1f} s after SIGTERM with a {drainS} s drain timeout"


def test_sigterm_closes_idle_connections_with_1001(provider, makeStack, connect):
    stack = makeStack(provider)
    clients = [connect(stack) for _ in range(3)]
    stack.gateway.signal(signal.SIGTERM)
    assert [c.waitClosed() for c in clients] == [1001, 1001, 1001]
    waitForCleanExit(stack.gateway)


def test_sighup_is_logged_and_both_processes_keep_serving(makeStack, connect):
    """SIGHUP's default action ends a process with no drain: a reload (`systemctl reload`) or
    a closed terminal must not take the gateway or a worker down."""
    stack = makeStack("rabbitmq")
    client = connect(stack)
    worker = stack.workers[0]
    worker.signal(signal.SIGHUP)
    stack.gateway.signal(signal.SIGHUP)
    worker.waitForLog("SIGHUP: a worker has nothing to re-read")
    stack.gateway.waitForLog("SIGHUP: no --authz-policy to re-read")
    assert client.call("echo", "still here").data == "still here"
    assert worker.running and stack.gateway.running


@pytest.mark.parametrize(("args", "message"), [
    (["relaybus", "--broker", "ftp://x"], "broker must be 'memory' or an amqp://"),
    (["relaybus", "--max-in-flight", "0"], "must be a positive integer, not 0"),
    (["relaybus", "--max-message-bytes", "lots"], "invalid literal"),
    (["relaybus", "--default-timeout-ms", "600000"], "must not exceed --max-timeout-ms"),
    (["relaybus", "--gateway-id", "bad id!"], "--gateway-id"),
    (["relaybus", "--amqp-prefix", "bad prefix!"], "--amqp-prefix"),
    (["relaybus", "--handlers", "no_such_relaybus_module"], "cannot import"),
    (["relaybus-worker"], "--broker amqp://... is required"),
    (["relaybus-worker", "--broker", "amqp://127.0.0.1/"], "at least one --handlers"),
    (["relaybus-worker", "--broker", "http://x", "--handlers", "workers.examples"],
     "amqp:// or amqps://"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_options_exit_nonzero_with_usage(tmp_path, args, message):
    done = subprocess.run([*twistdCommand(), "--nodaemon", "--pidfile=", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "Usage:" in output, output
    assert message in output, output


@pytest.mark.log_errors_expected  # twistd reports the CannotListenError with its traceback
def test_taken_port_exits_nonzero(processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gateway = processes.start(GatewayProcess([], port=port, name="gateway-port-taken"))
        assert gateway.process is not None
        code = gateway.process.wait(30)
    assert code not in (0, -signal.SIGTERM), gateway.log
    assert "Address already in use" in gateway.log or "CannotListen" in gateway.log, gateway.log


class TacGatewayProcess(GatewayProcess):
    """`twistd --nodaemon --pidfile= -y relaybus.tac`, configured by RELAYBUS_* variables."""

    def __init__(self, tac: Path, environ: dict[str, str]) -> None:
        self.port = freePort()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYBUS_")}
        env.update(environ, RELAYBUS_LISTEN=f"tcp:{self.port}:interface=127.0.0.1")
        ServiceProcess.__init__(self, "-y", [str(tac)], env=env, name="tac-gateway")


def test_relaybus_tac_serves_and_stops(processes, connect):
    tac = REPO_ROOT / "relaybus.tac"
    assert tac.exists(), tac
    gateway = processes.start(TacGatewayProcess(tac, {"RELAYBUS_MAX_IN_FLIGHT": "7"}))
    gateway.waitUntilReady()
    client = connect(gateway)
    assert client.hello["limits"]["maxInFlight"] == 7  # the environment reached the options
    assert client.call("echo", {"via": "tac"}).data == {"via": "tac"}
    assert client.call("testRequest", {"count": 2, "delayMs": 0}).data["chunks"] == 2
    client.close()
    gateway.signal(signal.SIGTERM)
    waitForCleanExit(gateway)


def test_unreachable_broker_is_unavailable_not_ready(processes, connect, waitUntil):
    port = freePort()  # nothing listens there
    gateway = processes.start(GatewayProcess(
        ["--broker", f"amqp://guest:guest@127.0.0.1:{port}/"], name="gateway-no-broker"))
    waitUntil(lambda: _status(gateway, "/healthz") == 200, "/healthz to answer 200")
    assert gateway.httpStatus("/readyz") == 503
    client = connect(gateway)
    requestId = client.request("echo", "anyone?")
    outcome = client.collect(requestId)
    assert outcome.code == "unavailable" and outcome.chunks == []
    gateway.signal(signal.SIGTERM)
    waitForCleanExit(gateway)


def _status(gateway: GatewayProcess, path: str) -> int | None:
    try:
        return gateway.httpStatus(path)
    except OSError:
        return None

