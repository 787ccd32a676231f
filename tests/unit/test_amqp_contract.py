"""The AMQP buses against relaybus.testing's fake pika connection and channels: topology,
returns, confirms, properties, deliveries.

No broker: each bus is set up on a FakeAmqpConnection the way BrokerLink sets it up after a
connect, and the test plays the broker on its FakeChannels. The names and properties checked
here are the wire contract of docs/protocol.md ("The AMQP contract").
"""

from __future__ import annotations

from typing import Any

import pika
import pytest
from amqpwire import ScriptedBroker, handshake
from pika.adapters.twisted_connection import ClosableDeferredQueue
from pika.exceptions import ChannelClosedByBroker, NackError, UnroutableError
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from unitsupport import assertNoResult, errorCode, failureResultOf, successResultOf

from relaybus.amqp import codec
from relaybus.amqp.gatewaybus import AmqpRequestBus
from relaybus.amqp.link import (
    DEFAULT_HEARTBEAT_S,
    AmqpConnection,
    Backoff,
    BrokerLink,
    SetupRefused,
    brokerParameters,
    consumeForever,
    detached,
    validateBrokerURL,
)
from relaybus.amqp.topology import Topology
from relaybus.amqp.workerbus import AmqpWorkerBus
from relaybus.errors import RelaybusError, ReplyRefusedError
from relaybus.messages import CancelNotice, ReplyKind, ReplyMessage, RequestMessage
from relaybus.testing import (
    FakeAmqpConnection,
    FakeChannel,
    FakeReplyReceiver,
    FakeRequestReceiver,
    PublishedMessage,
)

URL = "amqp://guest:guest@127.0.0.1:5672/"
START = 1_764_000_000.0


def returnedProperties(correlationId: str | None) -> pika.BasicProperties:
    return pika.BasicProperties(correlation_id=correlationId)


def requestProperties(correlationId: str | None = "c-1", replyTo: str | None = "gw-1",
                      headers: dict[str, Any] | None = None,
                      kind: str | None = None) -> pika.BasicProperties:
    return pika.BasicProperties(correlation_id=correlationId, reply_to=replyTo,
                                headers=headers, type=kind)


# Topology


@pytest.mark.parametrize(("url", "heartbeat"), [
    ("amqp://guest:guest@127.0.0.1:5672/", DEFAULT_HEARTBEAT_S),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=30", 30),
    ("amqp://guest:guest@127.0.0.1:5672/%2F?heartbeat=0", 0),
])
def test_heartbeat_defaults_short_unless_the_url_sets_one(url: str, heartbeat: int) -> None:
    assert brokerParameters(url).heartbeat == heartbeat


def test_topology_without_a_prefix() -> None:
    topology = Topology()
    assert (topology.requestsExchange, topology.responsesExchange, topology.cancelsExchange) == (
        "requests", "responses", "cancels")
    assert topology.requestQueue("testRequest") == "requests.testRequest"
    assert topology.replyQueue("gw-1") == "replies.gw-1"


def test_topology_with_a_prefix() -> None:
    topology = Topology("ci42.")
    assert (topology.requestsExchange, topology.responsesExchange, topology.cancelsExchange) == (
        "ci42.requests", "ci42.responses", "ci42.cancels")
    assert topology.requestQueue("echo") == "ci42.requests.echo"
    assert topology.replyQueue("gw-1") == "ci42.replies.gw-1"


def test_topology_declares_three_durable_direct_exchanges() -> None:
    declared: list[dict[str, Any]] = []

    class Channel:
        def exchange_declare(self, **kwargs: Any) -> Deferred[None]:
            declared.append(kwargs)
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d

    successResultOf(Topology("p.").declareExchanges(Channel()))
    assert declared == [
        {"exchange": name, "exchange_type": "direct", "durable": True}
        for name in ("p.requests", "p.responses", "p.cancels")]


@pytest.mark.parametrize("url", ["amqp://rabbit", "amqps://u:p@rabbit:5671/vh",
                                 "amqp://127.0.0.1:5672/%2F"])
def test_valid_broker_urls(url: str) -> None:
    validateBrokerURL(url)


@pytest.mark.parametrize("url", ["memory", "", "amqp://", "http://rabbit", "rabbit:5672",
                                 "amqp:///vhost"])
def test_invalid_broker_urls(url: str) -> None:
    with pytest.raises(ValueError):
        validateBrokerURL(url)


# The codec: what a gateway publishes is what a worker reads, and back


def test_codec_round_trips_a_request_a_reply_and_a_cancel_through_pika_encoding() -> None:
    def throughTheWire(properties: pika.BasicProperties) -> pika.BasicProperties:
        decoded = pika.BasicProperties()
        decoded.decode(b"".join(properties.encode()))
        return decoded

    request = RequestMessage("c-1", "echo", "gw-1", b'{"a":1}', START + 2.5, "gw-1", "alice",
                             b'{"sub":"alice","roles":["user"]}')
    assert codec.requestFromAmqp("echo", throughTheWire(codec.requestProperties(
        request, START)), b'{"a":1}') == request
    for reply in (ReplyMessage("c-1", "gw-1", ReplyKind.CHUNK, b"1", 7),
                  ReplyMessage("c-1", "gw-1", ReplyKind.RESPONSE, b"2"),
                  ReplyMessage("c-1", "gw-1", ReplyKind.ERROR, b"{}")):
        assert codec.replyFromAmqp(throughTheWire(codec.replyProperties(reply)), reply.body,
                                   "gw-1") == reply
    notice = CancelNotice("c-1", "echo", "disconnected")
    assert codec.cancelFromAmqp("echo", throughTheWire(codec.cancelProperties(notice))) == notice


