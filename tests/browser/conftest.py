"""Browser test support: Debian's headless Chromium, driven by Playwright's sync API, against
the integration tests' real processes (a gateway, RabbitMQ and a `relaybus-worker`).

The process harness is tests/integration/conftest.py itself, loaded under a module name of its
own and re-exported here: the same fixtures (`broker`, `processes`, `makeStack`, `waitUntil`),
the same log checks (a process that logs a traceback fails the test) and the same failure
reports. `stack` here is the RabbitMQ one only: the page talks to a gateway whose handlers run
in a separate worker process.

Playwright never downloads a browser: it launches /usr/bin/chromium (`./dev test` installs it).
Its sync API is used as is. pytest-twisted calls every test function from inside its reactor
greenlet; Playwright's sync API switches between the calling greenlet and a greenlet of its own
that runs Playwright's asyncio loop, which works from any greenlet as long as the reactor is not
an asyncio one (the project runs pytest-twisted's default reactor; with `--reactor=asyncio`
Playwright would find an asyncio loop already running and refuse). A Playwright call blocks the
reactor while it waits, as `waitUntil` does: nothing in these tests runs on the test process's
reactor.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from browsersupport import PAGE_TIMEOUT_MS, BrowserTab
from playwright.sync_api import Browser, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LAUNCH_TIMEOUT_MS = 60_000


def _loadIntegrationSupport() -> ModuleType:
    """tests/integration/conftest.py as a module of its own (tests/ is no importable package)."""
    path = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("relaybus_integration_support", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


integration = _loadIntegrationSupport()

# The integration harness's fixtures and hooks, for the tests in this folder.
pytest_configure = integration.pytest_configure
pytest_runtest_setup = integration.pytest_runtest_setup
pytest_runtest_call = integration.pytest_runtest_call
pytest_runtest_makereport = integration.pytest_runtest_makereport
broker = integration.broker
processes = integration.processes
makeStack = integration.makeStack
waitUntilFixture = integration.waitUntilFixture


@pytest.fixture(scope="module", params=[pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def stack(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A gateway and a worker on RabbitMQ, shared by the module's tests that leave them be."""
    yield from integration._moduleStack(request, ())


# The browser


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"The browser tests need Chromium at {CHROMIUM}. Install it (Debian: "
                    "apt-get update && apt-get install -y chromium; `./dev test` does it when "
                    "run as root), or deselect them with --ignore=tests/browser.", pytrace=False)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium for the session; each test gets a fresh context (profile)."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         headless=True, timeout=LAUNCH_TIMEOUT_MS)
    yield browser
    browser.close()


@pytest.fixture
def tab(chromium: Browser) -> Iterator[BrowserTab]:
    """A fresh page; the test fails if the page threw an uncaught error or rejection."""
    context = chromium.new_context()
    context.set_default_timeout(PAGE_TIMEOUT_MS)
    context.set_default_navigation_timeout(PAGE_TIMEOUT_MS)
    browserTab = BrowserTab(context.new_page())
    yield browserTab
    try:
        context.close()
    except PlaywrightError:
        pass  # the browser is gone already; the session fixture reports that
    assert not browserTab.pageErrors, f"uncaught errors in the page:\n{browserTab.describe()}"
