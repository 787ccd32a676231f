"""/metrics in the Prometheus text format: enough to see, from outside the process, that every
request ends and nothing piles up (the leak checks of tests/ and the soak read it too)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from relaybus.correlation import CorrelationTable
from relaybus.gateway import GatewayFactory
from relaybus.interfaces import IRequestBus
from relaybus.jwks import RemoteJWKS


class GatewayCollector:
    """Reads the live state at scrape time, so the numbers cannot drift from the truth."""

    def __init__(self, table: CorrelationTable, factory: GatewayFactory, bus: IRequestBus,
                 reactor: IReactorTime, jwks: RemoteJWKS | None = None) -> None:
        self._table = table
        self._jwks = jwks
        self._factory = factory
        self._bus = bus
        self._reactor = reactor

    def collect(self) -> Iterator[Metric]:
        table, factory = self._table, self._factory
        yield GaugeMetricFamily("relaybus_connections", "Open WebSocket connections.",
                                value=len(factory.connections))
        yield CounterMetricFamily("relaybus_connections_refused",
                                  "WebSocket handshakes refused at --max-connections (503).",
                                  value=factory.connectionsRefused)
        yield GaugeMetricFamily("relaybus_requests_in_flight",
                                "Accepted requests still waiting for their terminal frame.",
                                value=len(table))
        yield CounterMetricFamily("relaybus_requests_accepted",
                                  "Requests accepted into the correlation table.",
                                  value=table.accepted)
        ended = CounterMetricFamily("relaybus_requests_ended",
                                    "Accepted requests ended, by outcome (response or error code).",
                                    labels=["outcome"])
        for outcome, count in sorted(table.ended.items()):
            ended.add_metric([outcome], count)
        yield ended
        yield CounterMetricFamily("relaybus_late_replies",
                                  "Replies for requests that had already ended (dropped).",
                                  value=table.lateReplies)
        yield CounterMetricFamily("relaybus_client_log_entries_dropped",
                                  "client-log entries dropped over a connection's rate limit.",
                                  value=factory.clientLogEntriesDropped)
        yield CounterMetricFamily("relaybus_slow_clients_closed",
                                  "Connections closed (1008) for leaving too much unread.",
                                  value=factory.slowClientsClosed)
        requestsRefused = CounterMetricFamily(
            "relaybus_requests_refused",
            "Requests answered with an error at once, never accepted, by code (forbidden: "
            "outside the authorization policy; overloaded; unavailable; ...).",
            labels=["code"])
        for code, count in sorted(table.refused.items()):
            requestsRefused.add_metric([code], count)
        yield requestsRefused
        refused = CounterMetricFamily(
            "relaybus_handshakes_refused",
            "WebSocket handshakes refused before they opened, by reason (unauthorized: 401).",
            labels=["reason"])
        for reason, count in sorted(factory.handshakesRefused.items()):
            refused.add_metric([reason], count)
        yield refused
        framesRefused = CounterMetricFamily(
            "relaybus_frames_refused",
            "Client frames answered with an error frame and not acted on, by code (bad_request: "
            "not JSON, too deep, NaN, ...); the connection goes on.", labels=["code"])
        for code, count in sorted(factory.framesRefused.items()):
            framesRefused.add_metric([code], count)
        yield framesRefused
        closed = CounterMetricFamily(
            "relaybus_connections_closed",
            "Connections that had opened, by close code (1009 too big, 1002 protocol error, "
            "4401 token expired, none: dropped without a close frame, other: a code the "
            "client chose).", labels=["code"])
        for code, count in sorted(factory.connectionsClosed.items()):
            closed.add_metric([code], count)
        yield closed
        yield CounterMetricFamily("relaybus_requests_rate_limited",
                                  "Requests refused (overloaded) over --requests-per-second.",
                                  value=factory.requestsRateLimited)
        yield CounterMetricFamily("relaybus_tokens_expired",
                                  "Connections closed (4401) when their token expired.",
                                  value=factory.tokensExpired)
        yield CounterMetricFamily("relaybus_token_refreshes_refused",
                                  "In-band auth refreshes answered unauthorized.",
                                  value=factory.refreshesRefused)
        yield GaugeMetricFamily("relaybus_broker_ready", "1 while requests can be published.",
                                value=1 if self._bus.isReady() else 0)
        yield GaugeMetricFamily("relaybus_reactor_delayed_calls",
                                "Timers pending in the reactor (a timer leak shows here).",
                                value=len(self._reactor.getDelayedCalls()))
        if self._jwks is not None:
            yield from self._jwksMetrics(self._jwks)

    def _jwksMetrics(self, jwks: RemoteJWKS) -> Iterator[Metric]:
        refreshes = CounterMetricFamily(
            "relaybus_jwks_refreshes",
            "Fetches of --jwks-url, by outcome (failed: the keys loaded before are kept).",
            labels=["outcome"])
        for outcome, count in sorted(jwks.refreshes.items()):
            refreshes.add_metric([outcome], count)
        yield refreshes
        yield GaugeMetricFamily("relaybus_jwks_keys", "Keys of the JWK Set in use (0: none "
                                "loaded yet, handshakes with a token get 503).",
                                value=jwks.keyCount)
        if jwks.loadedAt is not None:
            yield GaugeMetricFamily("relaybus_jwks_age_seconds",
                                    "Seconds since the JWK Set was last loaded.",
                                    value=self._reactor.seconds() - jwks.loadedAt)


def gatewayRegistry(collector: GatewayCollector) -> CollectorRegistry:
    """A registry of our own (not the global one), so several gateways can share a process."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    ProcessCollector(registry=registry)  # process_resident_memory_bytes and friends
    return registry


class MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> Any:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
