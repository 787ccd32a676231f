"""A TLS listener (`--listen ssl:...`): wss:// and https:// on one port, and the send-buffer cap
still reaches a client that stops reading through the TLS layer."""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect as wsConnect

from relaybus.harness import GatewayProcess, freePort

pytestmark = [pytest.mark.processes]


def selfSignedCertificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    keyPath, certPath = folder / "key.pem", folder / "cert.pem"
    keyPath.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    certPath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


def trusting(certPath: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certPath))
    context.check_hostname = False  # the certificate names an IP address in its CN only
    return context


def metrics(port: int, context: ssl.SSLContext) -> dict[str, float]:
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=5,
                                context=context) as response:
        lines = response.read().decode().splitlines()
    return {name: float(value) for name, _, value in
            (line.rpartition(" ") for line in lines if line and not line.startswith("#"))}


def test_wss_and_https_on_one_tls_port_and_the_send_buffer_cap_through_tls(
        tmp_path, processes, waitUntil):
    keyPath, certPath = selfSignedCertificate(tmp_path)
    context = trusting(certPath)
    port = freePort()
    listen = f"ssl:{port}:privateKey={keyPath}:certKey={certPath}:interface=127.0.0.1"
    processes.start(GatewayProcess(["--listen", listen, "--max-send-buffer", "1048576"],
                                   port=port, name="tls-gateway"))
    waitUntil(lambda: _healthy(port, context), "the TLS gateway to answer /healthz")

    with wsConnect(f"wss://127.0.0.1:{port}/ws", ssl=context, open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        ws.send('{"type":"request","requestId":"t","requestType":"testRequest",'
                '"payload":{"count":3,"delayMs":0}}')
        frames = [json.loads(ws.recv(timeout=10)) for _ in range(4)]
    assert [f.get("seq") for f in frames[:3]] == [0, 1, 2]
    assert frames[3]["type"] == "response" and frames[3]["data"]["chunks"] == 3

    # A TLS client that stops reading: the cap is enforced below the TLS layer too.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", port))
    with context.wrap_socket(raw) as stalled:
        key = base64.b64encode(os.urandom(16))
        stalled.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key +
                        b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        stalled.sendall(Frame(Opcode.TEXT, b'{"type":"request","requestId":"big",'
                              b'"requestType":"testRequest","payload":{"count":2000,'
                              b'"delayMs":0,"chunkBytes":65536},"timeoutMs":120000}'
                              ).serialize(mask=True, extensions=[]))
        waitUntil(lambda: metrics(port, context)["relaybus_slow_clients_closed_total"] == 1,
                  "the stalled TLS client to be closed", timeout=30)
    waitUntil(lambda: metrics(port, context)["relaybus_requests_in_flight"] == 0,
              "its request to end")


def _healthy(port: int, context: ssl.SSLContext) -> bool:
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2,
                                    context=context) as response:
            return response.status == 200
    except OSError:
        return False
