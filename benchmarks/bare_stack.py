"""The design card's stack with no relaybus code: the floor of e2e.py's "bare stack" path.

    python benchmarks/bare_stack.py worker  --url amqp://... --queue NAME [--prefetch 100]
    python benchmarks/bare_stack.py gateway --url amqp://... --queue NAME --port N [--no-confirms]

Both run on Twisted's default reactor with pika's `TwistedProtocolConnection`, as relaybus
does, through the adapter's public API only (a worker consumes through its
`ClosableDeferredQueue`), and do the least the wire format needs:

- `worker` answers each request of its queue like benchmarks/barepika_worker.py (an `echo`
  gets its body back; a `testRequest` 5 chunks and a response), on the default exchange to the
  request's `reply_to`, then acks. No confirms, headers, TTL or cancel queue.
- `gateway` is an Autobahn WebSocket server (`WebSocketServerFactory` on a plain TCP port, no
  twisted.web) speaking enough of relaybus's client frames for e2e.py's client: a `hello`, then
  for each `request` frame `json.loads`, one publish of its payload to the worker's queue
  (`correlation_id`, `reply_to` = its exclusive reply queue, `type` = the requestType; with
  `mandatory` and publisher confirms unless `--no-confirms`, as relaybus publishes), and for
  each reply a `chunk` (numbered), `response` or `error` frame with the reply body spliced in
  unparsed. No validation, limits, deadlines, cancel, authentication, metrics or reconnection.

What relaybus's gateway and worker cost beyond these two is relaybus's own code; what these
cost is the floor of Autobahn + pika's Twisted adapter + Twisted on this machine. Each prints
"ready" once it serves (the gateway: "ready PORT"; `--port 0`, the default, takes a free
one), and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pika
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import inlineCallbacks

HELLO = json.dumps({"type": "hello", "limits": {"maxInFlight": 1000}})


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def replies(requestType: str | None, body: bytes) -> list[tuple[str, bytes]]:
    """(type, body) of every reply to one request, the terminal one last."""
    if requestType in ("echo", "asyncEcho"):
        return [("response", body)]
    if requestType == "testRequest":
        payload = json.loads(body)
        count, chunkBytes = int(payload["count"]), int(payload["chunkBytes"])
        filler = "x" * chunkBytes
        return [*(("chunk", _encode({"index": i, "filler": filler})) for i in range(count)),
                ("response", _encode({"chunks": count, "chunkBytes": chunkBytes,
                                      "delayMs": 0, "bytes": count * chunkBytes}))]
    return [("error", _encode({"code": "no_handler", "message": repr(requestType)}))]


@inlineCallbacks
def connect(url: str, name: str) -> Any:
    parameters = pika.URLParameters(url)
    parameters.client_properties = {"connection_name": f"relaybus benchmark bare {name}"}
    creator = protocol.ClientCreator(reactor, TwistedProtocolConnection, parameters)
    connection = yield creator.connectTCP(parameters.host, parameters.port)
    connection.transport.setTcpNoDelay(True)  # as relaybus's link does
    yield connection.ready
    return connection


@inlineCallbacks
def runWorker(args: argparse.Namespace) -> Any:
    connection = yield connect(args.url, "twisted worker")
    channel = yield connection.channel()
    yield channel.queue_declare(queue=args.queue, exclusive=True)
    yield channel.basic_qos(prefetch_count=args.prefetch)
    queue, _tag = yield channel.basic_consume(queue=args.queue)
    print("ready", flush=True)
    while True:
        try:
            message = yield queue.get()
        except Exception:  # the queue closed: channel or connection gone
            return
        properties = message.properties
        for kind, reply in replies(properties.type, message.body):
            channel.basic_publish(exchange="", routing_key=properties.reply_to, body=reply,
                                  properties=pika.BasicProperties(
                                      correlation_id=properties.correlation_id, type=kind))
        channel.basic_ack(delivery_tag=message.method.delivery_tag)


class BareGatewayFactory(WebSocketServerFactory):
    bus: BareBus


class BareGatewayProtocol(WebSocketServerProtocol):
    factory: BareGatewayFactory

    def onOpen(self) -> None:
        self.sendMessage(HELLO.encode("utf-8"), isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.bus.publish(self, json.loads(payload))

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.bus.forget(self)


class BareBus:
    """One channel, one reply queue, a dict of correlation id -> (connection, requestId)."""

    def __init__(self, queue: str, confirms: bool) -> None:
        self.queue = queue
        self.confirms = confirms
        # correlation id -> [connection, requestId as JSON, next chunk seq]
        self.pending: dict[str, list[Any]] = {}
        self.next = 0
        self.channel: Any = None
        self.replyTo = ""

    @inlineCallbacks
    def start(self, url: str) -> Any:
        connection = yield connect(url, "gateway")
        self.channel = yield connection.channel()
        declared = yield self.channel.queue_declare(queue="", exclusive=True)
        self.replyTo = declared.method.queue
        if self.confirms:
            yield self.channel.confirm_delivery()
        replies, _tag = yield self.channel.basic_consume(queue=self.replyTo, auto_ack=True)
        self.consume(replies)

    @inlineCallbacks
    def consume(self, replies: Any) -> Any:
        while True:
            try:
                message = yield replies.get()
            except Exception:
                return
            properties = message.properties
            kind = properties.type
            target = (self.pending.get(properties.correlation_id) if kind == "chunk"
                      else self.pending.pop(properties.correlation_id, None))
            if target is None:
                continue
            client, requestId, seq = target
            if kind == "chunk":
                target[2] += 1
                frame = b'{"type":"chunk","requestId":%s,"seq":%d,"data":%s}' % (
                    requestId, seq, message.body)
            elif kind == "error":
                frame = b'{"type":"error","requestId":%s,"error":%s}' % (requestId, message.body)
            else:
                frame = b'{"type":"response","requestId":%s,"data":%s}' % (
                    requestId, message.body)
            client.sendMessage(frame, isBinary=False)

    def publish(self, client: BareGatewayProtocol, frame: dict[str, Any]) -> None:
        self.next += 1
        correlationId = f"c{self.next}"
        self.pending[correlationId] = [client, json.dumps(frame["requestId"]).encode(), 0]
        published = self.channel.basic_publish(
            exchange="", routing_key=self.queue, body=_encode(frame["payload"]),
            properties=pika.BasicProperties(correlation_id=correlationId,
                                            reply_to=self.replyTo,
                                            type=frame["requestType"]),
            mandatory=self.confirms)
        published.addErrback(lambda failure: print(f"publish failed: {failure.value!r}",
                                                   flush=True))

    def forget(self, client: BareGatewayProtocol) -> None:
        for correlationId in [c for c, target in self.pending.items() if target[0] is client]:
            del self.pending[correlationId]


@inlineCallbacks
def runGateway(args: argparse.Namespace) -> Any:
    bus = BareBus(args.queue, confirms=not args.no_confirms)
    yield bus.start(args.url)
    factory = BareGatewayFactory("ws://127.0.0.1")  # the URL only names the host
    factory.protocol = BareGatewayProtocol
    factory.bus = bus
    port = reactor.listenTCP(args.port, factory, interface="127.0.0.1", backlog=1024)
    print(f"ready {port.getHost().port}", flush=True)  # type: ignore[attr-defined]
    yield defer.Deferred()  # until SIGTERM stops the reactor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["worker", "gateway"])
    parser.add_argument("--url", required=True, help="amqp://user:pass@host:port/vhost")
    parser.add_argument("--queue", required=True, help="the bare worker's request queue")
    parser.add_argument("--prefetch", type=int, default=100, help="worker: unacked deliveries")
    parser.add_argument("--port", type=int, default=0, help="gateway: WebSocket port")
    parser.add_argument("--no-confirms", action="store_true",
                        help="gateway: publish without mandatory and publisher confirms")
    args = parser.parse_args(argv)
    failures: list[str] = []

    def failed(failure: Any) -> None:
        failures.append(failure.getTraceback())
        reactor.stop()

    run = runWorker if args.role == "worker" else runGateway
    reactor.callWhenRunning(lambda: run(args).addErrback(failed))
    reactor.run()
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
