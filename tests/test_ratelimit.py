"""
Tests for L{smtprelay.inbound.ratelimit}: anvil-like windows on a fake clock,
bounded memory, whose events count.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.interfaces import ClientSession
from smtprelay.inbound.policy import RateLimits
from smtprelay.inbound.ratelimit import ListenerRates, RateCounter
from smtprelay.protocol.replies import Refusal, reply



def client(host: str = "192.0.2.7", user: str | None = None) -> ClientSession:
    return ClientSession(id="S1", protocol="smtp", clientHost=host, user=user)


class RateCounterTests(SynchronousTestCase):
    def test_fixedWindow(self) -> None:
        """
        A key's window starts at its first event and lasts C{window}
        seconds; the next event after it starts a new window at 1.
        """
        clock = Clock()
        counter = RateCounter(60, clock)
        self.assertEqual([counter.count("mail", "a") for _ in range(3)], [1, 2, 3])
        clock.advance(59.9)
        self.assertEqual(counter.count("mail", "a"), 4)
        clock.advance(0.1)
        self.assertEqual(counter.count("mail", "a"), 1)

    def test_keysAndEventsApart(self) -> None:
        clock = Clock()
        counter = RateCounter(60, clock)
        counter.count("mail", "a")
        self.assertEqual(counter.count("mail", "b"), 1)
        self.assertEqual(counter.count("rcpt", "a"), 1)
        self.assertEqual(counter.count("mail", "a"), 2)

    def test_bounded(self) -> None:
        """
        Past C{maxKeys}, the least recently counted key is forgotten; a
        recently counted one is kept.
        """
        clock = Clock()
        counter = RateCounter(60, clock, maxKeys=3)
        for key in "abc":
            counter.count("mail", key)
        counter.count("mail", "a")
        counter.count("mail", "d")
        self.assertEqual(len(counter), 3)
        self.assertEqual(counter.count("mail", "a"), 3)
        self.assertEqual(counter.count("mail", "b"), 1)


class ListenerRatesTests(SynchronousTestCase):
    def rates(self, exempt: frozenset[str] = frozenset(), **kw: Any) -> tuple[ListenerRates, Clock]:
        clock = Clock()
        return ListenerRates(RateLimits(**kw), clock, lambda host: host in exempt), clock

    def test_userCountsApartFromAddress(self) -> None:
        """
        An authenticated session's messages count against its user, wherever
        it connects from; an unauthenticated one's against its address.
        """
        rates, _ = self.rates(messages=1)
        self.assertIsNone(rates.message(client(user="alice")))
        self.assertIsNone(rates.message(client("192.0.2.8", user="bob")))
        self.assertIsNone(rates.message(client()))
        self.assertEqual(rates.message(client("192.0.2.9", user="alice")),
                         Refusal(reply(450, "4.7.1", "Error: too much mail from alice"), "rate_messages"))
        self.assertEqual(rates.message(client()),
                         Refusal(reply(450, "4.7.1", "Error: too much mail from 192.0.2.7"), "rate_messages"))

    def test_offExemptAndUnix(self) -> None:
        """
        0 is no limit; exempt addresses and unix-socket clients are never
        counted.
        """
        rates, _ = self.rates(recipients=0)
        self.assertTrue(all(rates.recipient(client()) is None for _ in range(1000)))
        rates, _ = self.rates(frozenset({"192.0.2.7"}), recipients=1, connections=1)
        for _ in range(3):
            self.assertIsNone(rates.recipient(client()))
            self.assertIsNone(rates.connection(client()))
            self.assertIsNone(rates.connection(client("", user="alice")))

    def test_refusedAttemptsCount(self) -> None:
        """
        Refused attempts count too, as anvil counts them: the client stays
        refused until its window is over.
        """
        rates, clock = self.rates(connections=1, window=10)
        self.assertIsNone(rates.connection(client()))
        for _ in range(5):
            clock.advance(1)
            self.assertIsNotNone(rates.connection(client()))
        clock.advance(5)
        self.assertIsNone(rates.connection(client()))
