"""Per-connection limits: --max-in-flight and --max-message-bytes (both directions), on a
gateway started with --max-in-flight 2 --max-message-bytes 4096 (the `limitedStack`)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.processes]

MAX_BYTES = 4096
SLOW = {"count": 3, "delayMs": 200, "chunkBytes": 1}


def test_hello_announces_the_limits(limitedStack, connect):
    limits = connect(limitedStack).hello["limits"]
    assert limits["maxInFlight"] == 2
    assert limits["maxMessageBytes"] == MAX_BYTES


def test_third_request_in_flight_is_overloaded(limitedStack, connect):
    client = connect(limitedStack)
    first = client.request("testRequest", SLOW)
    second = client.request("testRequest", SLOW)
    third = client.request("testRequest", SLOW)
    refused = client.collect(third)
    assert refused.code == "overloaded" and refused.chunks == []
    firstOutcome, secondOutcome = client.collect(first), client.collect(second)
    for outcome in (firstOutcome, secondOutcome):
        assert len(outcome.chunks) == 3 and outcome.data["chunks"] == 3
    # "At once": the refusal came before either accepted request ended.
    order = [id(f) for f in client.received]
    assert order.index(id(refused.terminal)) < min(
        order.index(id(firstOutcome.terminal)), order.index(id(secondOutcome.terminal)))
    client.assertQuiet(first, second, third)
    # The slots are free again.
    assert client.call("echo", "free").data == "free"


def test_max_in_flight_is_per_connection(limitedStack, connect):
    one, two = connect(limitedStack), connect(limitedStack)
    mine = [one.request("testRequest", SLOW) for _ in range(2)]
    theirs = [two.request("testRequest", SLOW) for _ in range(2)]
    for client, requestIds in ((one, mine), (two, theirs)):
        for requestId in requestIds:
            assert client.collect(requestId).data["chunks"] == 3
        client.assertQuiet(*requestIds)


def test_message_just_under_the_limit_is_served(limitedStack, connect):
    client = connect(limitedStack)
    payload = "u" * 3900
    frame = {"type": "request", "requestId": "big", "requestType": "echo", "payload": payload}
    assert len(json.dumps(frame)) < MAX_BYTES
    client.sendJSON(frame)
    assert client.finish("big").data == payload


def test_oversize_message_closes_with_1009_only_that_connection(limitedStack, connect):
    victim, bystander = connect(limitedStack), connect(limitedStack)
    running = bystander.request("testRequest", SLOW)
    victim.request("echo", "x" * (MAX_BYTES + 100))
    assert victim.waitClosed() == 1009
    outcome = bystander.finish(running)
    assert outcome.data["chunks"] == 3
    assert connect(limitedStack).call("echo", "new connection").data == "new connection"


def test_worker_chunk_over_the_limit_is_payload_too_large(limitedStack, connect):
    client = connect(limitedStack)
    mark = limitedStack.mark()
    requestId = client.request("testRequest", {"count": 3, "delayMs": 50, "chunkBytes": 5000})
    outcome = client.finish(requestId)
    assert outcome.code == "payload_too_large" and outcome.chunks == []
    limitedStack.waitForHandlerLog(
        r"Stopped testRequest [0-9a-f]{32}: cancelled by the gateway \(payload_too_large\)",
        mark)


def test_worker_response_over_the_limit_is_payload_too_large(limitedStack, connect):
    client = connect(limitedStack)
    # 1e2 is 3 bytes from the client but 100.0 (5 bytes) once Python re-encodes it, so the
    # echo's response is larger than the request was.
    client.sendRaw('{"type": "request", "requestId": "grow", "requestType": "echo", '
                   '"payload": [' + ",".join(["1e2"] * 900) + "]}")
    outcome = client.finish("grow")
    assert outcome.code == "payload_too_large"


# A reply whose body fits the limit but whose frame (body + envelope) does not: the frame is
# what counts (Autobahn would refuse to send it).

def test_chunk_frame_just_over_the_limit_is_payload_too_large(limitedStack, connect):
    client = connect(limitedStack)
    # Body {"index":0,"filler":"x...x"} is 4092 bytes; the chunk frame around it is larger.
    requestId = client.request("testRequest", {"count": 2, "delayMs": 0, "chunkBytes": 4070})
    outcome = client.finish(requestId)
    assert outcome.code == "payload_too_large" and outcome.chunks == []
    assert max(client.rawSizes) <= MAX_BYTES


def test_response_frame_just_over_the_limit_is_payload_too_large(limitedStack, connect):
    client = connect(limitedStack)
    # The response body is [100.0,...] with 678 items: 4069 bytes, under the limit; the
    # response frame around it is not.
    client.sendRaw('{"type": "request", "requestId": "edge", "requestType": "echo", '
                   '"payload": [' + ",".join(["1e2"] * 678) + "]}")
    outcome = client.finish("edge")
    assert outcome.code == "payload_too_large", outcome
    assert max(client.rawSizes) <= MAX_BYTES
