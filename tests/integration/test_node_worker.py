"""The Node.js worker in workers/node (written from docs/protocol.md alone) behind a real relaybus
gateway on RabbitMQ: the WebSocket client must not be able to tell it from a Python worker.

Each test gets a fresh gateway (its own --amqp-prefix, no Python worker) and starts its
`node workers/node/worker.js` processes by hand; every one is killed at teardown. `npm ci` runs
once per session if workers/node/node_modules is missing.

The contract's scenarios that need no fault (echo, streaming, cancel during a request,
deadlines, SIGTERM drain, redelivery, header types) are the conformance kit's: the Node
worker runs it in test_conformance.py. What stays here is Node-specific or needs a fault the
kit cannot inject (a killed worker, the drain timeout, prefetch-ordered cancel notices).
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import jwt
import pika
import pytest

from processfixtures import LOG_TIMEOUT
from relaybus.harness import ServiceProcess

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

NODE_DIR = Path(__file__).resolve().parents[2] / "workers" / "node"
READY = "node worker ready"
STOPPED = r"Stopped nodeCount [0-9a-f]{32}: "
NPM_TIMEOUT = 100  # seconds; the whole test has pytest-timeout's 120


@pytest.fixture(scope="session")
def nodeWorkerDir() -> Path:
    """workers/node with its dependencies installed (skips without node and npm)."""
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the Node.js worker tests need {' and '.join(missing)} on PATH "
                    "(install Node.js 18 or newer with npm)")
    if not (NODE_DIR / "node_modules" / "amqplib").is_dir():
        locked = (NODE_DIR / "package-lock.json").exists()
        command = ["npm", "ci" if locked else "install", "--no-audit", "--no-fund"]
        try:
            done = subprocess.run(command, cwd=NODE_DIR, capture_output=True, text=True,
                                  timeout=NPM_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{' '.join(command)}` in {NODE_DIR} took over {NPM_TIMEOUT}s",
                        pytrace=False)
        if done.returncode != 0:
            pytest.fail(f"`{' '.join(command)}` in {NODE_DIR} failed ({done.returncode}):\n"
                        f"{done.stdout}{done.stderr}", pytrace=False)
    return NODE_DIR


class NodeWorkerProcess(ServiceProcess):
    """`node worker.js ...` with its output in a log file, like the twistd processes (so the
    harness shows its log when a test fails, and flags tracebacks in it)."""

    def __init__(self, args: list[str], name: str) -> None:
        super().__init__("node", args, name=name)

    def start(self) -> NodeWorkerProcess:
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                ["node", str(NODE_DIR / "worker.js"), *self.args], stdout=log,
                stderr=subprocess.STDOUT, cwd=NODE_DIR, start_new_session=True)
        return self

    def waitUntilReady(self, timeout: float = 20.0, count: int = 1) -> NodeWorkerProcess:
        self.waitForLog(re.escape(READY), timeout, count)
        return self

    def waitForLogSince(self, offset: int, pattern: str, timeout: float = LOG_TIMEOUT) -> str:
        """The first match of `pattern` in the log after its first `offset` characters."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log[offset:])
            if match:
                return match.group(0)
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} in the log within {timeout}s; "
                                     f"log since then:\n{self.log[offset:][-4000:]}")
            time.sleep(0.05)


class NodeStack:
    """A gateway with no Python worker, and the Node.js workers a test starts."""

    def __init__(self, stack: Any, pool: Any) -> None:  # processfixtures' Stack and ProcessPool
        self.stack = stack
        self.pool = pool
        self.nodes: list[NodeWorkerProcess] = []

    def startNode(self, *args: str) -> NodeWorkerProcess:
        assert self.stack.broker is not None and self.stack.prefix is not None
        node = NodeWorkerProcess(["--broker", self.stack.broker.url,
                                  "--amqp-prefix", self.stack.prefix, *args],
                                 name=f"node-worker{len(self.nodes) + 1}")
        self.nodes.append(node)
        self.pool.start(node)
        return node.waitUntilReady()

    def queue(self, requestType: str) -> str:
        return f"{self.stack.prefix}requests.{requestType}"


@pytest.fixture
def nodeStack(nodeWorkerDir, makeStack, processes):
    stack = makeStack("rabbitmq", workers=0)
    nodes = NodeStack(stack, processes)
    try:
        yield nodes
    finally:
        # Before the pool stops the gateway: it expects a twistd log from what still runs.
        for node in nodes.nodes:
            node.kill()


