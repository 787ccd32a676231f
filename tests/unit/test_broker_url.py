"""Broker URLs (relaybus.amqp.brokerurl): which query options exist, what a hostile value gets,
that pika never sees ours, that no message shows a password or a key, and that the TLS
options built from them verify (and present) certificates as documented: handshakes in memory,
against a server built from the same throwaway CA (tests/tlscerts.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from relaybus.amqp.brokerurl import (
    MAX_PATH_CHARS,
    MAX_PEM_BYTES,
    clientTLS,
    parseBrokerURL,
)
from relaybus.amqp.link import brokerParameters, tlsProblem, validateBrokerURL
from tlscerts import PKI, makePKI

PASSWORD = "s3cret-PASSWORD"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return makePKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def otherPKI(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return makePKI(tmp_path_factory.mktemp("other-pki"), "another CA")


def url(query: str = "", scheme: str = "amqps") -> str:
    return f"{scheme}://relay:{PASSWORD}@127.0.0.1:5671/vh" + (f"?{query}" if query else "")


def refused(brokerURL: str) -> str:
    """The usage error of a URL; it must never show the password."""
    with pytest.raises(ValueError) as caught:
        validateBrokerURL(brokerURL)
    message = str(caught.value)
    assert PASSWORD not in message and "relay:" not in message, message
    return message


# What pika gets, and the ports


def test_our_options_are_taken_out_before_pika_sees_the_url(pki: PKI) -> None:
    brokerURL = url(f"cafile={pki.caCert}&certfile={pki.clientCert}&keyfile={pki.clientKey}"
                    "&server_hostname=rabbit.example&heartbeat=7&channel_max=9")
    validateBrokerURL(brokerURL)
    broker = parseBrokerURL(brokerURL)
    assert (broker.caFile, broker.certFile, broker.keyFile, broker.serverHostname) == (
        str(pki.caCert), str(pki.clientCert), str(pki.clientKey), "rabbit.example")
    assert "cafile" not in broker.pikaURL and "heartbeat=7" in broker.pikaURL
    parameters = brokerParameters(brokerURL)  # pika refuses unknown keys: ours are gone
    assert (parameters.heartbeat, parameters.channel_max, parameters.virtual_host) == (
        7, 9, "vh")
    assert parameters.credentials.password == PASSWORD
    assert PASSWORD not in repr(broker)


@pytest.mark.parametrize(("brokerURL", "port", "tls"), [
    ("amqp://rabbit", 5672, False), ("amqps://rabbit", 5671, True),
    ("amqps://rabbit:15671/", 15671, True), ("amqp://[::1]:5673/", 5673, False),
])
def test_default_ports_and_tls(brokerURL: str, port: int, tls: bool) -> None:
    broker = parseBrokerURL(brokerURL)
    assert (broker.port, broker.tls) == (port, tls)


def test_percent_encoded_path_and_password_reach_pika_unchanged() -> None:
    parameters = brokerParameters("amqps://u:p%40ss%23w%3Ard@rabbit/my%2Fvhost?heartbeat=3")
    assert parameters.credentials.password == "p@ss#w:rd"
    assert parameters.virtual_host == "my/vhost"


# Hostile and wrong queries


@pytest.mark.parametrize(("query", "expected"), [
    ("bogus=1", "unknown broker URL option 'bogus'"),
    ("password=hunter2", "unknown broker URL option 'password'"),
    ("x" * 5000 + "=1", "unknown broker URL option 'xxxxxxxx"),
    ("ssl_options={'ca_certs':'/x'}", "ssl_options has no effect in relaybus: Twisted"),
    ("tcp_options={}", "tcp_options has no effect"),
    ("connection_attempts=3", "connection_attempts has no effect"),
    ("client_properties={}", "client_properties has no effect"),
    ("socket_timeout=1", "socket_timeout has no effect"),
    ("cafile=", "cafile needs a value"),
    ("cafile=/a&cafile=/b", "cafile is given twice"),
    ("heartbeat=1&heartbeat=2", "heartbeat is given twice"),
    ("&".join(f"heartbeat{i}=1" for i in range(100)), "at most 16"),
    ("heartbeat", "name=value pairs"),
    ("heartbeat=soon", "Invalid heartbeat value 'soon'"),
    # pika takes these, then fails every connection at tune-ok (AMQP's heartbeat is a short),
    # or asserts in callLater when the broker blocks the connection
    ("heartbeat=65536", "heartbeat must be 0 to 65535"),
    ("heartbeat=" + "9" * 30, "heartbeat must be 0 to 65535"),
    ("blocked_connection_timeout=nan", "blocked_connection_timeout must be a finite number"),
    ("blocked_connection_timeout=inf", "blocked_connection_timeout must be a finite number"),
    ("keyfile=/tmp/k.pem", "keyfile needs certfile"),
    ("server_hostname=bad_name!", "server_hostname: 'bad_name!' is not a host name"),
    ("server_hostname=" + "a" * 300, "is not a host name"),
    ("cafile=/" + "a" * MAX_PATH_CHARS, f"the path is over {MAX_PATH_CHARS} characters"),
    ("cafile=/tmp/a%00b", "NUL character"),
])
def test_hostile_or_wrong_query_options_are_usage_errors(query: str, expected: str) -> None:
    message = refused(url(query))
    assert expected in message, message
    assert len(message) < 600, message


@pytest.mark.parametrize("option", ["cafile", "certfile", "server_hostname"])
def test_tls_options_need_amqps(option: str) -> None:
    assert f"option {option} needs an amqps:// URL" in refused(url(f"{option}=x", "amqp"))


@pytest.mark.parametrize(("brokerURL", "expected"), [
    (f"amqp://u:pa#{PASSWORD}@rabbit/", "'#'"),
    (f"amqp://u:pa?{PASSWORD}@rabbit/", "port must be a number"),
    (f"amqp://u:pa/{PASSWORD}@rabbit/", "port must be a number"),
    # digits before an unencoded '/' or '?' parse as host u, port 1234: the rest of the
    # password became the vhost (sent to host u in connection.open, and shown in the broker's
    # refusal) or a query value (shown in pika's error)
    (f"amqp://u:1234/{PASSWORD}@rabbit/", "an '@' after its host"),
    (f"amqp://u:1234?heartbeat=5{PASSWORD}@rabbit/", "an '@' after its host"),
    (f"amqp://u:{PASSWORD}@rabbit:99999/", "port must be a number"),
    ("amqp://u@rabbit/", "a user but no password"),
    (f"http://u:{PASSWORD}@rabbit/", "amqp:// or amqps://"),
    (f"amqp://u:{PASSWORD}@/vh", "names no host"),
    (f"amqps://u:{PASSWORD}@rabbit/?" + "a=1&" * 5000, "over 8192 characters"),
])
def test_malformed_urls_never_show_the_password(brokerURL: str, expected: str) -> None:
    assert expected in refused(brokerURL)


def test_an_at_sign_after_the_host_is_fine_with_credentials_or_encoded() -> None:
    assert brokerParameters("amqp://u:p@rabbit/team@site").virtual_host == "team@site"
    assert brokerParameters("amqp://rabbit/team%40site").virtual_host == "team@site"


# The files


def test_missing_unreadable_and_odd_files_name_the_option(tmp_path: Path, pki: PKI) -> None:
    missing = tmp_path / "nope.pem"
    assert f"cafile: no such file '{missing}'" in refused(url(f"cafile={missing}"))
    assert "is not a regular file" in refused(url(f"cafile={tmp_path}"))
    assert "is not a regular file" in refused(url("cafile=/dev/zero"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block the start for ever
    assert "is not a regular file" in refused(url(f"cafile={fifo}"))
    big = tmp_path / "big.pem"
    big.write_bytes(b"-" * (MAX_PEM_BYTES + 1))
    assert f"is over {MAX_PEM_BYTES} bytes" in refused(url(f"cafile={big}"))
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    assert "holds no PEM certificate" in refused(url(f"cafile={empty}"))
    assert "cafile" in refused(url(f"cafile={pki.clientKey}"))  # a key, not a certificate
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.pem"
        locked.write_bytes(pki.caCert.read_bytes())
        locked.chmod(0)
        assert "cannot read" in refused(url(f"cafile={locked}"))


def test_key_problems_never_show_the_key(tmp_path: Path, pki: PKI, otherPKI: PKI) -> None:
    keyText = pki.clientKey.read_text()
    secretLine = keyText.splitlines()[1]
    messages = [refused(url(f"certfile={pki.clientCert}&keyfile={otherPKI.clientKey}")),
                refused(url(f"certfile={pki.clientCert}")),  # no key in the certificate file
                refused(url(f"certfile={pki.clientKey}&keyfile={pki.clientKey}"))]
    assert "does not belong to the (first) certificate" in messages[0]
    assert "certfile: " in messages[1] and "holds no PEM private key" in messages[1]
    assert "certfile: " in messages[2] and "holds no PEM certificate" in messages[2]
    garbled = tmp_path / "garbled.key"
    garbled.write_text(keyText.replace(secretLine, secretLine[::-1]))
    messages.append(refused(url(f"certfile={pki.clientCert}&keyfile={garbled}")))
    assert "keyfile: " in messages[-1] and "holds no PEM private key" in messages[-1]
    from cryptography.hazmat.primitives import serialization

    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(serialization.load_pem_private_key(
        keyText.encode(), None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    messages.append(refused(url(f"certfile={pki.clientCert}&keyfile={encrypted}")))
    assert "is encrypted" in messages[-1]
    for message in messages:
        assert secretLine not in message and secretLine[::-1] not in message


def test_a_key_in_the_certificate_file_is_enough(tmp_path: Path, pki: PKI) -> None:
    combined = tmp_path / "combined.pem"
    combined.write_bytes(pki.clientCert.read_bytes() + pki.clientKey.read_bytes())
    validateBrokerURL(url(f"cafile={pki.caCert}&certfile={combined}"))


# The TLS options do what they say: handshakes in memory


class _Recorder(Protocol):
    def __init__(self) -> None:
        self.lost: Failure | None = None
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


def handshake(brokerURL: str, serverPKI: PKI, requireClientCert: bool
              ) -> tuple[_Recorder, _Recorder]:
    """Connect the client options of `brokerURL` to a TLS server with `serverPKI`'s server
    certificate; the client sends b"AMQP" once connected. Returns (client, server)."""
    server = PrivateCertificate.loadPEM(serverPKI.serverCert.read_bytes()
                                        + serverPKI.serverKey.read_bytes())
    serverOptions = (server.options(Certificate.loadPEM(serverPKI.caCert.read_bytes()))
                     if requireClientCert else server.options())
    serverRecorder = _Recorder()

    class Greeter(_Recorder):
        def connectionMade(self) -> None:
            self.transport.write(b"AMQP")

    clientSide = Greeter()

    clock = Clock()  # TLS writes are aggregated until the next tick

    def factoryOf(proto: Callable[[], Protocol], options: object, isClient: bool) -> Protocol:
        factory = TLSMemoryBIOFactory(options, isClient, Factory.forProtocol(proto), clock)
        built = factory.buildProtocol(None)
        assert built is not None
        return built

    _client, _server, pump = connectedServerAndClient(
        lambda: factoryOf(lambda: serverRecorder, serverOptions, False),
        lambda: factoryOf(lambda: clientSide, clientTLS(parseBrokerURL(brokerURL)), True),
        clock=clock)
    pump.flush()
    return clientSide, serverRecorder


def test_the_ca_file_verifies_the_broker(pki: PKI) -> None:
    client, server = handshake(url(f"cafile={pki.caCert}"), pki, requireClientCert=False)
    assert server.received == b"AMQP" and client.lost is None


def test_a_broker_certificate_of_another_ca_is_refused(pki: PKI, otherPKI: PKI) -> None:
    client, server = handshake(url(f"cafile={otherPKI.caCert}"), pki, requireClientCert=False)
    assert server.received == b""
    assert client.lost is not None and "certificate verify failed" in str(client.lost.value)
    assert tlsProblem(client.lost) == "certificate verify failed"  # what the link logs


def test_the_certificate_must_name_the_host(pki: PKI) -> None:
    client, server = handshake(url(f"cafile={pki.caCert}&server_hostname=rabbit.example"),
                               pki, requireClientCert=False)
    assert server.received == b""
    assert (tlsProblem(client.lost) or "").startswith(
        "the broker's certificate does not name the host: ")


def test_tls_problem_is_none_for_other_reasons() -> None:
    assert tlsProblem(None) is None
    assert tlsProblem(Failure(ConnectionDone())) is None


def test_server_hostname_names_the_host_the_certificate_carries(pki: PKI) -> None:
    brokerURL = (f"amqps://u:p@rabbit.internal:5671/?cafile={pki.caCert}"
                 "&server_hostname=localhost")
    client, server = handshake(brokerURL, pki, requireClientCert=False)
    assert server.received == b"AMQP" and client.lost is None


def test_the_client_certificate_is_presented(pki: PKI) -> None:
    withCert = url(f"cafile={pki.caCert}&certfile={pki.clientCert}&keyfile={pki.clientKey}")
    client, server = handshake(withCert, pki, requireClientCert=True)
    assert server.received == b"AMQP" and client.lost is None
    client, server = handshake(url(f"cafile={pki.caCert}"), pki, requireClientCert=True)
    assert server.received == b""
