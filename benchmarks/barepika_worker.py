"""The worker of benchmarks/e2e.py's "bare pika" path: plain pika RPC, no relaybus code.

    python benchmarks/barepika_worker.py --url amqp://... --queue NAME [--prefetch 100]

It declares its own queue (exclusive: it goes with this process), consumes requests from it
with `prefetch` unacked at a time, and answers each on the default exchange to its `reply_to`
queue with its `correlation_id`: an `echo` (AMQP `type`) gets its body back; a `testRequest`
({"count", "chunkBytes"}; delayMs must be 0) gets `count` messages of type `chunk`, then one
of type `response`, with the bodies relaybus's testRequest sends. Then it acks. No publisher
confirms, no headers, no TTL, no cancel queue: the floor that relaybus's worker is measured
against. It prints "ready" once it consumes, and stops cleanly on SIGTERM
(unacked requests go back to the broker).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import pika
import pika.exceptions
from pika.adapters.select_connection import SelectConnection
from pika.channel import Channel


def _encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def replies(requestType: str | None, body: bytes) -> list[tuple[str, bytes]]:
    """(type, body) of every reply to one request, the terminal one last."""
    if requestType in ("echo", "asyncEcho"):  # the same work: the bare ceiling for both
        return [("response", body)]
    if requestType == "testRequest":
        try:
            payload = json.loads(body)
            count, chunkBytes = int(payload["count"]), int(payload["chunkBytes"])
        except (ValueError, TypeError, KeyError) as e:
            return [("error", _encode({"code": "bad_request", "message": repr(e)}))]
        filler = "x" * chunkBytes
        return [*(("chunk", _encode({"index": i, "filler": filler})) for i in range(count)),
                ("response", _encode({"chunks": count, "chunkBytes": chunkBytes,
                                      "delayMs": 0, "bytes": count * chunkBytes}))]
    return [("error", _encode({"code": "no_handler", "message": repr(requestType)}))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A bare pika RPC worker (no relaybus code).")
    parser.add_argument("--url", required=True, help="amqp://user:pass@host:port/vhost")
    parser.add_argument("--queue", required=True, help="the request queue to declare and serve")
    parser.add_argument("--prefetch", type=int, default=100, help="unacked deliveries (100)")
    args = parser.parse_args(argv)
    parameters = pika.URLParameters(args.url)
    parameters.client_properties = {"connection_name": "relaybus benchmark bare pika worker"}
    failures: list[str] = []

    def requestArrived(channel: Channel, method: Any, properties: pika.BasicProperties,
                       body: bytes) -> None:
        for kind, reply in replies(properties.type, body):
            channel.basic_publish(exchange="", routing_key=properties.reply_to, body=reply,
                                  properties=pika.BasicProperties(
                                      correlation_id=properties.correlation_id, type=kind))
        channel.basic_ack(delivery_tag=method.delivery_tag)

    def channelOpened(channel: Channel) -> None:
        def consume(_frame: Any) -> None:
            channel.basic_consume(queue=args.queue, on_message_callback=requestArrived,
                                  callback=lambda _: print("ready", flush=True))

        channel.queue_declare(queue=args.queue, exclusive=True, callback=lambda _: (
            channel.basic_qos(prefetch_count=args.prefetch, callback=consume)))

    def closed(connection: SelectConnection, reason: BaseException) -> None:
        if not isinstance(reason, pika.exceptions.ConnectionClosedByClient):
            failures.append(repr(reason))
        connection.ioloop.stop()

    def openFailed(connection: SelectConnection, reason: BaseException) -> None:
        failures.append(repr(reason))
        connection.ioloop.stop()

    # SelectConnection, not BlockingConnection: the latter sends each publish and ack in a
    # syscall of its own, the former writes what a batch of deliveries produced at once
    # (as Twisted does for relaybus's worker), which makes it the faster floor at 50 in flight.
    connection = SelectConnection(
        parameters, on_open_callback=lambda c: c.channel(on_open_callback=channelOpened),
        on_open_error_callback=openFailed, on_close_callback=closed)
    # Not an exception from the handler: it could land inside pika. Ask the loop instead.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: (
        connection.ioloop.add_callback_threadsafe(connection.close)))
    connection.ioloop.start()
    for failure in failures:
        print(f"the AMQP connection failed or closed: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
