"""Requests whose requestType has lost every consumer end with worker_lost after a grace
period, not at their deadlines; a worker that is back within the grace loses nothing."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relaybus.config import Limits
from relaybus.correlation import CorrelationTable
from relaybus.frames import RequestFrame
from relaybus.testing import FakeClientConnection, FakeRequestBus
from relaybus.workerwatch import AbsentWorkerWatch

GRACE_S = 5.0
LIMITS = Limits(defaultTimeoutMs=60_000, maxTimeoutMs=60_000)


class Gateway:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_764_000_000)
        self.bus = FakeRequestBus()
        self.table = CorrelationTable(self.bus, self.clock, LIMITS, "gw")
        self.conn = FakeClientConnection("c1")
        self.watch = AbsentWorkerWatch(self.table, self.bus, self.clock, GRACE_S)
        self.watch.startService()

    def submit(self, requestId: str, requestType: str = "primes") -> Deferred[Any]:
        outcome = self.table.submit(self.conn, RequestFrame(requestId, requestType, None))
        assert outcome is not None
        return outcome

    def run(self, seconds: float) -> None:
        """Let time pass a second at a time, as the reactor would (a LoopingCall skips
        the rounds a single big jump of the clock would overtake)."""
        self.clock.pump([1.0] * int(seconds))

    def codeOf(self, requestId: str) -> str | None:
        frames = self.conn.terminalFrames(requestId)
        return frames[0]["error"]["code"] if frames else None


@pytest.fixture
def gw() -> Gateway:
    return Gateway()


def test_requests_of_a_type_with_no_consumer_end_with_worker_lost_after_the_grace(
        gw: Gateway) -> None:
    gw.bus.consumers["primes"] = 0
    gw.submit("r-1")
    gw.submit("r-2")
    gw.run(GRACE_S)  # first probe at 1 s sees 0; 5 s later is not yet reached
    assert gw.codeOf("r-1") is None
    gw.run(1)
    assert gw.codeOf("r-1") == gw.codeOf("r-2") == "worker_lost"
    assert gw.conn.terminalFrames("r-1")[0]["error"]["message"] == (
        "no worker has consumed requestType 'primes' for 5 s")
    assert {notice.reason for notice in gw.bus.cancels} == {"worker_lost"}
    assert len(gw.table) == 0 and gw.watch.requestsEnded == 2


def test_a_worker_back_within_the_grace_loses_nothing(gw: Gateway) -> None:
    gw.bus.consumers["primes"] = 0
    gw.submit("r-1")
    gw.run(3)
    gw.bus.consumers["primes"] = 1  # a restarted worker consumes again
    gw.run(1)
    gw.bus.consumers["primes"] = 0  # and dies again: the grace starts afresh at the next probe
    gw.run(GRACE_S)
    assert gw.codeOf("r-1") is None
    gw.run(1)
    assert gw.codeOf("r-1") == "worker_lost"


def test_only_the_type_without_consumers_is_ended(gw: Gateway) -> None:
    gw.bus.consumers.update(primes=0, echo=2)
    gw.submit("r-1", "primes")
    gw.submit("r-2", "echo")
    gw.run(GRACE_S + 2)
    assert gw.codeOf("r-1") == "worker_lost" and gw.codeOf("r-2") is None


def test_a_bus_that_cannot_tell_changes_nothing(gw: Gateway) -> None:
    gw.submit("r-1", "unknown")  # FakeRequestBus answers None: not connected, no such queue
    gw.run(GRACE_S * 10)
    assert gw.codeOf("r-1") is None


def test_nothing_is_asked_while_nothing_is_pending(gw: Gateway) -> None:
    gw.run(GRACE_S * 3)
    assert gw.bus.consumerQueries == []
    gw.bus.consumers["primes"] = 0
    outcome = gw.submit("r-1")
    gw.table.cancel(gw.conn, "r-1")
    assert outcome.called
    gw.run(2)
    assert gw.bus.consumerQueries == []


def test_a_new_request_after_an_ended_streak_gets_a_full_grace(gw: Gateway) -> None:
    gw.bus.consumers["primes"] = 0
    gw.submit("r-1")
    gw.run(GRACE_S + 1)
    assert gw.codeOf("r-1") == "worker_lost"
    gw.run(1)  # nothing pending: the streak is forgotten
    gw.submit("r-2")
    gw.run(GRACE_S)
    assert gw.codeOf("r-2") is None
    gw.run(1)
    assert gw.codeOf("r-2") == "worker_lost"


def test_a_probe_the_broker_never_answers_times_out_and_probing_goes_on(gw: Gateway) -> None:
    class StuckOnce(FakeRequestBus):
        stuck = True

        def consumersOf(self, requestType: str) -> Deferred[int | None]:
            if self.stuck:
                self.stuck = False
                return Deferred()  # never answered
            return super().consumersOf(requestType)

    gw.bus = StuckOnce(consumers={"primes": 0})
    gw.table = CorrelationTable(gw.bus, gw.clock, LIMITS, "gw")
    gw.watch.stopService()
    gw.watch = AbsentWorkerWatch(gw.table, gw.bus, gw.clock, GRACE_S)
    gw.watch.startService()
    gw.submit("r-1")
    gw.run(1)  # the first probe hangs
    gw.run(5)  # ... and times out after 5 intervals; the next rounds are answered
    assert gw.codeOf("r-1") is None
    gw.run(GRACE_S + 1)
    assert gw.codeOf("r-1") == "worker_lost"


def test_stopping_the_watch_stops_probing(gw: Gateway) -> None:
    gw.watch.stopService()
    gw.bus.consumers["primes"] = 0
    gw.submit("r-1")
    gw.run(GRACE_S * 3)
    assert gw.bus.consumerQueries == [] and gw.codeOf("r-1") is None
