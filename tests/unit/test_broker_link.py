"""BrokerLink's reactions to a connection that goes away during or after setup, with a fake
connection and a Clock: what it aborts, and what it logs (a lost connection is a warning with
its real reason, never a traceback or a made-up reason)."""

from __future__ import annotations

from typing import Any

import pytest
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from relaybus.amqp import BrokerLink

URL = "amqp://guest:guest@127.0.0.1:5672/"


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = 0

    def abortConnection(self) -> None:
        self.aborted += 1


class FakeConnection:
    """What BrokerLink touches of pika's TwistedProtocolConnection."""

    def __init__(self) -> None:
        self.is_open = True
        self.transport = FakeTransport()


class Link:
    def __init__(self) -> None:
        self.setups: list[Deferred[Any]] = []
        self.lost: list[Failure] = []
        self.clock = Clock()
        self.link = BrokerLink(URL, self.clock, "test link", self._setup, self.lost.append)
        self.link.running = True  # as if started; no ClientService, no sockets
        self.connection = FakeConnection()

    def _setup(self, connection: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.setups.append(d)
        return d

    def handshaken(self) -> Deferred[Any]:
        return self.link._handshaken(self.connection)

    def connectionLost(self, reason: Failure) -> None:
        self.connection.is_open = False
        self.link._connectionLost(self.connection, reason)


@pytest.fixture
def link() -> Link:
    return Link()


def _logged(events: list[dict[str, Any]]) -> list[tuple[LogLevel, str, bool]]:
    """(level, text, has a traceback) of each event."""
    return [(e["log_level"], formatEvent(e), "log_failure" in e) for e in events]


def test_connection_lost_during_setup_is_one_warning_without_traceback(link: Link) -> None:
    link.handshaken()
    reason = Failure(ConnectionLost("cut"))
    with capturedLogs() as events:
        # pika closes the connection's channels (failing the setup) before connectionLost
        link.connection.is_open = False
        link.setups[0].errback(reason)
        link.connectionLost(reason)
    assert _logged(events) == [
        (LogLevel.warn, "AMQP test link: connection lost: Connection to the other side was "
                        "lost in a non-clean fashion: cut.", False)]
    assert link.lost == [reason]
    assert link.link.connection is None


def test_setup_failing_on_an_open_connection_is_logged_and_dropped(link: Link) -> None:
    link.handshaken()
    with capturedLogs() as events:
        link.setups[0].errback(Failure(ChannelClosedByBroker(406, "PRECONDITION_FAILED")))
    logged = _logged(events)
    assert [(level, text) for level, text, _ in logged] == [
        (LogLevel.critical, "AMQP test link: setting up the connection failed"),
        (LogLevel.warn, "AMQP test link: reconnecting: setup failed")]
    assert logged[0][2], "the setup failure carries its traceback"
    assert link.connection.transport.aborted == 1


def test_consumer_closing_with_its_connection_is_not_blamed_on_the_broker(link: Link) -> None:
    link.handshaken()
    link.setups[0].callback(None)
    assert link.link.connection is link.connection
    reason = Failure(ConnectionLost("closed by the broker"))
    with capturedLogs() as events:
        link.connection.is_open = False  # its consumers stop because the connection went
        link.link.drop(link.connection, "the broker cancelled the reply consumer")
        link.connectionLost(reason)
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: connection lost: Connection to the other side was lost in a "
        "non-clean fashion: closed by the broker."]
    assert link.lost == [reason]


def test_consumer_cancelled_on_an_open_connection_drops_it(link: Link) -> None:
    link.handshaken()
    link.setups[0].callback(None)
    with capturedLogs() as events:
        link.link.drop(link.connection, "the broker cancelled the reply consumer")
        link.link.drop(link.connection, "the reply channel closed")
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: reconnecting: the broker cancelled the reply consumer"]
    assert link.connection.transport.aborted == 1
