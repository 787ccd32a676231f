"""A gateway and a worker as two restricted RabbitMQ users, with exactly the permissions
docs/security.md gives ("RabbitMQ permissions"; relaybus.amqp.topology builds them): they serve
requests end to end, and each user is refused what it must not do.

The users are created in the test vhost with random names and passwords (the password through
rabbitmqctl's stdin, not its command line) and deleted at teardown, whatever happened.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator

import attrs
import pika
import pytest
from pika.exceptions import ChannelClosedByBroker

from processfixtures import Broker, Stack, echoStreamAndCancel
from relaybus.amqp.topology import Permissions, Topology
from relaybus.harness import GatewayProcess, WorkerProcess, rabbitmqctl

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

REQUEST_TYPES = ("testRequest", "echo", "primes")  # what workers.examples serves


@attrs.frozen
class User:
    name: str
    password: str
    url: str


@pytest.fixture
def makeUser(broker: Broker) -> Iterator[Callable[[str, Permissions], User]]:
    broker.requireCtl()
    made: list[str] = []

    def make(role: str, permissions: Permissions) -> User:
        name = f"relaybus-test-{role}-{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(24)
        made.append(name)
        subprocess.run(["rabbitmqctl", "-q", "add_user", name], input=password + "\n",
                       text=True, capture_output=True, timeout=60, check=True)
        rabbitmqctl("set_permissions", "-p", broker.vhost, name, permissions.configure,
                    permissions.write, permissions.read)
        vhost = urllib.parse.quote(broker.vhost, safe="")
        return User(name, password, f"amqp://{name}:{password}@127.0.0.1:5672/{vhost}")

    yield make
    for name in made:
        rabbitmqctl("delete_user", name)


@pytest.fixture
def restricted(broker: Broker, makeUser, processes) -> Iterator[tuple[Stack, User, User, str]]:
    """A gateway (fixed --gateway-id) and a worker, each as its own restricted user."""
    prefix = broker.newPrefix()
    gatewayId = f"gw-{secrets.token_hex(4)}"
    topology = Topology(prefix)
    gatewayUser = makeUser("gateway", topology.gatewayPermissions(gatewayId))
    workerUser = makeUser("worker", topology.workerPermissions(REQUEST_TYPES))
    stack = Stack("rabbitmq", processes, broker, prefix)
    stack.workers.append(processes.start(WorkerProcess(
        ["--broker", workerUser.url, "--amqp-prefix", prefix, "--handlers", "workers.examples"],
        name="restricted-worker")))
    stack.gateways.append(processes.start(GatewayProcess(
        ["--broker", gatewayUser.url, "--amqp-prefix", prefix, "--gateway-id", gatewayId],
        name="restricted-gateway")))
    stack.workers[0].waitUntilReady()
    stack.gateway.waitUntilReady()
    yield stack, gatewayUser, workerUser, gatewayId


def refused(user: User, attempt: Callable[[pika.adapters.blocking_connection.BlockingChannel],
                                          object]) -> str:
    """Run `attempt` on a fresh channel of `user`; the broker must close it with 403."""
    connection = pika.BlockingConnection(pika.URLParameters(user.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # so that a refused publish raises here
        with pytest.raises(ChannelClosedByBroker) as closed:
            attempt(channel)
        assert closed.value.reply_code == 403, closed.value
        return str(closed.value.reply_text)
    finally:
        if connection.is_open:
            connection.close()


def test_a_gateway_and_a_worker_as_restricted_users(broker, restricted, connect):
    stack, gatewayUser, workerUser, _ = restricted
    echoStreamAndCancel(stack, connect(stack))
    # ... and a request nobody serves is still told at once (the mandatory return works)
    client = connect(stack)
    assert client.expectError(client.request("nobodyServesThis"), "no_handler")

    users = {c["user"] for c in _connections(broker.vhost)}
    assert {gatewayUser.name, workerUser.name} <= users, users
    for process in (*stack.gateways, *stack.workers):
        for password in (gatewayUser.password, workerUser.password):
            assert password not in process.log, f"{process.name} logged a password"


def test_each_user_is_refused_what_it_must_not_do(broker, restricted):
    stack, gatewayUser, workerUser, gatewayId = restricted
    topology = Topology(stack.prefix or "")
    replyQueue = topology.replyQueue(gatewayId)
    body = b'"forged"'
    forged = pika.BasicProperties(correlation_id="0" * 32, reply_to=gatewayId, type="request")

    # A worker cannot pose as a gateway: no requests, no cancel notices ...
    assert "access to exchange" in refused(workerUser, lambda ch: ch.basic_publish(
        topology.requestsExchange, "echo", body, forged))
    refused(workerUser, lambda ch: ch.basic_publish(
        topology.cancelsExchange, "echo", b"", pika.BasicProperties(type="cancel")))
    # ... nor read a gateway's replies, nor serve a requestType it was not given.
    assert "access to queue" in refused(workerUser, lambda ch: ch.basic_consume(
        replyQueue, lambda *a: None, auto_ack=True))
    refused(workerUser, lambda ch: ch.queue_declare(topology.requestQueue("admin"),
                                                    durable=True))

    # A gateway cannot take requests off a queue, nor answer as a worker.
    refused(gatewayUser, lambda ch: ch.basic_consume(
        topology.requestQueue("echo"), lambda *a: None))
    refused(gatewayUser, lambda ch: ch.basic_publish(
        topology.responsesExchange, gatewayId, body, pika.BasicProperties(type="response")))
    # Nor declare (or so delete) a request queue, nor another gateway's reply queue.
    refused(gatewayUser, lambda ch: ch.queue_declare(topology.requestQueue("echo"),
                                                     durable=True))
    refused(gatewayUser, lambda ch: ch.queue_declare(topology.replyQueue("gw-other")))

    # Neither user may touch another deployment's names in the vhost (another prefix).
    other = Topology(broker.newPrefix())
    refused(gatewayUser, lambda ch: ch.exchange_declare(other.requestsExchange, "direct",
                                                        durable=True))
    refused(workerUser, lambda ch: ch.exchange_declare(other.responsesExchange, "direct",
                                                       durable=True))

    # What each needs still works for them after all this (their processes kept serving).
    assert stack.gateway.httpStatus("/readyz") == 200


def test_a_wrong_password_is_logged_without_it(broker, makeUser, processes):
    user = makeUser("gateway", Topology("x.").gatewayPermissions())
    wrong = user.url.replace(user.password, "not-" + user.password[:8])
    gateway = processes.start(GatewayProcess(["--broker", wrong, "--amqp-prefix", "x."],
                                             name="wrong-password-gateway"))
    gateway.waitForLog(r"connection failed: the AMQP handshake failed \(a refused login",
                       timeout=30)
    assert gateway.httpStatus("/readyz") == 503
    assert user.password[:8] not in gateway.log


def _connections(vhost: str) -> list[dict[str, object]]:
    out = rabbitmqctl("list_connections", "-p", vhost, "user", "name", "--formatter", "json")
    return list(json.loads(out or "[]"))

