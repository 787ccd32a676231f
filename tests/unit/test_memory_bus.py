"""The embedded bus keeps the broker's semantics: async FIFO delivery, prefetch, TTL, requeue."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.task import Clock
from unitsupport import errorCode, failureResultOf, requestMessage, successResultOf

from relaybus.errors import RelaybusError
from relaybus.memory import MemoryBus
from relaybus.messages import CancelNotice, ReplyKind, ReplyMessage, RequestMessage
from relaybus.testing import FakeReplyReceiver, FakeRequestReceiver

START = 1_764_000_000.0


class Bus:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.bus = MemoryBus(self.clock)
        self.gateway = FakeReplyReceiver()
        self.bus.listen(self.gateway)
        self.bus.startService()

    def consumer(self, *requestTypes: str, prefetch: int = 10) -> FakeRequestReceiver:
        receiver = FakeRequestReceiver()
        self.bus.serve(requestTypes or ("work",), receiver, prefetch)
        return receiver

    def message(self, correlationId: str, requestType: str = "work",
                timeoutS: float = 30.0) -> RequestMessage:
        return requestMessage(correlationId, requestType, payload=correlationId,
                              deadline=self.clock.seconds() + timeoutS, replyTo="memory")

    def publish(self, correlationId: str, requestType: str = "work",
                timeoutS: float = 30.0) -> RequestMessage:
        message = self.message(correlationId, requestType, timeoutS)
        assert successResultOf(self.bus.publishRequest(message)) is None
        return message

    def turn(self) -> None:
        self.clock.advance(0)


@pytest.fixture
def b() -> Bus:
    return Bus()


def ids(receiver: FakeRequestReceiver) -> list[str]:
    return [d.message.correlationId for d in receiver.deliveries]


def reply(correlationId: str, seq: int) -> ReplyMessage:
    return ReplyMessage(correlationId, "memory", ReplyKind.CHUNK, b"%d" % seq, seq)


def test_ready_only_while_running() -> None:
    bus = MemoryBus(Clock())
    assert not bus.isReady()
    bus.startService()
    assert bus.isReady()
    bus.stopService()
    assert not bus.isReady()
    assert bus.replyTo == "memory"


def test_publish_without_a_consumer_is_no_handler(b: Bus) -> None:
    b.consumer("other")
    d = b.bus.publishRequest(b.message("c-1", "work"))
    assert errorCode(d) == "no_handler"
    assert b.bus.queuedCount() == 0


def test_publish_after_stop_serving_is_no_handler(b: Bus) -> None:
    receiver = b.consumer("work")
    b.bus.stopServing(receiver)
    assert errorCode(b.bus.publishRequest(b.message("c-1"))) == "no_handler"


def test_delivery_is_asynchronous(b: Bus) -> None:
    receiver = b.consumer()
    b.publish("c-1")
    assert receiver.deliveries == []
    b.turn()
    assert ids(receiver) == ["c-1"]
    delivery = receiver.deliveries[0]
    assert delivery.redelivered is False
    assert delivery.message == b.message("c-1", timeoutS=30.0)


def test_delivery_is_fifo_for_many_messages(b: Bus) -> None:
    receiver = b.consumer(prefetch=10_000)
    names = [f"c-{i}" for i in range(2000)]
    for name in names:
        b.publish(name)
    assert receiver.deliveries == []
    b.turn()
    assert ids(receiver) == names


def test_fifo_with_prefetch_one_and_publishes_while_delivering(b: Bus) -> None:
    receiver = b.consumer(prefetch=1)
    for i in range(5):
        b.publish(f"c-{i}")
    for i in range(5, 10):
        b.turn()
        receiver.deliveries[-1].ack()
        b.publish(f"c-{i}")
    for _ in range(20):
        if not b.bus.queuedCount():
            break
        b.turn()
        receiver.deliveries[-1].ack()
    assert ids(receiver) == [f"c-{i}" for i in range(10)]


def test_prefetch_is_respected(b: Bus) -> None:
    receiver = b.consumer(prefetch=2)
    for i in range(5):
        b.publish(f"c-{i}")
    b.turn()
    assert ids(receiver) == ["c-0", "c-1"]
    assert b.bus.queuedCount() == 3
    receiver.deliveries[0].ack()
    assert len(receiver.deliveries) == 2  # the next one comes on a later turn
    b.turn()
    assert ids(receiver) == ["c-0", "c-1", "c-2"]
    receiver.deliveries[1].ack()
    receiver.deliveries[2].ack()
    b.turn()
    assert ids(receiver) == ["c-0", "c-1", "c-2", "c-3", "c-4"]
    assert b.bus.queuedCount() == 0


def test_prefetch_applies_per_request_type_as_with_amqp(b: Bus) -> None:
    receiver = b.consumer("work", "other", prefetch=1)
    for i in range(2):
        b.publish(f"w-{i}", "work")
        b.publish(f"o-{i}", "other")
    b.turn()
    assert sorted(ids(receiver)) == ["o-0", "w-0"]


def test_round_robin_across_two_consumers(b: Bus) -> None:
    first, second = b.consumer(), b.consumer()
    for i in range(6):
        b.publish(f"c-{i}")
    b.turn()
    assert ids(first) == ["c-0", "c-2", "c-4"]
    assert ids(second) == ["c-1", "c-3", "c-5"]


def test_a_full_consumer_is_skipped(b: Bus) -> None:
    first, second = b.consumer(prefetch=1), b.consumer(prefetch=10)
    for i in range(4):
        b.publish(f"c-{i}")
    b.turn()
    assert ids(first) == ["c-0"]
    assert ids(second) == ["c-1", "c-2", "c-3"]


def test_consumers_get_only_their_request_types(b: Bus) -> None:
    works, others, both = b.consumer("work"), b.consumer("other"), b.consumer("work", "other")
    b.publish("w-1", "work")
    b.publish("o-1", "other")
    b.publish("w-2", "work")
    b.publish("o-2", "other")
    b.turn()
    assert ids(works) == ["w-1"] and ids(others) == ["o-1"]
    assert ids(both) == ["w-2", "o-2"]


def test_message_whose_deadline_passed_in_the_queue_is_dropped(b: Bus) -> None:
    receiver = b.consumer(prefetch=1)
    b.publish("long", timeoutS=60)
    b.publish("short", timeoutS=5)
    b.publish("later", timeoutS=60)
    b.turn()
    assert ids(receiver) == ["long"]
    b.clock.advance(5)  # "short" expires while queued
    receiver.deliveries[0].ack()
    b.turn()
    assert ids(receiver) == ["long", "later"]
    assert b.bus.queuedCount() == 0


def test_message_already_expired_when_its_turn_comes_is_not_delivered(b: Bus) -> None:
    receiver = b.consumer()
    b.publish("c-1", timeoutS=0.5)
    b.clock.advance(0.5)
    assert ids(receiver) == []
    assert b.bus.queuedCount() == 0


def test_requeue_delivers_again_first_and_marked_redelivered(b: Bus) -> None:
    receiver = b.consumer(prefetch=1)
    b.publish("c-1")
    b.publish("c-2")
    b.turn()
    receiver.deliveries[0].requeue()
    b.turn()
    assert ids(receiver) == ["c-1", "c-1"]
    assert [d.redelivered for d in receiver.deliveries] == [False, True]
    receiver.deliveries[1].ack()
    b.turn()
    assert ids(receiver) == ["c-1", "c-1", "c-2"]
    assert receiver.deliveries[2].redelivered is False


def test_requeue_goes_to_another_consumer_when_free(b: Bus) -> None:
    first, second = b.consumer(prefetch=1), b.consumer(prefetch=1)
    b.publish("c-1")
    b.turn()
    assert ids(first) == ["c-1"]
    first.deliveries[0].requeue()
    b.turn()
    assert ids(second) == ["c-1"] and second.deliveries[0].redelivered


def test_settle_twice_is_harmless(b: Bus) -> None:
    receiver = b.consumer(prefetch=1)
    b.publish("c-1")
    b.turn()
    delivery = receiver.deliveries[0]
    delivery.ack()
    delivery.ack()
    delivery.requeue()  # ignored too: it was settled
    b.publish("c-2")
    b.publish("c-3")
    b.turn()
    # had the second settle counted, prefetch 1 would have let both through
    assert ids(receiver) == ["c-1", "c-2"]
    assert b.bus.queuedCount() == 1


def test_replies_reach_the_reply_receiver_asynchronously_and_in_order(b: Bus) -> None:
    for seq in range(500):
        assert successResultOf(b.bus.publishReply(reply("c-1", seq))) is None
    assert b.gateway.replies == []
    b.turn()
    assert [r.seq for r in b.gateway.replies] == list(range(500))


def test_replies_and_deliveries_keep_one_order(b: Bus) -> None:
    events: list[str] = []

    class Recorder(FakeRequestReceiver):
        def requestReceived(self, delivery: Any) -> None:
            events.append("request " + delivery.message.correlationId)

    class ReplyRecorder(FakeReplyReceiver):
        def replyReceived(self, reply: ReplyMessage) -> None:
            events.append(f"reply {reply.seq}")

    b.bus.listen(ReplyRecorder())
    b.bus.serve(["work"], Recorder(), 10)
    b.bus.publishReply(reply("x", 0))
    b.publish("c-1")
    b.bus.publishReply(reply("x", 1))
    b.turn()
    assert events == ["reply 0", "request c-1", "reply 1"]


def test_cancel_notices_reach_consumers_of_that_request_type_only(b: Bus) -> None:
    works, others, both = b.consumer("work"), b.consumer("other"), b.consumer("other", "work")
    notice = CancelNotice("c-1", "work", "timeout")
    b.bus.publishCancel(notice)
    assert works.cancels == []
    b.turn()
    assert works.cancels == [notice] and both.cancels == [notice]
    assert others.cancels == []


def test_cancel_notice_for_an_unserved_type_goes_nowhere(b: Bus) -> None:
    receiver = b.consumer("work")
    b.bus.publishCancel(CancelNotice("c-1", "nobody", "cancelled"))
    b.turn()
    assert receiver.cancels == []


def test_stop_interrupts_the_gateway_and_later_publishes_are_unavailable(b: Bus) -> None:
    b.consumer()
    b.bus.stopService()
    [reason] = b.gateway.interruptions
    assert reason is not None and reason.check(RelaybusError)
    assert str(reason.value.code) == "unavailable"
    assert errorCode(b.bus.publishRequest(b.message("c-1"))) == "unavailable"
    assert errorCode(b.bus.publishReply(reply("c-1", 0))) == "unavailable"
    assert not b.bus.isReady()


def test_stop_without_a_listener(b: Bus) -> None:
    bus = MemoryBus(Clock())
    bus.startService()
    assert bus.stopService() is None
    failureResultOf(bus.publishRequest(b.message("c-1")), RelaybusError)


def test_a_raising_receiver_does_not_stall_later_deliveries(b: Bus) -> None:
    class Raising(FakeReplyReceiver):
        def replyReceived(self, reply: ReplyMessage) -> None:
            super().replyReceived(reply)
            if reply.seq == 0:
                raise RuntimeError("a bug in a receiver")

    receiver = Raising()
    b.bus.listen(receiver)
    for seq in range(3):
        b.bus.publishReply(reply("c-1", seq))
    try:
        b.turn()
    except RuntimeError:
        pass  # the real reactor would log it
    b.clock.advance(1)
    assert [r.seq for r in receiver.replies] == [0, 1, 2]
