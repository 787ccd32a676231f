"""The demo page the gateway serves at /, used as a person would: fill the form, click, read what
the page shows (the ids and data attributes demo.js's header promises). The tests share one
gateway + worker and leave them as they were."""

from __future__ import annotations

import json
import re
import secrets

import pytest

pytestmark = [pytest.mark.processes]

CORRELATION_ID = r"[0-9a-f]{32}"


def shownChunks(tab) -> list[tuple[str, object]]:
    """(data-seq, data) of each item in #chunks, in page order."""
    items = tab.evaluate("() => [...document.querySelectorAll('#chunks li')]"
                         ".map(li => [li.dataset.seq, li.textContent])")
    return [(seq, json.loads(text)) for seq, text in items]


def shownResult(tab) -> dict[str, str | None]:
    return tab.evaluate("() => { const r = document.querySelector('#result'); "
                        "return {outcome: r.dataset.outcome, code: r.dataset.code ?? null, "
                        "text: r.textContent}; }")


def test_send_fills_chunks_while_running_then_shows_the_response(stack, tab):
    tab.openDemo(stack.gateway)
    tab.page.fill("#count", "4")
    tab.page.fill("#delay", "400")
    tab.page.click("#send")
    # The first chunk shows while the request still runs (the rest are 1.2 s away).
    tab.waitFor("() => document.querySelectorAll('#chunks li').length >= 1"
                " && document.querySelector('#result').dataset.outcome === 'running'",
                "the first chunk in #chunks while the request runs")
    assert tab.page.is_disabled("#send") and tab.page.is_enabled("#cancel")
    tab.waitFor("() => document.querySelector('#result').dataset.outcome === 'response'",
                "the response in #result")
    filler = "x" * 16  # testRequest's default chunkBytes
    assert shownChunks(tab) == [(str(i), {"index": i, "filler": filler}) for i in range(4)]
    result = shownResult(tab)
    assert json.loads(result["text"]) == {"chunks": 4, "chunkBytes": 16, "delayMs": 400,
                                          "bytes": 64}, result
    assert tab.page.is_enabled("#send") and tab.page.is_disabled("#cancel")


def test_cancel_button_stops_the_request_on_the_worker(stack, tab):
    tab.openDemo(stack.gateway)
    tab.page.fill("#count", "100")
    tab.page.fill("#delay", "100")
    tab.page.fill("#timeout", "60000")
    tab.page.click("#send")
    tab.waitFor("() => document.querySelectorAll('#chunks li').length >= 2",
                "two chunks in #chunks")
    mark = stack.mark()
    tab.page.click("#cancel")
    tab.waitFor("() => document.querySelector('#result').dataset.outcome === 'error'",
                "the error in #result")
    result = shownResult(tab)
    assert result["code"] == "cancelled", result
    assert result["text"].startswith("cancelled: "), result
    assert 2 <= len(shownChunks(tab)) < 100
    assert tab.page.is_enabled("#send") and tab.page.is_disabled("#cancel")
    stack.waitForHandlerLog(
        rf"Stopped testRequest {CORRELATION_ID}: cancelled by the gateway \(cancelled\)", mark)


def test_log_form_line_reaches_the_gateway_log_with_the_connection_id(stack, tab, waitUntil):
    connectionId = tab.openDemo(stack.gateway)
    token = secrets.token_hex(6)
    tab.page.select_option("#log-level", "error")
    tab.page.fill("#log-message", f"demo says {token}")
    tab.page.click("#log-send")

    def logged() -> list[str]:
        return [line for line in stack.gateway.log.splitlines() if token in line]

    [line] = waitUntil(logged, f"the client-log line with {token} in the gateway log")
    assert "[relaybus.clientlog#error]" in line, line
    assert re.search(rf"\[{re.escape(connectionId)} [^\]]*\] demo says {token}$", line), line