def assertQuiet(client, *requestIds: str) -> None:
    """Client.assertQuiet with a nodeEcho barrier (there is no Python `echo` worker here)."""
    client.assertQuiet(*requestIds, barrierType="nodeEcho")


def finish(client, requestId: str):
    outcome = client.collect(requestId)
    assertQuiet(client, requestId)
    return outcome


def test_topology_is_the_documented_one(nodeStack):
    nodeStack.startNode("--concurrency", "3")
    broker, prefix = nodeStack.stack.broker, nodeStack.stack.prefix
    vhost = ["-p", broker.vhost]
    exchanges = {row[0]: row[1:] for row in _rows(broker.ctl(
        "list_exchanges", *vhost, "name", "type", "durable", "auto_delete", "internal",
        "arguments"))}
    for name in ("requests", "responses", "cancels"):
        assert exchanges[prefix + name] == ["direct", "true", "false", "false", "[]"], name
    queues = {row[0]: row[1:] for row in _rows(broker.ctl(
        "list_queues", *vhost, "name", "durable", "auto_delete", "exclusive", "arguments"))}
    bindings = {tuple(row) for row in _rows(broker.ctl(
        "list_bindings", *vhost, "source_name", "destination_name", "routing_key"))}
    consumers = {row[0]: row[1:] for row in _rows(broker.ctl(
        "list_consumers", *vhost, "queue_name", "ack_required", "prefetch_count"))}
    cancelQueues = [name for name in queues if name.startswith("amq.gen-")]
    assert len(cancelQueues) == 1, queues
    assert queues[cancelQueues[0]] == ["false", "true", "true", "[]"]
    assert consumers[cancelQueues[0]] == ["false", "0"]  # auto-ack
    for requestType in ("nodeEcho", "nodeCount"):
        queue = nodeStack.queue(requestType)
        assert queues[queue] == ["true", "false", "false", "[]"], queue
        assert (prefix + "requests", queue, requestType) in bindings
        assert (prefix + "cancels", cancelQueues[0], requestType) in bindings
        assert consumers[queue] == ["true", "3"], queue  # manual acks, per-consumer prefetch


def _rows(output: str) -> list[list[str]]:
    lines = output.strip().splitlines()
    return [line.split("\t") for line in lines[1:]]  # the first line names the columns


