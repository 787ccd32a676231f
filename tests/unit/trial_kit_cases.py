"""The handler testing kit under trial (run by test_handler_kit.py in a subprocess: pytest and
trial test cases must not share a process). A trial test may return the kit's Deferred."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from workers import blocking_examples, examples

from relaybus.testing import HandlerOutcome, runHandler


class KitUnderTrial(TestCase):
    def test_on_a_clock(self) -> None:
        clock = Clock()
        run = runHandler(examples.TestRequestHandler(clock), {"count": 2, "delayMs": 10},
                         clock=clock)
        clock.pump([0.01, 0.01])  # one step per delay: a Clock runs what falls due
        self.assertEqual(run.outcome.result["chunks"], 2)

    def test_returning_the_deferred_on_the_real_reactor(self) -> Any:
        run = runHandler(examples.TestRequestHandler(reactor), {"count": 2, "delayMs": 5},
                         clock=reactor)

        def check(outcome: HandlerOutcome) -> None:
            self.assertTrue(outcome.ok)
            self.assertEqual(len(outcome.chunks), 2)

        return run.finished().addCallback(check)

    def test_a_blocking_handler_in_a_real_thread(self) -> Any:
        run = runHandler(blocking_examples.slowDigest, {"steps": 2, "roundsPerStep": 100},
                         clock=reactor, threads=1)
        return run.finished().addCallback(lambda outcome: self.assertTrue(outcome.ok))

    def test_cancelling_a_blocking_handler_leaves_the_reactor_clean(self) -> Any:
        run = runHandler(blocking_examples.slowDigest, {"steps": 5, "roundsPerStep": 300_000},
                         clock=reactor, threads=1)
        reactor.callLater(0.05, run.cancel)
        return run.finished().addCallback(
            lambda outcome: self.assertEqual(outcome.errorCode, "cancelled"))
