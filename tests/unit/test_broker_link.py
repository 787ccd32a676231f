"""BrokerLink, the reconnecting AMQP connection, with real pika over a StringTransport and a
MemoryReactorClock: the documented backoff policy, connection.blocked, what it aborts and what
it logs (a lost connection is a warning with its real reason, never a traceback or a made-up
reason; a setup the broker refuses is one error per episode), and a bounded stop."""

from __future__ import annotations

from typing import Any

import pika
import pika.spec
import pytest
from amqpwire import ScriptedBroker, handshake, method, methodNames, refusedLogin
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from relaybus.amqp.link import CLOSE_TIMEOUT_S, Backoff, BrokerLink, SetupRefused

NO_JITTER = Backoff(jitter=lambda: 0.0)


class Link:
    """A started BrokerLink whose TCP connects the test answers (or refuses) by hand."""

    def __init__(self, backoff: Backoff = NO_JITTER, setupSucceeds: bool = False,
                 setupOpensAChannel: bool = False,
                 setupOpensAWatchedChannel: bool = False) -> None:
        self.reactor = MemoryReactorClock()
        self.setups: list[Deferred[Any]] = []
        self.lost: list[Failure] = []
        self.connections: list[Any] = []  # what setup was called with: our AmqpConnection
        self.setupSucceeds = setupSucceeds
        self.setupOpensAChannel = setupOpensAChannel
        self.setupOpensAWatchedChannel = setupOpensAWatchedChannel
        self.link = BrokerLink(TCP4ClientEndpoint(self.reactor, "127.0.0.1", 5672),
                               pika.ConnectionParameters(), self.reactor, "test link",
                               self._setup, self.lost.append, backoff)
        self.transport: StringTransport | None = None
        self.protocol: Any = None
        self.link.startService()

    def _setup(self, connection: Any) -> Deferred[Any]:
        self.connections.append(connection)
        if self.setupSucceeds:
            return succeed(None)
        if self.setupOpensAWatchedChannel:  # as the buses do: its close drops the connection
            watched: Deferred[Any] = self.link.openChannel(connection, "reply")
            return watched
        if self.setupOpensAChannel:  # pika fails it if the connection goes meanwhile
            opening: Deferred[Any] = connection.channel()
            return opening
        d: Deferred[Any] = Deferred()
        self.setups.append(d)
        return d

    @property
    def connection(self) -> Any:
        return self.connections[-1]

    def accept(self, data: bytes = b"") -> None:
        """Answer the pending TCP connect, then play the broker's side of the handshake."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5672))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        if data:
            self.protocol.dataReceived(data)

    def connectAndSetUp(self) -> None:
        self.accept(handshake())
        assert self.connection.is_open

    def refuse(self) -> None:
        connector = self.reactor.connectors[-1]
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))

    def lose(self, reason: Exception | None = None) -> Failure:
        failure = Failure(reason or ConnectionLost("cut"))
        self.protocol.connectionLost(failure)
        return failure

    def nextAttemptAfter(self) -> float:
        """Run the clock until the link connects again; the seconds that took."""
        start, attempts = self.reactor.seconds(), len(self.reactor.tcpClients)
        while len(self.reactor.tcpClients) == attempts:
            pending = sorted(call.getTime() for call in self.reactor.getDelayedCalls())
            assert pending, "no reconnect is scheduled"
            self.reactor.advance(pending[0] - self.reactor.seconds())
        return round(self.reactor.seconds() - start, 6)


@pytest.fixture
def link() -> Link:
    return Link()


def _logged(events: list[dict[str, Any]]) -> list[tuple[LogLevel, str, bool]]:
    """(level, text, has a traceback) of each relaybus event (not ClientService's)."""
    return [(e["log_level"], formatEvent(e), "log_failure" in e) for e in events
            if e.get("log_namespace", "").startswith("relaybus")]


# The documented backoff: 0.5 s doubling to 10 s, jitter of up to a quarter, reset only after
# a successful setup.


def test_refused_connects_back_off_from_half_a_second_doubling_to_ten(link: Link) -> None:
    delays = []
    for _ in range(8):
        link.refuse()
        delays.append(link.nextAttemptAfter())
    assert delays == [0.5, 1, 2, 4, 8, 10, 10, 10]


def test_jitter_shortens_each_delay_by_up_to_a_quarter() -> None:
    mostJitter = Link(Backoff(jitter=lambda: 0.999999))
    delays = []
    for _ in range(6):
        mostJitter.refuse()
        delays.append(mostJitter.nextAttemptAfter())
    assert delays == pytest.approx([0.375, 0.75, 1.5, 3, 6, 7.5], abs=1e-4)
    sampled = [Backoff().delay(3) for _ in range(500)]  # the default jitter is random
    assert 1.5 <= min(sampled) < 1.6 and 1.9 < max(sampled) <= 2.0


def test_a_refused_login_backs_off_like_a_refused_connect(link: Link) -> None:
    """A TCP connect that succeeds must not reset the backoff: a wrong password would
    otherwise retry in a tight loop."""
    delays = []
    for _ in range(4):
        link.accept(refusedLogin())
        link.lose()
        delays.append(link.nextAttemptAfter())
    assert delays == [0.5, 1, 2, 4]
    assert link.lost == []  # never set up: nothing was in flight


def test_backoff_resets_only_after_a_successful_setup(link: Link) -> None:
    link.connectAndSetUp()
    link.setups[-1].errback(Failure(ChannelClosedByBroker(406, "PRECONDITION_FAILED")))
    link.lose()  # the abort reaches connectionLost
    first = link.nextAttemptAfter()
    link.connectAndSetUp()
    link.setups[-1].errback(Failure(ChannelClosedByBroker(406, "PRECONDITION_FAILED")))
    link.lose()
    second = link.nextAttemptAfter()
    assert (first, second) == (0.5, 1)  # failed setups keep doubling
    link.connectAndSetUp()
    link.setups[-1].callback(None)
    assert link.link.ready
    link.lose()
    assert link.nextAttemptAfter() == 0.5  # a working connection that dropped: start over


def test_connection_blocked_makes_the_link_not_ready_until_unblocked() -> None:
    link = Link(setupSucceeds=True)
    link.connectAndSetUp()
    assert link.link.ready and not link.link.blocked
    with capturedLogs() as events:
        link.protocol.dataReceived(method(0, pika.spec.Connection.Blocked(reason="low on memory")))
        assert link.link.blocked and not link.link.ready
        link.protocol.dataReceived(method(0, pika.spec.Connection.Unblocked()))
    assert link.link.ready and not link.link.blocked
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: the broker blocks this connection (resource alarm)",
        "AMQP test link: the broker unblocked this connection (resource alarm)"]


