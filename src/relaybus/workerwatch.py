"""Requests whose workers are all gone end early, not at their deadlines.

AMQP tells a publisher nothing when the last consumer of a queue goes (basic.cancel reaches
consumers only), so a request whose only worker died waited in its queue until its deadline
and the client got `timeout`. While requests of a requestType are pending, the gateway asks the
broker how many consumers its queue has (a passive queue.declare, cheap); once that has been 0
for a grace period (a worker restarting within it loses nothing), those requests end with
`worker_lost`: they may have been half done.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relaybus.correlation import CorrelationTable
from relaybus.interfaces import IRequestBus

log = Logger()

PROBE_INTERVAL_S = 1.0


class AbsentWorkerWatch(Service):
    def __init__(self, table: CorrelationTable, bus: IRequestBus, clock: IReactorTime,
                 graceS: float, intervalS: float = PROBE_INTERVAL_S) -> None:
        self._table = table
        self._bus = bus
        self._clock = clock
        self._graceS = graceS
        self._intervalS = intervalS
        self._zeroSince: dict[str, float] = {}  # requestType -> first probe that saw 0
        self._probing: Deferred[Any] | None = None
        self._loop = LoopingCall(self._probe)
        self._loop.clock = clock
        self.requestsEnded = 0

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._intervalS, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _probe(self) -> None:
        if self._probing is not None:  # the broker has not answered the last round yet
            return
        pending = self._table.pendingRequestTypes()
        for requestType in set(self._zeroSince) - pending:
            del self._zeroSince[requestType]
        if not pending:
            return
        rounds = [self._bus.consumersOf(requestType)
                  .addTimeout(self._intervalS * 5, self._clock)
                  .addCallback(self._counted, requestType)
                  for requestType in sorted(pending)]
        probing = self._probing = DeferredList(rounds, consumeErrors=True)
        probing.addBoth(self._probed)

    def _probed(self, _: object) -> None:
        self._probing = None  # (set before this may run: answers can come synchronously)

    def _counted(self, consumers: int | None, requestType: str) -> None:
        if consumers != 0:  # a worker is there, or the bus cannot tell: wait for the deadline
            self._zeroSince.pop(requestType, None)
            return
        now = self._clock.seconds()
        since = self._zeroSince.setdefault(requestType, now)
        if now - since < self._graceS:
            return
        ended = self._table.endWithoutWorker(
            requestType, f"no worker has consumed requestType {requestType!r} for "
                         f"{self._graceS:g} s")
        self._zeroSince.pop(requestType, None)
        self.requestsEnded += ended
        if ended:
            log.warn("Ended {count} {requestType} request(s): no worker has consumed them "
                     "for {grace} s", count=ended, requestType=requestType, grace=self._graceS)
