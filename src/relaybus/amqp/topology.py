"""Exchange and queue names, and their declarations: the topology half of docs/protocol.md's
AMQP contract. Every argument here must match what other gateways and workers (in any
language) declare, or RabbitMQ refuses the second declaration with 406."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

import attrs
from pika.adapters.twisted_connection import TwistedChannel
from twisted.internet.defer import Deferred, inlineCallbacks

# A gateway's reply queue outlives a short reconnect, and is removed once the gateway is gone.
REPLY_QUEUE_EXPIRES_MS = 60_000


@attrs.frozen
class Topology:
    """`prefix` lets several deployments (or test runs) share a vhost."""

    prefix: str = ""

    @property
    def requestsExchange(self) -> str:
        return f"{self.prefix}requests"

    @property
    def responsesExchange(self) -> str:
        return f"{self.prefix}responses"

    @property
    def cancelsExchange(self) -> str:
        return f"{self.prefix}cancels"

    def requestQueue(self, requestType: str) -> str:
        return f"{self.prefix}requests.{requestType}"

    def replyQueue(self, gatewayId: str) -> str:
        return f"{self.prefix}replies.{gatewayId}"

    @inlineCallbacks
    def declareExchanges(self, channel: TwistedChannel) -> Generator[Deferred[Any], Any, None]:
        for name in (self.requestsExchange, self.responsesExchange, self.cancelsExchange):
            yield channel.exchange_declare(exchange=name, exchange_type="direct", durable=True)

    @inlineCallbacks
    def declareReplyQueue(self, channel: TwistedChannel,
                          gatewayId: str) -> Generator[Deferred[Any], Any, str]:
        """Not exclusive, so it survives a reconnect; x-expires removes it once its gateway
        is gone for good. Bound to the responses exchange by the gateway id."""
        queue = self.replyQueue(gatewayId)
        yield channel.queue_declare(queue=queue, durable=False, exclusive=False,
                                    auto_delete=False,
                                    arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
        yield channel.queue_bind(queue=queue, exchange=self.responsesExchange,
                                 routing_key=gatewayId)
        return queue

    @inlineCallbacks
    def declareRequestQueues(self, channel: TwistedChannel,
                             requestTypes: Iterable[str]) -> Generator[Deferred[Any], Any, None]:
        """One durable queue per requestType, shared by every worker that serves it."""
        for requestType in requestTypes:
            queue = self.requestQueue(requestType)
            yield channel.queue_declare(queue=queue, durable=True)
            yield channel.queue_bind(queue=queue, exchange=self.requestsExchange,
                                     routing_key=requestType)

    @inlineCallbacks
    def declareCancelQueue(self, channel: TwistedChannel,
                           requestTypes: Iterable[str]) -> Generator[Deferred[Any], Any, str]:
        """A worker's own server-named queue for the cancel notices of its requestTypes;
        it goes with the worker's connection."""
        declared = yield channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        queue: str = declared.method.queue
        for requestType in requestTypes:
            yield channel.queue_bind(queue=queue, exchange=self.cancelsExchange,
                                     routing_key=requestType)
        return queue