def test_blocked_is_forgotten_with_the_connection() -> None:
    link = Link(setupSucceeds=True)
    link.connectAndSetUp()
    link.protocol.dataReceived(method(0, pika.spec.Connection.Blocked(reason="disk")))
    link.lose()
    assert not link.link.blocked  # the next connection starts unblocked
    assert len(link.lost) == 1


# What a lost connection costs, and what is logged


def test_connection_lost_during_setup_is_one_warning_without_traceback() -> None:
    link = Link(setupOpensAChannel=True)
    link.connectAndSetUp()
    reason = Failure(ConnectionLost("cut"))
    with capturedLogs() as events:
        # pika fails the setup's channel.open first, then connectionLost reaches the link
        link.protocol.connectionLost(reason)
    assert _logged(events) == [
        (LogLevel.warn, "AMQP test link: connection lost: Connection to the other side was "
                        "lost in a non-clean fashion: cut.", False)]
    assert link.lost == [reason]  # deliveries may have been handed out during setup
    assert link.link.connection is None


def test_setup_failing_on_an_open_connection_is_logged_and_dropped(link: Link) -> None:
    link.connectAndSetUp()
    with capturedLogs() as events:
        link.setups[0].errback(Failure(ChannelClosedByBroker(406, "PRECONDITION_FAILED")))
    logged = _logged(events)
    assert [(level, text) for level, text, _ in logged] == [
        (LogLevel.critical, "AMQP test link: setting up the connection failed"),
        (LogLevel.warn, "AMQP test link: reconnecting: setup failed")]
    assert logged[0][2], "the setup failure carries its traceback"
    assert link.transport is not None and link.transport.disconnected


def test_channel_closing_with_its_connection_is_not_blamed_on_the_broker() -> None:
    link = Link(setupOpensAWatchedChannel=True)
    link.connectAndSetUp()
    assert link.transport is not None
    ScriptedBroker(link.protocol, link.transport).pump()  # channel.open-ok: set up
    assert link.link.connection is link.connection and link.link.ready
    reason = Failure(ConnectionLost("closed by the broker"))
    with capturedLogs() as events:
        # pika closes the channel inside connectionLost (its watcher calls drop() then),
        # before the link hears of the loss
        link.protocol.connectionLost(reason)
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: connection lost: Connection to the other side was lost in a "
        "non-clean fashion: closed by the broker."]
    assert link.lost == [reason]


