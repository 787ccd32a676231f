"""relaybus: a WebSocket-to-worker gateway on Twisted, Autobahn and RabbitMQ."""

__version__ = "0.1.0"
