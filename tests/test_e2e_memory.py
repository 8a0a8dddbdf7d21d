"""
The whole relay in memory: a client's bytes → the inbound engine → the relay
session → failover and the outbound engine → a scripted fake downstream
(L{smtprelay.testing.downstream}).  Each test asserts what the client saw
and the exact bytes the downstream received (the transparency rules).
"""

from __future__ import annotations

from functools import partial
import re
from typing import Any, Literal

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app.tls import clientOptions
from smtprelay.config.model import Address, ClientTLS, DownstreamAuth, Listener, Secret, Target
from smtprelay.app.targets import makeFailover, targetRoute
from smtprelay.relay.session import RelaySession
from smtprelay.relay.routing import Router
from smtprelay.app.listeners import sessionPolicy
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.testing.downstream import CLOSE, STALL, FakeDownstream, MemoryNetwork, Script

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
                 endpoints: tuple[Address, ...] = (FIRST,),
                 kind: Literal["smtp", "submission", "lmtp"] = "smtp", lmtp: bool = False,
                 **targetKw: Any) -> None:
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        self.servers = {a: self.network.add(str(a), s, lmtp=lmtp)
                        for a, s in scripts.items() if s is not None}
        self.target = target = Target(
            name="t", protocol="lmtp" if lmtp else "smtp", endpoints=endpoints, hostname="relay.test",
            attemptStartTLS=False, **targetKw,
        )
        listener = Listener(kind=kind, addresses=(Address("tcp", "127.0.0.1", 2525),),
                            deliverTo=target)
        failover = makeFailover(target, self.clock, endpointFactory=self.network)
        routes = Router.single(targetRoute(target, failover.open, lambda downstream: downstream.quit()))
        factory = SMTPServerFactory(
            sessionPolicy(listener),
            lambda session: RelaySession(session, listener.auth.mode, routes, "relay.test", self.clock),
            "relay.test", self.clock,
        )
        factory.newSessionId = lambda: "SID"
        self.protocol = factory.buildProtocol(LOOPBACK)
        self.transport = FakeTransport(LOOPBACK)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        case.assertRegex(self.send(b"LHLO client.test\r\n" if kind == "lmtp" else HELLO),
                         GREETING_AND_EHLO)

    def send(self, data: bytes) -> bytes:
        """
        The client sends C{data}; every connection moves until quiet; return
        what the client received.
        """
        self.protocol.dataReceived(data)
        return self.received()

    def received(self) -> bytes:
        """
        Every connection moves until quiet; return what the client received
        since the last call.
        """
        for _ in range(20):
            self.network.flush()
        out = self.transport.value()
        self.transport.clear()
        return out

    def clientGone(self) -> None:
        """
        The client's connection is lost; every connection moves until quiet.
        """
        self.protocol.connectionLost(Failure(ConnectionLost("client gone")))
        self.received()

    def downstream(self, address: Address = FIRST, index: int = 0) -> FakeDownstream:
        return self.servers[address].connections[index]