def test_consumer_cancelled_on_an_open_connection_drops_it(link: Link) -> None:
    link.connectAndSetUp()
    link.setups[0].callback(None)
    with capturedLogs() as events:
        link.link.drop(link.connection, "the broker cancelled the reply consumer")
        link.link.drop(link.connection, "the reply channel closed")
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: reconnecting: the broker cancelled the reply consumer"]
    assert link.transport is not None and link.transport.disconnected


def test_setup_that_hangs_is_dropped_after_fifteen_seconds(link: Link) -> None:
    link.connectAndSetUp()
    with capturedLogs() as events:
        link.reactor.advance(15)
    assert [text for _, text, _ in _logged(events)] == [
        "AMQP test link: setup took over 15.0 s", "AMQP test link: reconnecting: setup timed out"]
    assert link.transport is not None and link.transport.disconnected


# A setup the broker refuses for a reason the operator must fix or wait out (SetupRefused: the
# gateway's reply queue consumed by another connection)


def _refuseSetup(link: Link, why: str = "the queue is taken") -> None:
    """Connect, have the setup refused, and play the broker through the polite close."""
    link.connectAndSetUp()
    assert link.transport is not None
    link.transport.clear()
    link.setups[-1].errback(Failure(SetupRefused(why)))
    assert methodNames(link.transport.value()) == ["Close"]  # not an abort
    assert not link.transport.disconnected
    link.protocol.dataReceived(method(0, pika.spec.Connection.CloseOk()))
    link.lose(ConnectionDone())


def _aboveDebug(events: list[dict[str, Any]]) -> list[tuple[LogLevel, str, bool]]:
    return [entry for entry in _logged(events) if entry[0] is not LogLevel.debug]


def test_a_refused_setup_is_one_error_per_episode_and_retried_with_the_backoff(
        link: Link) -> None:
    delays = []
    with capturedLogs() as events:
        for _ in range(3):
            _refuseSetup(link)
            assert not link.link.ready
            delays.append(link.nextAttemptAfter())
        link.connectAndSetUp()
        link.setups[-1].callback(None)
    assert delays == [0.5, 1, 2]  # as for any failed setup
    assert _aboveDebug(events) == [
        (LogLevel.error, "AMQP test link: the queue is taken", False),
        (LogLevel.info, "AMQP test link: connected and set up, after 3 refused setups", False)]
    assert link.link.ready
    link.lose()
    link.nextAttemptAfter()
    with capturedLogs() as events:
        _refuseSetup(link)  # a new episode is told again
        link.nextAttemptAfter()
        _refuseSetup(link, "another reason")  # and so is another reason
    assert [text for _, text, _ in _aboveDebug(events)] == [
        "AMQP test link: the queue is taken", "AMQP test link: another reason"]


def test_a_refused_setup_whose_close_the_broker_does_not_answer_is_aborted(link: Link) -> None:
    link.connectAndSetUp()
    link.setups[-1].errback(Failure(SetupRefused("the queue is taken")))
    assert link.transport is not None and not link.transport.disconnected
    link.reactor.advance(CLOSE_TIMEOUT_S)
    assert link.transport.disconnected
    link.lose()
    assert link.nextAttemptAfter() == 0.5


# Stopping


def test_stop_closes_politely(link: Link) -> None:
    link.connectAndSetUp()
    link.setups[0].callback(None)
    assert link.transport is not None
    link.transport.clear()
    stopped = link.link.stopService()
    assert methodNames(link.transport.value()) == ["Close"]
    link.protocol.dataReceived(method(0, pika.spec.Connection.CloseOk()))
    link.lose()
    fired: list[Any] = []
    stopped.addBoth(fired.append)
    assert fired == [None]
    assert link.lost == []  # a stop is no loss


def test_stop_is_bounded_when_the_broker_does_not_read(link: Link) -> None:
    link.connectAndSetUp()
    link.setups[0].callback(None)
    stopped = link.link.stopService()
    fired: list[Any] = []
    stopped.addBoth(fired.append)
    link.reactor.advance(CLOSE_TIMEOUT_S)  # no close-ok: the broker is not reading
    assert link.transport is not None and link.transport.disconnected  # aborted
    link.reactor.advance(CLOSE_TIMEOUT_S)
    assert fired == [None], "BrokerLink.stopService() still waiting"
