"""RabbitMQ only: several gateways and workers on one broker, two gateways given one id,
broker connection loss, a wrong password, an idempotent handler re-run after its worker dies,
and handlers in-process.
(Worker faults under load are in test_worker_faults.py, broker faults in test_broker_faults.py.)"""

from __future__ import annotations

import concurrent.futures
import re
import secrets
import time

import pytest

from processfixtures import LATE_REPLIES
from relaybus.harness import GatewayProcess

pytestmark = [pytest.mark.rabbitmq, pytest.mark.processes]

STOPPED = r"Stopped testRequest [0-9a-f]{32}: "


def test_readyz_and_healthz_when_connected(makeStack):
    stack = makeStack("rabbitmq")
    assert stack.gateway.httpStatus("/readyz") == 200
    assert stack.gateway.httpStatus("/healthz") == 200


def _clientSession(connect, gateway, clientName):
    """Pipeline echoes and testRequests with payloads only this client could expect, reusing
    the same requestIds as every other client, then check each reply."""
    client = connect(gateway)
    token = secrets.token_hex(4)
    echoes = {f"e{i}": {"client": clientName, "token": token, "n": i} for i in range(15)}
    streams = {f"s{i}": {"count": 2 + i, "delayMs": 10, "chunkBytes": 1 + i % 3}
               for i in range(4)}
    for requestId, payload in echoes.items():
        client.request("echo", payload, requestId)
    for requestId, payload in streams.items():
        client.request("testRequest", payload, requestId)
    for requestId, payload in echoes.items():
        outcome = client.collect(requestId)
        assert outcome.data == payload, (clientName, outcome)
    for requestId, payload in streams.items():
        outcome = client.collect(requestId)
        assert outcome.chunkData == [{"index": i, "filler": "x" * payload["chunkBytes"]}
                                     for i in range(payload["count"])], (clientName, outcome)
        assert outcome.data["bytes"] == payload["count"] * payload["chunkBytes"]
    client.assertQuiet(*echoes, *streams)
    strangers = [f for f in client.received
                 if f.get("requestId") not in (*echoes, *streams, None)
                 and not f["requestId"].startswith("barrier-")]
    assert not strangers, strangers
    return clientName


def test_two_gateways_two_workers_no_crosstalk(makeStack, connect):
    stack = makeStack("rabbitmq", gateways=2, workers=2)
    names = [(gateway, f"{gateway.name}-client{i}")
             for gateway in stack.gateways for i in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(_clientSession, connect, gateway, name)
                   for gateway, name in names]
        done = [f.result(timeout=60) for f in futures]
    assert sorted(done) == sorted(name for _, name in names)


def test_a_second_gateway_with_the_same_id_is_refused_until_the_first_one_goes(
        makeStack, connect, waitUntil):
    """Both used to consume the one reply queue, and RabbitMQ dealt the replies out between
    them: 10 of 20 echoes answered on each, the rest `timeout`. Now its consumer is
    exclusive: the second is refused, says why once, stays not ready, and takes over."""
    gatewayId = f"gw-twin-{secrets.token_hex(3)}"
    stack = makeStack("rabbitmq", gatewayArgs=("--gateway-id", gatewayId))
    first = stack.gateway
    second = stack.startGateway("--gateway-id", gatewayId, wait=False)
    refusal = (rf"AMQP relaybus gateway {gatewayId}: another connection consumes this "
               rf"gateway's reply queue .* in exclusive use\): most likely another gateway "
               rf"process with the same --gateway-id {gatewayId} is connected")
    second.waitForLog(refusal)
    assert second.httpStatus("/readyz") == 503
    assert second.metrics()["relaybus_broker_ready"] == 0
    refused = connect(second)
    assert refused.collect(refused.request("echo", "refused")).code == "unavailable"

    client = connect(first)
    requestIds = {client.request("echo", {"n": n}): n for n in range(20)}
    for requestId, n in requestIds.items():
        assert client.collect(requestId).data == {"n": n}
    assert first.metrics().get(LATE_REPLIES, 0.0) == 0
    # Refused again and again (ClientService tells each retry), said once.
    waitUntil(lambda: second.log.count("Scheduling retry") >= 3, "3 refused attempts")
    assert second.httpStatus("/readyz") == 503
    assert re.findall(r"\[relaybus\.amqp#(warn|error|critical)\]", second.log) == ["error"]

    assert first.stop() == 0
    stoppedAt = time.monotonic()
    second.waitUntilReady(timeout=30)  # the next retry, 10 s at most after the first left
    readyAfter = time.monotonic() - stoppedAt
    assert connect(second).call("echo", "taken over").data == "taken over"
    setUp = re.search(rf"AMQP relaybus gateway {gatewayId}: connected and set up, after (\d+) "
                      r"refused setups", second.log)
    assert setUp, second.log[-3000:]
    print(f"same id: the first answered 20 of 20; the second, refused {setUp[1]} times with "
          f"one error, was ready {readyAfter:.1f} s after the first stopped")


