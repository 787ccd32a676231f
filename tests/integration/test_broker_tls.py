"""amqps:// to the local RabbitMQ: gateways and workers over TLS listeners this module adds to the
running node (and removes again), with the CA and client certificate from the URL's query.

The node is shared with other test runs, so it is never reconfigured or restarted: each
listener is started with `rabbit_networking:start_ssl_listener/3` through `rabbitmqctl eval`
on a free port and stopped with `rabbit_networking:stop_tcp_listener/1` (RabbitMQ 3.10's
rabbit_networking.erl). The broker runs as its own user, so the certificates go to a folder
under /tmp that user can read (test-only keys, deleted at the end).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from processfixtures import Broker, Stack, echoStreamAndCancel
from relaybus.harness import (
    GatewayProcess,
    RabbitMQError,
    WorkerProcess,
    freePort,
    rabbitmqctl,
    twistdCommand,
)
from tlscerts import PKI, makePKI

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

SAFE_PATH = re.compile(r"[A-Za-z0-9_./-]+")


class TLSListener:
    """One TLS listener on the local node, on 127.0.0.1:`port`."""

    def __init__(self, pki: PKI, requireClientCert: bool) -> None:
        self.pki = pki
        self.requireClientCert = requireClientCert
        self.port = 0

    def start(self) -> None:
        files = {"cacertfile": self.pki.caCert, "certfile": self.pki.serverCert,
                 "keyfile": self.pki.serverKey}
        for path in files.values():
            assert SAFE_PATH.fullmatch(str(path)), path  # it goes into an Erlang string
        options = ",".join(f'{{{name},"{path}"}}' for name, path in files.items())
        options += (",{verify,verify_peer},{fail_if_no_peer_cert,"
                    f"{'true' if self.requireClientCert else 'false'}}}")
        problems = []
        for _ in range(5):  # a free port may be taken by someone else in between
            port = freePort()
            out = rabbitmqctl("eval", f'rabbit_networking:start_ssl_listener({{"127.0.0.1", '
                              f"{port}}}, rabbit_networking:fix_ssl_options([{options}]), 1).")
            if out.strip() == "ok":
                self.port = port
                return
            problems.append(out.strip())
        pytest.fail("could not start a TLS listener on the local RabbitMQ with "
                    f"rabbit_networking:start_ssl_listener/3: {problems}", pytrace=False)

    def stop(self) -> None:
        if self.port:
            rabbitmqctl("eval", f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", '
                        f"{self.port}}}).")
            self.port = 0

    def connections(self, vhost: str) -> list[dict[str, object]]:
        """The vhost's AMQP connections that came in through this listener."""
        out = rabbitmqctl("list_connections", "-p", vhost, "name", "ssl", "ssl_protocol",
                          "peer_cert_subject", "--formatter", "json")
        return [c for c in json.loads(out or "[]")
                if str(c["name"]).endswith(f"-> 127.0.0.1:{self.port}")]