def assertNoLastChunk(case: SynchronousTestCase, fake: FakeDownstream) -> None:
    """
    C{fake}, a BDAT downstream, was closed without a LAST chunk.
    """
    case.assertTrue(fake.lost)
    case.assertNotIn(-1, fake.chunks)
    case.assertNotIn(b"LAST", bytes(fake.received))


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
        The client disconnects before its end-of-data; the
        downstream connection is closed without the dot (an RSET inside DATA
        is body text).
        """
        stack = Stack(self, {FIRST: Script()})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        stack.send(b"Subject: x\r\n\r\nRSET\r\n")
        stack.clientGone()
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


BODY_READ = b"".join(b"%05d" % i + b"x" * 993 + b"\r\n" for i in range(66))
"""The first 66 kB of the body: what the downstream reads before the fault."""

BODY_REST = b"y" * 998 + b"\r\n"


class MidBodyFaultTests(SynchronousTestCase):
    """
    Issue 14 A: the downstream goes away in the middle of a
    300 kB body while back-pressure holds the client's upload paused.  The
    client is let go at once: the rest of its body is read and discarded,
    its end-of-data gets C{451 4.4.2}, and the downstream never sees a dot.
    """

    def pausedInBody(self) -> Stack:
        """
        A transaction in its body: the downstream has read 66 kB and then
        stopped reading, its socket buffer is full and the client's upload
        is paused; the client has sent the rest of its 300 kB and the dot.
        """
        stack = Stack(self, {FIRST: Script()}, dataTimeout=30.0)
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        self.assertEqual(stack.send(b"DATA\r\n"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(stack.send(BODY_READ), b"")
        # What a TCP transport does when its peer stops reading.
        stack.network.pumps[-1].clientIO.producer.pauseProducing()
        self.assertEqual(stack.transport.producerState, "paused")
        self.assertEqual(stack.send(BODY_REST * 235 + b".\r\n"), b"")
        self.assertEqual(stack.transport.producerState, "paused")
        return stack

    def assertLetGo(self, stack: Stack) -> None:
        """
        The client got its 451 at its end-of-data, its upload was resumed,
        and the downstream got no dot.
        """
        self.assertEqual(stack.received(),
                         b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n")
        self.assertEqual(stack.transport.producerState, "producing")
        fake = stack.downstream()
        self.assertTrue(fake.lost)
        self.assertEqual(fake.messages, [])
        self.assertNotIn(b"\r\n.\r\n", bytes(fake.received).split(b"DATA\r\n", 1)[1])
        self.assertEqual(stack.send(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")

    def test_downstreamCloses(self) -> None:
        stack = self.pausedInBody()
        stack.downstream().transport.loseConnection()
        self.assertLetGo(stack)

    def test_downstreamResets(self) -> None:
        stack = self.pausedInBody()
        stack.downstream().transport.abortConnection()
        self.assertLetGo(stack)

    def test_unrequestedReply(self) -> None:
        stack = self.pausedInBody()
        stack.downstream().transport.write(b"421 4.3.2 Shutting down\r\n")
        self.assertLetGo(stack)

    def test_stallPastTheTargetsDataTimeout(self) -> None:
        """
        The target's C{data_timeout}, not the listener's, decides how long
        a stalled downstream holds the client.
        """
        stack = self.pausedInBody()
        stack.clock.advance(29)
        self.assertEqual(stack.received(), b"")
        self.assertFalse(stack.downstream().lost)
        stack.clock.advance(1)
        self.assertLetGo(stack)

    def test_clientStillSending(self) -> None:
        """
        The downstream goes while the client's body is still coming: the
        client is not answered before its end-of-data, the rest of the body
        is read and discarded, and the end-of-data gets 451.
        """
        stack = Stack(self, {FIRST: Script()}, dataTimeout=30.0)
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        stack.send(b"DATA\r\n")
        stack.send(BODY_READ)
        stack.network.pumps[-1].clientIO.producer.pauseProducing()
        stack.send(BODY_REST * 10)
        stack.downstream().transport.loseConnection()
        self.assertEqual(stack.received(), b"")
        self.assertEqual(stack.transport.producerState, "producing")
        self.assertEqual(stack.send(BODY_REST * 225), b"")
        self.assertEqual(stack.send(b".\r\n"),
                         b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n")
        self.assertEqual(stack.downstream().messages, [])


class LMTPPartialTests(SynchronousTestCase):
    """
    Issue 14 C: LMTP → LMTP, the downstream answers the first of
    three recipients after the dot and then closes or stalls.  The reply
    that arrived is relayed as it is; only the missing ones become
    C{451 4.4.2}, so that the client does not deliver recipient 1 twice.
    """

    def run_(self, then: bytes) -> bytes:
        script = Script(lmtp={b"a@example.net": b"250 2.0.0 <a@example.net> Saved\r\n",
                              b"b@example.net": then, b"c@example.net": then})
        stack = Stack(self, {FIRST: script}, kind="lmtp", lmtp=True)
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        for rcpt in (b"a", b"b", b"c"):
            self.assertEqual(stack.send(b"RCPT TO:<" + rcpt + b"@example.net>\r\n"), b"250 2.1.5 Ok\r\n")
        stack.send(b"DATA\r\n")
        self.stack = stack
        return stack.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")

    def test_closedAfterTheFirst(self) -> None:
        out = self.run_(CLOSE)
        self.assertEqual(out, b"250 2.0.0 <a@example.net> Saved\r\n"
                              b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n"
                              b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n")

    def test_stalledAfterTheFirst(self) -> None:
        """
        The replies go to the client together, when the target's
        C{submission_timeout} gives up on the missing ones.
        """
        self.assertEqual(self.run_(STALL), b"")
        self.stack.clock.advance(self.stack.target.submissionTimeout)
        self.assertEqual(self.stack.received(),
                         b"250 2.0.0 <a@example.net> Saved\r\n"
                         b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n"
                         b"451 4.4.2 Downstream connection lost, try again later [SID]\r\n")


class LMTPTempfailTests(SynchronousTestCase):
    def test_agreementByClass(self) -> None:
        """
        Issue 14 D: an SMTP client, an LMTP target under C{lmtp_split
        tempfail}: C{250 2.0.0 ok} and C{250 2.1.5 delivered} are both
        deliveries, so the client gets the first one's 250, once.
        """
        script = Script(lmtp={b"a@example.net": b"250 2.0.0 ok\r\n",
                              b"b@example.net": b"250 2.1.5 delivered\r\n"})
        stack = Stack(self, {FIRST: script}, lmtp=True, lmtpSplit="tempfail")
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        stack.send(b"RCPT TO:<a@example.net>\r\n")
        self.assertEqual(stack.send(b"RCPT TO:<b@example.net>\r\n"), b"250 2.1.5 Ok\r\n")
        stack.send(b"DATA\r\n")
        self.assertEqual(stack.send(b"Subject: x\r\n\r\nhi\r\n.\r\n"), b"250 2.0.0 ok\r\n")
        self.assertEqual(len(stack.downstream().messages), 1)


class RcptReplyTests(SynchronousTestCase):
    def test_tooManyRecipientsIsTemporary(self) -> None:
        """
        RFC 5321 §4.5.3.1.10: the downstream's C{552 5.5.3} to RCPT reaches
        the client as C{452 4.5.3}, text kept; the transaction goes on.
        """
        script = Script(rcpt={b"b@example.net": b"552 5.5.3 Error: too many recipients\r\n"})
        stack = Stack(self, {FIRST: script})
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(stack.send(b"RCPT TO:<a@example.net>\r\n"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(stack.send(b"RCPT TO:<b@example.net>\r\n"),
                         b"452 4.5.3 Error: too many recipients\r\n")
        self.assertEqual(stack.send(b"DATA\r\n"), b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def test_longReplyWrapped(self) -> None:
        """
        A downstream reply line longer than 512 bytes reaches the client
        wrapped onto continuation lines of at most 512 bytes each.
        """
        text = b"<r@example.net>: " + b"no such user here " * 40
        stack = Stack(self, {FIRST: Script(rcpt={b"r@example.net": b"550 5.1.1 " + text + b"\r\n"})})
        stack.send(b"MAIL FROM:<s@example.org>\r\n")
        out = stack.send(b"RCPT TO:<r@example.net>\r\n")
        lines = out.split(b"\r\n")[:-1]
        self.assertEqual([len(line) + 2 for line in lines], [509, 250])
        self.assertEqual(lines[0][:10], b"550-5.1.1 ")
        self.assertEqual(lines[1][:10], b"550 5.1.1 ")
        self.assertEqual(b" ".join(line[10:] for line in lines), text.rstrip())


class OwnCredentialsTests(SynchronousTestCase):
    def test_refusedEverywhereIsASoftBounce(self) -> None:
        """
        Issue 13 item 3: the relay's own password refused (535) by every
        target: the client's MAIL gets 454 4.7.0, which it retries, not the
        downstream's 535, which would bounce the message.
        """
        ehlo = b"250-fake.example\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"
        refused = Script(replies={"EHLO": ehlo}, auth=[b"535 5.7.8 Error: authentication failed\r\n"])
        stack = Stack(self, {FIRST: refused, SECOND: refused}, endpoints=(FIRST, SECOND),
                      auth=DownstreamAuth("plain", "relayuser", Secret("wrongpass")),
                      tlsClient=ClientTLS(insecureSkipVerify=True))
        self.assertEqual(stack.send(b"MAIL FROM:<s@example.org>\r\n"),
                         b"454 4.7.0 Relay cannot authenticate downstream, try again later [SID]\r\n")
        self.assertEqual(stack.network.attempts, [str(FIRST), str(SECOND)])


CHUNKING = b"250-fake.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"


class ChunkingEndToEndTests(SynchronousTestCase):
    """
    A client's DATA body to a downstream that advertises CHUNKING: BDAT
    chunks of the unstuffed body, the client's 250 only after the LAST
    chunk's.
    """

    def test_dataBecomesChunks(self) -> None:
        """
        The client's dot-stuffed body arrives unstuffed in one LAST chunk
        (no DATA downstream); the client's final reply is the LAST chunk's,
        held until it arrives.
        """
        stack = Stack(self, {FIRST: Script(replies={"EHLO": CHUNKING, "END": STALL})})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n")
        self.assertEqual(stack.send(b"DATA\r\n"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(stack.send(b"Subject: x\r\n\r\n..dot\r\n.\r\n"), b"")
        fake = stack.downstream()
        self.assertNotIn(b"DATA", fake.commands)
        [message] = fake.messages
        self.assertTrue(message.startswith(b"Received: from client.test ([127.0.0.1])\r\n"), message)
        self.assertTrue(message.endswith(b"\r\nSubject: x\r\n\r\n.dot\r\n"), message)
        self.assertEqual(fake.chunks, [len(message), -1])
        fake.transport.write(b"250 2.0.0 Ok: queued as C\r\n")
        self.assertEqual(stack.received(), b"250 2.0.0 Ok: queued as C\r\n")

    def test_clientGoneMidBodyNoLast(self) -> None:
        """
        The client's connection drops in the body: the downstream never
        gets the LAST chunk, and is closed.
        """
        stack = Stack(self, {FIRST: Script(replies={"EHLO": CHUNKING})})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n")
        stack.send(b"x" * 70000 + b"\r\n" + b"y" * 100)
        stack.clientGone()
        assertNoLastChunk(self, stack.downstream())


class InboundChunkingEndToEndTests(SynchronousTestCase):
    """
    A client's BDAT body goes out dot-stuffed after DATA to a downstream
    without CHUNKING, and as BDAT to one with it.
    """

    BODY = b"Subject: x\r\n\r\n.dot\r\n.\r\nend\r\n"

    def test_bdatToData(self) -> None:
        stack = Stack(self, {FIRST: Script()})
        out = stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n"
                         b"BDAT %d LAST\r\n" % len(self.BODY) + self.BODY)
        self.assertEqual(out, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: queued\r\n")
        [message] = stack.downstream().messages
        self.assertTrue(message.endswith(b"\r\nSubject: x\r\n\r\n..dot\r\n..\r\nend\r\n.\r\n"), message)

    def test_bdatToBdat(self) -> None:
        stack = Stack(self, {FIRST: Script(replies={"EHLO": CHUNKING})})
        out = stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n"
                         b"BDAT 14\r\n" + self.BODY[:14] + b"BDAT %d LAST\r\n" % (len(self.BODY) - 14)
                         + self.BODY[14:])
        self.assertEqual(out, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 14 octets\r\n"
                              b"250 2.0.0 Ok: queued\r\n")
        fake = stack.downstream()
        [message] = fake.messages
        self.assertTrue(message.endswith(b"\r\n" + self.BODY), message)
        self.assertNotIn(b"DATA", fake.commands)

    def test_clientGoneMidChunkNoLast(self) -> None:
        """
        A BDAT client that dies in the middle of a chunk: the downstream
        (BDAT too) never gets a LAST chunk and is closed.
        """
        stack = Stack(self, {FIRST: Script(replies={"EHLO": CHUNKING})})
        stack.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n"
                   b"BDAT 80000 LAST\r\n" + b"x" * 70000)
        stack.clientGone()
        assertNoLastChunk(self, stack.downstream())
