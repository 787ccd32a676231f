"""The broker's side of the AMQP wire, for unit tests that run real pika (and a real
BrokerLink) over a StringTransport: frames to feed it, and the frames it wrote."""

from __future__ import annotations

from typing import Any

import pika
import pika.frame
import pika.spec


def method(channel: int, amqpMethod: Any) -> bytes:
    return pika.frame.Method(channel, amqpMethod).marshal()


def _start() -> bytes:
    return method(0, pika.spec.Connection.Start(
        server_properties={"capabilities": {"publisher_confirms": True, "basic.nack": True,
                                            "consumer_cancel_notify": True}},
        mechanisms=b"PLAIN", locales=b"en_US"))


def handshake(heartbeat: int = 0) -> bytes:
    """Connection.Start, Tune and OpenOk: all a client needs to reach `ready`."""
    return (_start()
            + method(0, pika.spec.Connection.Tune(channel_max=2047, frame_max=131072,
                                                  heartbeat=heartbeat))
            + method(0, pika.spec.Connection.OpenOk()))


def refusedLogin() -> bytes:
    """What RabbitMQ answers a wrong password with: Connection.Close 403 after Start."""
    return (_start()
            + method(0, pika.spec.Connection.Close(
                reply_code=403, reply_text="ACCESS_REFUSED - Login was refused", class_id=0,
                method_id=0)))


def delivery(channel: int, consumerTag: str, deliveryTag: int, routingKey: str,
             properties: pika.BasicProperties, body: bytes) -> bytes:
    return (method(channel, pika.spec.Basic.Deliver(
                consumer_tag=consumerTag, delivery_tag=deliveryTag, redelivered=False,
                exchange="", routing_key=routingKey))
            + pika.frame.Header(channel, len(body), properties).marshal()
            + pika.frame.Body(channel, body).marshal())


class ScriptedBroker:
    """Answers what a real pika client writes as RabbitMQ would (each declaration, qos,
    confirm.select, consume and close with its -ok), except basic.cancel: its cancel-ok is
    held, to model deliveries that cross it. A consume of a queue in `inExclusiveUse` is
    refused as RabbitMQ refuses it (channel.close 403). Call `pump()` after anything that
    makes the client write."""

    def __init__(self, protocol: Any, transport: Any) -> None:
        self._protocol = protocol
        self._transport = transport
        self._serverNamed = 0
        self.inExclusiveUse: set[str] = set()  # by another connection
        self.consumerTags: dict[str, str] = {}  # queue -> consumer tag
        self.channelOf: dict[str, int] = {}  # queue -> the channel consuming it

    def _answer(self, channel: int, request: Any) -> Any:
        spec = pika.spec
        if isinstance(request, spec.Channel.Open):
            return spec.Channel.OpenOk()
        if isinstance(request, spec.Exchange.Declare):
            return spec.Exchange.DeclareOk()
        if isinstance(request, spec.Queue.Declare):
            queue = request.queue
            if not queue:
                self._serverNamed += 1
                queue = f"amq.gen-{self._serverNamed}"
            return spec.Queue.DeclareOk(queue=queue, message_count=0, consumer_count=0)
        if isinstance(request, spec.Queue.Bind):
            return spec.Queue.BindOk()
        if isinstance(request, spec.Basic.Qos):
            return spec.Basic.QosOk()
        if isinstance(request, spec.Confirm.Select):
            return spec.Confirm.SelectOk()
        if isinstance(request, spec.Basic.Consume) and request.queue in self.inExclusiveUse:
            return spec.Channel.Close(
                reply_code=403, class_id=60, method_id=20,
                reply_text=f"ACCESS_REFUSED - queue '{request.queue}' in vhost '/' in "
                           "exclusive use")
        if isinstance(request, spec.Channel.Close):
            return spec.Channel.CloseOk()
        if isinstance(request, spec.Connection.Close):
            return spec.Connection.CloseOk()
        if isinstance(request, spec.Basic.Consume):
            self.consumerTags[request.queue] = request.consumer_tag
            self.channelOf[request.queue] = channel
            return spec.Basic.ConsumeOk(consumer_tag=request.consumer_tag)
        return None

    def pump(self) -> list[str]:
        """Answer until the client is quiet; the names of the methods it sent."""
        seen: list[str] = []
        while data := self._transport.value():
            self._transport.clear()
            for frame in frames(data):
                if not isinstance(frame, pika.frame.Method):
                    continue
                seen.append(type(frame.method).__name__)
                answer = self._answer(frame.channel_number, frame.method)
                if answer is not None:
                    self._protocol.dataReceived(method(frame.channel_number, answer))
        return seen

    def deliver(self, queue: str, deliveryTag: int, properties: pika.BasicProperties,
                body: bytes = b"null") -> None:
        self._protocol.dataReceived(delivery(
            self.channelOf[queue], self.consumerTags[queue], deliveryTag,
            queue.rpartition(".")[2], properties, body))


def frames(data: bytes) -> list[Any]:
    """Decode what a client wrote (skipping the protocol header it starts with)."""
    found = []
    if data.startswith(b"AMQP"):
        data = data[8:]
    while data:
        consumed, frame = pika.frame.decode_frame(data)
        found.append(frame)
        data = data[consumed:]
    return found


def methodNames(data: bytes) -> list[str]:
    return [type(f.method).__name__ for f in frames(data) if isinstance(f, pika.frame.Method)]

