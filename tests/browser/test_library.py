"""The browser library (/client/relaybus.js) in a real Chromium, against a gateway, RabbitMQ and
a worker process: streaming, cancelling, an unserved requestType, and logs shipped to the
gateway. The tests share one gateway + worker and leave them as they were."""

from __future__ import annotations

import re
import secrets

import pytest
from browsersupport import pretty

pytestmark = [pytest.mark.processes]

CORRELATION_ID = r"[0-9a-f]{32}"


def test_request_streams_chunks_in_seq_order_then_the_response(stack, tab):
    tab.openHarness(stack.gateway)
    tab.connect()
    tab.start("stream", "testRequest", {"count": 8, "delayMs": 20, "chunkBytes": 5},
              timeoutMs=30_000)
    run = tab.waitForRun("stream")
    assert run["error"] is None, pretty(run)
    assert run["seqs"] == list(range(8)), pretty(run)
    assert run["chunks"] == [{"index": i, "filler": "xxxxx"} for i in range(8)], pretty(run)
    assert run["data"] == {"chunks": 8, "chunkBytes": 5, "delayMs": 20, "bytes": 40}


def test_request_chunks_by_async_iteration(stack, tab):
    tab.openHarness(stack.gateway)
    tab.connect()
    tab.evaluate("() => harness.iterate('loop', 'testRequest', "
                 "{count: 4, delayMs: 10, chunkBytes: 2})")
    run = tab.waitForRun("loop")
    assert run["error"] is None, pretty(run)
    assert run["chunks"] == [{"index": i, "filler": "xx"} for i in range(4)], pretty(run)
    assert run["data"] == {"chunks": 4, "chunkBytes": 2, "delayMs": 10, "bytes": 8}


def test_abort_signal_cancels_midway_and_the_worker_stops(stack, tab):
    tab.openHarness(stack.gateway)
    tab.connect()
    tab.start("long", "testRequest", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    tab.waitForRun("long", chunks=2)  # running on the worker now
    mark = stack.mark()
    tab.evaluate("() => harness.controllers.long.abort()")
    run = tab.waitForRun("long")
    assert run["error"] is not None and run["error"]["isRelaybusError"], pretty(run)
    assert run["error"]["code"] == "cancelled", pretty(run)
    assert 2 <= len(run["chunks"]) < 100, pretty(run)
    stack.waitForHandlerLog(
        rf"Stopped testRequest {CORRELATION_ID}: cancelled by the gateway \(cancelled\)", mark)
    assert "Stopped testRequest" not in mark.since(stack.gateway)  # it ran on the worker


def test_request_type_nobody_serves_gets_no_handler(stack, tab):
    tab.openHarness(stack.gateway)
    tab.connect()
    tab.start("orphan", "nobodyServesThis", {"x": 1})
    run = tab.waitForRun("orphan")
    assert run["error"] is not None and run["error"]["isRelaybusError"], pretty(run)
    assert run["error"]["code"] == "no_handler", pretty(run)
    assert run["chunks"] == [] and run["data"] is None, pretty(run)


def test_logger_line_reaches_the_gateway_log_with_the_connection_id(stack, tab, waitUntil):
    tab.openHarness(stack.gateway)
    connectionId = tab.connect()
    token = secrets.token_hex(6)
    tab.evaluate("""token => {
        const logger = harness.relaybus.createLogger(harness.client);
        logger.warn(`browser says ${token}`, {page: "browser-test"});
        logger.flush();
    }""", token)

    def logged() -> list[str]:
        return [line for line in stack.gateway.log.splitlines() if token in line]

    [line] = waitUntil(logged, f"the client-log line with {token} in the gateway log")
    assert "[relaybus.clientlog#warn]" in line, line
    assert re.search(rf"\[{re.escape(connectionId)} [^\]]*\] browser says {token}$", line), line