# The gateway's bus: publishing requests


class Gateway:
    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(START)
        self.bus = AmqpRequestBus(URL, self.clock, Topology("t."), "gw-1")
        self.receiver = FakeReplyReceiver()
        self.bus.listen(self.receiver)
        self.connection = FakeAmqpConnection()
        successResultOf(self.bus.setUpConnection(self.connection))
        self.consuming, self.publishing = self.connection.channels

    def publish(self, correlationId: str = "c-1", requestType: str = "echo",
                timeoutS: float = 2.5) -> tuple[Deferred[None], PublishedMessage]:
        message = RequestMessage(correlationId=correlationId, requestType=requestType,
                                 replyTo="gw-1", body=b'{"count":3}',
                                 deadline=self.clock.seconds() + timeoutS, gatewayId="gw-1")
        d = self.bus.publishRequest(message)
        return d, self.publishing.published[-1]

    def reply(self, properties: pika.BasicProperties, body: bytes = b'{"a":1}') -> None:
        self.consuming.deliver("t.replies.gw-1", properties, body, routingKey="gw-1")


@pytest.fixture
def gw() -> Gateway:
    return Gateway()


def test_gateway_setup_declares_its_topology_and_consumes_its_reply_queue(gw: Gateway) -> None:
    assert gw.consuming.declarations == [
        *[("exchange_declare", {"exchange": name, "exchange_type": "direct", "durable": True})
          for name in ("t.requests", "t.responses", "t.cancels")],
        ("queue_declare", {"queue": "t.replies.gw-1", "durable": False, "exclusive": False,
                           "auto_delete": False, "arguments": {"x-expires": 60_000}}),
        ("queue_bind", {"queue": "t.replies.gw-1", "exchange": "t.responses",
                        "routing_key": "gw-1"})]
    assert list(gw.consuming.consumers) == ["t.replies.gw-1"]
    # Exclusive: a second gateway with this id is refused instead of taking half the replies
    assert gw.consuming.consumeArguments["t.replies.gw-1"] == {"auto_ack": True,
                                                                "exclusive": True}
    assert gw.publishing.confirming and not gw.consuming.confirming
    assert gw.bus.isReady()


def test_published_request_follows_the_contract(gw: Gateway) -> None:
    d, published = gw.publish("c-1", "testRequest", timeoutS=2.5)
    assert published.exchange == "t.requests"
    assert published.routingKey == "testRequest"
    assert published.body == b'{"count":3}'
    assert published.mandatory is True
    properties = published.properties
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 1
    assert properties.correlation_id == "c-1"
    assert properties.reply_to == "gw-1"
    assert properties.expiration == "2500"
    assert properties.type == "request"
    assert properties.timestamp == int(START)
    assert properties.headers == {
        "relaybus-request-type": "testRequest",
        "relaybus-deadline-ms": int((START + 2.5) * 1000),
        "relaybus-gateway-id": "gw-1",
        "relaybus-principal": None,
        "relaybus-claims": None,
    }
    assertNoResult(d)  # waits for the publisher confirm
    published.confirm.callback(None)
    assert successResultOf(d) is None


@pytest.mark.parametrize(("timeoutS", "expiration"), [(0.0004, "1"), (0, "1"), (-5, "1"),
                                                      (300, "300000"), (1.2345, "1234")])
def test_expiration_is_remaining_milliseconds_at_least_one(gw: Gateway, timeoutS: float,
                                                           expiration: str) -> None:
    _, published = gw.publish(timeoutS=timeoutS)
    assert published.properties.expiration == expiration


def test_published_properties_survive_pika_encoding(gw: Gateway) -> None:
    _, published = gw.publish()
    encoded = pika.BasicProperties()
    encoded.decode(b"".join(published.properties.encode()))
    assert encoded.headers["relaybus-deadline-ms"] == int((START + 2.5) * 1000)
    assert encoded.expiration == "2500"


def test_returned_message_is_no_handler_even_if_pika_says_success(gw: Gateway) -> None:
    d, published = gw.publish("c-1", "nobodyServesThis")
    gw.publishing.returnMessage(returnedProperties("c-1"))
    published.confirm.callback(None)
    error = failureResultOf(d, RelaybusError).value
    assert error.code == "no_handler"
    assert "nobodyServesThis" in error.message
    # nothing kept once settled: the same id published again is routed
    again, publishedAgain = gw.publish("c-1", "echo")
    publishedAgain.confirm.callback(None)
    assert successResultOf(again) is None


def test_returned_message_with_pika_unroutable_error_is_no_handler(gw: Gateway) -> None:
    d, published = gw.publish("c-1")
    gw.publishing.returnMessage(returnedProperties("c-1"))
    published.confirm.errback(UnroutableError([]))
    assert errorCode(d) == "no_handler"


