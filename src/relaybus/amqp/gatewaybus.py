"""A gateway's side of RabbitMQ: requests and cancel notices out, its own reply queue in."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pika.spec
from pika.adapters.twisted_connection import (
    ReceivedMessage,
    TwistedChannel,
    TwistedProtocolConnection,
)
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from relaybus.amqp import codec
from relaybus.amqp.link import (
    BrokerLink,
    SetupRefused,
    consumeForever,
    detached,
    notReachable,
    unavailable,
)
from relaybus.amqp.topology import Topology
from relaybus.errors import ErrorCode, RelaybusError
from relaybus.interfaces import IReplyReceiver, IRequestBus
from relaybus.messages import CancelNotice, RequestMessage

log = Logger(namespace="relaybus.amqp")


@implementer(IRequestBus)
class AmqpRequestBus(MultiService):
    """Publishes requests (mandatory, with confirms) and cancels; consumes its reply queue
    (exclusively: another gateway with the same id is refused it, see setUpConnection).

    `BrokerLink` calls `setUpConnection` after every (re)connect and `connectionLost` when
    the connection goes; unit tests call them with the fakes of relaybus.testing.
    """

    def __init__(self, url: str, reactor: IReactorTime, topology: Topology,
                 gatewayId: str, endpoint: IStreamClientEndpoint | None = None) -> None:
        super().__init__()
        self.replyTo = gatewayId
        self._clock = reactor
        self._topology = topology
        self._receiver: IReplyReceiver | None = None
        self._publishing: TwistedChannel | None = None
        self._connection: TwistedProtocolConnection | None = None
        # For passive declares only: unwatched, since a 404 closes it (reopened when needed).
        # One probe at a time uses it: pika opens a channel a round trip later, so probes
        # started together each opened one, and all but the last stayed open.
        self._probing: TwistedChannel | None = None
        self._probingLock = DeferredLock()
        # Correlation ids of mandatory publishes awaiting their confirm, and those of them
        # the broker returned (no queue bound for their requestType).
        self._unconfirmed: set[str] = set()
        self._returned: set[str] = set()
        self._link = BrokerLink.forURL(url, reactor, f"relaybus gateway {gatewayId}",
                                       self.setUpConnection, self.connectionLost, endpoint)
        self._link.setServiceParent(self)

    def listen(self, receiver: IReplyReceiver) -> None:
        self._receiver = receiver

    def isReady(self) -> bool:
        """Connected, set up, and not blocked by a broker resource alarm."""
        return self._link.canPublish(self._publishing)

    @inlineCallbacks
    def setUpConnection(self, connection: TwistedProtocolConnection
                        ) -> Generator[Deferred[Any], Any, None]:
        topology, link = self._topology, self._link
        consuming = yield link.openChannel(connection, "reply")
        yield topology.declareExchanges(consuming)
        replyQueue = yield topology.declareReplyQueue(consuming, self.replyTo)
        publishing = yield link.openChannel(connection, "publishing")
        yield publishing.confirm_delivery()
        publishing.add_on_return_callback(self._messageReturned)
        try:
            queue, _tag = yield consuming.basic_consume(queue=replyQueue, auto_ack=True,
                                                         exclusive=True)
        except ChannelClosedByBroker as e:
            if e.reply_code == pika.spec.ACCESS_REFUSED and "exclusive use" in e.reply_text:
                raise SetupRefused(self._replyQueueTaken(e.reply_text)) from e
            raise
        consumeForever(queue, self._replyArrived, lambda: link.drop(
            connection, "the broker cancelled the reply consumer"))
        self._unconfirmed.clear()
        self._returned.clear()
        self._publishing = publishing
        self._connection = connection

    def _replyQueueTaken(self, brokerSays: str) -> str:
        """What the operator must know when the broker refuses us our reply queue: shared, it
        would give each gateway of that id about half of the other's replies (both losing)."""
        within = self._link.brokerNoticesDeathWithinS
        unnoticed = (f"which the broker closes within {within} s (3 heartbeats)" if within
                     else "which the broker notices only when TCP gives up (heartbeats are off)")
        return (f"another connection consumes this gateway's reply queue ({brokerSays}): "
                f"most likely another gateway process with the same --gateway-id "
                f"{self.replyTo} is connected to this broker and vhost (give each gateway its "
                f"own id, or leave it out for a random one), or this gateway's previous "
                f"connection died unnoticed, {unnoticed}. Not ready until the queue is free; "
                f"retrying.")

    def connectionLost(self, reason: Failure) -> None:
        self._publishing = self._connection = self._probing = None
        if self._receiver is not None:
            self._receiver.busInterrupted(reason)

    def publishRequest(self, message: RequestMessage) -> Deferred[None]:
        channel = self._publishing
        if channel is None or not channel.is_open:
            return notReachable()
        correlationId = message.correlationId
        self._unconfirmed.add(correlationId)
        published = channel.basic_publish(
            exchange=self._topology.requestsExchange, routing_key=message.requestType,
            body=message.body, properties=codec.requestProperties(message, self._clock.seconds()),
            mandatory=True)

        def settled(result: object) -> Failure | None:
            # The adapter can blame a basic.return on the wrong publish (see the field notes):
            # whether *this* message came back is decided by its correlation_id alone.
            returned = correlationId in self._returned
            self._returned.discard(correlationId)
            self._unconfirmed.discard(correlationId)
            if returned:
                raise RelaybusError(ErrorCode.NO_HANDLER,
                                    f"no worker serves requestType {message.requestType!r}")
            if isinstance(result, Failure) and not result.check(UnroutableError):
                if result.check(NackError):
                    raise RelaybusError(ErrorCode.OVERLOADED,
                                        "the message broker refused the request")
                return unavailable(result)
            return None

        return detached(published).addBoth(settled)

    @inlineCallbacks
    def consumersOf(self, requestType: str) -> Generator[Deferred[Any], Any, int | None]:
        """A passive queue.declare of requestType's queue, whose DeclareOk counts its
        consumers (AMQP tells publishers nothing when a consumer goes). AbsentWorkerWatch's
        timeout cancels a probe the broker does not answer: pika's Deferreds are detached, so
        that never cancels them (pika #1282)."""
        connection = self._connection
        if connection is None or not self.isReady():
            return None
        yield self._probingLock.acquire()
        try:
            if self._probing is None or not self._probing.is_open:
                self._probing = yield detached(connection.channel())
            declared = yield detached(self._probing.queue_declare(
                queue=self._topology.requestQueue(requestType), passive=True))
        except Exception as e:  # a 404 (no such queue) closes the channel: reopen next time
            log.debug("Counting the consumers of {requestType} failed: {e}",
                      requestType=requestType, e=e)
            return None
        finally:
            self._probingLock.release()
        return int(declared.method.consumer_count)

    def _messageReturned(self, message: ReceivedMessage) -> None:
        """Kept only for a publish still awaiting its confirm: a return for anything else
        (a message of a previous connection, a stray id) must neither stick nor leak."""
        correlationId = message.properties.correlation_id
        if correlationId in self._unconfirmed:
            self._returned.add(correlationId)

    def publishCancel(self, notice: CancelNotice) -> None:
        channel = self._publishing
        if channel is None or not channel.is_open:
            return
        channel.basic_publish(
            exchange=self._topology.cancelsExchange, routing_key=notice.requestType,
            body=b"", properties=codec.cancelProperties(notice)).addErrback(
            lambda f: log.debug("Cancel notice not published: {why}", why=f.getErrorMessage()))

    def _replyArrived(self, message: ReceivedMessage) -> None:
        reply = codec.replyFromAmqp(message.properties, message.body, self.replyTo)
        if reply is None:
            log.warn("Dropped a reply without a correlation_id (type {kind})",
                     kind=codec.shownValue(message.properties.type))
            return
        if self._receiver is not None:
            self._receiver.replyReceived(reply)
