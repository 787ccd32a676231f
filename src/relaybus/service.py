"""Service trees for the gateway and the worker, shared by the twistd plugins and relaybus.tac.

Both stop in order (MultiService would stop every child at once): first stop taking work,
then let the work in hand finish within the drain timeout, then close connections and the bus.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from relaybus.admission import Authenticator
from relaybus.amqp.gatewaybus import AmqpRequestBus
from relaybus.amqp.topology import Topology
from relaybus.amqp.workerbus import AmqpWorkerBus
from relaybus.authorization import Authorizer
from relaybus.config import GatewayConfig, WorkerConfig
from relaybus.correlation import CorrelationTable
from relaybus.gateway import GatewayFactory, makeSite
from relaybus.identity import JWTChecker
from relaybus.interfaces import IJWKSFetcher, IRequestBus, IRequestHandler, IWorkerBus
from relaybus.jwks import AgentJWKSFetcher, RemoteJWKS, checkJWKSURL
from relaybus.listener import listenerService
from relaybus.memory import MemoryBus
from relaybus.metrics import GatewayCollector, MetricsResource, gatewayRegistry
from relaybus.worker import WorkerRuntime
from relaybus.workerwatch import AbsentWorkerWatch

log = Logger(namespace="relaybus.service")


def _defaultReactor() -> Any:
    from twisted.internet import reactor

    return reactor


def reloadOnSighup(authorizer: Authorizer | None, reactor: Any = None,
                   nothingToReread: str = "no --authz-policy to re-read") -> None:
    """SIGHUP (`systemctl reload`, or a closed terminal) re-reads the authorization policy (a
    bad new one is logged, the old one kept); without a policy (and in a worker) it is only
    logged: its default action would end the process at once, without a drain. Installed after
    startup, like exitZeroOnSigterm."""
    reactor = reactor or _defaultReactor()

    def reload() -> None:
        if authorizer is None:
            log.info("SIGHUP: {nothing}", nothing=nothingToReread)
        else:
            authorizer.reload()

    def onSighup(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(reload)

    reactor.addSystemEventTrigger(
        "after", "startup", lambda: signal.signal(signal.SIGHUP, onSighup))


# Python's default first-generation threshold (700 allocations) runs the cyclic collector so
# often that every request's short-lived cycles (Deferred chains, closures) are promoted before
# they die, and full collections, each a pause over every connection's objects, follow:
# measured with 10,000 connections at 1,700 requests/s, 18 full collections of 124 ms each,
# 18 % of the gateway's CPU. At 10,000 the young cycles are collected young: collector time
# 3.2 -> 1.2 s, gateway CPU 0.77x, p99 latency 444 -> 314 ms (benchmarks/README.md). The
# garbage waiting between collections is bounded by the threshold: a few MB at most.
GC_FIRST_GENERATION_THRESHOLD = 10_000


def tuneGarbageCollector() -> None:
    """Called by the twistd plugins and relaybus.tac, for the whole process."""
    _, second, third = gc.get_threshold()
    gc.set_threshold(GC_FIRST_GENERATION_THRESHOLD, second, third)


def exitZeroOnSigterm(reactor: Any = None) -> None:
    """Make a drained SIGTERM stop exit with status 0.

    twistd's own handler records the signal and re-raises it once the reactor has stopped, so
    even a clean shutdown reports "killed by SIGTERM". SIGTERM is how systemd and operators ask
    relaybus to stop; after the ordered drain that is a success, so we stop the reactor
    without recording the signal. Installed after startup, when the reactor's handler is in.
    """
    reactor = reactor or _defaultReactor()

    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass  # a second SIGTERM during the drain

    def onSigterm(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(stop)

    reactor.addSystemEventTrigger(
        "after", "startup", lambda: signal.signal(signal.SIGTERM, onSigterm))


class GatewayService(MultiService):
    """The bus, any in-process workers and the WebSocket listener, started in that order.

    `handlers` are the in-process handlers the options resolved (GatewayOptions.registry);
    `checker` verifies the handshakes' tokens (GatewayOptions.checker; None: no keys, every
    handshake is admitted); `authorizer` decides what each principal may call
    (GatewayOptions.authorizer; None: everything). With --jwks-url, a RemoteJWKS child keeps
    the checker's keys fetched (`jwksFetcher` replaces its HTTP client in tests).
    """

    def __init__(self, config: GatewayConfig, handlers: dict[str, IRequestHandler],
                 reactor: Any = None, checker: JWTChecker | None = None,
                 authorizer: Authorizer | None = None,
                 jwksFetcher: IJWKSFetcher | None = None) -> None:
        super().__init__()
        reactor = reactor or _defaultReactor()
        self.config = config
        self.draining = False
        self.workers: list[tuple[WorkerRuntime, IService | None]] = []
        bus: IRequestBus
        if config.inMemory:
            memoryBus = MemoryBus(reactor)
            memoryBus.setServiceParent(self)
            bus = memoryBus
            if handlers:
                runtime = WorkerRuntime(memoryBus, handlers, reactor, config.workerConcurrency,
                                        config.drainTimeoutS, config.workerThreads)
                runtime.setServiceParent(self)
                self.workers.append((runtime, None))
        else:
            topology = Topology(config.amqpPrefix)
            amqpBus = AmqpRequestBus(config.broker, reactor, topology, config.gatewayId)
            amqpBus.setServiceParent(self)
            bus = amqpBus
            if handlers:
                workerBus = AmqpWorkerBus(config.broker, reactor, topology,
                                          f"relaybus in-process worker {config.gatewayId}")
                runtime = WorkerRuntime(workerBus, handlers, reactor, config.workerConcurrency,
                                        config.drainTimeoutS, config.workerThreads)
                runtime.setServiceParent(self)
                workerBus.setServiceParent(self)  # after its runtime, which calls serve()
                self.workers.append((runtime, workerBus))
        self.bus = bus
        self.authorizer = authorizer
        self.table = CorrelationTable(bus, reactor, config.limits, config.gatewayId,
                                      authorizer, config.forwardClaims)
        self.workerWatch: AbsentWorkerWatch | None = None
        if config.broker != "memory" and config.workerAbsentGraceS > 0:
            self.workerWatch = AbsentWorkerWatch(self.table, bus, reactor,
                                                 config.workerAbsentGraceS)
            self.workerWatch.setServiceParent(self)
        authenticator = (None if checker is None else
                         Authenticator(checker, config.allowAnonymous, config.jwt.leewayS,
                                       config.jwtCookie))
        self.factory = GatewayFactory(config, self.table, reactor, authenticator)
        self.jwks: RemoteJWKS | None = None
        jwksUrl = config.jwt.jwksUrl
        if checker is not None and jwksUrl:
            self.jwks = RemoteJWKS(checker, jwksFetcher or AgentJWKSFetcher(reactor, jwksUrl),
                                   reactor, checkJWKSURL(jwksUrl), config.jwt.jwksRefreshS)
            self.jwks.setServiceParent(self)
        metrics = MetricsResource(gatewayRegistry(
            GatewayCollector(self.table, self.factory, bus, reactor, self.jwks)))
        self.site = makeSite(self.factory, bus, lambda: self.draining, metrics,
                             lambda: self.jwks is None or self.jwks.loaded)
        self.listener = listenerService(config.listen, self.site, reactor, config.reusePort)
        self.listener.setServiceParent(self)

    def startService(self) -> None:
        log.info("relaybus gateway {gatewayId} on {listen}, broker {broker}",
                 gatewayId=self.config.gatewayId, listen=self.config.listen,
                 broker=_redacted(self.config.broker))
        super().startService()

    @inlineCallbacks
    def stopService(self) -> Any:
        self.running = False
        self.draining = True
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("stop listening", self.listener.stopService),
            *([("stop fetching the JWK Set", self.jwks.stopService)] if self.jwks else []),
            *([("stop watching for absent workers", self.workerWatch.stopService)]
              if self.workerWatch is not None else []),
            ("drain requests", lambda: self.table.drain(self.config.drainTimeoutS)),
            ("close connections", self.factory.closeAll),
        ]
        for runtime, workerBus in self.workers:
            steps.append(("stop in-process workers", runtime.stopService))
            if workerBus is not None:
                steps.append(("close the workers' broker connection", workerBus.stopService))
        steps.append(("close the broker connection", self.bus.stopService))
        for what, step in steps:
            try:  # a failing step must not skip the ones after it
                yield step()
            except Exception:
                log.failure("Shutdown: {what} failed", what=what)


class WorkerService(MultiService):
    """A worker process: the handlers the options resolved (WorkerOptions.registry), served
    from the broker.

    `bus` replaces the broker's bus (tests); like both real buses it must be an IService too.
    """

    def __init__(self, config: WorkerConfig, handlers: dict[str, IRequestHandler],
                 reactor: Any = None, bus: IWorkerBus | None = None) -> None:
        super().__init__()
        reactor = reactor or _defaultReactor()
        self.config = config
        if bus is None:
            bus = AmqpWorkerBus(config.broker, reactor, Topology(config.amqpPrefix),
                                f"relaybus worker {','.join(handlers)}")
        self.bus = bus
        self.runtime = WorkerRuntime(self.bus, handlers, reactor, config.concurrency,
                                     config.drainTimeoutS, config.threads)
        self.runtime.setServiceParent(self)
        IService(self.bus).setServiceParent(self)

    def startService(self) -> None:
        log.info("relaybus worker serving {types} from {broker}",
                 types=self.runtime.describeHandlers(), broker=_redacted(self.config.broker))
        super().startService()

    @inlineCallbacks
    def stopService(self) -> Any:
        self.running = False
        yield self.runtime.stopService()
        yield IService(self.bus).stopService()


def _redacted(url: str) -> str:
    """Broker URLs carry passwords: never log them."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
