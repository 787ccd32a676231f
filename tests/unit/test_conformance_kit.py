"""The conformance kit's parts that need no broker: its quotes of docs/protocol.md, its table,
its JSON comparison, its AMQP integer widths, the exit status of a process it did not start,
the four conformance handlers of the Python runtime, and the command line."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import pika.data
import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from unitsupport import assertNoResult, failureResultOf, successResultOf

import relaybus.conformance as handlers
from relaybus.cli import main
from relaybus.conformance import kit
from relaybus.conformance.wire import AmqpInteger, integerWidths, safeURL
from relaybus.errors import ErrorCode, RelaybusError
from relaybus.handlers import registerHandlers
from relaybus.testing import FakeRequestStream
from relaybus.worker import HandlerRequest

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
KIT_DOC = Path(__file__).resolve().parents[2] / "docs" / "workers-any-language.md"


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# What the kit quotes, and its order


@pytest.mark.parametrize("scenario", kit.SCENARIOS, ids=lambda s: s.name)
def test_every_quoted_sentence_is_in_protocol_md(scenario: kit.Scenario) -> None:
    page = _flat(PROTOCOL.read_text())
    assert scenario.sentences
    for sentence in scenario.sentences:
        assert _flat(sentence) in page, f"{scenario.name}: not in docs/protocol.md: {sentence}"


def test_every_scenario_is_documented_for_worker_authors() -> None:
    page = KIT_DOC.read_text()
    for scenario in kit.SCENARIOS:
        assert f"`{scenario.name}`" in page, scenario.name


def test_scenario_names_are_unique_and_the_signal_one_runs_last() -> None:
    names = [s.name for s in kit.SCENARIOS]
    assert len(set(names)) == len(names)
    assert [s.name for s in kit.SCENARIOS if s.needsPid] == ["sigterm-drain"]
    assert kit.SCENARIOS[-1].name == "sigterm-drain"
    assert kit.SCENARIOS[0].name == "topology"


# Running and the table


def _scenario(name: str, check: Any, needsPid: bool = False) -> kit.Scenario:
    return kit.Scenario(name, (f"the sentence of {name}",), check, needsPid)


def _raise(seen: str) -> Any:
    def check(_ctx: Any) -> None:
        raise kit.KitError(seen)

    return check


def _context(workerPid: int | None = None) -> Any:
    return kit.Context(broker=None, socket=None, gateway=None,  # type: ignore[arg-type]
                       openSocket=lambda: None, timeoutS=1.0,  # type: ignore[arg-type,return-value]
                       workerPid=workerPid, prefix="p.")


def test_results_pass_fail_and_skip() -> None:
    scenarios = [_scenario("topology", lambda ctx: None),
                 _scenario("a", lambda ctx: "a note"),
                 _scenario("b", _raise("the worker said hello")),
                 _scenario("c", lambda ctx: 1 / 0),
                 _scenario("d", lambda ctx: None),
                 _scenario("e", lambda ctx: None, needsPid=True)]
    results = kit.runScenarios(_context(), frozenset({"d"}), scenarios)
    assert [(r.scenario.name, r.status, r.detail) for r in results] == [
        ("topology", "pass", None), ("a", "pass", "a note"),
        ("b", "FAIL", "the worker said hello"),
        ("c", "FAIL", "ZeroDivisionError: division by zero"),
        ("d", "skipped", "--skip"), ("e", "skipped", "needs --worker-pid")]
    table = kit.formatTable(results)
    assert "\nFAIL     b" in table
    assert "seen: the worker said hello" in table
    assert "“the sentence of b”" in table
    assert re.search(r"skipped  e +\(needs --worker-pid\)", table)
    assert table.endswith("6 scenarios: 2 passed, 2 failed, 2 skipped")
    withPid = kit.runScenarios(_context(workerPid=1), frozenset(), scenarios[-1:])
    assert [r.status for r in withPid] == ["pass"]


def test_without_a_topology_the_rest_is_not_run() -> None:
    ran = []
    scenarios = [_scenario("topology", _raise("queue 'p.requests.conformance.echo': 404")),
                 _scenario("echo", lambda ctx: ran.append("echo"))]
    results = kit.runScenarios(_context(), frozenset(), scenarios)
    assert [r.status for r in results] == ["FAIL", "FAIL"]
    assert "not run" in str(results[1].detail)
    assert ran == []


def test_safe_url_hides_the_password() -> None:
    assert safeURL("amqp://bob:s3cret@rabbit:5672/v") == "amqp://bob:***@rabbit:5672/v"
    assert "s3cret" not in safeURL("amqps://bob:s3cret@rabbit/v")
    assert safeURL("amqp://rabbit/") == "amqp://rabbit/"


# Comparing JSON


@pytest.mark.parametrize("a, b, same", [
    (1, 1.0, True), (True, 1, False), (False, 0, False), (None, None, True),
    ({"a": [1, True]}, {"a": [1, True]}, True), ({"a": [1, True]}, {"a": [1, 1]}, False),
    ([1, 2], [1, 2, 3], False), ({"a": 1}, {"a": 1, "b": 2}, False), ("1", 1, False),
    (kit._deep(100), kit._deep(100), True),
])
def test_same_json(a: Any, b: Any, same: bool) -> None:
    assert kit.sameJSON(a, b) is same


def test_the_odd_payloads_are_strict_json() -> None:
    from relaybus.strictjson import decodeJSON, encodeJSON

    for payload in [*kit.ODD_JSON, kit._deep(100)]:
        assert kit.sameJSON(decodeJSON(encodeJSON(payload)), payload)


# AMQP integers of every width


def _roundTrip(headers: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    with integerWidths():
        encoded = b"".join(pika.BasicProperties(headers=headers).encode())
    decoded = pika.BasicProperties()
    decoded.decode(encoded)
    return encoded, decoded.headers


@pytest.mark.parametrize("kind, value", [
    (b"b", -128), (b"B", 255), (b"s", -32768), (b"u", 65535), (b"I", -2**31),
    (b"i", 2**32 - 1), (b"l", 2**63 - 1)])
def test_integers_go_out_in_the_width_asked_for(kind: bytes, value: int) -> None:
    encoded, headers = _roundTrip({"h": AmqpInteger(kind, value)})
    assert b"\x01h" + kind in encoded
    assert headers == {"h": value}


def test_doubles_and_nested_values_are_encoded_too() -> None:
    encoded, headers = _roundTrip({"d": 2.5, "t": {"x": AmqpInteger(b"b", -1)},
                                   "a": [AmqpInteger(b"u", 7), "s"]})
    assert b"\x01dd" + struct.pack(">d", 2.5) in encoded
    assert b"\x01xb\xff" in encoded
    # (pika 1.4.4 itself decodes a double as an integer: 2.5 comes back as 2)
    assert headers == {"d": 2, "t": {"x": -1}, "a": [7, "s"]}


def test_the_patch_is_only_there_while_publishing() -> None:
    original = pika.data.encode_value
    with integerWidths():
        assert pika.data.encode_value is not original
    assert pika.data.encode_value is original
    with pytest.raises(Exception):  # noqa: B017 - pika's own encoder does not know it
        pika.BasicProperties(headers={"h": AmqpInteger(b"b", 1)}).encode()


@pytest.mark.parametrize("hostile", [(b"b", 128), (b"B", -1), (b"u", 65536), (b"q", 1)])
def test_an_integer_that_does_not_fit_its_width_is_refused(hostile: tuple[bytes, int]) -> None:
    kind, value = hostile
    with pytest.raises((ValueError, KeyError, Exception)):
        AmqpInteger(kind, value).encode()


# The exit of a process the kit did not start


def test_process_exit_of_a_zombie_and_of_a_reaped_process() -> None:
    assert kit.processExit(subprocess.os.getpid()) is None  # type: ignore[attr-defined]
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    deadline = time.monotonic() + 10
    while kit.processExit(child.pid) is None:  # a zombie until it is reaped
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert kit.processExit(child.pid) == "exit 3"
    assert child.wait(5) == 3
    assert kit.processExit(child.pid) == "reaped"


# The Python runtime's four handlers


def _request(payload: Any, requestType: str) -> HandlerRequest:
    return HandlerRequest(payload=payload, requestType=requestType, correlationId="c-1",
                          deadline=1e12, redelivered=False, principal=None)


def _start(handler: Any, payload: Any) -> tuple[Deferred[Any], FakeRequestStream]:
    """As the runtime calls it: a plain result, a raise or a coroutine, all as a Deferred."""
    stream = FakeRequestStream()

    async def call() -> Any:
        result = handler.handle(_request(payload, handler.requestType), stream)
        return (await result) if hasattr(result, "__await__") else result

    return ensureDeferred(call()), stream


def test_the_module_registers_the_four_types_none_idempotent() -> None:
    registry = registerHandlers("relaybus.conformance")
    assert sorted(registry) == sorted(handlers.REQUEST_TYPES)
    assert not any(h.idempotent for h in registry.values())


def test_echo_returns_the_payload() -> None:
    for payload in kit.ODD_JSON:
        d, stream = _start(handlers.echo, payload)
        assert successResultOf(d) == payload and stream.chunks == []


def test_stream_sends_count_chunks_delay_apart_the_first_at_once() -> None:
    clock = Clock()
    d, stream = _start(handlers.ConformanceStream(clock), {"count": 3, "delayMs": 100})
    assert stream.chunks == [{"index": 0}]
    clock.advance(0.1)
    assert stream.chunks == [{"index": 0}, {"index": 1}]
    clock.advance(0.1)
    assert successResultOf(d) == {"count": 3}
    assert stream.chunks == [{"index": i} for i in range(3)]


@pytest.mark.parametrize("payload", [
    None, [], "x", {"count": -1}, {"count": 1001}, {"count": True}, {"count": 1.5},
    {"count": 1, "delayMs": 10_001}, {"count": "3"}])
def test_stream_refuses_bad_payloads(payload: Any) -> None:
    d, _ = _start(handlers.ConformanceStream(Clock()), payload)
    assert failureResultOf(d, RelaybusError).value.code == ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("code, sent", [
    ("timeout", "timeout"), ("cancelled", "cancelled"), ("worker_lost", "worker_lost"),
    ("no_handler", "handler_error"), ("x" * 64, "handler_error")])
def test_fail_replies_the_code_it_is_given(code: str, sent: str) -> None:
    d, _ = _start(handlers.fail, {"code": code, "message": "M ✓"})
    error = failureResultOf(d, RelaybusError).value
    assert (str(error.code), error.message) == (sent, "M ✓")


@pytest.mark.parametrize("payload", [
    {"code": "timeout"}, {"message": "m"}, {"code": 1, "message": "m"},
    {"code": "x" * 65, "message": "m"}, {"code": "c", "message": "m" * 1025}, [1]])
def test_fail_refuses_bad_payloads(payload: Any) -> None:
    d, _ = _start(handlers.fail, payload)
    assert failureResultOf(d, RelaybusError).value.code == ErrorCode.BAD_REQUEST


def test_slow_runs_until_cancelled() -> None:
    clock = Clock()
    d, stream = _start(handlers.ConformanceSlow(clock), {})
    clock.advance(3600)
    assertNoResult(d)
    d.cancel()
    failureResultOf(d)
    d, stream = _start(handlers.ConformanceSlow(clock), {"chunkEveryMs": 50})
    clock.pump([0.05] * 4)
    assert stream.chunks == [{"index": i} for i in range(4)]
    d.cancel()
    failureResultOf(d)
    clock.advance(1)
    assert len(stream.chunks) == 4 and clock.getDelayedCalls() == []


@pytest.mark.parametrize("payload", [{"chunkEveryMs": 0}, {"chunkEveryMs": "5"}, [],
                                     {"chunkEveryMs": 10_001}])
def test_slow_refuses_bad_payloads(payload: Any) -> None:
    d, _ = _start(handlers.ConformanceSlow(Clock()), payload)
    assert failureResultOf(d, RelaybusError).value.code == ErrorCode.BAD_REQUEST


# The command line


@pytest.mark.parametrize("argv, complaint", [
    (["conformance"], "--broker"),
    (["conformance", "--broker", "http://x/"], "amqp://"),
    (["conformance", "--broker", "amqp://h/", "--skip", "nope"], "no scenario nope"),
    (["conformance", "--broker", "amqp://h/", "--timeout", "0"], "--timeout"),
    (["conformance", "--broker", "amqp://h/", "--worker-pid", "-3"], "--worker-pid"),
    (["conformance", "--broker", "amqp://h/", "--amqp-prefix", "p" * 200], "--amqp-prefix"),
    (["conformance", "--broker", "amqp://h/", "--amqp-prefix", "a b\n"], "--amqp-prefix"),
])
def test_conformance_usage_errors(argv: list[str], complaint: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert complaint in capsys.readouterr().err
