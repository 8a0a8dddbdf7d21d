"""
The whole relay in memory: a client's bytes → the inbound engine → the relay
session → failover and the outbound engine → a scripted fake downstream
(L{smtprelay.testing.downstream}).  Each test asserts what the client saw
and the exact bytes the downstream received (SPEC §4.3–§4.8).
"""

from __future__ import annotations

import re

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config.model import Address, Listener, Target
from smtprelay.failover import Failover
from smtprelay.relay import RelaySession
from smtprelay.routing import Route, Router
from smtprelay.server import SMTPServerFactory
from smtprelay.testing.downstream import CLOSE, MemoryNetwork, Script

from .server_helpers import LOOPBACK, FakeTransport

FIRST = Address("tcp", "mx1.example", 25)
SECOND = Address("tcp", "mx2.example", 25)
HELLO = b"EHLO client.test\r\n"
GREETING_AND_EHLO = re.compile(rb"\A220 [^\r]*\r\n(250-[^\r]*\r\n)*250 [^\r]*\r\n\Z")


class Stack:
    """
    One client connection through the whole relay to fakes in a
    L{MemoryNetwork}.
    """

    def __init__(self, case: SynchronousTestCase, scripts: dict[Address, Script | None],
                 endpoints: tuple[Address, ...] = (FIRST,)) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.servers = {a: self.network.add(str(a), s) for a, s in scripts.items() if s is not None}
        target = Target(name="t", protocol="smtp", endpoints=endpoints, hostname="relay.test",
                        attemptStartTLS=False)
        listener = Listener(kind="smtp", addresses=(Address("tcp", "127.0.0.1", 2525),), deliverTo=target)
        failover = Failover(target, self.clock, endpointFactory=self.network)
        routes = Router.single(Route(target, failover.open, lambda downstream: downstream.quit()))
        factory = SMTPServerFactory(
            listener,
            lambda session: RelaySession(session, listener, routes, "relay.test", self.clock),
            "relay.test", self.clock,
        )
        factory.newSessionId = lambda: "SID"
        self.protocol = factory.buildProtocol(LOOPBACK)
        self.transport = FakeTransport(LOOPBACK)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        case.assertRegex(self.send(HELLO), GREETING_AND_EHLO)

    def send(self, data: bytes) -> bytes:
        """
        The client sends C{data}; every connection moves until quiet; return
        what the client received.
        """
        self.protocol.dataReceived(data)
        for _ in range(20):
            self.network.flush()
        out = self.transport.value()
        self.transport.clear()
        return out

    def downstream(self, address: Address = FIRST, index: int = 0):  # type: ignore[no-untyped-def]
        return self.servers[address].connections[index]