def test_unroutable_error_blamed_on_a_message_that_was_not_returned_is_success(
        gw: Gateway) -> None:
    """The adapter bug of the field notes: pika attributes a basic.return to the wrong publish."""
    routed, routedPublish = gw.publish("c-routed", "echo")
    unroutable, unroutablePublish = gw.publish("c-returned", "nobody")
    gw.publishing.returnMessage(returnedProperties("c-returned"))
    routedPublish.confirm.errback(UnroutableError([]))  # wrong Deferred blamed
    unroutablePublish.confirm.callback(None)
    assert successResultOf(routed) is None
    assert errorCode(unroutable) == "no_handler"


def test_nack_is_overloaded(gw: Gateway) -> None:
    d, published = gw.publish()
    published.confirm.errback(NackError([]))
    assert errorCode(d) == "overloaded"


@pytest.mark.parametrize("error", [ConnectionDone("gone"), ChannelClosedByBroker(406, "nope"),
                                   RuntimeError("weird")],
                         ids=["connection-done", "channel-closed", "runtime-error"])
def test_other_publish_failures_are_unavailable(gw: Gateway, error: Exception) -> None:
    d, published = gw.publish()
    published.confirm.errback(Failure(error))
    assert errorCode(d) == "unavailable"


def test_relaybus_error_from_the_channel_keeps_its_code(gw: Gateway) -> None:
    d, published = gw.publish()
    published.confirm.errback(RelaybusError("overloaded", "slow down"))
    assert errorCode(d) == "overloaded"


def test_return_for_a_message_not_awaiting_its_confirm_is_ignored(gw: Gateway) -> None:
    gw.publishing.returnMessage(returnedProperties(""))
    gw.publishing.returnMessage(returnedProperties(None))
    gw.publishing.returnMessage(returnedProperties("c-1"))  # c-1 is not published yet
    d, published = gw.publish("c-1")
    published.confirm.callback(None)
    assert successResultOf(d) is None  # a stray return earlier did not stick to it


@pytest.mark.parametrize("state", ["never-set-up", "closed-channel"])
def test_not_connected_is_unavailable_at_once(gw: Gateway, state: str) -> None:
    if state == "never-set-up":
        bus = AmqpRequestBus(URL, gw.clock, Topology("t."), "gw-2")
    else:
        bus = gw.bus
        gw.publishing.is_open = False
    assert not bus.isReady()
    message = RequestMessage("c-1", "echo", "gw-1", b"null", START + 1)
    assert errorCode(bus.publishRequest(message)) == "unavailable"
    bus.publishCancel(CancelNotice("c-1", "echo", "timeout"))  # dropped: nowhere to send it
    assert gw.publishing.published == []  # (the never-set-up bus has no channel at all)


def test_ready_with_an_open_channel(gw: Gateway) -> None:
    assert gw.bus.isReady()
    assert gw.bus.replyTo == "gw-1"


def test_publish_cancel(gw: Gateway) -> None:
    gw.bus.publishCancel(CancelNotice("c-1", "testRequest", "disconnected"))
    [published] = gw.publishing.published
    assert (published.exchange, published.routingKey, published.body) == (
        "t.cancels", "testRequest", b"")
    assert published.mandatory is False
    assert published.properties.type == "cancel"
    assert published.properties.correlation_id == "c-1"
    assert published.properties.headers == {"relaybus-cancel-reason": "disconnected"}
    published.confirm.errback(ConnectionDone())  # best effort: swallowed, nothing unhandled
    assert published.confirm.called


@pytest.mark.parametrize("kind", ["chunk", "response", "error"])
def test_reply_arrived_goes_to_the_receiver(gw: Gateway, kind: str) -> None:
    headers = {"relaybus-seq": 3} if kind == "chunk" else None
    gw.reply(requestProperties("c-1", None, headers, kind=kind), b'"data"')
    assert gw.receiver.replies == [ReplyMessage(
        "c-1", "gw-1", ReplyKind(kind), b'"data"', 3 if kind == "chunk" else None)]


@pytest.mark.parametrize(("kind", "correlationId"), [("chunk", None), ("response", "")])
def test_replies_without_a_correlation_id_are_dropped(gw: Gateway, kind: str | None,
                                                      correlationId: str | None) -> None:
    gw.reply(requestProperties(correlationId, kind=kind))
    assert gw.receiver.replies == []


@pytest.mark.parametrize(("kind", "shown"), [
    ("request", "'request'"), (None, "None"), ("x" * 100, "'" + "x" * 36 + "...")])
def test_a_reply_of_unknown_type_for_a_request_is_a_violation(gw: Gateway, kind: str | None,
                                                              shown: str) -> None:
    gw.reply(requestProperties("c-1", kind=kind))
    [reply] = gw.receiver.replies
    assert reply.correlationId == "c-1"
    assert reply.violation == f"a reply of type {shown} (not chunk, response or error)"


