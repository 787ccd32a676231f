"""A worker's side of RabbitMQ: its requestTypes' queues and cancel notices in, replies out."""

from __future__ import annotations

import functools
from collections.abc import Generator, Iterable
from typing import Any

from pika.adapters.twisted_connection import (
    ReceivedMessage,
    TwistedChannel,
    TwistedProtocolConnection,
)
from pika.exceptions import NackError
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.amqp import codec
from relaybus.amqp.link import BrokerLink, consumeForever, detached, notReachable, unavailable
from relaybus.amqp.topology import Topology
from relaybus.errors import ReplyRefusedError
from relaybus.interfaces import IRequestReceiver, IWorkerBus
from relaybus.messages import Delivery, ReplyMessage

log = Logger(namespace="relaybus.amqp")


@implementer(IWorkerBus)
class AmqpWorkerBus(MultiService):
    """Consumes its requestTypes' queues (manual acks, prefetch) and its cancel queue;
    publishes replies with confirms.

    `BrokerLink` calls `setUpConnection` after every (re)connect and `connectionLost` when
    the connection goes; unit tests call them with the fakes of relaybus.testing.
    """

    def __init__(self, url: str, reactor: IReactorTime, topology: Topology,
                 name: str = "relaybus worker",
                 endpoint: IStreamClientEndpoint | None = None) -> None:
        super().__init__()
        self._topology = topology
        self._requestTypes: list[str] = []
        self._receiver: IRequestReceiver | None = None
        self._prefetch = 1
        self._consuming: TwistedChannel | None = None
        self._publishing: TwistedChannel | None = None
        self._consumerTags: list[str] = []
        self._serving = False
        self._link = BrokerLink.forURL(url, reactor, name, self.setUpConnection,
                                       self.connectionLost, endpoint)
        self._link.setServiceParent(self)

    def serve(self, requestTypes: Iterable[str], receiver: IRequestReceiver,
              prefetch: int) -> None:
        if self._receiver is not None:
            raise RuntimeError("an AmqpWorkerBus serves one receiver")
        self._requestTypes = list(requestTypes)
        self._receiver = receiver
        self._prefetch = prefetch
        self._serving = True

    def startService(self) -> None:
        if self._receiver is None:
            raise RuntimeError("call serve() before starting an AmqpWorkerBus")
        super().startService()

    def stopServing(self, receiver: IRequestReceiver) -> Deferred[None]:
        """Stop taking new deliveries (those in hand can still be settled); fires once the
        broker confirmed, so deliveries already on their way have arrived."""
        self._serving = False
        channel, tags, self._consumerTags = self._consuming, self._consumerTags, []
        if channel is None or not channel.is_open:
            return defer.succeed(None)
        return DeferredList([detached(channel.basic_cancel(tag)) for tag in tags],
                            consumeErrors=True).addCallback(lambda _: None)

    def isReady(self) -> bool:
        return self._link.canPublish(self._publishing)

    @inlineCallbacks
    def setUpConnection(self, connection: TwistedProtocolConnection
                        ) -> Generator[Deferred[Any], Any, None]:
        topology, link = self._topology, self._link
        consuming = yield link.openChannel(connection, "consuming")
        yield topology.declareExchanges(consuming)
        yield consuming.basic_qos(prefetch_count=self._prefetch)  # before any basic_consume
        yield topology.declareRequestQueues(consuming, self._requestTypes)
        cancelQueue = yield topology.declareCancelQueue(consuming, self._requestTypes)
        publishing = yield link.openChannel(connection, "publishing")
        yield publishing.confirm_delivery()
        self._consuming, self._publishing = consuming, publishing
        cancels, _tag = yield consuming.basic_consume(queue=cancelQueue, auto_ack=True)
        consumeForever(cancels, self._cancelArrived, lambda: link.drop(
            connection, "the broker cancelled the cancel-notice consumer"))
        self._consumerTags = []
        for requestType in self._requestTypes:
            if not self._serving:  # stopServing() came while we were setting up
                break
            queue, tag = yield consuming.basic_consume(
                queue=topology.requestQueue(requestType), auto_ack=False)
            if not self._serving:
                detached(consuming.basic_cancel(tag)).addErrback(lambda _: None)
            else:
                self._consumerTags.append(tag)
            consumeForever(queue, functools.partial(self._requestArrived, consuming),
                           functools.partial(self._consumerStopped, connection, requestType))

    def _consumerStopped(self, connection: TwistedProtocolConnection, requestType: str) -> None:
        if self._serving:  # not our own basic.cancel: the broker cancelled it (queue deleted)
            self._link.drop(connection, f"the broker cancelled the {requestType} consumer")

    def connectionLost(self, reason: Failure) -> None:
        self._consuming = self._publishing = None
        self._consumerTags = []
        if self._receiver is not None:
            self._receiver.busInterrupted(reason)

    def _requestArrived(self, channel: TwistedChannel, message: ReceivedMessage) -> None:
        method = message.method
        tag = method.delivery_tag

        def settle(requeue: bool) -> None:
            current = self._consuming
            if current is None or current is not channel or not current.is_open:
                return  # the broker requeues it itself when the channel closed
            if requeue:
                current.basic_nack(delivery_tag=tag, requeue=True)
            else:
                current.basic_ack(delivery_tag=tag)

        request = codec.requestFromAmqp(method.routing_key, message.properties, message.body)
        if request is None:
            log.warn("Dropped a request without correlation_id or reply_to on {key}",
                     key=method.routing_key)
            settle(False)
            return
        assert self._receiver is not None
        self._receiver.requestReceived(Delivery(request, bool(method.redelivered), settle))

    def _cancelArrived(self, message: ReceivedMessage) -> None:
        notice = codec.cancelFromAmqp(message.method.routing_key, message.properties)
        if notice is not None and self._receiver is not None:
            self._receiver.cancelReceived(notice)

    def publishReply(self, reply: ReplyMessage) -> Deferred[None]:
        channel = self._publishing
        if channel is None or not channel.is_open:
            return notReachable()
        published = channel.basic_publish(exchange=self._topology.responsesExchange,
                                          routing_key=reply.replyTo, body=reply.body,
                                          properties=codec.replyProperties(reply))
        return detached(published).addCallbacks(lambda _: None, _refusedOrUnavailable)


def _refusedOrUnavailable(failure: Failure) -> Failure:
    """A nack (the broker got the reply and refused it) is not a lost channel: the runtime
    settles the two differently (docs/protocol.md, "What a worker must do", step 4)."""
    if failure.check(NackError):
        return Failure(ReplyRefusedError("the broker refused the reply (publisher nack)"))
    return unavailable(failure)
