"""Shared pytest setup. Unit tests live in tests/unit (no sockets), integration tests against
the real RabbitMQ and real twistd processes in tests/integration."""