@pytest.mark.parametrize("seq", ["3", "0", 1.5, 2.0, -1, True, b"7"])
def test_a_chunk_seq_that_is_not_a_non_negative_integer_is_a_violation(gw: Gateway,
                                                                       seq: Any) -> None:
    gw.reply(requestProperties("c-1", headers={"relaybus-seq": seq}, kind="chunk"))
    [reply] = gw.receiver.replies
    assert reply.violation is not None and "relaybus-seq" in reply.violation


def test_a_chunk_without_seq_and_a_seq_on_other_replies_are_legal(gw: Gateway) -> None:
    gw.reply(requestProperties("c-1", headers={"relaybus-seq": None}, kind="chunk"))
    gw.reply(requestProperties("c-1", headers={"relaybus-seq": "junk"}, kind="response"))
    assert [(r.kind, r.seq, r.violation) for r in gw.receiver.replies] == [
        (ReplyKind.CHUNK, None, None), (ReplyKind.RESPONSE, None, None)]


def test_a_cancel_notice_has_no_content_type() -> None:
    properties = codec.cancelProperties(CancelNotice("c-1", "echo", "timeout"))
    assert properties.content_type is None and properties.type == "cancel"


@pytest.mark.parametrize(("query", "unnoticed"), [
    ("", "which the broker closes within 45 s (3 heartbeats)"),
    ("?heartbeat=5", "which the broker closes within 15 s (3 heartbeats)"),
    ("?heartbeat=0", "which the broker notices only when TCP gives up (heartbeats are off)")])
def test_a_reply_queue_another_connection_consumes_refuses_the_setup_and_says_why(
        query: str, unnoticed: str) -> None:
    clock = MemoryReactorClock()
    bus = AmqpRequestBus(URL + query, clock, Topology("t."), "gw-1")
    connection = FakeAmqpConnection(queueConsumers={"t.replies.gw-1": 1})
    refused = failureResultOf(bus.setUpConnection(connection), SetupRefused)
    assert refused.getErrorMessage() == (
        "another connection consumes this gateway's reply queue (ACCESS_REFUSED - queue "
        "'t.replies.gw-1' in vhost '/' in exclusive use): most likely another gateway process "
        "with the same --gateway-id gw-1 is connected to this broker and vhost (give each "
        "gateway its own id, or leave it out for a random one), or this gateway's previous "
        f"connection died unnoticed, {unnoticed}. Not ready until the queue is free; "
        "retrying.")
    consuming, _publishing = connection.channels
    assert not consuming.is_open  # the broker closed it
    assert not bus.isReady()
    message = RequestMessage("c-1", "echo", "gw-1", b"null", START + 1)
    assert errorCode(bus.publishRequest(message)) == "unavailable"


def test_other_refusals_of_the_reply_consumer_are_not_blamed_on_another_gateway() -> None:
    """A 403 for missing permissions, say: a setup failure like any other (a traceback)."""
    bus = AmqpRequestBus(URL, MemoryReactorClock(), Topology("t."), "gw-1")
    connection = FakeAmqpConnection(holdConsumes=True)
    setup = bus.setUpConnection(connection)
    consuming = connection.channels[0]
    consuming.closeByBroker(ChannelClosedByBroker(
        403, "ACCESS_REFUSED - access to queue 't.replies.gw-1' in vhost '/' refused for user "
             "'gw'"))
    refused = failureResultOf(setup, ChannelClosedByBroker)
    assert not refused.check(SetupRefused)


def test_losing_the_connection_interrupts_the_receiver(gw: Gateway) -> None:
    reason = Failure(ConnectionDone("gone"))
    gw.bus.connectionLost(reason)
    assert gw.receiver.interruptions == [reason]
    assert not gw.bus.isReady()


# The worker's bus


class Worker:
    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.bus = AmqpWorkerBus(URL, self.clock, Topology("t."))
        self.receiver = FakeRequestReceiver()
        self.bus.serve(["echo", "testRequest"], self.receiver, 5)
        self.connection = FakeAmqpConnection()
        successResultOf(self.bus.setUpConnection(self.connection))
        self.consuming, self.publishing = self.connection.channels

    def arrive(self, properties: pika.BasicProperties, body: bytes = b'{"a":1}',
               requestType: str = "echo", deliveryTag: int = 7,
               redelivered: bool = False) -> None:
        self.consuming.deliver(f"t.requests.{requestType}", properties, body,
                               deliveryTag=deliveryTag, redelivered=redelivered)

    def cancelArrives(self, properties: pika.BasicProperties, requestType: str) -> None:
        self.consuming.deliver("amq.gen-1", properties, routingKey=requestType)


@pytest.fixture
def wk() -> Worker:
    return Worker()


def test_worker_setup_declares_its_topology_then_consumes(wk: Worker) -> None:
    assert wk.consuming.declarations == [
        *[("exchange_declare", {"exchange": name, "exchange_type": "direct", "durable": True})
          for name in ("t.requests", "t.responses", "t.cancels")],
        ("queue_declare", {"queue": "t.requests.echo", "durable": True}),
        ("queue_bind", {"queue": "t.requests.echo", "exchange": "t.requests",
                        "routing_key": "echo"}),
        ("queue_declare", {"queue": "t.requests.testRequest", "durable": True}),
        ("queue_bind", {"queue": "t.requests.testRequest", "exchange": "t.requests",
                        "routing_key": "testRequest"}),
        ("queue_declare", {"queue": "amq.gen-1", "exclusive": True, "auto_delete": True}),
        *[("queue_bind", {"queue": "amq.gen-1", "exchange": "t.cancels", "routing_key": key})
          for key in ("echo", "testRequest")]]
    assert wk.consuming.prefetch == 5
    assert list(wk.consuming.consumers) == [
        "amq.gen-1", "t.requests.echo", "t.requests.testRequest"]
    assert wk.publishing.confirming and not wk.consuming.confirming
    assert wk.bus.isReady()


