"""The browser library outlives its gateway: when the gateway goes away the client reconnects
by itself to the one that replaces it on the same port, and carries on."""

from __future__ import annotations

import signal

import pytest
from browsersupport import pretty

from relaybus.harness import GatewayProcess

pytestmark = [pytest.mark.processes, pytest.mark.rabbitmq]

# Quick retries, so the client notices the replacement soon after it listens.
BACKOFF = {"initialDelayMs": 100, "maxDelayMs": 500}


def startReplacement(stack, port: int) -> GatewayProcess:
    """A new gateway process on `port`, on the same broker and prefix as `stack`'s."""
    replacement = stack.pool.start(GatewayProcess(
        ["--broker", stack.broker.url, "--amqp-prefix", stack.prefix], port=port,
        name=f"gateway{len(stack.gateways) + 1}"))
    stack.gateways.append(replacement)
    return replacement.waitUntilReady()


def statesSinceOpen(tab) -> list[dict]:
    return tab.evaluate("() => harness.states.slice(harness.states.findIndex("
                        "s => s.state === 'open'))")


def test_request_in_flight_fails_disconnected_and_the_client_comes_back(makeStack, tab):
    """SIGKILL, not SIGTERM: a draining gateway ends every request itself before it closes,
    so only a gateway that dies leaves the client a request in flight."""
    stack = makeStack("rabbitmq")
    tab.openHarness(stack.gateway)
    firstConnection = tab.connect(**BACKOFF)
    tab.start("inflight", "testRequest", {"count": 20, "delayMs": 200}, timeoutMs=60_000)
    tab.waitForRun("inflight", chunks=1)

    stack.gateway.kill()
    run = tab.waitForRun("inflight")
    assert run["error"] is not None and run["error"]["code"] == "disconnected", pretty(run)
    assert 1 <= len(run["chunks"]) < 20, pretty(run)
    tab.waitFor("() => harness.states.some(s => s.state === 'reconnecting')",
                "the client to be reconnecting")

    startReplacement(stack, stack.gateway.port)
    secondConnection = tab.waitFor(
        "() => harness.client.state === 'open' && harness.client.connectionId",
        "the client to reopen by itself")
    assert secondConnection != firstConnection
    states = [s["state"] for s in statesSinceOpen(tab)]
    # connecting / reconnecting alternate while the port refuses, however many times.
    assert states[:2] == ["open", "reconnecting"], states
    assert states[-2:] == ["connecting", "open"], states
    assert set(states[2:-2]) <= {"connecting", "reconnecting"}, states

    tab.start("after", "testRequest", {"count": 3, "delayMs": 10, "chunkBytes": 1})
    after = tab.waitForRun("after")
    assert after["error"] is None, pretty(after)
    assert after["seqs"] == [0, 1, 2], pretty(after)
    assert after["data"] == {"chunks": 3, "chunkBytes": 1, "delayMs": 10, "bytes": 3}


def test_client_reconnects_after_a_graceful_restart(makeStack, tab):
    stack = makeStack("rabbitmq")
    tab.openHarness(stack.gateway)
    tab.connect(**BACKOFF)

    stack.gateway.signal(signal.SIGTERM)
    tab.waitFor("() => harness.states.some(s => s.state === 'reconnecting')",
                "the client to be reconnecting")
    assert stack.gateway.process.wait(30) in (0, -signal.SIGTERM), stack.gateway.log[-3000:]
    goingAway = statesSinceOpen(tab)[1]
    assert goingAway == {"state": "reconnecting", "code": 1001}, goingAway

    startReplacement(stack, stack.gateway.port)
    tab.waitFor("() => harness.client.state === 'open'", "the client to reopen by itself")
    tab.start("after", "echo", {"back": True})
    after = tab.waitForRun("after")
    assert after["error"] is None and after["data"] == {"back": True}, pretty(after)