def test_cancel_notice_before_the_request_skips_it(nodeStack, connect, waitUntil):
    # With prefetch 1, the second request waits in the queue while the first runs, so its
    # cancel notice reaches the worker before the request does.
    node = nodeStack.startNode("--concurrency", "1")
    client = connect(nodeStack.stack)
    running = client.request("nodeCount", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(running)
    queued = client.request("nodeCount", {"count": 3, "delayMs": 0}, timeoutMs=60_000)
    client.cancel(queued)
    assert client.collect(queued).code == "cancelled"
    assert not re.search(r"Skipped|Stopped", node.log), node.log  # nothing ran it yet
    offset = len(node.log)
    client.cancel(running)
    assert client.collect(running).code == "cancelled"
    node.waitForLogSince(offset, STOPPED + re.escape("cancelled (reason: cancelled)"))
    node.waitForLogSince(offset, r"Skipped nodeCount [0-9a-f]{32}: cancelled before it arrived")
    assertQuiet(client, running, queued)
    queue, broker = nodeStack.queue("nodeCount"), nodeStack.stack.broker
    waitUntil(lambda: broker.queues()[queue]["messages"] == 0, f"{queue} empty (all acked)")


@pytest.mark.parametrize("payload, field", [
    pytest.param({"count": "three"}, "count", id="count-not-an-integer"),
    pytest.param({"count": 2, "delayMs": -5}, "delayMs", id="negative-delay"),
    pytest.param({}, "count", id="no-count"),
    pytest.param([1, 2], "payload", id="not-an-object"),
    pytest.param(None, "payload", id="null"),
])
def test_bad_payload_is_bad_request(nodeStack, connect, payload, field):
    nodeStack.startNode()
    client = connect(nodeStack.stack)
    outcome = finish(client, client.request("nodeCount", payload))
    assert outcome.code == "bad_request", outcome
    assert field in outcome.terminal["error"]["message"]
    assert not outcome.chunks


def test_worker_killed_mid_stream_is_worker_lost(nodeStack, connect):
    first = nodeStack.startNode()
    client = connect(nodeStack.stack)
    requestId = client.request("nodeCount", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId, seq=2)
    first.kill()
    # RabbitMQ hands the unacked request to the next worker with redelivered = true; nodeCount
    # is not idempotent, so that worker answers worker_lost instead of running it again.
    second = nodeStack.startNode()
    outcome = finish(client, requestId)
    assert outcome.code == "worker_lost", outcome
    assert [c["seq"] for c in outcome.chunks] == list(range(len(outcome.chunks)))
    assert re.search(r"Not running nodeCount [0-9a-f]{32} again: it was redelivered",
                     second.log), second.log
    assert "Stopped nodeCount" not in second.log


def test_sigterm_requeues_what_outlives_the_drain_timeout(nodeStack, connect, waitUntil):
    node = nodeStack.startNode("--drain-timeout", "0.5")
    client = connect(nodeStack.stack)
    requestId = client.request("nodeCount", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)
    node.signal(signal.SIGTERM)
    assert node.process is not None
    assert node.process.wait(15) == 0, node.log
    assert re.search(STOPPED + "the drain timeout passed while shutting down; requeued it",
                     node.log), node.log
    queue = nodeStack.queue("nodeCount")
    broker = nodeStack.stack.broker
    waitUntil(lambda: broker.queues()[queue]["messages"] == 1, f"the request back in {queue}")
    # The next worker gets it redelivered: it ran partly, so it is not run again.
    nodeStack.startNode()
    outcome = finish(client, requestId)
    assert outcome.code == "worker_lost", outcome
    assert 0 < len(outcome.chunks) < 100


def test_the_node_worker_learns_who_asked_from_the_gateway(nodeWorkerDir, makeStack, processes,
                                                          connect, tmp_path):
    """relaybus-principal and relaybus-claims reach a Node.js handler as the gateway verified
    them (a gateway with JWT on); without JWT they are null and {}."""
    secret = b"relaybus-node-worker-test-secret-0123456789"
    (tmp_path / "secret").write_bytes(secret)
    stack = makeStack("rabbitmq", ["--jwt-secret-file", str(tmp_path / "secret")], workers=0)
    nodes = NodeStack(stack, processes)
    try:
        nodes.startNode()
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600, "roles": ["user"],
                            "email": "alice@example.com"}, secret, "HS256")
        client = connect(stack, additional_headers={"Authorization": f"Bearer {token}"})
        spoofed = {"relaybus-principal": "root", "relaybus-claims": '{"roles":["admin"]}'}
        outcome = client.collect(client.request("nodeWhoAmI", spoofed, **spoofed))
        assert outcome.data == {"principal": "alice",
                                "claims": {"sub": "alice", "roles": ["user"]}}
    finally:
        for node in nodes.nodes:
            node.kill()


def test_without_jwt_the_node_worker_sees_nobody(nodeStack, connect):
    nodeStack.startNode()
    client = connect(nodeStack.stack)
    requestId = client.request("nodeWhoAmI")
    assert client.collect(requestId).data == {"principal": None, "claims": {}}
    assertQuiet(client, requestId)


def test_only_the_workers_connection_closed_is_worker_lost_for_the_client(nodeStack, connect):
    """docs/protocol.md, step 7: the gateway still has the request open when the reconnected
    worker gets it back redelivered."""
    node = nodeStack.startNode()
    client = connect(nodeStack.stack)
    requestId = client.request("nodeCount", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)
    assert node.process is not None
    broker = nodeStack.stack.broker
    assert broker.closeConnectionsNamed(f"relaybus-node-worker pid {node.process.pid}") == 1
    outcome = client.collect(requestId)
    assert outcome.code == "worker_lost", outcome
    node.waitUntilReady(count=2)
    assert re.search(r"Not running nodeCount [0-9a-f]{32} again: it was redelivered", node.log)
    assert finish(client, client.request("nodeEcho", "after")).data == "after"


REJECT_EVERY_PUBLISH = {"max-length": 0, "overflow": "reject-publish"}


