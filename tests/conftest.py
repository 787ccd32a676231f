"""Shared pytest setup. Unit tests live in tests/unit (no sockets), integration tests against
the real RabbitMQ and real twistd processes in tests/integration, browser tests in tests/browser;
the last two share the process fixtures of tests/processfixtures.py."""

pytest_plugins = ["processfixtures"]
