"""`relaybus conformance` (the console script, as a worker author runs it) against real workers:
the Python runtime serving relaybus.conformance and the Node.js worker must pass every
scenario, SIGTERM included; a broken worker must fail, with the scenario named.

The kit starts its own gateway; each test gives its worker a fresh --amqp-prefix in the
session's vhost.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_node_worker import NodeWorkerProcess, nodeWorkerDir  # noqa: F401 (a fixture)

from relaybus.conformance.kit import SCENARIOS
from relaybus.harness import WorkerProcess

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

RELAYBUS = str(Path(sys.executable).parent / "relaybus")
KIT_TIMEOUT = 90  # seconds for the whole kit; pytest-timeout gives the test 120
ROW = re.compile(r"^(pass|FAIL|skipped) +(\S+)", re.MULTILINE)


def runKit(broker, prefix: str, *args: str) -> tuple[int, dict[str, str], str]:
    """The kit's exit status, {scenario: result} from its table, and all it printed."""
    code, stdout, stderr = runCommand([RELAYBUS, "conformance", "--broker", broker.url,
                                       "--amqp-prefix", prefix, *args])
    return code, {name: result for result, name in ROW.findall(stdout)}, stdout + stderr


def runCommand(command: list[str]) -> tuple[int, str, str]:
    """Run it; past KIT_TIMEOUT, SIGTERM it (the kit then stops the gateway it started) and
    fail."""
    kit = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = kit.communicate(timeout=KIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        kit.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = kit.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            kit.kill()
            stdout, stderr = kit.communicate()
        pytest.fail(f"the kit took over {KIT_TIMEOUT}s:\n{stdout}{stderr}", pytrace=False)
    return kit.returncode, stdout, stderr


def assertAllPass(code: int, rows: dict[str, str], output: str) -> None:
    assert rows == {s.name: "pass" for s in SCENARIOS}, output
    assert code == 0, output


def test_the_python_runtime_passes_the_kit(broker, processes):
    prefix = broker.newPrefix()
    worker = processes.start(WorkerProcess(
        ["--broker", broker.url, "--amqp-prefix", prefix, "--handlers", "relaybus.conformance"],
        name="conformance-worker"))
    worker.waitUntilReady()
    code, rows, output = runKit(broker, prefix, "--worker-pid", str(worker.process.pid))
    assertAllPass(code, rows, output)
    # The last scenario sent it SIGTERM; it exited 0 after finishing the stream.
    assert worker.process.wait(15) == 0, worker.log
    assert "Server Shut Down." in worker.log


def test_the_node_worker_passes_the_kit(nodeWorkerDir, broker, processes):  # noqa: F811
    prefix = broker.newPrefix()
    node = NodeWorkerProcess(["--broker", broker.url, "--amqp-prefix", prefix],
                             name="conformance-node-worker")
    processes.start(node)
    try:
        node.waitUntilReady()
        code, rows, output = runKit(broker, prefix, "--worker-pid", str(node.process.pid))
        assertAllPass(code, rows, output)
        assert node.process.wait(15) == 0, node.log
        assert "node worker stopped" in node.log
    finally:
        node.kill()  # before the pool stops it: it expects a twistd log from what still runs


def test_a_broken_worker_fails_the_kit_by_name(broker, processes, handlerPath):
    prefix = broker.newPrefix()
    worker = processes.start(WorkerProcess(
        ["--broker", broker.url, "--amqp-prefix", prefix, "--handlers", "broken_conformance"],
        name="broken-worker"))
    worker.waitUntilReady()
    code, rows, output = runKit(broker, prefix, "--timeout", "3")
    assert code == 1, output
    assert rows["echo"] == "FAIL" and rows["redelivered"] == "FAIL", output
    assert rows["topology"] == rows["stream"] == rows["errors"] == "pass", output
    assert rows["sigterm-drain"] == "skipped", output
    assert re.search(r"skipped +sigterm-drain +\(needs --worker-pid\)", output), output
    assert "seen: sent None, got back {'not': 'the payload'}" in output, output
    assert re.search(r"seen: a redelivered conformance.stream: \['chunk", output), output
    assert "13 scenarios: " in output and " failed, 1 skipped" in output


def test_without_a_worker_the_kit_fails_fast(broker):
    code, rows, output = runKit(broker, broker.newPrefix(), "--timeout", "3")
    assert code == 1, output
    assert rows["topology"] == "FAIL", output
    assert "NOT_FOUND" in output, output
    assert set(rows.values()) == {"FAIL"}
    assert "not run: the topology is not there" in output


def test_without_a_broker_the_kit_cannot_start(processes):
    from relaybus.harness import freePort

    code, stdout, stderr = runCommand([RELAYBUS, "conformance", "--broker",
                                       f"amqp://guest:s3cret@127.0.0.1:{freePort()}/",
                                       "--timeout", "3"])
    assert code == 2, stdout + stderr
    assert "The kit could not start" in stdout
    assert "s3cret" not in stdout + stderr
