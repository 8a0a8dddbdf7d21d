"""
Tests for L{smtprelay.app.service.RelayService}: whether it serves, and its
graceful stop.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from smtprelay.config import loadString
from smtprelay.app.service import makeService

from .procs import HOST, freePort


class ServingTests(TestCase):
    @inlineCallbacks
    def test_servingWhileListening(self) -> Generator[Deferred[Any], Any, None]:
        """
        The relay serves (what C{/healthz} reports) from its start until
        its stop begins; a listener stopped alone makes it not serve.
        """
        config = loadString(
            f"smtp tcp://{HOST}:{freePort()} {{\n deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n"
        )
        root = makeService(config, reactor)
        self.assertFalse(root.serving())
        root.privilegedStartService()
        root.startService()
        self.assertTrue(root.serving())
        [listener] = root._listeners
        yield listener.stopService()
        self.assertFalse(root.serving())
        listener.startService()
        self.assertTrue(root.serving())
        stopped = root.stopService()
        self.assertFalse(root.serving())
        yield stopped


class StopTests(TestCase):
    @inlineCallbacks
    def test_idleDownstreamsClosedAfterDrain(self) -> Generator[Deferred[Any], Any, None]:
        """
        Stopping closes every target's idle downstream connections (once,
        after the sessions drained), so that none outlives the relay.
        """
        config = loadString(
            f"smtp tcp://{HOST}:{freePort()} {{\n deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n"
        )
        root = makeService(config, reactor)
        root.privilegedStartService()
        root.startService()
        [failover] = root.failovers.values()
        closed: list[str] = []
        failover.close = lambda: closed.append(failover.policy.name)  # type: ignore[method-assign]  # a spy on the method
        self.assertEqual(closed, [])
        yield root.stopService()
        self.assertEqual(closed, [failover.policy.name])


class ReloadTests(TestCase):
    def test_usersFileReloaded(self) -> None:
        """
        C{reload} (SIGHUP) re-reads an C{auth users} file: the next AUTH is
        checked against the new users.  A file that no longer parses keeps
        the old users.
        """
        import bcrypt

        from smtprelay.interfaces import ClientSession

        users = self.mktemp()

        def write(name: str, password: bytes) -> None:
            with open(users, "wb") as f:
                f.write(name.encode() + b":" + bcrypt.hashpw(password, bcrypt.gensalt(4)) + b"\n")

        write("alice", b"one")
        config = loadString(
            f"smtp tcp://{HOST}:{freePort()} {{\n auth users {users}\n"
            f" deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n"
        )
        root = makeService(config, reactor)
        [factory] = root.factories

        def authenticate(user: str, password: str) -> int:
            handler = factory.handlerFactory(ClientSession(id="S", protocol="smtp", clientHost=HOST))
            return self.successResultOf(handler.authenticate("PLAIN", user, password)).code

        self.assertEqual((authenticate("alice", "one"), authenticate("bob", "two")), (235, 535))
        write("bob", b"two")
        root.reload()
        self.assertEqual((authenticate("alice", "one"), authenticate("bob", "two")), (535, 235))
        with open(users, "wb") as f:
            f.write(b"carol:not-a-hash\n")
        root.reload()
        self.assertEqual(authenticate("bob", "two"), 235)
