"""Attacks on the HTTP request that carries a WebSocket upgrade, before `onConnect` sees it:
a slowloris that trickles its request a byte at a time, a peer that opens more unfinished
requests than its per-address cap, and oversized headers. Each gets its documented answer
from a real gateway while a client on another connection is served."""

from __future__ import annotations

import select
import socket
import time
from typing import Any

import pytest

pytestmark = [pytest.mark.processes]

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


def rawConnection(stack: Any) -> socket.socket:
    return socket.create_connection(("127.0.0.1", stack.gateway.port), timeout=10)


def answerOf(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


RESET = b"<reset>"


def trickle(sockets: list[socket.socket], request: bytes, until: float) -> dict[int, bytes]:
    """Send `request` one byte per socket every 0.2 s (never finishing it) until each socket
    is closed by the gateway or `until` passes; returns what each one was answered.

    A socket is read before each byte is sent, so the gateway's answer is seen before the
    next byte reaches its closed socket. A byte that still crosses the close draws a reset,
    which may discard the unread answer: that socket's answer is then `RESET`."""
    answers: dict[int, bytes] = {}
    position = 0
    while len(answers) < len(sockets) and time.monotonic() < until:
        for index, sock in enumerate(sockets):
            if index in answers:
                continue
            answer = _answerIfClosed(sock)
            if answer is None:
                try:
                    sock.sendall(request[position % (len(request) - 4):][:1])
                except (BrokenPipeError, ConnectionResetError):
                    answer = _answerIfClosed(sock) or RESET
            if answer is not None:
                answers[index] = answer
        position += 1
        time.sleep(0.2)
    return answers


def _answerIfClosed(sock: socket.socket) -> bytes | None:
    """What the gateway sent before closing `sock`, or None while it is still open."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return None
    try:
        return answerOf(sock) or RESET
    except ConnectionResetError:
        return RESET


def test_a_slowloris_is_cut_at_the_open_handshake_timeout(makeStack: Any,
                                                          connect: Any) -> None:
    stack = makeStack("memory", ["--open-handshake-timeout", "2"])
    good = connect(stack)
    sockets = [rawConnection(stack) for _ in range(40)]
    started = time.monotonic()
    answers = trickle(sockets, UPGRADE, until=started + 30)
    assert len(answers) == 40, "some trickling connections were never closed"
    # each was answered 408, or (rarely) a trickled byte crossed the close and the reset
    # discarded the answer; the metric below counts the gateway's 408s either way
    assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout") or answer == RESET
               for answer in answers.values()), answers
    assert list(answers.values()).count(RESET) < len(answers) / 2, answers
    assert good.call("echo", "still here").data == "still here"
    metrics = stack.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="request_timeout"}'] == 40
    assert metrics["relaybus_connections"] == 1
    for sock in sockets:
        sock.close()


def test_unfinished_requests_beyond_the_per_address_cap_get_429(makeStack: Any,
                                                                connect: Any) -> None:
    stack = makeStack("memory", ["--max-connections-per-ip", "5",
                                 "--open-handshake-timeout", "30"])
    good = connect(stack)  # its request is in: it no longer counts as unfinished
    pending = [rawConnection(stack) for _ in range(5)]
    for sock in pending:
        sock.sendall(UPGRADE[:20])
    over = rawConnection(stack)
    assert answerOf(over).startswith(b"HTTP/1.1 429 Too Many Requests")
    assert good.call("echo", "still here").data == "still here"
    pending[0].sendall(UPGRADE[20:])  # finishing one request frees its place
    assert pending[0].recv(4096).startswith(b"HTTP/1.1 101")
    connect(stack).call("echo", 1)
    metrics = stack.gateway.metrics()
    assert metrics['relaybus_handshakes_refused_total{reason="per_ip_pending"}'] == 1
    for sock in [*pending, over]:
        sock.close()


@pytest.mark.parametrize(("name", "headers", "status"), [
    ("101 headers", b"".join(b"X-H%d: y\r\n" % n for n in range(101)), b"400"),
    ("a 17 KB header line", b"X-Big: " + b"y" * 17_000 + b"\r\n", b"431"),
    ("20 KB of headers", b"".join(b"X-H%d: %s\r\n" % (n, b"y" * 1000) for n in range(20)),
     b"400"),
    ("a 1 MB body declared on the upgrade", b"Content-Length: 1048576\r\n", b"413"),
])
def test_oversized_headers_are_refused(makeStack: Any, connect: Any, name: str,
                                       headers: bytes, status: bytes) -> None:
    stack = makeStack("memory")
    good = connect(stack)
    sock = rawConnection(stack)
    sock.sendall(UPGRADE[:-2] + headers + b"\r\n")
    assert answerOf(sock).startswith(b"HTTP/1.1 " + status), name
    sock.close()
    assert good.call("echo", "still here").data == "still here"


@pytest.mark.parametrize("path", [b"/ws", b"/ws?redirect=https%3A%2F%2Fevil.example%2F"])
def test_a_plain_get_of_the_websocket_path_is_no_status_page_or_redirect(
        makeStack: Any, connect: Any, path: bytes) -> None:
    """Autobahn's own status page (server software, and a 303 to any ?redirect= URL) would
    answer before onConnect, so before any token or Origin check: it is turned off."""
    stack = makeStack("memory")
    good = connect(stack)
    sock = rawConnection(stack)
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = answerOf(sock)
    sock.close()
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 4"), answer[:200]
    assert b"evil.example" not in answer and b"Autobahn" not in answer
    assert good.call("echo", "still here").data == "still here"
