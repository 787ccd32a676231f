"""Load and bookkeeping for the fault-injection tests (test_broker_faults, test_worker_faults).

`LoadClient` keeps many requests in flight on one WebSocket connection from a thread of its own,
so a test can break the broker or a worker underneath them. `Tally` then checks protocol rule 1
for every request any client sent: exactly one terminal frame, chunks numbered 0, 1, 2, ... and
none after the terminal frame. Its figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed

from processfixtures import Client, newRequestId

TERMINAL_TYPES = ("response", "error")
DRAIN_TIMEOUT_S = 30.0  # how long a stopped LoadClient waits for its last requests to end


def outcomeOf(frame: dict[str, Any]) -> str:
    """"response", or the error code of an error frame."""
    return "response" if frame["type"] == "response" else str(frame["error"]["code"])


class LoadClient(threading.Thread):
    """One connection that keeps up to `inFlight` requests going, at most `perSecond` new ones a
    second, until `finish()`; then waits (bounded) for the ones still in flight to end.

    `nextRequest(n)` gives the n-th request's (requestType, payload). Only this thread touches
    the client until `finish()` returns; every frame stays in `client.received`.
    """

    def __init__(self, client: Client, name: str,
                 nextRequest: Callable[[int], tuple[str, Any]], inFlight: int,
                 perSecond: float, timeoutMs: int) -> None:
        super().__init__(name=f"load-{name}", daemon=True)
        self.client = client
        self.label = name
        self.sent: list[str] = []
        self._outstanding: set[str] = set()
        self._lock = threading.Lock()  # for _outstanding, read by snapshot() in other threads
        self.failure: BaseException | None = None
        self._nextRequest = nextRequest
        self._inFlight = inFlight
        self._perSecond = perSecond
        self._timeoutMs = timeoutMs
        self._sending = threading.Event()
        self._sending.set()
        self._seen = 0

    def run(self) -> None:
        try:
            started = time.monotonic()
            while self._sending.is_set():
                allowed = int((time.monotonic() - started) * self._perSecond) - len(self.sent)
                while allowed > 0 and len(self._outstanding) < self._inFlight:
                    self._send()
                    allowed -= 1
                self._receive(0.02)
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while self._outstanding and time.monotonic() < deadline:
                self._receive(min(0.2, deadline - time.monotonic()))
        except BaseException as e:  # reported by finish(), in the test's thread
            self.failure = e

    def _send(self) -> None:
        requestType, payload = self._nextRequest(len(self.sent))
        requestId = self.client.request(requestType, payload, f"{self.label}-{len(self.sent)}",
                                        timeoutMs=self._timeoutMs)
        self.sent.append(requestId)
        with self._lock:
            self._outstanding.add(requestId)

    def _receive(self, timeout: float) -> None:
        try:
            self.client.receiveOne(timeout)
        except ConnectionClosed as e:
            raise AssertionError(f"{self.label}: the gateway closed the connection ({e})") from e
        received = self.client.received
        with self._lock:
            for frame in received[self._seen:]:
                if frame.get("type") in TERMINAL_TYPES:
                    self._outstanding.discard(frame.get("requestId"))
        self._seen = len(received)
        self.client.unread.clear()  # nothing reads them one by one; `received` keeps them

    def snapshot(self) -> set[str]:
        """The requests in flight right now."""
        with self._lock:
            return set(self._outstanding)

    def stop(self) -> None:
        self._sending.clear()

    def finish(self) -> None:
        """Stop sending, wait for what is in flight to end, then check the connection still
        carries a request (so a late duplicate would have had time to show)."""
        self.stop()
        self.join(DRAIN_TIMEOUT_S + 10)
        assert not self.is_alive(), f"{self.label} is still running"
        if self.failure is not None:
            raise AssertionError(f"{self.label} failed: {self.failure!r}") from self.failure
        barrier = self.client.request("echo", "barrier", newRequestId(f"{self.label}-barrier"),
                                      timeoutMs=10_000)
        self.sent.append(barrier)
        assert self.client.collect(barrier).terminal["type"] == "response"


@contextlib.contextmanager
def loadRunning(clients: Iterable[Client], nextRequest: Callable[[int], tuple[str, Any]],
                inFlight: int, perSecond: float, timeoutMs: int) -> Iterator[list[LoadClient]]:
    """A LoadClient on each client; the test calls finish() on each, and a failing test
    leaves none of them sending."""
    loads = [LoadClient(client, f"c{i}", nextRequest, inFlight, perSecond, timeoutMs)
             for i, client in enumerate(clients)]
    for load in loads:
        load.start()
    try:
        yield loads
    finally:
        for load in loads:
            load.stop()


def inFlight(loads: Iterable[LoadClient]) -> int:
    return sum(len(load.snapshot()) for load in loads)


def finishAll(loads: Iterable[LoadClient]) -> None:
    for load in loads:
        load.stop()  # all at once, then wait for each
    for load in loads:
        load.finish()


def firstOutcomes(client: Client) -> dict[str, str]:
    """requestId -> the outcome of its first terminal frame, for every request on `client`."""
    outcomes: dict[str, str] = {}
    for frame in client.received:
        if frame.get("type") in TERMINAL_TYPES:
            outcomes.setdefault(frame.get("requestId"), outcomeOf(frame))
    return outcomes


class Tally:
    """Every request sent, checked against what came back on its connection."""

    def __init__(self) -> None:
        self.sent = 0
        self.terminalFrames = 0
        self.lost: list[str] = []
        self.duplicated: list[str] = []
        self.misordered: list[str] = []  # a chunk out of sequence or after the end
        self.outcomes: collections.Counter[str] = collections.Counter()

    def add(self, client: Client, requestIds: Iterable[str]) -> Tally:
        """Count the requests `requestIds` sent on `client` (other frames are not looked at)."""
        asked = set(requestIds)
        self.sent += len(asked)
        terminals: collections.Counter[str] = collections.Counter()
        chunks: collections.Counter[str] = collections.Counter()
        for frame in client.received:
            requestId = frame.get("requestId")
            if requestId not in asked:
                continue
            if frame["type"] in TERMINAL_TYPES:
                terminals[requestId] += 1
                if terminals[requestId] == 1:
                    self.outcomes[outcomeOf(frame)] += 1
            elif frame["type"] != "chunk":
                self.misordered.append(f"{requestId}: unexpected frame {frame}")
            elif terminals[requestId] or frame.get("seq") != chunks[requestId]:
                self.misordered.append(f"{requestId}: chunk seq {frame.get('seq')} after "
                                       f"{chunks[requestId]} chunks and "
                                       f"{terminals[requestId]} terminal frames")
            else:
                chunks[requestId] += 1
        self.terminalFrames += sum(terminals.values())
        self.lost += sorted(asked - set(terminals))
        self.duplicated += sorted(r for r, n in terminals.items() if n > 1)
        return self

    @classmethod
    def of(cls, loads: Iterable[LoadClient]) -> Tally:
        tally = cls()
        for load in loads:
            tally.add(load.client, load.sent)
        return tally

    def report(self, title: str) -> str:
        text = (f"{title}: requests sent {self.sent}, terminal frames {self.terminalFrames}, "
                f"lost {len(self.lost)}, duplicated {len(self.duplicated)}, "
                f"misordered {len(self.misordered)}; outcomes {dict(self.outcomes)}")
        print(text)
        return text

    def assertExactlyOnce(self, title: str, allowed: Iterable[str] | None = None) -> None:
        """Print the figures; fail on any request without exactly one terminal frame, any
        chunk out of place, or (given `allowed`) an outcome not in `allowed`."""
        text = self.report(title)
        assert not self.lost, f"{text}\nlost: {self.lost[:20]}"
        assert not self.duplicated, f"{text}\nduplicated: {self.duplicated[:20]}"
        assert not self.misordered, f"{text}\n" + "\n".join(self.misordered[:20])
        if allowed is not None:
            unexpected = set(self.outcomes) - set(allowed)
            assert not unexpected, f"{text}\nunexpected outcomes: {sorted(unexpected)}"
