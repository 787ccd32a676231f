"""Exchange and queue names, and their declarations: the topology half of docs/protocol.md's
AMQP contract. Every argument here must match what other gateways and workers (in any
language) declare, or RabbitMQ refuses the second declaration with 406."""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable
from typing import Any

import attrs
from pika.adapters.twisted_connection import TwistedChannel
from twisted.internet.defer import Deferred, inlineCallbacks

# A gateway's reply queue outlives a short reconnect, and is removed once the gateway is gone.
REPLY_QUEUE_EXPIRES_MS = 60_000


@attrs.frozen
class Permissions:
    """RabbitMQ's three permission regexes of a user in a vhost (`rabbitmqctl set_permissions
    -p VHOST USER CONFIGURE WRITE READ`)."""

    configure: str
    write: str
    read: str


def _escape(name: str) -> str:
    """`name` as a literal in RabbitMQ's (PCRE) regexes: only the metacharacters escaped, so
    the documented regexes stay readable."""
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", name)


def _anyOf(*patterns: str) -> str:
    return "^(" + "|".join(patterns) + ")$"


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

    def gatewayPermissions(self, gatewayId: str | None = None) -> Permissions:
        """Least privilege for a gateway's RabbitMQ user (docs/security.md): declare the three
        exchanges and its reply queue, publish requests and cancel notices, bind and consume
        its reply queue. Never a request queue, never the responses exchange (no replies).
        `gatewayId` None: any gateway's reply queue (gateways with random ids, one user)."""
        reply = self._name("replies.") + (".+" if gatewayId is None else _escape(gatewayId))
        requests, responses, cancels = (self._name(n) for n in ("requests", "responses",
                                                                 "cancels"))
        return Permissions(configure=_anyOf(requests, responses, cancels, reply),
                           write=_anyOf(requests, cancels, reply),
                           read=_anyOf(responses, reply))

    def workerPermissions(self, requestTypes: Iterable[str] | None = None) -> Permissions:
        """Least privilege for a worker's RabbitMQ user (docs/security.md): declare the three
        exchanges, its request queues and its server-named cancel queue (amq.gen-...), bind
        and consume those queues, publish replies. Never a reply queue, never the requests
        or cancels exchange (it cannot pose as a gateway). `requestTypes` None: any."""
        types = (".+" if requestTypes is None else
                 "(" + "|".join(_escape(t) for t in sorted(requestTypes)) + ")")
        queues = (self._name("requests.") + types, r"amq\.gen-.+")
        requests, responses, cancels = (self._name(n) for n in ("requests", "responses",
                                                                 "cancels"))
        return Permissions(configure=_anyOf(requests, responses, cancels, *queues),
                           write=_anyOf(responses, *queues),
                           read=_anyOf(requests, cancels, *queues))

    def _name(self, name: str) -> str:
        return _escape(self.prefix + name)

    @inlineCallbacks
    def declareExchanges(self, channel: TwistedChannel) -> Generator[Deferred[Any], Any, None]:
        for name in (self.requestsExchange, self.responsesExchange, self.cancelsExchange):
            yield channel.exchange_declare(exchange=name, exchange_type="direct", durable=True)

    @inlineCallbacks
    def declareReplyQueue(self, channel: TwistedChannel,
                          gatewayId: str) -> Generator[Deferred[Any], Any, str]:
        """Not exclusive, so it survives a reconnect; x-expires removes it once its gateway
        is gone for good. Bound to the responses exchange by the gateway id. (Its consumer is
        exclusive: a second gateway with the same id is refused, see gatewaybus.)"""
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