def test_serve_once_and_only_before_start() -> None:
    bus = AmqpWorkerBus(URL, MemoryReactorClock(), Topology())
    with pytest.raises(RuntimeError):
        bus.startService()
    bus.serve(["echo"], FakeRequestReceiver(), 3)
    with pytest.raises(RuntimeError):
        bus.serve(["echo"], FakeRequestReceiver(), 3)


def test_request_arrived_becomes_a_delivery(wk: Worker) -> None:
    wk.arrive(requestProperties(
        "c-1", "gw-1", {"relaybus-request-type": "echo", "relaybus-deadline-ms": 1_764_000_002_500,
                        "relaybus-gateway-id": "gw-1", "relaybus-principal": "alice"}),
        body=b'{"a":1}', requestType="echo", deliveryTag=7, redelivered=True)
    [delivery] = wk.receiver.deliveries
    assert delivery.message == RequestMessage(
        correlationId="c-1", requestType="echo", replyTo="gw-1", body=b'{"a":1}',
        deadline=1_764_000_002.5, gatewayId="gw-1", principal="alice")
    assert delivery.redelivered is True


def test_request_arrived_with_minimal_properties(wk: Worker) -> None:
    wk.arrive(requestProperties("c-1", "gw-1", None), requestType="testRequest")
    [delivery] = wk.receiver.deliveries
    message = delivery.message
    assert message.requestType == "testRequest"  # from the routing key
    assert message.deadline == float("inf")
    assert (message.gatewayId, message.principal) == ("", None)
    assert delivery.redelivered is False


@pytest.mark.parametrize("deadline", ["1764000002500", b"1764000002500", 1.5e12, None, True,
                                      False])
def test_deadline_header_that_is_not_an_integer_means_no_deadline(wk: Worker,
                                                                  deadline: Any) -> None:
    wk.arrive(requestProperties(headers={"relaybus-deadline-ms": deadline,
                                         "relaybus-principal": 5}))
    message = wk.receiver.deliveries[0].message
    assert message.deadline == float("inf")
    assert message.principal is None


@pytest.mark.parametrize(("correlationId", "replyTo"), [(None, "gw-1"), ("c-1", None),
                                                        ("", "gw-1"), ("c-1", "")])
def test_request_without_correlation_id_or_reply_to_is_acked_and_dropped(
        wk: Worker, correlationId: str | None, replyTo: str | None) -> None:
    wk.arrive(requestProperties(correlationId, replyTo), deliveryTag=9)
    assert wk.receiver.deliveries == []
    assert wk.consuming.acks == [9]


def test_settle_acks_or_requeues_on_the_channel(wk: Worker) -> None:
    wk.arrive(requestProperties("c-1"), deliveryTag=1)
    wk.arrive(requestProperties("c-2"), deliveryTag=2)
    first, second = wk.receiver.deliveries
    first.ack()
    second.requeue()
    assert wk.consuming.acks == [1]
    assert wk.consuming.nacks == [(2, True)]
    assert wk.publishing.acks == [] and wk.publishing.nacks == []


def test_settle_on_a_closed_channel_does_nothing(wk: Worker) -> None:
    wk.arrive(requestProperties("c-1"), deliveryTag=1)
    wk.consuming.is_open = False
    wk.receiver.deliveries[0].ack()
    wk.receiver.deliveries[0].requeue()
    assert wk.consuming.acks == [] and wk.consuming.nacks == []


def test_settle_after_a_reconnect_does_nothing(wk: Worker) -> None:
    """Delivery tags belong to their channel: never ack an old tag on the new channel."""
    wk.arrive(requestProperties("c-1"), deliveryTag=1)
    old = wk.consuming
    wk.bus.connectionLost(Failure(ConnectionDone()))
    assert wk.receiver.interruptions and not wk.bus.isReady()
    reconnected = FakeAmqpConnection()
    successResultOf(wk.bus.setUpConnection(reconnected))
    new = reconnected.channels[0]
    wk.receiver.deliveries[0].ack()
    assert old.acks == [] and new.acks == []


def test_cancel_arrived(wk: Worker) -> None:
    wk.cancelArrives(requestProperties("c-1", None, {"relaybus-cancel-reason": "timeout"}),
                     "echo")
    wk.cancelArrives(requestProperties("c-2", None, None), "testRequest")
    wk.cancelArrives(requestProperties(None, None, None), "echo")  # unusable: dropped
    assert wk.receiver.cancels == [CancelNotice("c-1", "echo", "timeout"),
                                   CancelNotice("c-2", "testRequest", "cancelled")]


