"""Hostile WebSocket frames from an authenticated client, against a real `twistd relaybus`:
JSON depth and number bombs cost one `bad_request` and nothing else; a message over
`maxMessageBytes` (in one frame, announced in a frame header, or in thousands of fragments,
finished or not) closes that connection with 1009; a fragmented message broken by another
data frame is a protocol error (1002). The connection's other requests go on where the
protocol says the connection survives, end (workers told) where it does not, and a
well-behaved client on another connection is served throughout."""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

pytestmark = [pytest.mark.processes]

SECRET = b"relaybus-security-suite-secret-0123456789"
MAX_BYTES = 1_048_576  # the default --max-message-bytes: room for the bombs under it
SLOW = {"count": 6, "delayMs": 100}


def bearer(sub: str) -> dict[str, Any]:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, "HS256")
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


@pytest.fixture
def armed(tmp_path: Path, makeStack: Any, connect: Any) -> Any:
    (tmp_path / "secret").write_bytes(SECRET)
    stack = makeStack("memory", ["--jwt-secret-file", str(tmp_path / "secret")])
    stack.good = connect(stack, **bearer("bob"))
    stack.attacker = connect(stack, **bearer("mallory"))
    assert stack.attacker.hello["limits"]["maxMessageBytes"] == MAX_BYTES
    return stack


def stillServed(stack: Any) -> None:
    assert stack.good.call("echo", "still here").data == "still here"


def sendFrame(client: Any, frame: Frame) -> None:
    """A frame written straight to the socket, as websockets would never send it."""
    client.ws.socket.sendall(frame.serialize(mask=True, extensions=[]))


def request(payload: str) -> str:
    return '{"type": "request", "requestId": "bomb", "requestType": "echo", "payload": ' \
        + payload + "}"


DEPTH = 100_000
BOMBS = {
    "arrays 100,000 deep": request("[" * DEPTH + "]" * DEPTH),
    "objects 100,000 deep": request('{"a":' * DEPTH + "1" + "}" * DEPTH),
    "1e400": request("1e400"),
    "-1e400": request("[-1e400]"),
    "an integer of 5000 digits": request("1" + "0" * 5000),
    "an integer beyond a float (10**309)": request("1" + "0" * 309),
    "NaN": request("NaN"),
    "Infinity": request('{"x": -Infinity}'),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_json_bomb_costs_one_bad_request(armed: Any, bomb: str) -> None:
    attacker = armed.attacker
    running = attacker.request("testRequest", SLOW)
    attacker.waitForChunk(running)
    attacker.sendRaw(BOMBS[bomb])
    error = attacker.next(lambda f: f["type"] == "error", "the bomb's error")
    assert error["requestId"] is None  # the frame could not be read, so neither its id
    assert error["error"]["code"] == "bad_request", error
    assert error["error"]["message"].startswith("frame is not valid JSON")
    assert len(error["error"]["message"]) <= 1024
    stillServed(armed)
    assert attacker.finish(running).data["chunks"] == SLOW["count"]
    assert armed.gateway.metrics()["relaybus_connections"] == 2


def closedWith(client: Any, code: int) -> None:
    assert client.waitClosed() == code


def assertEndedByTheClose(stack: Any, mark: Any) -> None:
    stack.waitForHandlerLog(r"Stopped testRequest [0-9a-f]{32}: cancelled by the gateway "
                            r"\(disconnected\)", mark)


def test_a_frame_just_over_the_limit_closes_with_1009(armed: Any, connect: Any) -> None:
    attacker = armed.attacker
    edge = '{"type": "request", "requestId": "edge", "requestType": "echo", "payload": 1, ' \
        '"pad": "'
    atLimit = edge + "x" * (MAX_BYTES - len(edge) - 2) + '"}'
    assert len(atLimit) == MAX_BYTES
    attacker.sendRaw(atLimit)
    assert attacker.finish("edge").data == 1  # the limit itself is allowed
    running = attacker.request("testRequest", {"count": 100, "delayMs": 100})
    attacker.waitForChunk(running)
    mark = armed.mark()
    attacker.sendRaw(atLimit[:-2] + 'x"}')
    closedWith(attacker, 1009)
    assertEndedByTheClose(armed, mark)
    stillServed(armed)


def test_a_frame_header_announcing_4_eib_closes_with_1009_before_any_payload(
        armed: Any) -> None:
    attacker = armed.attacker
    # FIN + TEXT, masked, 64-bit length 2**62, the mask key, and then nothing.
    attacker.ws.socket.sendall(bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 2**62)
                               + b"\x00\x00\x00\x00")
    closedWith(attacker, 1009)
    stillServed(armed)


