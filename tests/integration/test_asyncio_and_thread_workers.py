"""Asyncio and blocking handlers in real `twistd -r asyncio relaybus-worker` processes on
RabbitMQ (and in the gateway's own process under `twistd -r asyncio relaybus`), driven by a
real WebSocket client: streams, a real asyncio HTTP client (httpx) awaited inside a handler,
cancel / deadline / SIGTERM reaching the asyncio Task, a bounded thread pool, and the wrong
reactor refused at start."""

from __future__ import annotations

import http.server
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from relaybus.harness import twistdCommand

pytestmark = [pytest.mark.processes]

HANDLERS = ("--handlers", "world_handlers", "--handlers", "workers.asyncio_examples",
            "--handlers", "workers.blocking_examples")


def _token() -> str:
    return secrets.token_hex(6)


class _Lines(http.server.BaseHTTPRequestHandler):
    """GET /lines?n=N: N lines, 10 ms apart, streamed (HTTP/1.0, ends when closed)."""

    def do_GET(self) -> None:
        count = int(self.path.partition("n=")[2] or 1)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        for index in range(count):
            self.wfile.write(f"line {index}\n".encode())
            self.wfile.flush()
            time.sleep(0.01)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def httpServer(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Lines)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("RELAYBUS_TEST_HTTP_URL", url)  # the workers inherit it
    yield url
    server.shutdown()
    server.server_close()


@pytest.fixture
def asyncioStack(handlerPath: None, httpServer: str, makeStack: Any) -> Any:
    return makeStack("rabbitmq", workerArgs=(*HANDLERS, "--threads", "2"), reactor="asyncio")


@pytest.mark.rabbitmq
def test_asyncio_handlers_stream_and_await_a_real_asyncio_client(asyncioStack, connect):
    stack = asyncioStack
    mark = stack.mark()
    client = connect(stack)
    token = _token()
    probe = client.request("taskProbe", {"token": token, "count": 4, "delayMs": 5})
    ticker = client.request("asyncTicker", {"count": 5, "intervalMs": 2})
    lines = client.request("httpLines", {"lines": 6})
    outcome = client.collect(probe)
    assert outcome.code is None and outcome.chunkData == [0, 1, 2, 3]
    assert outcome.terminal["data"] == {"token": token}
    assert client.collect(ticker).chunkData == [{"tick": n} for n in range(5)]
    fetched = client.collect(lines)
    assert fetched.chunkData == [f"line {n}" for n in range(6)]
    assert fetched.terminal["data"] == {"lines": 6, "status": 200}
    stack.waitForHandlerLog(rf"Task started {token} \(in a Task: True\)", mark)
    log = stack.workers[0].log
    assert "AsyncioSelectorReactor" in log
    assert "asyncTicker (asyncio)" in log and "slowDigest (thread; 2 threads)" in log
    client.assertQuiet(probe, ticker, lines)


@pytest.mark.rabbitmq
def test_cancel_disconnect_and_deadline_reach_the_asyncio_task(asyncioStack, connect):
    stack = asyncioStack
    client = connect(stack)
    mark = stack.mark()
    cancelled, timedOut = _token(), _token()
    first = client.request("taskProbe", {"token": cancelled, "count": 1000, "delayMs": 20})
    second = client.request("taskProbe", {"token": timedOut, "count": 1000, "delayMs": 20},
                            timeoutMs=600)
    leaver = connect(stack)
    disconnected = _token()
    third = leaver.request("taskProbe", {"token": disconnected, "count": 1000, "delayMs": 20})
    client.waitForChunk(first, 2)
    client.cancel(first)
    leaver.waitForChunk(third, 1)
    leaver.close()  # the client goes away mid-stream
    assert client.collect(first).code == "cancelled"
    assert client.collect(second).code == "timeout"
    for token in (cancelled, timedOut, disconnected):
        stack.waitForHandlerLog(f"Task cancelled {token}", mark)
        stack.waitForHandlerLog(f"Task finally {token}", mark)
    client.assertQuiet(first, second)