@pytest.mark.parametrize(("kind", "seq"), [(ReplyKind.CHUNK, 0), (ReplyKind.CHUNK, 4),
                                           (ReplyKind.RESPONSE, None), (ReplyKind.ERROR, None)])
def test_publish_reply_follows_the_contract(wk: Worker, kind: ReplyKind,
                                            seq: int | None) -> None:
    d = wk.bus.publishReply(ReplyMessage("c-1", "gw-7", kind, b'"x"', seq))
    [published] = wk.publishing.published
    assert (published.exchange, published.routingKey, published.body) == (
        "t.responses", "gw-7", b'"x"')
    properties = published.properties
    assert properties.correlation_id == "c-1"
    assert properties.type == str(kind)
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 1
    assert properties.headers == ({"relaybus-seq": seq} if seq is not None else None)
    assertNoResult(d)
    published.confirm.callback("pika's result")
    assert successResultOf(d) is None


def test_publish_reply_nacked_is_refused_not_unavailable(wk: Worker) -> None:
    """The runtime acks a request whose final reply the broker refused (docs/protocol.md,
    step 4), and leaves one whose reply was lost with its channel to the broker."""
    d = wk.bus.publishReply(ReplyMessage("c-1", "gw-7", ReplyKind.RESPONSE, b"1"))
    wk.publishing.published[0].confirm.errback(NackError([]))
    failure = failureResultOf(d, ReplyRefusedError)
    assert failure.value.code == "overloaded"


@pytest.mark.parametrize("error", [ConnectionDone("gone"), ChannelClosedByBroker(406, "nope"),
                                   RuntimeError("weird")],
                         ids=["connection-done", "channel-closed", "runtime-error"])
def test_publish_reply_failure_is_unavailable(wk: Worker, error: Exception) -> None:
    d = wk.bus.publishReply(ReplyMessage("c-1", "gw-7", ReplyKind.RESPONSE, b"1"))
    wk.publishing.published[0].confirm.errback(Failure(error))
    failure = failureResultOf(d, RelaybusError)
    assert not failure.check(ReplyRefusedError)
    assert failure.value.code == "unavailable"


def test_publish_reply_when_not_connected_is_unavailable(wk: Worker) -> None:
    wk.publishing.is_open = False
    assert not wk.bus.isReady()
    assert errorCode(wk.bus.publishReply(
        ReplyMessage("c-1", "gw-7", ReplyKind.RESPONSE, b"1"))) == "unavailable"
    wk.bus.connectionLost(Failure(ConnectionDone()))
    assert errorCode(wk.bus.publishReply(
        ReplyMessage("c-1", "gw-7", ReplyKind.RESPONSE, b"1"))) == "unavailable"


def test_stop_serving_fires_once_the_broker_confirmed_every_cancel(wk: Worker) -> None:
    """Deliveries already on their way arrive before cancel-ok: the drain waits for it."""
    stopped = wk.bus.stopServing(wk.receiver)
    first, second = wk.consuming.cancelOks
    first.callback(None)
    assertNoResult(stopped)
    second.errback(ChannelClosedByBroker(406, "gone"))  # a failed cancel does not hang it
    assert successResultOf(stopped) is None


def test_stop_serving_cancels_the_consumers(wk: Worker) -> None:
    wk.bus.stopServing(wk.receiver)
    assert wk.consuming.cancelled == ["ctag-t.requests.echo", "ctag-t.requests.testRequest"]
    wk.bus.stopServing(wk.receiver)  # nothing left to cancel
    assert wk.consuming.cancelled == ["ctag-t.requests.echo", "ctag-t.requests.testRequest"]


# consumeForever


def test_consume_forever_drains_a_backlog_without_recursion() -> None:
    queue = ClosableDeferredQueue()
    for i in range(5000):
        queue.put(i)
    handled: list[int] = []
    consumeForever(queue, handled.append)
    assert handled == list(range(5000))
    queue.put(5000)  # and takes more as pika puts them
    queue.put(5001)
    assert handled[-2:] == [5000, 5001]
    assert not queue.pending and not queue.waiting  # nothing queued, no Deferred waiting


def test_consume_forever_stops_once_when_the_queue_is_closed() -> None:
    queue = ClosableDeferredQueue()
    handled: list[str] = []
    stops: list[int] = []
    queue.put("a")
    consumeForever(queue, handled.append, lambda: stops.append(1))
    queue.close(ChannelClosedByBroker(320, "closed"))
    assert stops == [1]
    failureResultOf(queue.put("b")).trap(ChannelClosedByBroker)  # refused by the closed queue
    failureResultOf(queue.get()).trap(ChannelClosedByBroker)
    assert handled == ["a"] and stops == [1]


def test_consume_forever_stops_on_a_queue_closed_before_it_starts() -> None:
    queue = ClosableDeferredQueue()
    queue.close(ConnectionDone())
    handled: list[Any] = []
    stops: list[int] = []
    consumeForever(queue, handled.append, lambda: stops.append(1))
    assert handled == [] and stops == [1]


