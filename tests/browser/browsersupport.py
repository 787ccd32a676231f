"""Driving a page from the tests: bounded waits that report what the page was doing, and the
harness page (harness.js) that exercises the browser library on the gateway's own origin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from playwright.sync_api import ConsoleMessage, Page, Route
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

PAGE_TIMEOUT_MS = 15_000  # the hang guard of every Playwright action and wait

HARNESS_PATH = "/__browser_tests__/"
HARNESS_SCRIPT = Path(__file__).with_name("harness.js")
HARNESS_HTML = ('<!doctype html><meta charset="utf-8"><title>relaybus browser tests</title>'
                f'<script type="module" src="{HARNESS_PATH}harness.js"></script>')


def origin(gateway: Any) -> str:
    """The http:// origin a gateway serves its pages from."""
    return f"http://127.0.0.1:{gateway.port}"


def pretty(value: Any) -> str:
    """What a page observed, for an assertion message."""
    return json.dumps(value, indent=1)[:3000]


def _serveHarness(route: Route) -> None:
    if route.request.url.endswith("/harness.js"):
        route.fulfill(path=HARNESS_SCRIPT, content_type="text/javascript")
    else:
        route.fulfill(body=HARNESS_HTML, content_type="text/html")


class BrowserTab:
    """A page in a fresh browser context that remembers its console and its uncaught errors,
    so a failed wait can say what the page was doing."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        self.pageErrors: list[str] = []
        page.on("console", self._onConsole)
        page.on("pageerror", lambda error: self.pageErrors.append(str(error)))

    def _onConsole(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    def describe(self) -> str:
        console = "\n".join(self.console[-40:]) or "(nothing)"
        errors = "\n".join(self.pageErrors) or "(none)"
        return f"browser console (last 40):\n{console}\nuncaught page errors:\n{errors}"

    def waitFor(self, expression: str, what: str, arg: Any = None,
                timeout: int = PAGE_TIMEOUT_MS) -> Any:
        """Wait until the JS function `expression` returns something truthy; return it."""
        try:
            handle = self.page.wait_for_function(expression, arg=arg, timeout=timeout)
        except PlaywrightTimeoutError:
            raise AssertionError(f"timed out after {timeout} ms waiting for {what}\n"
                                 f"{self.describe()}") from None
        try:
            return handle.json_value()
        finally:
            handle.dispose()

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        """Run JS that does not wait on anything (page.evaluate has no timeout of its own)."""
        return self.page.evaluate(expression, arg)

    # The harness page

    def openHarness(self, gateway: Any) -> None:
        """Load the harness page from `gateway`'s origin: Playwright serves the page itself,
        the library comes from the gateway's /client/.

        Chromium cannot tell that a page Playwright served came from a loopback address, so its
        Local Network Access checks would block the page's WebSocket to 127.0.0.1: the origin
        gets that permission. (The demo page, served by the gateway itself, needs none.)"""
        base = origin(gateway)
        self.page.context.grant_permissions(["local-network-access"], origin=base)
        self.page.route(f"{base}{HARNESS_PATH}**", _serveHarness)
        self.page.goto(f"{base}{HARNESS_PATH}index.html")
        self.waitFor("() => window.harness !== undefined",
                     "the harness page to load /client/relaybus.js")

    def connect(self, **options: Any) -> str:
        """Open the page's client (options: createClient's) and wait until it is open;
        returns its connectionId."""
        self.evaluate("options => harness.connect(options)", options)
        return str(self.waitFor(
            "() => harness.client.state === 'open' && harness.client.connectionId",
            "the client to open"))

    def start(self, name: str, requestType: str, payload: Any = None, **options: Any) -> str:
        """Send a request with makeBackendRequest (its onChunk records the chunks); returns
        its requestId."""
        return str(self.evaluate(
            "([name, type, payload, options]) => harness.start(name, type, payload, options)",
            [name, requestType, payload, options]))

    def waitForRun(self, name: str, chunks: int | None = None,
                   timeout: int = PAGE_TIMEOUT_MS) -> dict[str, Any]:
        """What request `name` observed once it ended (or once it had `chunks` chunks)."""
        if chunks is None:
            condition, what = "run.done", f"request {name!r} to end"
        else:
            condition = f"run.done || run.chunks.length >= {int(chunks)}"
            what = f"{chunks} chunks of request {name!r}"
        return dict(self.waitFor(
            f"name => {{ const run = harness.runs[name]; return run && ({condition}) && run; }}",
            what, name, timeout))

    # The demo page

    def openDemo(self, gateway: Any) -> str:
        """Load the demo page the gateway serves at / and wait until its client is open;
        returns the connectionId it shows."""
        self.page.goto(f"{origin(gateway)}/")
        return str(self.waitFor(
            "() => document.querySelector('#state').dataset.state === 'open'"
            " && document.querySelector('#connection-id').textContent",
            "the demo page's client to open"))