def test_a_message_in_thousands_of_fragments_within_the_limit_is_served(armed: Any) -> None:
    attacker = armed.attacker
    text = request('"' + "y" * 60_000 + '"')
    attacker.ws.send(text[i:i + 16] for i in range(0, len(text), 16))  # 3,754 fragments
    outcome = attacker.finish("bomb")
    assert outcome.data == "y" * 60_000
    stillServed(armed)


def test_thousands_of_tiny_fragments_over_the_limit_close_with_1009(armed: Any) -> None:
    attacker = armed.attacker
    running = attacker.request("testRequest", {"count": 100, "delayMs": 100})
    attacker.waitForChunk(running)
    mark = armed.mark()
    fragments = (request('"') if i == 0 else "z" * 32 for i in range(MAX_BYTES // 32 + 100))
    try:
        attacker.ws.send(fragments)  # 32,868 fragments of 32 bytes: 3 KiB over the limit
    except ConnectionClosed:
        pass  # the gateway closed while we were still sending
    closedWith(attacker, 1009)
    assertEndedByTheClose(armed, mark)
    stillServed(armed)


def test_a_flood_of_fragments_never_finished_closes_with_1009(armed: Any) -> None:
    """Empty continuation frames cost nothing but reading them; the first byte over the
    limit closes, though the message never ends."""
    attacker = armed.attacker
    sendFrame(attacker, Frame(Opcode.TEXT, request('"').encode(), fin=False))
    empty = Frame(Opcode.CONT, b"", fin=False).serialize(mask=True, extensions=[])
    attacker.ws.socket.sendall(empty * 5000)
    stillServed(armed)  # meanwhile, others are served
    chunk = Frame(Opcode.CONT, b"w" * 4096, fin=False).serialize(mask=True, extensions=[])
    try:
        for _ in range(MAX_BYTES // 4096 + 1):
            attacker.ws.socket.sendall(chunk)
    except OSError:
        pass  # closed under us
    closedWith(attacker, 1009)
    stillServed(armed)


def test_an_unfinished_message_left_hanging_costs_only_its_connection(
        armed: Any, connect: Any, waitUntil: Any) -> None:
    attacker = armed.attacker
    sendFrame(attacker, Frame(Opcode.TEXT, request('"half').encode(), fin=False))
    stillServed(armed)
    attacker.close()
    waitUntil(lambda: armed.gateway.metrics()["relaybus_connections"] == 1,
              "the gateway to let the half-sent connection go")
    stillServed(armed)


@pytest.mark.parametrize("intruder", [
    Frame(Opcode.TEXT, b'{"type": "cancel", "requestId": "x"}'),
    Frame(Opcode.BINARY, b"\x00"),
], ids=["text", "binary"])
def test_a_data_frame_inside_a_fragmented_message_closes_with_1002(armed: Any,
                                                                   intruder: Frame) -> None:
    attacker = armed.attacker
    sendFrame(attacker, Frame(Opcode.TEXT, b'{"type": ', fin=False))
    sendFrame(attacker, intruder)
    closedWith(attacker, 1002)
    stillServed(armed)


def test_a_continuation_without_a_message_closes_with_1002(armed: Any) -> None:
    sendFrame(armed.attacker, Frame(Opcode.CONT, b"orphan"))
    closedWith(armed.attacker, 1002)
    stillServed(armed)


def test_compression_is_not_negotiated_so_no_decompression_bomb(armed: Any) -> None:
    # websockets offers permessage-deflate by default; the gateway accepts no extension.
    assert armed.attacker.ws.protocol.extensions == []
    assert "Sec-WebSocket-Extensions" not in armed.attacker.ws.response.headers