def test_consume_forever_survives_a_failing_handler() -> None:
    queue = ClosableDeferredQueue()
    handled: list[int] = []

    def handle(item: int) -> None:
        handled.append(item)
        if item == 1:
            raise ValueError("bad message")

    for i in range(3):
        queue.put(i)
    consumeForever(queue, handle)
    queue.put(3)
    assert handled == [0, 1, 2, 3]


# Cancelling our Deferreds never reaches pika's (pika #1282)


def test_cancelling_a_detached_deferred_leaves_pikas_alone() -> None:
    pikas: Deferred[str] = Deferred(lambda _: pytest.fail("pika's Deferred was cancelled"))
    ours = detached(pikas)
    ours.cancel()
    failureResultOf(ours).trap(CancelledError)
    pikas.callback("ack")  # arrives later: no AlreadyCalledError, nothing unhandled
    assert successResultOf(pikas) is None


def test_detached_relays_success_and_failure() -> None:
    ok: Deferred[str] = Deferred()
    bad: Deferred[str] = Deferred()
    okOurs, badOurs = detached(ok), detached(bad)
    ok.callback("ack")
    bad.errback(NackError([]))
    assert successResultOf(okOurs) == "ack"
    failureResultOf(badOurs).trap(NackError)


def test_cancelled_send_chunk_does_not_cancel_the_publish(wk: Worker) -> None:
    published = wk.bus.publishReply(ReplyMessage("c-1", "gw-1", ReplyKind.CHUNK, b"1", 0))
    published.cancel()
    failureResultOf(published).trap(CancelledError)
    [sent] = wk.publishing.published
    sent.confirm.callback(None)  # the broker's confirm comes later: nothing breaks


def test_amqp_connections_disable_nagle() -> None:
    transport = StringTransport()
    transport.setTcpNoDelay = lambda enabled: setattr(transport, "noDelay", enabled)
    connection = AmqpConnection(pika.ConnectionParameters(), Clock(), lambda *_: None)
    connection.makeConnection(transport)
    assert transport.noDelay is True


# The buses on a real BrokerLink: real pika over a StringTransport, the broker's side scripted


def _connectedThroughTheLink(bus: Any, reactor: MemoryReactorClock) -> tuple[Any, ScriptedBroker]:
    bus.startService()
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5672))
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(handshake())
    broker = ScriptedBroker(protocol, transport)
    broker.pump()  # the bus's setup: channels, topology, confirms, consumers
    return protocol, broker


def test_the_gateway_bus_is_set_up_by_its_link_and_hears_when_it_is_lost() -> None:
    reactor = MemoryReactorClock()
    bus = AmqpRequestBus(URL, reactor, Topology("t."), "gw-1",
                         endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", 5672))
    receiver = FakeReplyReceiver()
    bus.listen(receiver)
    protocol, _broker = _connectedThroughTheLink(bus, reactor)
    assert bus.isReady()
    reason = Failure(ConnectionLost("cut"))
    protocol.connectionLost(reason)
    assert not bus.isReady()
    assert [f.value for f in receiver.interruptions] == [reason.value]


def test_a_gateway_refused_its_reply_queue_says_so_once_and_takes_over_once_it_is_free(
        ) -> None:
    """Real pika: the broker's channel.close fails the consume before the channel watcher
    hears of it, so the refusal is what is logged, not a closed channel or a traceback."""
    reactor = MemoryReactorClock()
    bus = AmqpRequestBus(URL, reactor, Topology("t."), "gw-1",
                         endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", 5672))
    bus.startService()
    with capturedLogs() as events:
        for attempt in range(3):
            _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5672))
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(handshake())
            broker = ScriptedBroker(protocol, transport)
            if attempt < 2:  # the other gateway is still there
                broker.inExclusiveUse.add("t.replies.gw-1")
            sent = broker.pump()
            if attempt == 2:
                break
            assert not bus.isReady()
            assert sent[-3:] == ["CloseOk", "Close", "Close"]  # its channel, ours, the connection
            assert transport.disconnecting and not transport.disconnected  # closed, not aborted
            protocol.connectionLost(Failure(ConnectionDone()))
            attempts = len(reactor.tcpClients)
            reactor.advance(Backoff().maxS)
            assert len(reactor.tcpClients) == attempts + 1
    assert bus.isReady()
    logged = [(e["log_level"], formatEvent(e), "log_failure" in e) for e in events
              if e.get("log_namespace", "").startswith("relaybus")
              and e["log_level"] is not LogLevel.debug]
    assert [(level, tb) for level, _, tb in logged] == [(LogLevel.error, False),
                                                         (LogLevel.info, False)]
    assert "same --gateway-id gw-1" in logged[0][1]
    assert logged[1][1] == ("AMQP relaybus gateway gw-1: connected and set up, after 2 refused "
                            "setups")


def test_the_worker_bus_is_set_up_by_its_link_and_hears_when_it_is_lost() -> None:
    reactor = MemoryReactorClock()
    bus = AmqpWorkerBus(URL, reactor, Topology("t."),
                        endpoint=TCP4ClientEndpoint(reactor, "127.0.0.1", 5672))
    receiver = FakeRequestReceiver()
    bus.serve(["echo"], receiver, 3)
    protocol, broker = _connectedThroughTheLink(bus, reactor)
    assert bus.isReady()
    broker.deliver("t.requests.echo", 1, requestProperties("c-1", "gw-1"))
    assert [d.message.correlationId for d in receiver.deliveries] == ["c-1"]
    reason = Failure(ConnectionLost("cut"))
    protocol.connectionLost(reason)
    assert not bus.isReady()
    assert [f.value for f in receiver.interruptions] == [reason.value]