def test_broker_connections_dropped_mid_request(isolatedBroker, makeStack, connect, waitUntil):
    stack = makeStack("rabbitmq", broker=isolatedBroker)
    client = connect(stack)
    requestId = client.request("testRequest", {"count": 100, "delayMs": 100}, timeoutMs=60_000)
    client.waitForChunk(requestId)
    gatewayMark = stack.mark()
    isolatedBroker.closeAllConnections("relaybus integration test")
    outcome = client.collect(requestId)
    assert outcome.code == "unavailable", outcome
    # The worker stopped the handler whose broker link went away: told by the link, or
    # first by the chunk it could not publish (whichever the drop reached first).
    stack.waitForHandlerLog(f"(?:{STOPPED}lost the connection to the message broker"
                            r"|Request [0-9a-f]{32} ended: the broker did not take it)",
                            gatewayMark)
    # Both come back on their own.
    stack.workers[0].waitUntilReady(count=2)
    waitUntil(lambda: stack.gateway.httpStatus("/readyz") == 200, "/readyz 200 again")

    def echoWorks():
        outcome = client.collect(client.request("echo", "back", timeoutMs=2000))
        return outcome.code is None and outcome.data == "back"

    waitUntil(echoWorks, "an echo to succeed after the reconnect", timeout=15, interval=0.2)
    again = client.call("testRequest", {"count": 3, "delayMs": 10})
    assert again.data["chunks"] == 3 and len(again.chunks) == 3
    # A fresh connection works too.
    assert connect(stack).call("echo", "fresh").data == "fresh"


def test_a_wrong_password_is_not_ready_and_says_why(broker, processes):
    url = broker.url.replace("guest:guest@", "guest:wrong@")
    assert url != broker.url
    gateway = processes.start(GatewayProcess(["--broker", url,
                                              "--amqp-prefix", broker.newPrefix()]))
    gateway.waitForLog(r"a refused login: check user, password and vhost")
    assert gateway.httpStatus("/readyz") == 503
    assert gateway.httpStatus("/healthz") == 200


def test_idempotent_handler_reruns_after_its_worker_dies_without_repeating_chunks(
        handlerPath, makeStack, connect):
    # The rerun starts from chunk 0 again; the gateway forwards only the chunks the client
    # has not had, so the client sees 0..count-1 exactly once, in order.
    stack = makeStack("rabbitmq", workerArgs=("--handlers", "idempotent_handlers"))
    client = connect(stack)
    requestId = client.request("slowCount", {"count": 30, "delayMs": 50}, timeoutMs=60_000)
    client.waitForChunk(requestId, seq=5)
    stack.workers[0].kill()
    stack.startWorker("--handlers", "idempotent_handlers")
    outcome = client.finish(requestId)
    assert outcome.data == {"count": 30, "rerun": 1}
    assert outcome.chunkData == list(range(30))


def test_gateway_can_run_handlers_in_process_against_rabbitmq(makeStack, connect):
    # --handlers with --broker: the gateway process also runs a worker runtime on the broker.
    stack = makeStack("rabbitmq", workers=0,
                      gatewayArgs=("--handlers", "workers.examples"))
    stack.gateway.waitForLog(r"relaybus in-process worker .*: connected and set up")
    client = connect(stack)
    outcome = client.finish(client.request("testRequest", {"count": 2, "delayMs": 0}))
    assert [c["index"] for c in outcome.chunkData] == [0, 1]
    assert client.call("echo", {"in": "process"}).data == {"in": "process"}
