"""`relaybus call` (and through it relaybus.client) against a real gateway, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RELAYBUS = str(Path(sys.executable).parent / "relaybus")

pytestmark = pytest.mark.processes


def relaybusCall(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    result = subprocess.run([RELAYBUS, "call", *args], capture_output=True, text=True,
                            timeout=60)
    return result.returncode, [json.loads(line) for line in result.stdout.splitlines()], \
        result.stderr


def test_call_prints_each_chunk_then_the_response(stack: Any) -> None:
    code, lines, _ = relaybusCall("testRequest", '{"count": 3, "delayMs": 10, "chunkBytes": 4}',
                                  "--url", stack.url)
    assert code == 0
    assert lines == [
        {"type": "chunk", "seq": 0, "data": {"index": 0, "filler": "xxxx"}},
        {"type": "chunk", "seq": 1, "data": {"index": 1, "filler": "xxxx"}},
        {"type": "chunk", "seq": 2, "data": {"index": 2, "filler": "xxxx"}},
        {"type": "response", "data": {"chunks": 3, "chunkBytes": 4, "delayMs": 10, "bytes": 12}},
    ]


def test_call_error_prints_the_code_and_exits_1(stack: Any) -> None:
    code, lines, _ = relaybusCall("nobodyServesThis", "--url", stack.url)
    assert code == 1
    assert [line["code"] for line in lines] == ["no_handler"]


def test_call_timeout_is_the_gateways_timeout(stack: Any) -> None:
    code, lines, _ = relaybusCall("testRequest", '{"count": 3, "delayMs": 2000}',
                                  "--url", stack.url, "--timeout", "0.5")
    assert code == 1
    assert lines[-1]["type"] == "error" and lines[-1]["code"] == "timeout"


def test_call_without_a_gateway_says_disconnected(stack: Any) -> None:
    from relaybus.harness import freePort

    code, lines, _ = relaybusCall("echo", "--url", f"ws://127.0.0.1:{freePort()}/ws",
                                  "--timeout", "5")
    assert code == 1
    assert lines == [{"type": "error", "code": "disconnected", "message": lines[0]["message"]}]


def test_bad_payload_is_a_usage_error(stack: Any) -> None:
    code, lines, stderr = relaybusCall("echo", "{not json", "--url", stack.url)
    assert code == 2 and lines == [] and "payload is not JSON" in stderr