def test_the_buses_back_off_as_documented() -> None:
    """Tests inject their own Backoff: the one a real bus gets must be the documented one."""
    link = BrokerLink.forURL(URL, MemoryReactorClock(), "test", lambda c: succeed(None),
                             lambda r: None)
    assert link.backoff == Backoff()
    assert (Backoff().initialS, Backoff().maxS, Backoff().jitterShare) == (0.5, 10.0, 0.25)


# The gateway's bus: how many workers consume a requestType (AbsentWorkerWatch asks)


def test_consumers_of_a_request_type_come_from_a_passive_declare(gw: Gateway) -> None:
    assert successResultOf(gw.bus.consumersOf("echo")) is None  # no such queue: 404
    probe = gw.connection.channels[-1]
    assert not probe.is_open and gw.bus.isReady()  # the 404 closed the probe channel only
    gw.connection.queueConsumers["t.requests.echo"] = 3
    assert successResultOf(gw.bus.consumersOf("echo")) == 3
    fresh = gw.connection.channels[-1]
    assert fresh is not probe  # reopened
    assert successResultOf(gw.bus.consumersOf("echo")) == 3
    assert gw.connection.channels[-1] is fresh  # and kept
    assert fresh.declarations[-1] == ("queue_declare",
                                      {"queue": "t.requests.echo", "passive": True})


class SlowChannels(FakeAmqpConnection):
    """As pika's connection.channel(): a channel opens a round trip later (`openAll`); its
    passive declares answer at once, or wait for the test (`silent`)."""

    def __init__(self) -> None:
        super().__init__()
        self.opening: list[Deferred[FakeChannel]] = []
        self.silent = False
        self.unanswered: list[Deferred[Any]] = []

    def channel(self) -> Deferred[FakeChannel]:
        opened: Deferred[FakeChannel] = Deferred()
        self.opening.append(opened)
        return opened

    def openAll(self) -> None:
        while self.opening:
            channel = SilentChannel(queueConsumers=self.queueConsumers, connection=self)
            self.channels.append(channel)
            self.opening.pop(0).callback(channel)


class SilentChannel(FakeChannel):
    def __init__(self, connection: SlowChannels, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._slow = connection

    def queue_declare(self, queue: str = "", **arguments: Any) -> Deferred[Any]:
        if not (arguments.get("passive") and self._slow.silent):
            return super().queue_declare(queue, **arguments)
        unanswered: Deferred[Any] = Deferred()
        self._slow.unanswered.append(unanswered)
        return unanswered


def slowGateway() -> tuple[Gateway, SlowChannels]:
    gw = Gateway()
    slow = SlowChannels()
    setUp = gw.bus.setUpConnection(slow)
    slow.openAll()
    successResultOf(setUp)
    return gw, slow


def test_probes_of_several_request_types_at_once_share_one_channel() -> None:
    """AbsentWorkerWatch asks about every pending requestType at once; each probe opened a
    channel of its own (pika opens it a round trip later) and all but the last stayed open,
    unreferenced, until the connection closed: a leak in every round after a 404."""
    gw, slow = slowGateway()
    slow.queueConsumers.update({"t.requests.a": 1, "t.requests.b": 0, "t.requests.c": 2})
    for _ in range(3):  # three rounds, each after a 404 closed the probe channel
        counts = [gw.bus.consumersOf(requestType) for requestType in ("a", "b", "c", "gone")]
        slow.openAll()
        assert [successResultOf(count) for count in counts] == [1, 0, 2, None]
    probes = slow.channels[2:]  # after the reply and publishing channels
    assert len(probes) == 3 and not any(probe.is_open for probe in probes)
    assert [len(probe.declarations) for probe in probes] == [4, 4, 4]


def test_a_probe_given_up_never_cancels_pikas_deferred() -> None:
    """AbsentWorkerWatch's timeout cancels a probe the broker does not answer; cancelling
    pika's own Deferred later raises AlreadyCalledError inside pika (pika #1282)."""
    gw, slow = slowGateway()
    slow.queueConsumers["t.requests.echo"] = 1
    slow.silent = True
    probe = gw.bus.consumersOf("echo")
    slow.openAll()
    [unanswered] = slow.unanswered
    probe.cancel()
    assert successResultOf(probe) is None  # cannot tell
    assert not unanswered.called
    slow.silent = False
    assert successResultOf(gw.bus.consumersOf("echo")) == 1  # the next probe goes ahead
    unanswered.callback(pika.frame.Method(1, pika.spec.Queue.DeclareOk(
        queue="t.requests.echo", consumer_count=1)))  # the late answer is dropped


def test_consumers_cannot_be_told_without_a_connection(gw: Gateway) -> None:
    gw.bus.connectionLost(Failure(ConnectionDone()))
    assert successResultOf(gw.bus.consumersOf("echo")) is None