class EndToEndTests(SynchronousTestCase):
    def test_transaction(self) -> None:
        """
        The client sees the downstream's replies; the downstream receives the
        envelope, our Received: header and the body dot-stuffed again.
        """
        stack = Stack(self, {FIRST: Script()})
        self.assertEqual(stack.send(b"MAIL FROM:<s@example.org> SIZE=30\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(stack.send(b"RCPT TO:<r@example.net>\r\n"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(stack.send(b"DATA\r\n"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(stack.send(b"Subject: x\r\n\r\n..dot\r\n.\r\n"), b"250 2.0.0 Ok: queued\r\n")
        fake = stack.downstream()
        self.assertEqual(fake.commands[:4], [b"EHLO relay.test", b"MAIL FROM:<s@example.org> SIZE=30",
                                             b"RCPT TO:<r@example.net>", b"DATA"])
        [message] = fake.messages
        self.assertTrue(message.startswith(b"Received: from client.test ([127.0.0.1])\r\n"
                                           b"\tby relay.test (smtprelay) with ESMTP id SID\r\n"
                                           b"\tfor <r@example.net>; "), message)
        self.assertTrue(message.endswith(b"\r\nSubject: x\r\n\r\n..dot\r\n.\r\n"), message)
        self.assertEqual(stack.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(fake.commands[-1], b"QUIT")

    def test_rcptRefusalVerbatim(self) -> None:
        stack = Stack(self, {FIRST: Script(rcpt={b"x@example.net": b"550 5.1.1 <x@example.net>: unknown\r\n"})})
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(stack.send(b"RCPT TO:<x@example.net>\r\n"), b"550 5.1.1 <x@example.net>: unknown\r\n")
        self.assertEqual(stack.send(b"DATA\r\n"), b"554 5.5.1 No valid recipients [SID]\r\n")
        self.assertNotIn(b"DATA", stack.downstream().commands)

    def test_failoverFromRefusedFirstTarget(self) -> None:
        stack = Stack(self, {FIRST: None, SECOND: Script()}, endpoints=(FIRST, SECOND))
        self.assertEqual(stack.send(b"MAIL FROM:<s@example.org>\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(stack.network.attempts, [str(FIRST), str(SECOND)])

    def test_allTargetsRefused(self) -> None:
        stack = Stack(self, {FIRST: None, SECOND: None}, endpoints=(FIRST, SECOND))
        self.assertEqual(stack.send(b"MAIL FROM:<s@example.org>\r\n"),
                         b"451 4.4.1 No downstream server available [SID]\r\n")

    def test_lostAfterDotIs451(self) -> None:
        """
        The downstream drops the connection after our dot: 451 4.4.2, never
        250 and never 5xx.
        """
        stack = Stack(self, {FIRST: Script(replies={"END": CLOSE})})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        self.assertEqual(stack.send(b"x\r\n.\r\n"), b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n")

    def test_malformedReplyIs451(self) -> None:
        stack = Stack(self, {FIRST: Script(replies={"RCPT": b"hello there\r\n"})})
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertRegex(stack.send(b"RCPT TO:<r@example.net>\r\n"), rb"^451 4\.4\.2 .*\[SID\]\r\n$")

    def test_unexpected2xxToDataIs451(self) -> None:
        stack = Stack(self, {FIRST: Script(replies={"DATA": b"250 2.0.0 what\r\n"})})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        self.assertRegex(stack.send(b"DATA\r\n"), rb"^451 4\.3\.0 .*\[SID\]\r\n$")

    def test_clientGoneMidBodyNeverGetsDotDownstream(self) -> None:
        """
        SPEC §4.8: the client disconnects before its end-of-data; the
        downstream connection is closed without the dot (an RSET inside DATA
        is body text).
        """
        stack = Stack(self, {FIRST: Script()})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        stack.send(b"Subject: x\r\n\r\nRSET\r\n")
        stack.protocol.connectionLost(None)  # type: ignore[arg-type]
        for _ in range(5):
            stack.network.flush()
        fake = stack.downstream()
        self.assertTrue(fake.lost)
        self.assertEqual(fake.messages, [])
        self.assertNotIn(b"\r\n.\r\n", bytes(fake.received).split(b"DATA\r\n", 1)[1])

    def test_bareLFRefusedWithoutDot(self) -> None:
        stack = Stack(self, {FIRST: Script()})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        self.assertEqual(stack.send(b"Subject: x\r\n\r\nbare\nlf\r\n.\r\n"),
                         b"550 5.5.2 Bare LF/CR not allowed [SID]\r\n")
        fake = stack.downstream()
        self.assertEqual(fake.messages, [])
        self.assertTrue(fake.lost)

    def test_smugglingVariantStaysInBody(self) -> None:
        """
        C{<LF>.<LF>} is not an end-of-data: no second transaction reaches
        the downstream, whatever follows.
        """
        stack = Stack(self, {FIRST: Script()})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        out = stack.send(b"x\r\n\n.\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.net>\r\nDATA\r\n")
        self.assertEqual(out, b"")
        self.assertEqual([c for c in stack.downstream().commands if c.startswith(b"MAIL")],
                         [b"MAIL FROM:<s@example.org>"])
