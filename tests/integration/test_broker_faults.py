"""Broker faults against the real RabbitMQ: channels and consumers the broker closes while the
connection stays up, and resource alarms that block the gateway's connection.

This module is also a handler module: the worker loads it with --handlers.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from zope.interface import implementer

from conftest import waitUntil
from relaybus.interfaces import IRequestHandler, IRequestStream

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

RABBITMQ_MAX_MESSAGE_SIZE = 134_217_728  # the broker's default max_message_size (3.10)


@implementer(IRequestHandler)
class _TooBigForTheBroker:
    """Answers with a reply one byte over RabbitMQ's max_message_size: the broker closes the
    worker's publishing channel (406 PRECONDITION_FAILED), the connection stays up."""

    requestType = "reviewTooBig"
    idempotent = False

    def handle(self, request: Any, stream: IRequestStream) -> str:
        return "x" * RABBITMQ_MAX_MESSAGE_SIZE


reviewTooBig = _TooBigForTheBroker()


def _echoWorks(client: Any) -> bool:
    outcome = client.collect(client.request("echo", "after", timeoutMs=1500))
    return outcome.code is None and outcome.data == "after"


@pytest.mark.log_errors_expected
def test_gateway_recovers_when_the_broker_cancels_its_reply_consumer(makeStack, connect,
                                                                     waitUntil):
    gatewayId = f"gw-review-{secrets.token_hex(3)}"
    stack = makeStack("rabbitmq", gatewayArgs=("--gateway-id", gatewayId))
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    replyQueue = f"{stack.prefix}replies.{gatewayId}"
    stack.broker.ctl("delete_queue", "-p", stack.broker.vhost, replyQueue)
    waitUntil(lambda: _echoWorks(client), "an echo to succeed after the reply consumer was "
              "cancelled by the broker", timeout=12, interval=0.2)


@pytest.mark.log_errors_expected
def test_worker_recovers_after_the_broker_closes_its_publishing_channel(makeStack, connect,
                                                                        waitUntil,
                                                                        monkeypatch):
    here = str(Path(__file__).parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [here, os.environ.get("PYTHONPATH")])))
    stack = makeStack("rabbitmq", workerArgs=("--handlers", Path(__file__).stem))
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    tooBig = client.request("reviewTooBig", None, timeoutMs=5000)
    stack.workers[0].waitForLog(r"PRECONDITION_FAILED|not published", timeout=30)
    client.collect(tooBig, timeout=15)  # timeout (the final reply could not be published)
    waitUntil(lambda: _echoWorks(client), "an echo to succeed after the worker's publishing "
              "channel was closed by the broker", timeout=12, interval=0.2)


# A resource alarm: RabbitMQ blocks every connection that publishes and stops reading from it.

DEFAULT_DISK_FREE_LIMIT = "50000000"  # RabbitMQ's default (50 MB)


@contextlib.contextmanager
def _diskAlarm(broker: Any) -> Iterator[None]:
    """Raise a disk alarm broker-wide (the only way to block a connection from outside),
    and always clear it again."""
    broker.requireCtl()
    broker.ctl("set_disk_free_limit", "1000000GB")
    try:
        waitUntil(lambda: "disk" in json.dumps(json.loads(
            broker.ctl("status", "--formatter", "json")).get("alarms")),
            "the disk alarm to be raised", timeout=15, interval=0.2)
        yield
    finally:
        broker.ctl("set_disk_free_limit", DEFAULT_DISK_FREE_LIMIT)


def _waitUntilBlocked(stack: Any) -> None:
    waitUntil(lambda: "blocked" in stack.broker.ctl("list_connections", "-p",
                                                     stack.broker.vhost, "state"),
              "the broker to block the gateway's connection", timeout=15, interval=0.2)


@pytest.mark.log_errors_expected
def test_gateway_exits_on_sigterm_while_the_broker_blocks_it(makeStack, connect):
    stack = makeStack("rabbitmq", gatewayArgs=("--drain-timeout", "1"))
    gateway = stack.gateway
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    try:
        with _diskAlarm(stack.broker):
            payload = "x" * (900 * 1024)
            for _ in range(40):  # ~36 MB: more than the socket buffers can hold
                client.request("echo", payload, timeoutMs=60_000)
            _waitUntilBlocked(stack)
            started = time.monotonic()
            gateway.signal(signal.SIGTERM)
            try:
                code = gateway.process.wait(20)  # drain 1 s + close 3 s + slack
            except subprocess.TimeoutExpired:
                code = None
            assert code is not None, (f"still running {time.monotonic() - started:.0f} s "
                                      "after SIGTERM")
    finally:
        gateway.kill()  # before the alarm clears, so this test never passes by accident


@pytest.mark.log_errors_expected
def test_gateway_is_not_ready_while_the_broker_blocks_it(makeStack, connect):
    stack = makeStack("rabbitmq")
    client = connect(stack)
    assert client.call("echo", "before").data == "before"
    with _diskAlarm(stack.broker):
        client.request("echo", "x" * 1024, timeoutMs=60_000)  # the publish that blocks it
        _waitUntilBlocked(stack)
        waitUntil(lambda: stack.gateway.httpStatus("/readyz") == 503,
                  "/readyz to say 503 while blocked", timeout=10)
