"""A WebSocket client and an HTTP GET for unit tests of the gateway's edge: they talk to the
real GatewayProtocol and Site through a StringTransport / DummyRequest, with no sockets."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import txaio
from autobahn.websocket.protocol import WebSocketProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from relaybus.gateway import GatewayFactory, GatewayProtocol

START = 1_764_000_000


@contextlib.contextmanager
def autobahnOn(start: float = START) -> Iterator[Clock]:
    """A Clock at `start` that is also txaio's loop (Autobahn's timers use txaio's), restored
    afterwards: the clock fixture of the gateway's edge tests."""
    clock = Clock()
    clock.advance(start)
    txaio.use_twisted()
    previous = txaio.config.loop
    txaio.config.loop = clock
    try:
        yield clock
    finally:
        txaio.config.loop = previous

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OPCODE_TEXT, OPCODE_BINARY, OPCODE_CLOSE = 0x1, 0x2, 0x8


def clientFrame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
    """One final, masked client-to-server frame."""
    mask = os.urandom(4)
    header = bytes([0x80 | opcode])
    length = len(payload)
    if length < 126:
        header += bytes([0x80 | length])
    elif length < 65536:
        header += bytes([0x80 | 126]) + struct.pack("!H", length)
    else:
        header += bytes([0x80 | 127]) + struct.pack("!Q", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


def serverFrames(data: bytes) -> list[tuple[int, bytes]]:
    """Split what the server wrote (unmasked frames) into (opcode, payload)."""
    frames = []
    while data:
        opcode = data[0] & 0x0F
        assert data[1] & 0x80 == 0, "server frames are never masked"
        length, offset = data[1] & 0x7F, 2
        if length == 126:
            (length,), offset = struct.unpack("!H", data[2:4]), 4
        elif length == 127:
            (length,), offset = struct.unpack("!Q", data[2:10]), 10
        frames.append((opcode, data[offset:offset + length]))
        data = data[offset + length:]
    return frames


class TCPLikeTransport(StringTransport):
    """A StringTransport that, like a real TCP transport, allows unregisterProducer without one
    registered (Autobahn does that when it drops a connection)."""

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None


class Client:
    """One WebSocket client talking to a GatewayProtocol through a StringTransport."""

    def __init__(self, factory: GatewayFactory) -> None:
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50_000))
        assert isinstance(self.protocol, GatewayProtocol)
        self.transport = TCPLikeTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50_000))
        self.protocol.makeConnection(self.transport)
        self.read = 0

    def handshake(self, path: bytes = b"/ws", headers: dict[str, str] | None = None) -> bytes:
        key = base64.b64encode(os.urandom(16))
        extra = b"".join(f"{name}: {value}\r\n".encode() for name, value in
                         (headers or {}).items())
        self.protocol.dataReceived(
            b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n")
        written = self.transport.value()
        head, _, _rest = written.partition(b"\r\n\r\n")
        self.read = len(head) + 4
        return head + b"\r\n\r\n" + base64.b64encode(
            hashlib.sha1(key + WEBSOCKET_GUID).digest())

    def send(self, payload: bytes | str, opcode: int = OPCODE_TEXT) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.protocol.dataReceived(clientFrame(payload, opcode))

    def sendJSON(self, value: Any) -> None:
        self.send(json.dumps(value))

    def frames(self) -> list[tuple[int, bytes]]:
        """Frames written since the last call."""
        data = self.transport.value()[self.read:]
        self.read = len(self.transport.value())
        return serverFrames(data)

    def messages(self) -> list[Any]:
        frames = self.frames()
        assert all(opcode == OPCODE_TEXT for opcode, _ in frames), frames
        return [json.loads(payload) for _, payload in frames]

    @property
    def isOpen(self) -> bool:
        return (self.protocol.state == WebSocketProtocol.STATE_OPEN
                and not self.transport.disconnecting)


def get(site: Site, path: bytes) -> tuple[int, bytes, bytes | None]:
    segments = path.lstrip(b"/").split(b"/")
    request = DummyRequest(segments)
    request.path = path
    resource = getChildForRequest(site.resource, request)
    rendered = resource.render(request)
    body = b"".join(request.written) if rendered is NOT_DONE_YET else rendered
    assert isinstance(body, bytes)
    contentType = request.responseHeaders.getRawHeaders(b"content-type", [None])[0]
    return request.responseCode or 200, body, contentType
