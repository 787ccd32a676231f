"""The attack suite's summary, for issue 9's closing note: each case with its result, and what
its gateways' /metrics counted (refusals by reason and code, rate limits, expiries, requests
accepted and ended), scraped after the test, just before its processes are stopped. Printed
at the end of every run that includes tests/security; also written as Markdown to the file
named by RELAYBUS_SECURITY_REPORT. A gateway the test stopped itself is not scraped."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relaybus.harness import GatewayProcess

COUNTERS = ("relaybus_handshakes_refused_total", "relaybus_connections_refused_total",
            "relaybus_requests_refused_total", "relaybus_requests_rate_limited_total",
            "relaybus_tokens_expired_total", "relaybus_token_refreshes_refused_total",
            "relaybus_slow_clients_closed_total", "relaybus_client_log_entries_dropped_total",
            "relaybus_requests_accepted_total", "relaybus_requests_ended_total",
            "relaybus_frames_refused_total", "relaybus_connections_closed_total",
            "relaybus_jwks_refreshes_total")

# nodeid -> {"result": ..., "metrics": Counter of the COUNTERS samples}, in the order run
_cases: dict[str, dict[str, Any]] = {}


def _case(nodeid: str) -> dict[str, Any]:
    return _cases.setdefault(nodeid, {"result": "not run", "metrics": collections.Counter()})


@pytest.fixture(autouse=True)
def _scrapeGateways(request: pytest.FixtureRequest, processes: Any) -> Iterator[None]:
    """Torn down before `processes` (which this depends on) stops the gateways."""
    yield
    counted = _case(request.node.nodeid)["metrics"]
    for process in processes.processes:
        if isinstance(process, GatewayProcess) and process.running:
            try:
                samples = process.metrics()
            except OSError:
                continue
            counted.update({name: value for name, value in samples.items()
                            if name.startswith(COUNTERS) and value})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    case = _case(report.nodeid)
    if report.failed:
        case["result"] = "FAILED" if report.when == "call" else f"ERROR ({report.when})"
    elif report.skipped and case["result"] == "not run":
        case["result"] = "skipped"
    elif report.when == "call" and report.passed:
        case["result"] = "passed"


def _short(name: str) -> str:
    return name.removeprefix("relaybus_").replace("_total", "")


def summary() -> list[str]:
    lines = ["| case | result | what its gateways' /metrics counted |", "|---|---|---|"]
    totals: collections.Counter[str] = collections.Counter()
    for nodeid, case in _cases.items():
        metrics = case["metrics"]
        totals.update(metrics)
        counted = ", ".join(f"{_short(k)} {v:.0f}" for k, v in sorted(metrics.items()))
        name = nodeid.split("tests/security/")[-1].replace("|", "\\|")
        lines.append(f"| `{name}` | {case['result']} | "
                     f"{counted or '-'} |")
    results = collections.Counter(case["result"] for case in _cases.values())
    lines += ["", f"{len(_cases)} cases: " + ", ".join(f"{n} {r}" for r, n in
                                                      sorted(results.items())), "",
              "| /metrics after the suite (all gateways) | total |", "|---|---|"]
    lines += [f"| `{name}` | {value:.0f} |" for name, value in sorted(totals.items())]
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _cases:
        return
    lines = summary()
    terminalreporter.write_sep("=", "security suite: cases and /metrics")
    for line in lines:
        terminalreporter.write_line(line)
    path = os.environ.get("RELAYBUS_SECURITY_REPORT")
    if path:
        Path(path).write_text("\n".join(lines) + "\n")