def test_replies_the_broker_refuses_are_acked_and_the_worker_serves_on(
        nodeWorkerDir, makeStack, processes, connect, waitUntil):
    """docs/protocol.md, step 4, as test_worker_faults checks it for the Python runtime: a
    final reply the broker nacks gets the request acked (its prefetch slot, the only one, is
    free at once); a nacked chunk ends the request with a handler_error attempt, nacked too."""
    gatewayId = f"gw-nack-{secrets.token_hex(3)}"
    stack = makeStack("rabbitmq", ["--gateway-id", gatewayId], workers=0)
    nodes = NodeStack(stack, processes)
    try:
        node = nodes.startNode("--concurrency", "1")
        broker = stack.broker
        client = connect(stack)
        offset = len(node.log)
        with broker.policy(f"{stack.prefix}replies.{gatewayId}", REJECT_EVERY_PUBLISH):
            final = client.request("nodeWhoAmI", None, timeoutMs=8000)  # no chunk
            chunked = client.request("nodeEcho", "refused", timeoutMs=8000)  # a chunk first
            node.waitForLogSince(offset, r"The broker refused the final response reply of "
                                 r"nodeWhoAmI [0-9a-f]{32}: acked the request")
            node.waitForLogSince(offset, r"The broker refused chunk 0 of nodeEcho [0-9a-f]{32}: "
                                 r"ending the request")
            node.waitForLogSince(offset, r"The broker refused the final error reply of "
                                 r"nodeEcho [0-9a-f]{32}: acked the request")
            for requestType in ("nodeWhoAmI", "nodeEcho"):  # acked: nothing held
                queue = nodes.queue(requestType)
                waitUntil(lambda q=queue: broker.unacked(q) == 0, f"nothing unacked in {queue}")
            for requestId in (final, chunked):
                outcome = client.collect(requestId)
                assert outcome.code == "timeout" and not outcome.chunks, outcome
        # The same worker, one request of each type at a time, serves the next ones.
        assert client.collect(client.request("nodeWhoAmI")).data == {"principal": None,
                                                                    "claims": {}}
        assert client.collect(client.request("nodeEcho", "served")).data == "served"
        assert "Unhandled" not in node.log
    finally:
        for node in nodes.nodes:
            node.kill()


class DirectClient:
    """Publishes requests straight to a request queue, as no gateway would (odd headers), and
    reads the replies from a queue of its own bound to the responses exchange."""

    def __init__(self, url: str, prefix: str) -> None:
        self.prefix = prefix
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.replyTo = f"direct-{secrets.token_hex(4)}"
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(self.queue, f"{prefix}responses", self.replyTo)

    def request(self, requestType: str, body: bytes, headers: dict[str, Any] | None) -> str:
        correlationId = secrets.token_hex(16)
        self.channel.basic_publish(f"{self.prefix}requests", requestType, body,
                                   pika.BasicProperties(correlation_id=correlationId,
                                                        reply_to=self.replyTo,
                                                        headers=headers))
        return correlationId

    def replies(self, correlationId: str, timeout: float = 10.0) -> list[Any]:
        """(method, properties, body) of each reply up to the final one."""
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            if properties.correlation_id == correlationId:
                got.append((method, properties, body))
                if properties.type != "chunk":
                    return got
        raise AssertionError(f"no final reply for {correlationId} within {timeout}s: {got}")

    def close(self) -> None:
        self.connection.close()


@pytest.mark.parametrize("headers", [
    pytest.param(None, id="no-headers"),
    pytest.param({"relaybus-deadline-ms": "1"}, id="string-deadline"),
    pytest.param({"relaybus-deadline-ms": True}, id="boolean-deadline"),
    pytest.param({"relaybus-deadline-ms": None, "relaybus-principal": 5,
                  "relaybus-claims": b"\xff"}, id="odd-values"),
])
def test_a_request_with_odd_headers_is_served_and_acked(nodeStack, waitUntil, headers):
    """docs/protocol.md: absent headers and a deadline that is not an integer mean "no
    deadline" (the document's own sketch once threw on a message without headers, holding its
    prefetch slot forever). The chunk's relaybus-seq arrives as an AMQP integer, and every
    reply is JSON with content_type application/json."""
    nodeStack.startNode("--concurrency", "1")
    direct = DirectClient(nodeStack.stack.broker.url, nodeStack.stack.prefix)
    try:
        correlationId = direct.request("nodeEcho", b'{"odd": true}', headers)
        chunk, final = direct.replies(correlationId)
        assert (chunk[1].type, chunk[1].headers) == ("chunk", {"relaybus-seq": 0})
        assert type(chunk[1].headers["relaybus-seq"]) is int  # not a string, nor a float
        assert json.loads(chunk[2]) == {"received": True}
        assert (final[1].type, json.loads(final[2])) == ("response", {"odd": True})
        for _method, properties, body in (chunk, final):
            assert properties.content_type == "application/json"
            assert properties.delivery_mode == 1
            json.loads(body)
    finally:
        direct.close()
    queue, broker = nodeStack.queue("nodeEcho"), nodeStack.stack.broker
    waitUntil(lambda: broker.unacked(queue) == 0, f"nothing unacked in {queue}")
