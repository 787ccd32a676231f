"""The HTTP side of the gateway's port: the demo page, the browser library, health and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from websupport import get

from relaybus import gateway
from relaybus.config import GatewayConfig
from relaybus.correlation import CorrelationTable
from relaybus.gateway import GatewayFactory, makeSite
from relaybus.metrics import GatewayCollector, MetricsResource, gatewayRegistry
from relaybus.testing import FakeRequestBus


@pytest.fixture
def webRoot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "client" / "test").mkdir(parents=True)
    (tmp_path / "index.html").write_text("<h1>demo</h1>")
    (tmp_path / "demo.js").write_text("import '/client/relaybus.js';")
    (tmp_path / "client" / "relaybus.js").write_text("export const x = 1;")
    (tmp_path / "client" / "package.json").write_text("{}")
    (tmp_path / "client" / "test" / "client.test.js").write_text("secret")
    (tmp_path / "secret.js").write_text("outside the library")
    monkeypatch.setattr(gateway, "WEB_ROOT", tmp_path)
    return tmp_path


class Gateway:
    def __init__(self) -> None:
        self.clock = Clock()
        self.config = GatewayConfig(gatewayId="gw-test")
        self.bus = FakeRequestBus()
        self.table = CorrelationTable(self.bus, self.clock, self.config.limits, "gw-test")
        self.factory = GatewayFactory(self.config, self.table, self.clock)
        registry = gatewayRegistry(GatewayCollector(self.table, self.factory, self.bus,
                                                    self.clock))
        self.site = makeSite(self.factory, self.bus, lambda: False, MetricsResource(registry))

    def get(self, path: bytes) -> tuple[int, bytes, bytes | None]:
        return get(self.site, path)


def test_demo_page_at_the_root(webRoot: Path) -> None:
    status, body, contentType = Gateway().get(b"/")
    assert status == 200 and body == b"<h1>demo</h1>"
    assert contentType == b"text/html; charset=utf-8"
    assert Gateway().get(b"/demo.js")[1] == b"import '/client/relaybus.js';"


def test_browser_library_modules_are_served_as_javascript(webRoot: Path) -> None:
    status, body, contentType = Gateway().get(b"/client/relaybus.js")
    assert status == 200 and body == b"export const x = 1;"
    assert contentType == b"text/javascript; charset=utf-8"


@pytest.mark.parametrize("path", [
    b"/client/package.json", b"/client/test", b"/client/test/client.test.js",
    b"/client/..", b"/client/../secret.js", b"/client/missing.js", b"/client/.js",
    b"/client/%2e%2e%2fsecret.js",
])
def test_nothing_else_of_the_library_folder_is_served(webRoot: Path, path: bytes) -> None:
    status, body, _ = Gateway().get(path)
    assert status == 404
    assert b"outside" not in body and b"secret" not in body.replace(path, b"")


def test_the_shipped_page_and_library_exist() -> None:
    """The package carries what / and /client/relaybus.js serve."""
    assert (gateway.WEB_ROOT / "index.html").is_file()
    assert (gateway.WEB_ROOT / "demo.js").is_file()
    assert (gateway.WEB_ROOT / "client" / "relaybus.js").is_file()


def test_health_endpoints() -> None:
    gw = Gateway()
    assert gw.get(b"/healthz")[:2] == (200, b"ok\n")
    assert gw.get(b"/readyz")[:2] == (200, b"ok\n")
    gw.bus.ready = False
    assert gw.get(b"/readyz")[:2] == (503, b"not ready\n")


def test_metrics_report_the_live_state() -> None:
    gw = Gateway()
    gw.table.accepted = 7
    gw.table.ended.update({"response": 5, "timeout": 2})
    gw.table.lateReplies = 3
    gw.factory.slowClientsClosed = 1
    gw.factory.handshakesRefused["unauthorized"] = 4
    gw.factory.tokensExpired = 2
    status, body, contentType = gw.get(b"/metrics")
    assert status == 200 and contentType is not None and contentType.startswith(b"text/plain")
    text = body.decode()
    for line in ["relaybus_connections 0.0", "relaybus_requests_in_flight 0.0",
                 "relaybus_requests_accepted_total 7.0",
                 'relaybus_requests_ended_total{outcome="response"} 5.0',
                 'relaybus_requests_ended_total{outcome="timeout"} 2.0',
                 "relaybus_late_replies_total 3.0", "relaybus_slow_clients_closed_total 1.0",
                 "relaybus_client_log_entries_dropped_total 0.0", "relaybus_broker_ready 1.0",
                 "relaybus_reactor_delayed_calls 0.0",
                 'relaybus_handshakes_refused_total{reason="unauthorized"} 4.0',
                 "relaybus_tokens_expired_total 2.0",
                 "relaybus_token_refreshes_refused_total 0.0"]:
        assert line in text.splitlines(), line
    assert "process_resident_memory_bytes" in text
