"""
Tests for L{smtprelay.relay.pool}: which idle connections are kept, and for
how long.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.relay.pool import MAX_IDLE, Pool, ReusePolicy


class Connection:
    """
    The part of an L{smtprelay.interfaces.IDownstream} the pool uses.
    """

    def __init__(self, address: str, connectedAt: float = 0.0) -> None:
        self.address = address
        self.connectedAt = connectedAt
        self.idle = True
        self.quitted = self.aborted = False

    def quit(self) -> None:
        self.quitted = True

    def abort(self) -> None:
        self.aborted = True


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = Pool(ReusePolicy(idleTime=2.0, timeLimit=60.0), self.clock)

    def test_newestFirstPerAddress(self) -> None:
        """
        C{take} gives the newest idle connection to that address, once.
        """
        older, newer, other = Connection("a"), Connection("a"), Connection("b")
        for c in (older, newer, other):
            self.pool.release(c)  # type: ignore[arg-type]  # a fake IDownstream
        self.assertIs(self.pool.take("a"), newer)
        self.assertIs(self.pool.take("a"), older)
        self.assertIsNone(self.pool.take("a"))
        self.assertIs(self.pool.take("b"), other)
        self.assertFalse(self.pool)

    def test_atMostMaxIdle(self) -> None:
        """
        Beyond L{MAX_IDLE} idle connections, one more is QUIT.
        """
        kept = [Connection("a") for _ in range(MAX_IDLE)]
        extra = Connection("a")
        for c in kept + [extra]:
            self.pool.release(c)  # type: ignore[arg-type]  # a fake IDownstream
        self.assertEqual([c.quitted for c in kept], [False] * MAX_IDLE)
        self.assertTrue(extra.quitted)

    def test_staleDroppedOnTake(self) -> None:
        """
        A connection that stopped being idle while it waited is aborted, and
        the next one is tried.
        """
        good, stale = Connection("a"), Connection("a")
        self.pool.release(good)  # type: ignore[arg-type]  # a fake IDownstream
        self.pool.release(stale)  # type: ignore[arg-type]  # a fake IDownstream
        stale.idle = False
        self.assertIs(self.pool.take("a"), good)
        self.assertTrue(stale.aborted)

    def test_notKept(self) -> None:
        """
        A busy connection, one past its time limit, and any under no reuse
        policy (a connection that carries a client's identity) are QUIT.
        """
        busy, old = Connection("a"), Connection("a", connectedAt=-60.0)
        busy.idle = False
        for c in (busy, old):
            self.pool.release(c)  # type: ignore[arg-type]  # a fake IDownstream
        personal = Connection("a")
        Pool(None, self.clock).release(personal)  # type: ignore[arg-type]  # a fake IDownstream
        disabled = Connection("a")
        Pool(ReusePolicy(enabled=False), self.clock).release(disabled)  # type: ignore[arg-type]  # a fake IDownstream
        self.assertEqual([c.quitted for c in (busy, old, personal, disabled)], [True] * 4)
        self.assertFalse(self.pool)

    def test_idleTimeAndClose(self) -> None:
        """
        An idle connection is QUIT after the idle time; C{close} QUITs the
        rest and keeps no more.
        """
        first = Connection("a")
        self.pool.release(first)  # type: ignore[arg-type]  # a fake IDownstream
        self.clock.advance(2.0)
        self.assertTrue(first.quitted)
        second, third = Connection("a"), Connection("a")
        self.pool.release(second)  # type: ignore[arg-type]  # a fake IDownstream
        self.pool.close()
        self.pool.release(third)  # type: ignore[arg-type]  # a fake IDownstream
        self.assertTrue(second.quitted and third.quitted)
        self.assertEqual(self.clock.getDelayedCalls(), [])
