"""Browser test support: Debian's headless Chromium, driven by Playwright's sync API, against
the integration tests' real processes (a gateway, RabbitMQ and a `relaybus-worker`).

The process fixtures are tests/processfixtures.py's (a plugin of tests/conftest.py): the same
`broker`, `processes`, `makeStack` and `waitUntil`, the same log checks (a process that logs a
traceback fails the test) and the same failure reports. `stack` here is the RabbitMQ one only:
the page talks to a gateway whose handlers run in a separate worker process.

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

import os
from collections.abc import Iterator

import pytest
from browsersupport import PAGE_TIMEOUT_MS, BrowserTab
from playwright.sync_api import Browser, Playwright, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from processfixtures import Stack, moduleStack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LAUNCH_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module", params=[pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A gateway and a worker on RabbitMQ, shared by the module's tests that leave them be."""
    yield from moduleStack(request, ())


# The browser


# Per module, not per session: Playwright's sync API keeps an asyncio loop marked "running" in
# the main thread while it is open, and every later asyncio.run / pytest-asyncio test in the
# session would fail with "cannot be called from a running event loop".
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"The browser tests need Chromium at {CHROMIUM}. Install it (Debian: "
                    "apt-get update && apt-get install -y chromium; `./dev test` does it when "
                    "run as root), or deselect them with --ignore=tests/browser.", pytrace=False)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def chromium(playwright: Playwright) -> Iterator[Browser]:
    """One headless Chromium per module; each test gets a fresh context (profile)."""
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