@pytest.mark.rabbitmq
def test_sigterm_drain_cancels_the_tasks_it_hands_back(handlerPath, httpServer, makeStack,
                                                        connect):
    stack = makeStack("rabbitmq", workerArgs=(*HANDLERS, "--drain-timeout", "1"),
                      reactor="asyncio")
    worker = stack.workers[0]
    client = connect(stack)
    tokens = [_token() for _ in range(3)]
    requests = [client.request("taskProbe", {"token": t, "count": 1000, "delayMs": 20})
                for t in tokens]
    for requestId in requests:
        client.waitForChunk(requestId)
    worker.signal(signal.SIGTERM)
    assert worker.process is not None
    code = worker.process.wait(30)
    assert code == 0, worker.log[-3000:]
    for token in tokens:  # the drain timed out: each Task was cancelled and cleaned up
        assert f"Task cancelled {token}" in worker.log, worker.log[-3000:]
        assert f"Task finally {token}" in worker.log, worker.log[-3000:]
    # Handed back to the broker; not idempotent, so the next worker answers worker_lost
    # without running them again.
    mark = stack.mark()
    stack.startWorker(*HANDLERS, reactor="asyncio")
    for requestId in requests:
        assert client.collect(requestId).code == "worker_lost"
    assert "Task started" not in stack.handlerLogSince(mark)


@pytest.mark.rabbitmq
def test_blocking_handlers_stream_from_a_bounded_pool(asyncioStack, connect):
    stack = asyncioStack
    client = connect(stack)
    holds = [client.request("threadHold", {"holdMs": 300}) for _ in range(6)]
    digest = client.request("slowDigest", {"steps": 3, "roundsPerStep": 1000})
    outcomes = [client.collect(r) for r in holds]
    assert all(o.code is None for o in outcomes)
    assert max(o.terminal["data"]["mostAtOnce"] for o in outcomes) == 2  # --threads 2
    threads = {o.chunkData[0]["thread"] for o in outcomes}
    assert len(threads) <= 2 and all("relaybus-handlers" in t for t in threads)
    steps = client.collect(digest)
    assert [c["step"] for c in steps.chunkData] == [0, 1, 2]
    assert steps.terminal["data"]["digest"] == steps.chunkData[-1]["digest"]
    client.assertQuiet(*holds, digest)


def test_the_gateway_runs_asyncio_handlers_in_process_under_the_asyncio_reactor(
        handlerPath, httpServer, makeStack, connect):
    stack = makeStack("memory", gatewayArgs=("--handlers", "workers.examples", *HANDLERS),
                      reactor="asyncio")
    client = connect(stack)
    ticker = client.request("asyncTicker", {"count": 3, "intervalMs": 1})
    lines = client.request("httpLines", {"lines": 2})
    digest = client.request("slowDigest", {"steps": 1, "roundsPerStep": 10})
    assert client.collect(ticker).chunkData == [{"tick": n} for n in range(3)]
    assert client.collect(lines).chunkData == ["line 0", "line 1"]
    assert client.collect(digest).code is None
    client.assertQuiet(ticker, lines, digest)


@pytest.mark.parametrize(("plugin", "extra"), [
    ("relaybus-worker", ["--broker", "amqp://guest:guest@127.0.0.1:5672/"]),
    ("relaybus", []),
])
def test_an_asyncio_handler_on_the_default_reactor_fails_at_start_naming_the_fix(
        tmp_path, plugin, extra):
    done = subprocess.run(
        [*twistdCommand(), "--nodaemon", "--pidfile=", plugin, *extra,
         "--handlers", "workers.asyncio_examples"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert re.search(r"handler 'asyncTicker' \(workers\.asyncio_examples\.AsyncTickerHandler\)"
                     r" runs in asyncio", output), output
    assert f"`twistd -r asyncio {plugin} ...`" in output, output
    assert "Traceback" not in output, output
