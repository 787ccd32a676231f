"""Every real implementation and every fake provides its interface fully (names and signatures)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from unitsupport import requestMessage
from workers import asyncio_examples, blocking_examples, examples
from zope.interface import Interface
from zope.interface.verify import verifyClass, verifyObject

from relaybus.amqp.gatewaybus import AmqpRequestBus
from relaybus.amqp.topology import Topology
from relaybus.amqp.workerbus import AmqpWorkerBus
from relaybus.config import GatewayConfig, Limits
from relaybus.correlation import CorrelationTable
from relaybus.gateway import GatewayFactory, GatewayProtocol
from relaybus.handlerworlds import AsyncioStream, InlineThreads, ThreadStream
from relaybus.interfaces import (
    IClientConnection,
    IJWKSFetcher,
    IReplyReceiver,
    IRequestBus,
    IRequestHandler,
    IRequestReceiver,
    IRequestStream,
    IWorkerBus,
)
from relaybus.jwks import AgentJWKSFetcher
from relaybus.memory import MemoryBus
from relaybus.testing import (
    FakeClientConnection,
    FakeJWKSFetcher,
    FakeReplyReceiver,
    FakeRequestBus,
    FakeRequestHandler,
    FakeRequestReceiver,
    FakeRequestStream,
    FakeWorkerBus,
)
from relaybus.worker import WorkerRuntime

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def _workerStream() -> Any:
    """The stream the worker runtime hands a handler (its class is private)."""
    clock = Clock()
    clock.advance(1_000_000)
    bus = FakeWorkerBus()
    handler = FakeRequestHandler()
    runtime = WorkerRuntime(bus, {handler.requestType: handler}, clock)
    runtime.startService()
    bus.deliver(requestMessage(deadline=clock.seconds() + 30))
    [(_request, stream, _d)] = handler.calls
    return stream


def _gatewayProtocol() -> GatewayProtocol:
    config = GatewayConfig(gatewayId="gw-test")
    table = CorrelationTable(FakeRequestBus(), Clock(), config.limits, config.gatewayId)
    protocol = GatewayFactory(config, table, Clock()).buildProtocol(None)
    assert isinstance(protocol, GatewayProtocol)
    return protocol


def _cases() -> list[Any]:
    reactor = MemoryReactorClock()
    memoryBus = MemoryBus(Clock())
    workerBus = AmqpWorkerBus(AMQP_URL, reactor, Topology())
    return [
        pytest.param(IReplyReceiver,
                     CorrelationTable(FakeRequestBus(), Clock(), Limits(), "gw"),
                     id="CorrelationTable-IReplyReceiver"),
        pytest.param(IRequestBus, memoryBus, id="MemoryBus-IRequestBus"),
        pytest.param(IWorkerBus, memoryBus, id="MemoryBus-IWorkerBus"),
        pytest.param(IRequestBus, AmqpRequestBus(AMQP_URL, reactor, Topology(), "gw"),
                     id="AmqpRequestBus-IRequestBus"),
        pytest.param(IWorkerBus, workerBus, id="AmqpWorkerBus-IWorkerBus"),
        pytest.param(IRequestReceiver, WorkerRuntime(FakeWorkerBus(), {}, Clock()),
                     id="WorkerRuntime-IRequestReceiver"),
        pytest.param(IRequestStream, _workerStream(), id="worker-stream-IRequestStream"),
        pytest.param(IRequestHandler, examples.testRequest, id="examples.testRequest"),
        pytest.param(IRequestHandler, examples.echo, id="examples.echo"),
        pytest.param(IRequestHandler, examples.primes, id="examples.primes"),
        pytest.param(IRequestHandler, examples.TestRequestHandler(Clock()),
                     id="TestRequestHandler-with-clock"),
        pytest.param(IRequestHandler, examples.PrimesHandler(Clock()),
                     id="PrimesHandler-with-clock"),
        pytest.param(IClientConnection, _gatewayProtocol(), id="GatewayProtocol"),
        pytest.param(IClientConnection, FakeClientConnection(), id="FakeClientConnection"),
        pytest.param(IRequestBus, FakeRequestBus(), id="FakeRequestBus"),
        pytest.param(IWorkerBus, FakeWorkerBus(), id="FakeWorkerBus"),
        pytest.param(IReplyReceiver, FakeReplyReceiver(), id="FakeReplyReceiver"),
        pytest.param(IRequestReceiver, FakeRequestReceiver(), id="FakeRequestReceiver"),
        pytest.param(IRequestStream, FakeRequestStream(), id="FakeRequestStream"),
        pytest.param(IRequestStream, AsyncioStream(FakeRequestStream(), asyncio.new_event_loop()),
                     id="AsyncioStream"),
        pytest.param(IRequestStream, ThreadStream(FakeRequestStream(), InlineThreads()),
                     id="ThreadStream"),
        pytest.param(IRequestHandler, asyncio_examples.asyncTicker, id="AsyncTickerHandler"),
        pytest.param(IRequestHandler, blocking_examples.slowDigest, id="SlowDigestHandler"),
        pytest.param(IRequestHandler, FakeRequestHandler(), id="FakeRequestHandler"),
        pytest.param(IJWKSFetcher, AgentJWKSFetcher(reactor, "https://idp.example/jwks.json"),
                     id="AgentJWKSFetcher"),
        pytest.param(IJWKSFetcher, FakeJWKSFetcher(), id="FakeJWKSFetcher"),
    ]


@pytest.mark.parametrize(("interface", "provider"), _cases())
def test_provides_interface(interface: type[Interface], provider: Any) -> None:
    assert verifyObject(interface, provider)
    assert verifyClass(interface, type(provider))


@pytest.mark.parametrize("interface", [IClientConnection, IJWKSFetcher, IReplyReceiver,
                                       IRequestBus,
                                       IRequestHandler, IRequestReceiver, IRequestStream,
                                       IWorkerBus])
def test_every_interface_has_a_fake_in_relaybus_testing(interface: type[Interface]) -> None:
    import relaybus.testing as testing

    fakes = [value for name, value in vars(testing).items()
             if name.startswith("Fake") and interface.implementedBy(value)]
    assert fakes, f"no fake for {interface.__name__}"


def test_a_handler_missing_handle_is_not_a_request_handler() -> None:
    """The check above can fail: verifyObject refuses an incomplete provider."""
    from zope.interface import implementer
    from zope.interface.exceptions import Invalid

    @implementer(IRequestHandler)
    class Incomplete:
        requestType = "x"
        idempotent = False

    with pytest.raises(Invalid):
        verifyObject(IRequestHandler, Incomplete())