@pytest.fixture(scope="module")
def pki() -> Iterator[PKI]:
    # pytest's tmp_path is private to this user; the broker (user rabbitmq) must read these.
    folder = Path(tempfile.mkdtemp(prefix="relaybus-broker-tls-"))
    try:
        folder.chmod(0o755)
        made = makePKI(folder)
        for path in folder.iterdir():
            path.chmod(0o644)
        yield made
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def otherPKI(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return makePKI(tmp_path_factory.mktemp("other-pki"), "a CA the broker does not use")


def _listener(broker: Broker, pki: PKI, requireClientCert: bool) -> Iterator[TLSListener]:
    broker.requireCtl()  # an external broker (RELAYBUS_TEST_AMQP_URL) is not ours to change
    try:
        rabbitmqctl("eval", "_ = rabbit_networking:ensure_ssl(), ok.")  # starts ssl
    except RabbitMQError as e:
        pytest.fail(f"the local RabbitMQ cannot start its ssl application: {e}", pytrace=False)
    listener = TLSListener(pki, requireClientCert)
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()


@pytest.fixture(scope="module")
def tlsListener(broker: Broker, pki: PKI) -> Iterator[TLSListener]:
    """Verifies a client certificate when one is presented; does not require one."""
    yield from _listener(broker, pki, requireClientCert=False)


@pytest.fixture(scope="module")
def mutualTLSListener(broker: Broker, pki: PKI) -> Iterator[TLSListener]:
    """verify_peer + fail_if_no_peer_cert: a client certificate of the CA is required."""
    yield from _listener(broker, pki, requireClientCert=True)


def amqpsURL(broker: Broker, listener: TLSListener, **query: str) -> str:
    vhost = urllib.parse.quote(broker.vhost, safe="")
    return (f"amqps://guest:guest@127.0.0.1:{listener.port}/{vhost}?"
            + urllib.parse.urlencode(query))


def tlsStack(makeStack, broker: Broker, url: str) -> Stack:
    """A gateway and a worker whose --broker is `url` (the stack's vhost and a fresh prefix)."""
    return makeStack("rabbitmq", broker=Broker(url, broker.vhost, managed=True))


def test_gateway_and_worker_over_amqps_with_the_ca_from_the_url(
        broker, pki, tlsListener, makeStack, connect):
    stack = tlsStack(makeStack, broker, amqpsURL(broker, tlsListener, cafile=str(pki.caCert)))
    echoStreamAndCancel(stack, connect(stack))
    connections = tlsListener.connections(broker.vhost)
    assert len(connections) >= 2, connections  # the gateway's and the worker's, at least
    assert all(c["ssl"] is True for c in connections), connections


def test_a_broker_certificate_of_another_ca_is_refused_and_the_gateway_stays_not_ready(
        broker, otherPKI, tlsListener, processes, waitUntil):
    url = amqpsURL(broker, tlsListener, cafile=str(otherPKI.caCert))
    gateway = processes.start(GatewayProcess(["--broker", url, "--amqp-prefix",
                                              broker.newPrefix()], name="wrong-ca-gateway"))
    worker = processes.start(WorkerProcess(["--broker", url, "--amqp-prefix", broker.newPrefix(),
                                            "--handlers", "workers.examples"],
                                           name="wrong-ca-worker"))
    for process in (gateway, worker):
        process.waitForLog(r"AMQP .*: connection failed: TLS failed .*certificate verify "
                           r"failed", timeout=30)
    waitUntil(lambda: _status(gateway, "/healthz") == 200, "the gateway to serve /healthz")
    assert _status(gateway, "/readyz") == 503
    assert tlsListener.connections(broker.vhost) == []  # no AMQP connection ever opened
    assert "guest:guest" not in gateway.log + worker.log


def test_a_required_client_certificate_from_certfile_and_keyfile(
        broker, pki, mutualTLSListener, makeStack, connect):
    url = amqpsURL(broker, mutualTLSListener, cafile=str(pki.caCert),
                   certfile=str(pki.clientCert), keyfile=str(pki.clientKey))
    stack = tlsStack(makeStack, broker, url)
    echoStreamAndCancel(stack, connect(stack))
    connections = mutualTLSListener.connections(broker.vhost)
    assert connections and all("relaybus-client" in str(c["peer_cert_subject"])
                               for c in connections), connections


def test_without_the_required_client_certificate_the_gateway_never_connects(
        broker, pki, mutualTLSListener, processes, waitUntil):
    url = amqpsURL(broker, mutualTLSListener, cafile=str(pki.caCert))
    gateway = processes.start(GatewayProcess(["--broker", url, "--amqp-prefix",
                                              broker.newPrefix()], name="certless-gateway"))
    gateway.waitForLog(r"AMQP .*: connection failed: TLS failed .*certificate required",
                       timeout=30)
    waitUntil(lambda: _status(gateway, "/healthz") == 200, "the gateway to serve /healthz")
    assert _status(gateway, "/readyz") == 503
    assert mutualTLSListener.connections(broker.vhost) == []


@pytest.mark.parametrize("plugin", ["relaybus", "relaybus-worker"])
def test_an_unreadable_tls_file_is_a_usage_error_naming_the_option(tmp_path, plugin):
    missing = tmp_path / "no-such-ca.pem"
    url = f"amqps://relay:Pa55-{os.getpid()}@127.0.0.1:5671/?cafile={missing}"
    args = [plugin, "--broker", url]
    if plugin == "relaybus-worker":
        args += ["--handlers", "workers.examples"]
    done = subprocess.run([*twistdCommand(), "--nodaemon", "--pidfile=", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"broker URL option cafile: no such file '{missing}'" in output, output
    assert f"Pa55-{os.getpid()}" not in output, output


def _status(gateway: GatewayProcess, path: str) -> int:
    try:
        return gateway.httpStatus(path)
    except OSError:
        return 0
