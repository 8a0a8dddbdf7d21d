"""
Tests for L{smtprelay.inbound.session}: exact bytes on the wire for every command,
error, limit and pipelining case, with a recording handler and a fake
clock.
"""

from __future__ import annotations

import base64
import os
import re
import socket
from ipaddress import ip_network

from hypothesis import given, settings
from hypothesis import strategies as st
from typing import Any, Sequence, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import directlyProvides

from smtprelay.protocol import replies
from smtprelay.observe.metrics import REJECTION_REASONS, NullMetrics
from smtprelay.config.model import ListenerAuth
from smtprelay.protocol.replies import reply
from smtprelay.inbound.factory import SMTPServerFactory, randomSessionId
from smtprelay.inbound.framing import MAX_INPUT_BUFFER
from smtprelay.testing.handler import RecordingHandlerFactory

from .logcapture import captureEvents
from .test_tlsinfo import PINNED, PINNED_INFO, handshake
from .server_helpers import (
    EHLO_REPLY,
    GREETING,
    HOST,
    LOOPBACK,
    STRANGER,
    UNIX,
    FakeTransport,
    Session,
    makePolicy,
)

START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
QUEUED = b"250 2.0.0 Ok: queued\r\n"
TRANSACTION = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


def greeted(**kwargs: Any) -> Session:
    """
    A session that has read the greeting and sent EHLO.
    """
    session = Session(**kwargs)
    session.read()
    session.send(b"EHLO client.example\r\n")
    return session


# Unicode characters whose upper case is an ASCII letter.
_TRICKS = {"I": "\u0131", "S": "\u017f", "K": "\u212a"}


def _trickValue(value: str) -> st.SearchStrategy[bytes]:
    variants = [st.sampled_from([c, c.lower(), _TRICKS.get(c, c)]) for c in value]
    return st.tuples(*variants).map(lambda chars: "".join(chars).encode("utf-8"))


_caseTricks = st.sampled_from(["7BIT", "8BITMIME", "FULL", "HDRS", "NEVER", "SUCCESS,DELAY",
                               "FAILURE"]).flatmap(_trickValue)
"""Valid keyword values with letters swapped for their Unicode case tricks."""


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


class GreetingTests(SynchronousTestCase):
    def test_smtp(self) -> None:
        session = Session()
        self.assertEqual(session.read(), GREETING)
        self.assertEqual(session.protocol.session.id, "S1")
        self.assertEqual(session.protocol.session.clientHost, "127.0.0.1")
        self.assertEqual(session.protocol.session.protocol, "smtp")

    def test_lmtp(self) -> None:
        session = Session(makePolicy(kind="lmtp"))
        self.assertEqual(session.read(), b"220 mx.example.org LMTP smtprelay tok123\r\n")
        self.assertEqual(session.protocol.session.protocol, "lmtp")

    def test_noToken(self) -> None:
        factory = SMTPServerFactory(makePolicy(), RecordingHandlerFactory(), HOST, None)  # type: ignore[arg-type]  # no clock: the greeting needs none
        self.assertEqual(factory.greeting, b"220 mx.example.org ESMTP smtprelay\r\n")

    def test_sessionIds(self) -> None:
        ids = {randomSessionId() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        self.assertTrue(all(len(i) == 10 and i.isalnum() for i in ids))

    def test_pregreetTalk(self) -> None:
        """
        A client whose bytes are already waiting when it connects talked
        before our greeting: 554 and close, no greeting.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        theirs.sendall(b"EHLO x\r\n")
        transport = FakeTransport(LOOPBACK)
        transport.getHandle = lambda: ours  # type: ignore[attr-defined]  # StringTransport has no getHandle; the test gives it one
        session = Session(transport=transport)
        self.assertEqual(session.read(), b"554 5.5.0 Error: SMTP protocol synchronization [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.closed, 1)

    def test_quietSocket(self) -> None:
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        transport = FakeTransport(LOOPBACK)
        transport.getHandle = lambda: ours  # type: ignore[attr-defined]  # StringTransport has no getHandle; the test gives it one
        session = Session(transport=transport)
        self.assertEqual(session.read(), GREETING)


class HelloTests(SynchronousTestCase):
    def test_ehlo(self) -> None:
        session = Session()
        session.read()
        self.assertEqual(session.send(b"EHLO client.example\r\n"), EHLO_REPLY)
        self.assertEqual(session.protocol.session.heloName, "client.example")
        self.assertTrue(session.protocol.session.esmtp)

    def test_ehloStartTLS(self) -> None:
        session = Session(tlsOptions=object())
        session.read()
        self.assertEqual(
            session.send(b"EHLO c\r\n"),
            EHLO_REPLY.replace(b"250-ENHANCED", b"250-STARTTLS\r\n250-ENHANCED"),
        )

    def test_ehloAuthOnUnix(self) -> None:
        session = Session(makePolicy(auth=ListenerAuth("users", "/dev/null")), peer=UNIX)
        session.read()
        self.assertEqual(
            session.send(b"EHLO c\r\n"),
            EHLO_REPLY.replace(b"250-ENHANCED", b"250-AUTH PLAIN LOGIN\r\n250-ENHANCED"),
        )

    def test_noAuthBeforeTLS(self) -> None:
        session = Session(makePolicy(auth=ListenerAuth("forward")), tlsOptions=object())
        session.read()
        self.assertNotIn(b"AUTH", session.send(b"EHLO c\r\n"))

    def test_implicitTLS(self) -> None:
        """
        On an implicit-TLS transport, AUTH is offered and STARTTLS is not.
        """
        transport = FakeTransport(LOOPBACK)
        directlyProvides(transport, ISSLTransport)
        session = Session(makePolicy(auth=ListenerAuth("forward")), tlsOptions=object(),
                          transport=transport)
        self.assertEqual(session.read(), b"", "the greeting waits for the handshake")
        session.protocol.handshakeCompleted()
        self.assertEqual(session.read(), GREETING)
        self.assertEqual(
            session.send(b"EHLO c\r\n"),
            EHLO_REPLY.replace(b"250-ENHANCED", b"250-AUTH PLAIN LOGIN\r\n250-ENHANCED"),
        )

    def test_helo(self) -> None:
        session = Session()
        session.read()
        self.assertEqual(session.send(b"HELO client.example\r\n"), b"250 mx.example.org\r\n")
        self.assertFalse(session.protocol.session.esmtp)

    def test_ehloWithoutName(self) -> None:
        session = Session()
        session.read()
        self.assertEqual(session.send(b"EHLO\r\n"), b"501 5.5.4 Syntax: EHLO hostname [S1]\r\n")

    def test_lmtpRefusesEhloHelo(self) -> None:
        session = Session(makePolicy(kind="lmtp"))
        session.read()
        for command in (b"EHLO c\r\n", b"HELO c\r\n"):
            self.assertEqual(
                session.send(command),
                b"500 5.5.1 Error: this is an LMTP service, use LHLO [S1]\r\n",
            )
        self.assertEqual(session.send(b"LHLO c\r\n"), EHLO_REPLY)

    def test_smtpRefusesLhlo(self) -> None:
        session = Session()
        session.read()
        self.assertEqual(session.send(b"LHLO c\r\n"), b"500 5.5.2 Error: command not recognized [S1]\r\n")

    def test_ehloResetsTransaction(self) -> None:
        session = greeted()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"EHLO again\r\n"), EHLO_REPLY)
        self.assertEqual(session.handler.methods, ["mail", "reset"])
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"), MAIL_OK)


class SimpleCommandTests(SynchronousTestCase):
    """
    Commands answered locally, never passed to the handler.
    """

    table = [
        (b"NOOP", b"250 2.0.0 OK\r\n"),
        (b"NOOP anything", b"250 2.0.0 OK\r\n"),
        (b"HELP", b"214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP STARTTLS AUTH\r\n"),
        (b"VRFY postmaster", b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"),
        (b"EXPN list", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"ETRN example.com", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"TURN", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"XCLIENT ADDR=1.2.3.4", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"XFORWARD ADDR=1.2.3.4", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"BDAT 0 LAST", b"503 5.5.1 Error: send EHLO first [S1]\r\n"),
        (b"FOO", b"500 5.5.2 Error: command not recognized [S1]\r\n"),
        (b"", b"500 5.5.2 Error: bad syntax [S1]\r\n"),
        (b"NO\nOP", b"500 5.5.2 Error: bare <CR> or <LF> in command [S1]\r\n"),
        (b"STARTTLS", b"502 5.5.1 Error: command not implemented [S1]\r\n"),
        (b"AUTH PLAIN", b"503 5.5.1 Error: authentication not enabled [S1]\r\n"),
        (b"MAIL FROM:<a@b.example>", b"503 5.5.1 Error: send HELO/EHLO first [S1]\r\n"),
        (b"RCPT TO:<a@b.example>", b"503 5.5.1 Error: need MAIL command [S1]\r\n"),
        (b"DATA", b"503 5.5.1 Error: need MAIL command [S1]\r\n"),
        (b"DATA x", b"501 5.5.4 Syntax: DATA [S1]\r\n"),
        (b"noop", b"250 2.0.0 OK\r\n"),
    ]

    def test_table(self) -> None:
        for command, expected in self.table:
            session = Session()
            session.read()
            self.assertEqual(session.send(command + b"\r\n"), expected, command)
            self.assertEqual(session.handler.calls, [], command)

    def test_rset(self) -> None:
        session = greeted()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RSET\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(session.handler.methods, ["mail", "reset"])
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"), MAIL_OK)

    def test_quit(self) -> None:
        session = greeted()
        self.assertEqual(session.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.methods, ["close"])

    def test_closeOnce(self) -> None:
        """
        handler.close is called exactly once whatever ends the session.
        """
        session = greeted()
        session.send(b"QUIT\r\n")
        session.protocol.connectionLost()
        self.assertEqual(session.handler.closed, 1)
        session = greeted()
        session.transport.loseConnection()
        self.assertEqual(session.handler.closed, 1)

    def test_whenClosed(self) -> None:
        session = greeted()
        d = session.protocol.whenClosed()
        self.assertNoResult(d)
        session.send(b"QUIT\r\n")
        self.successResultOf(d)
        self.successResultOf(session.protocol.whenClosed())


class EnvelopeTests(SynchronousTestCase):
    def test_parameters(self) -> None:
        session = greeted()
        session.send(
            b"MAIL FROM:<a@example.com> SIZE=100 BODY=8bitmime RET=hdrs ENVID=x+2B1 REQUIRETLS\r\n"
        )
        session.send(b"RCPT TO: <b@example.net> NOTIFY=success,failure ORCPT=rfc822;b@example.net\r\n")
        self.assertEqual(
            session.handler.calls,
            [
                ("mail", (b"a@example.com", {"SIZE": "100", "BODY": "8BITMIME", "RET": "HDRS",
                                             "ENVID": "x+2B1", "REQUIRETLS": None})),
                ("rcpt", (b"b@example.net", {"NOTIFY": "SUCCESS,FAILURE",
                                             "ORCPT": "rfc822;b@example.net"})),
            ],
        )

    def test_nullSenderAndSourceRoute(self) -> None:
        session = greeted()
        self.assertEqual(session.send(b"MAIL FROM:<>\r\n"), MAIL_OK)
        self.assertEqual(session.send(b"RCPT TO:<@relay.example:b@example.net>\r\n"), RCPT_OK)
        self.assertEqual(session.handler.calls[0][1][0], b"")
        self.assertEqual(session.handler.calls[1][1][0], b"b@example.net")

    errors = [
        (b"MAIL FROM:<a@example.com> FOO=1", b"555 5.5.4 Unsupported option: FOO=1 [S1]\r\n"),
        (b"MAIL FROM:<a@example.com> BODY=BINARYMIME",
         b"555 5.5.4 Unsupported option: BODY=BINARYMIME [S1]\r\n"),
        (b"MAIL FROM:<a@example.com> SIZE=x", b"501 5.5.4 Bad SIZE parameter syntax [S1]\r\n"),
        (b"MAIL FROM:<a@example.com> SIZE=1 SIZE=2", b"501 5.5.4 Duplicate SIZE parameter [S1]\r\n"),
        (b"MAIL FROM:<a@example.com> SIZE=33554433",
         b"552 5.3.4 Message size exceeds fixed limit [S1]\r\n"),
        (b"MAIL TO:<a@example.com>", b"501 5.5.4 Syntax: MAIL FROM:<address> [S1]\r\n"),
        (b"MAIL FROM:<a@example.com", b"501 5.5.4 Syntax: MAIL FROM:<address> [S1]\r\n"),
        (b"MAIL FROM:<a b@example.com>", b"501 5.1.7 Bad sender address syntax [S1]\r\n"),
        (b"MAIL FROM:<\xc3\xa9@example.com>",
         b"553 5.6.7 Must declare SMTPUTF8 to send unicode address [S1]\r\n"),
    ]

    def test_mailErrors(self) -> None:
        for command, expected in self.errors:
            session = greeted()
            self.assertEqual(session.send(command + b"\r\n"), expected, command)
            self.assertEqual(session.handler.calls, [], command)

    rcptErrors = [
        (b"RCPT TO:<>", b"501 5.1.3 Bad recipient address syntax [S1]\r\n"),
        (b"RCPT TO:<b@>", b"501 5.1.3 Bad recipient address syntax [S1]\r\n"),
        (b"RCPT FROM:<b@example.net>", b"501 5.5.4 Syntax: RCPT TO:<address> [S1]\r\n"),
        (b"RCPT TO:<b@example.net> SIZE=1", b"555 5.5.4 Unsupported option: SIZE=1 [S1]\r\n"),
        (b"RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS",
         b"501 5.5.4 Bad NOTIFY parameter syntax [S1]\r\n"),
        (b"RCPT TO:<\xc3\xa9@example.net>",
         b"553 5.6.7 Must declare SMTPUTF8 to send unicode address [S1]\r\n"),
    ]

    def test_rcptErrors(self) -> None:
        for command, expected in self.rcptErrors:
            session = greeted()
            session.send(b"MAIL FROM:<a@example.com>\r\n")
            self.assertEqual(session.send(command + b"\r\n"), expected, command)
            self.assertEqual(session.handler.methods, ["mail"], command)

    def test_unicodeCaseInParameters(self) -> None:
        """
        Values whose Unicode upper case is ASCII (dotless i, long s) are
        refused like any other bad value, also pipelined behind MAIL: one
        reply per command, in order, and the session goes on.
        """
        session = greeted()
        self.assertEqual(session.send(b"MAIL FROM:<a@b.c> BODY=8b\xc4\xb1tmime\r\n"),
                         b"555 5.5.4 Unsupported option: BODY=8b\\xc4\\xb1tmime [S1]\r\n")
        out = session.send(b"MAIL FROM:<a@example.com>\r\n"
                           b"RCPT TO:<r@d.e> NOTIFY=\xc5\xbfUCCESS\r\n"
                           b"RCPT TO:<r@d.e> NOTIFY=SUCCESS\r\n"
                           b"MAIL FROM:<a@b.c> RET=HDR\xc5\xbf\r\n"
                           b"NOOP\r\n")
        self.assertEqual(
            out,
            MAIL_OK + b"501 5.5.4 Bad NOTIFY parameter syntax [S1]\r\n" + RCPT_OK
            + b"503 5.5.1 Error: nested MAIL command [S1]\r\n" + b"250 2.0.0 OK\r\n",
        )
        self.assertEqual(session.handler.methods, ["mail", "rcpt"])

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(_caseTricks, st.binary(min_size=1, max_size=30).map(
        lambda b: b.replace(b"\r", b"").replace(b"\n", b"") or b"x")), min_size=1, max_size=3))
    def test_anyParameterBytes(self, values: list[bytes]) -> None:
        """
        Any bytes as ESMTP parameters of MAIL and RCPT, pipelined: no
        exception escapes and every command gets exactly one reply.
        """
        session = greeted(policy=makePolicy(maxErrors=1000))
        commands = []
        for value in values:
            for keyword in (b"BODY", b"RET", b"NOTIFY", b"ENVID", b"ORCPT", b"SIZE", b"AUTH", b""):
                parameter = keyword + b"=" + value if keyword else value
                commands += [b"MAIL FROM:<a@example.com> " + parameter,
                             b"RCPT TO:<b@example.net> " + parameter, b"RSET"]
        out = session.send(b"".join(c + b"\r\n" for c in commands))
        finals = [line for line in out.split(b"\r\n")[:-1] if line[3:4] != b"-"]
        self.assertEqual(len(finals), len(commands), out)
        self.assertFalse(session.closed)

    def test_commandDefect(self) -> None:
        """
        A command whose code raises still gets exactly one reply, in order,
        and the session goes on.
        """
        session = greeted()

        def broken(argument: bytes) -> None:
            raise RuntimeError("defect")

        session.protocol.do_VRFY = broken  # type: ignore[method-assign]  # a broken method stands in on purpose
        self.assertEqual(session.send(b"NOOP\r\nVRFY x\r\nNOOP\r\n"),
                         b"250 2.0.0 OK\r\n451 4.3.0 Local error in processing [S1]\r\n"
                         b"250 2.0.0 OK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_postmaster(self) -> None:
        session = greeted()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<Postmaster>\r\n"), RCPT_OK)

    def test_smtputf8(self) -> None:
        session = greeted()
        self.assertEqual(session.send(b"MAIL FROM:<\xc3\xa9@example.com> SMTPUTF8\r\n"), MAIL_OK)
        self.assertTrue(session.protocol.session.smtputf8)
        self.assertEqual(session.send(b"RCPT TO:<\xc3\xbc@b\xc3\xbccher.example>\r\n"), RCPT_OK)

    def test_nestedMail(self) -> None:
        session = greeted()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"),
                         b"503 5.5.1 Error: nested MAIL command [S1]\r\n")

    def test_refusedMailKeepsNoTransaction(self) -> None:
        session = greeted(script={"mail": reply(451, "4.3.0", "later")})
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"), b"451 4.3.0 later\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"),
                         b"503 5.5.1 Error: need MAIL command [S1]\r\n")

    def test_noValidRecipients(self) -> None:
        session = greeted(script={"rcpt": reply(550, "5.1.1", "no such user")})
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), b"550 5.1.1 no such user\r\n")
        self.assertEqual(session.send(b"DATA\r\n"), b"554 5.5.1 No valid recipients [S1]\r\n")
        self.assertNotIn("data", session.handler.methods)

    def test_needRcpt(self) -> None:
        session = greeted()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"DATA\r\n"), b"503 5.5.1 Error: need RCPT command [S1]\r\n")

    def test_maxRecipients(self) -> None:
        session = greeted(policy=makePolicy(maxRecipients=2))
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        out = session.send(b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\n"
                           b"RCPT TO:<d@example.net>\r\n")
        self.assertEqual(out, RCPT_OK * 2 + b"452 4.5.3 Too many recipients [S1]\r\n")
        self.assertEqual(session.handler.methods, ["mail", "rcpt", "rcpt"])

    def test_handlerFailure(self) -> None:
        """
        A handler whose Deferred fails gives a local 451, and the session
        goes on.
        """
        session = greeted()
        session.handler.mail = lambda *a: fail(RuntimeError("boom"))  # type: ignore[method-assign]  # a failing method stands in on purpose
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"),
                         b"451 4.3.0 Local error in processing [S1]\r\n")
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(session.send(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")


class RelayAccessTests(SynchronousTestCase):
    """
    Clients outside C{allow} are refused before the handler is
    asked anything.
    """

    def test_relayDenied(self) -> None:
        session = greeted(peer=STRANGER)
        out = session.send(b"MAIL FROM:<a@example.com>\r\n")
        out += session.send(b"RCPT TO:<b@example.net>\r\n")
        out += session.send(b"DATA\r\n")
        out += session.send(b"RSET\r\n")
        self.assertEqual(
            out,
            MAIL_OK + b"554 5.7.1 Relay access denied [S1]\r\n"
            b"554 5.5.1 No valid recipients [S1]\r\n250 2.0.0 OK\r\n",
        )
        self.assertEqual(session.handler.calls, [])

    def test_refusalsLogged(self) -> None:
        """
        Each command the relay refuses on its own is logged as
        Postfix logs C{NOQUEUE: reject: RCPT from ...: 554 5.7.1 ... Relay
        access denied; from=<...> to=<...>}.
        """
        from twisted.logger import formatEvent

        events = captureEvents(self)
        session = greeted(peer=STRANGER)
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        session.send(b"RCPT TO:<b@example.net>\r\n")
        session.send(b"DATA\r\n")
        host = STRANGER.host
        self.assertEqual(
            [formatEvent(e) for e in events if e.get("reject")],
            [f"S1: reject: RCPT from unknown[{host}]: 554 5.7.1 Relay access denied [S1]; "
             f"from=<a@example.com> to=<b@example.net> proto=ESMTP helo=<client.example> relay=none",
             f"S1: reject: DATA from unknown[{host}]: 554 5.5.1 No valid recipients [S1]; "
             f"from=<a@example.com> proto=ESMTP helo=<client.example> relay=none"],
        )

    def test_allowedNetwork(self) -> None:
        import ipaddress

        listener = makePolicy(allow=(ipaddress.ip_network("192.0.2.0/24"),))
        session = greeted(policy=listener, peer=STRANGER)
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), RCPT_OK)

    def test_mappedIPv4(self) -> None:
        session = greeted(peer=IPv4Address("TCP", "::ffff:127.0.0.1", 1))
        self.assertEqual(session.protocol.session.clientHost, "127.0.0.1")
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), RCPT_OK)

    def test_unixAllowed(self) -> None:
        session = greeted(peer=UNIX)
        self.assertEqual(session.protocol.session.clientHost, "")
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), RCPT_OK)

    def test_submissionNeedsAuth(self) -> None:
        listener = makePolicy(kind="submission", auth=ListenerAuth("forward"))
        session = greeted(policy=listener, peer=STRANGER)
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"),
                         b"530 5.7.0 Authentication required [S1]\r\n")
        self.assertEqual(session.handler.calls, [])

    def test_authenticatedMayRelay(self) -> None:
        listener = makePolicy(auth=ListenerAuth("forward"))
        transport = FakeTransport(STRANGER)
        directlyProvides(transport, ISSLTransport)
        session = greeted(policy=listener, peer=STRANGER, transport=transport)
        self.assertEqual(session.send(b"AUTH PLAIN " + b64("\0u\0p") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), RCPT_OK)

    def test_requireTLS(self) -> None:
        session = greeted(policy=makePolicy(requireTLS=True), tlsOptions=object())
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"),
                         b"530 5.7.0 Must issue a STARTTLS command first [S1]\r\n")
        self.assertEqual(session.handler.calls, [])


class DataTests(SynchronousTestCase):
    def transaction(self, session: Session, body: bytes) -> bytes:
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"), MAIL_OK)
        self.assertEqual(session.send(b"RCPT TO:<b@example.net>\r\n"), RCPT_OK)
        self.assertEqual(session.send(b"DATA\r\n"), START)
        return session.send(body)

    def test_message(self) -> None:
        session = greeted()
        out = self.transaction(session, b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n")
        self.assertEqual(out, QUEUED)
        self.assertEqual(session.handler.body, b"Subject: x\r\n\r\n.dot\r\nbody\r\n")
        self.assertEqual(session.handler.methods[-1], "endData")
        self.assertFalse(session.protocol._body.open)
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"), MAIL_OK)

    def test_lmtpRepliesPerRecipient(self) -> None:
        session = Session(makePolicy(kind="lmtp"), script={
            "rcpt:bad@example.net": reply(550, "5.1.1", "unknown"),
            "endData": [reply(250, "2.0.0", "one"), reply(452, "4.2.2", "full")],
        })
        session.read()
        session.send(b"LHLO c\r\n")
        out = session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                           b"RCPT TO:<bad@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + b"550 5.1.1 unknown\r\n" + RCPT_OK + START)
        self.assertEqual(session.send(b"hi\r\n.\r\n"), b"250 2.0.0 one\r\n452 4.2.2 full\r\n")

    def test_dataRefused(self) -> None:
        session = greeted(script={"data": reply(451, "4.4.2", "down")})
        session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(session.send(b"DATA\r\n"), b"451 4.4.2 down\r\n")
        self.assertEqual(session.send(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")

    def test_bareLFRejected(self) -> None:
        session = greeted()
        out = self.transaction(session, b"a\r\nb\nc\r\n")
        self.assertEqual(out, b"")
        out = session.send(b"d\r\n.\r\n")
        self.assertEqual(out, b"550 5.5.2 Bare LF/CR not allowed [S1]\r\n")
        self.assertEqual(session.handler.aborted, replies.BARE_LF.withSession("S1"))
        self.assertNotIn("endData", session.handler.methods)
        self.assertNotIn(b"\n", session.handler.body.replace(b"\r\n", b""))

    def test_bareLFNormalized(self) -> None:
        session = greeted(policy=makePolicy(bareLF="normalize"))
        self.assertEqual(self.transaction(session, b"a\nb\rc\r\n.\r\n"), QUEUED)
        self.assertEqual(session.handler.body, b"a\r\nb\r\nc\r\n")

    def test_tooBig(self) -> None:
        session = greeted(policy=makePolicy(maxMessageSize=10))
        out = self.transaction(session, b"0123456789\r\nmore\r\n.\r\n")
        self.assertEqual(out, b"552 5.3.4 Message size exceeds fixed limit [S1]\r\n")
        self.assertEqual(session.handler.aborted, replies.MESSAGE_TOO_BIG.withSession("S1"))
        self.assertNotIn("endData", session.handler.methods)

    def test_lineTooLong(self) -> None:
        """
        With C{max_line_length}, a longer body line refuses the message
        after its end-of-data with C{552 5.3.4}; the handler never gets
        the end-of-data.
        """
        session = greeted(policy=makePolicy(maxLineLength=1000))
        out = self.transaction(session, b"a\r\n" + b"x" * 999 + b"\r\nb\r\n.\r\n")
        self.assertEqual(out, b"552 5.3.4 Message has a line longer than allowed [S1]\r\n")
        self.assertEqual(session.handler.aborted,
                         replies.LINE_TOO_LONG_IN_BODY.withSession("S1"))
        self.assertNotIn("endData", session.handler.methods)
        self.assertEqual(session.send(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")

    def test_longLineForwardedByDefault(self) -> None:
        session = greeted()
        line = b"x" * 5000 + b"\r\n"
        self.assertEqual(self.transaction(session, line + b".\r\n"), QUEUED)
        self.assertEqual(session.handler.body, line)

    def test_tooManyHops(self) -> None:
        session = greeted(policy=makePolicy(maxHops=2))
        out = self.transaction(session, b"Received: a\r\nReceived: b\r\nReceived: c\r\n\r\nx\r\n")
        self.assertEqual(out, b"")
        self.assertEqual(session.send(b".\r\n"), b"554 5.4.6 Too many hops [S1]\r\n")

    def test_smugglingVariants(self) -> None:
        """
        A fake end-of-data followed by a second transaction stays body text:
        one transaction only, and the session is still in DATA until the
        real end.
        """
        for fake in [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n\x00.\r\n",
                     b"\r\n.\x00\r\n", b"\n.\r\r\n"]:
            session = greeted()
            smuggled = (b"body" + fake + b"MAIL FROM:<evil@example.com>\r\n"
                        b"RCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n")
            self.assertEqual(self.transaction(session, smuggled), b"", fake)
            self.assertTrue(session.protocol._body.open)
            out = session.send(b".\r\n")
            self.assertEqual(session.handler.methods.count("mail"), 1, fake)
            if b"\x00" in fake:
                self.assertEqual(out, QUEUED, fake)
            else:
                self.assertEqual(out, b"550 5.5.2 Bare LF/CR not allowed [S1]\r\n", fake)

    def test_longLineInData(self) -> None:
        """
        A 20,000-byte line inside DATA is body text, never a command.
        """
        session = greeted()
        line = b"QUIT " + b"x" * 20000 + b"\r\n"
        self.assertEqual(self.transaction(session, line[:9000]), b"")
        self.assertEqual(session.send(line[9000:] + b"RSET\r\n.\r\n"), QUEUED)
        self.assertEqual(session.handler.body, line + b"RSET\r\n")
        self.assertFalse(session.closed)

    def test_streamingChunks(self) -> None:
        """
        Body bytes reach the handler as they arrive.
        """
        session = greeted()
        self.transaction(session, b"Subject: x\r\n\r\nabc")
        self.assertEqual(session.handler.body, b"Subject: x\r\n\r\nabc")

    def test_backPressure(self) -> None:
        """
        A handler that pauses the producer pauses the client's socket and
        the body stops there; resuming goes on from the same byte.
        """
        session = greeted()
        self.transaction(session, b"one\r\n")
        session.handler.pause()
        self.assertEqual(session.transport.producerState, "paused")
        session.send(b"two\r\n.\r\nNOOP\r\n")
        self.assertEqual(session.handler.body, b"one")
        session.handler.resume()
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(session.read(), QUEUED + b"250 2.0.0 OK\r\n")
        self.assertEqual(session.handler.body, b"one\r\ntwo\r\n")

    def test_stopProducingDetaches(self) -> None:
        session = greeted()
        self.transaction(session, b"one\r\n")
        session.handler.pause()
        assert session.handler.producer is not None
        session.handler.producer.stopProducing()
        self.assertEqual(session.transport.producerState, "producing")
        self.assertEqual(session.send(b".\r\n"), QUEUED)

    def test_dropDuringData(self) -> None:
        session = greeted()
        self.transaction(session, b"partial")
        session.transport.loseConnection()
        self.assertEqual(session.handler.methods[-1], "close")
        self.assertEqual(session.handler.closed, 1)
        self.assertNotIn("endData", session.handler.methods)


class PipeliningTests(SynchronousTestCase):
    group = (b"MAIL FROM:<a@example.com> SIZE=20\r\nRCPT TO:<b@example.net>\r\n"
             b"RCPT TO:<c@example.net>\r\nDATA\r\n")
    body = b"Subject: t\r\n\r\n..x\r\n.\r\nMAIL FROM:<d@example.com>\r\nRSET\r\nQUIT\r\n"
    expected = (MAIL_OK + RCPT_OK + RCPT_OK + START, QUEUED + MAIL_OK + b"250 2.0.0 OK\r\n"
                b"221 2.0.0 Bye\r\n")

    def transact(
        self, bytewise: bool, manual: tuple[str, ...] = ()
    ) -> tuple[bytes, bytes, Session]:
        # Not "run": that name is TestCase's, and this class's tests ran not.
        session = greeted(manual=manual)
        send = session.sendBytewise if bytewise else session.send
        first = send(self.group)
        while session.handler.pending:
            session.handler.fire()
        first += session.read()
        second = send(self.body)
        while session.handler.pending:
            session.handler.fire()
        second += session.read()
        return first, second, session

    def test_oneSegment(self) -> None:
        first, second, session = self.transact(False)
        self.assertEqual((first, second), self.expected)
        # The pipelined MAIL after the dot started a new transaction: the
        # body is in the recorded calls.
        body = b"".join(args[0] for name, args in session.handler.calls if name == "dataChunk")
        self.assertEqual(body, b"Subject: t\r\n\r\n.x\r\n")

    def test_oneByteAtATime(self) -> None:
        self.assertEqual(self.transact(True)[:2], self.expected)

    def test_pendingHandler(self) -> None:
        """
        With every handler call pending, replies still come out in order
        and the same bytes result.
        """
        manual = ("mail", "rcpt", "data", "endData")
        self.assertEqual(self.transact(False, manual)[:2], self.expected)
        self.assertEqual(self.transact(True, manual)[:2], self.expected)

    def test_inOrderWhilePending(self) -> None:
        session = greeted(manual=("mail", "rcpt"))
        out = session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nNOOP\r\n")
        self.assertEqual(out, b"")
        self.assertEqual(session.handler.methods, ["mail"])
        self.assertEqual(session.transport.producerState, "paused")
        session.handler.fire()
        self.assertEqual(session.read(), MAIL_OK)
        self.assertEqual(session.handler.methods, ["mail", "rcpt"])
        session.handler.fire(reply(550, "5.1.1", "no"))
        self.assertEqual(session.read(), b"550 5.1.1 no\r\n250 2.0.0 OK\r\n")
        self.assertEqual(session.transport.producerState, "producing")

    def test_batchedWrite(self) -> None:
        """
        Replies to a pipelined group leave in one write.
        """
        session = greeted()
        session.transport.writes.clear()
        session.send(self.group)
        self.assertEqual(session.transport.writes, [self.expected[0]])

    def test_contentBeforeStart(self) -> None:
        """
        Body bytes in the same segment as DATA: 554 and close; the handler
        is never asked for DATA.
        """
        session = greeted()
        out = session.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
                           b"DATA\r\nSubject: x\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK
                         + b"554 5.5.0 Error: SMTP protocol synchronization [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertNotIn("data", session.handler.methods)

    def test_contentWhileDataPending(self) -> None:
        session = greeted(manual=("data",))
        self.assertEqual(session.send(TRANSACTION), MAIL_OK + RCPT_OK)
        session.send(b"Subject: x\r\n")
        session.handler.fire()
        self.assertEqual(session.read(),
                         b"554 5.5.0 Error: SMTP protocol synchronization [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.closed, 1)

    def test_ehloNotLast(self) -> None:
        """
        A client that has not seen PIPELINING yet must wait for the EHLO
        reply.
        """
        session = Session()
        session.read()
        out = session.send(b"EHLO c\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(out, b"554 5.5.0 Error: SMTP protocol synchronization [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.calls, [("close", ())])

    def test_heloClientPipelining(self) -> None:
        session = Session()
        session.read()
        session.send(b"HELO c\r\n")
        out = session.send(b"NOOP\r\nMAIL FROM:<a@example.com>\r\n")
        self.assertEqual(out, b"554 5.5.0 Error: SMTP protocol synchronization [S1]\r\n")

    def test_esmtpNoopPipelining(self) -> None:
        session = greeted()
        self.assertEqual(session.send(b"NOOP\r\nNOOP\r\n"), b"250 2.0.0 OK\r\n" * 2)

    def test_floodBounded(self) -> None:
        """
        10,000 pipelined NOOPs from a client that never reads: the socket is
        paused once the unread replies pass the transport's high-water mark,
        so neither our output nor our input buffer grows without bound.
        """
        session = greeted()
        session.read()
        flood = b"NOOP\r\n" * 10000
        for i in range(0, len(flood), 4096):
            session.protocol.dataReceived(flood[i:i + 4096])
        self.assertEqual(session.transport.producerState, "paused")
        written = len(session.transport.value())
        self.assertLess(written, FakeTransport.highWater + 20 * 1024)
        self.assertLessEqual(len(session.protocol._input.data), len(flood))
        # The client reads: the rest is answered.
        total = 0
        while session.transport.producerState == "paused":
            total += len(session.transport.drain())
        total += len(session.transport.drain())
        self.assertEqual(total, 10000 * len(b"250 2.0.0 OK\r\n"))

    def test_nonReaderTimesOut(self) -> None:
        """
        A client that pipelines commands but never reads our replies keeps
        its read deadline while the socket is paused for it: it is closed
        when the deadline expires.
        """
        session = greeted(policy=makePolicy(readTimeout=60))
        session.read()
        session.protocol.dataReceived(b"NOOP\r\n" * 10000)
        self.assertEqual(session.transport.producerState, "paused")
        session.clock.advance(59)
        self.assertFalse(session.closed)
        session.clock.advance(1)
        self.assertTrue(session.closed)
        self.assertTrue(session.transport.value().endswith(b"421 4.4.2 Timeout exceeded [S1]\r\n"))

    def test_inputCap(self) -> None:
        """
        A transport that ignores our pause cannot make us buffer without
        bound.
        """
        session = greeted(manual=("mail",))
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        out = session.send(b"NOOP\r\n" * (MAX_INPUT_BUFFER // 6 + 1))
        self.assertTrue(session.closed)
        self.assertEqual(out, b"421 4.7.0 Too much unread input [S1]\r\n")


class StartTLSTests(SynchronousTestCase):
    def test_injection(self) -> None:
        """
        Plaintext pipelined after STARTTLS is discarded: only the 220 is
        written, then TLS starts with a fresh state.
        """
        options = object()
        session = greeted(tlsOptions=options)
        out = session.send(b"STARTTLS\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n")
        self.assertEqual(out, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(session.transport.tlsStarted, [options])
        self.assertEqual(session.handler.calls, [])
        self.assertIsNone(session.protocol.session.heloName)
        self.assertEqual(session.send(b"MAIL FROM:<a@example.com>\r\n"),
                         b"503 5.5.1 Error: send HELO/EHLO first [S1]\r\n")
        self.assertEqual(session.send(b"EHLO c\r\n"), EHLO_REPLY)

    def test_twice(self) -> None:
        session = greeted(tlsOptions=object())
        session.send(b"STARTTLS\r\n")
        session.send(b"EHLO c\r\n")
        self.assertEqual(session.send(b"STARTTLS\r\n"), b"554 5.5.1 Error: TLS already active [S1]\r\n")

    def test_inTransaction(self) -> None:
        session = greeted(tlsOptions=object())
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"STARTTLS\r\n"),
                         b"503 5.5.1 Error: MAIL transaction in progress [S1]\r\n")

    def test_handshakeInfo(self) -> None:
        """
        After the STARTTLS handshake the session knows what it negotiated
        (read from the transport's OpenSSL connection), cipher bits included.
        """
        server, _ = handshake(**PINNED)
        session = greeted(tlsOptions=object())
        session.transport.getHandle = server.getHandle  # type: ignore[attr-defined]  # StringTransport has no TLS
        session.send(b"STARTTLS\r\n")
        session.protocol.handshakeCompleted()
        self.assertEqual(session.protocol.session.tls, PINNED_INFO)


class AuthTests(SynchronousTestCase):
    def authSession(self, **kwargs: object) -> Session:
        kwargs.setdefault("policy", makePolicy(auth=ListenerAuth("users", "/dev/null"),
                                                   maxAuthFailures=2))
        return greeted(peer=UNIX, **kwargs)

    def test_plainInitial(self) -> None:
        session = self.authSession()
        out = session.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n")
        self.assertEqual(out, b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(session.handler.calls, [("authenticate", ("PLAIN", "user", "secret"))])
        self.assertEqual(session.protocol.session.user, "user")

    def test_plainChallenge(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(session.send(b64("\0user\0secret") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")

    def test_login(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH LOGIN\r\n"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(session.send(b64("user") + b"\r\n"), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(session.send(b64("secret") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(session.handler.calls, [("authenticate", ("LOGIN", "user", "secret"))])

    def test_loginInitial(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH LOGIN " + b64("user") + b"\r\n"),
                         b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(session.send(b64("secret") + b"\r\n"),
                         b"235 2.7.0 Authentication successful\r\n")

    def test_cancel(self) -> None:
        session = self.authSession()
        session.send(b"AUTH LOGIN\r\n")
        self.assertEqual(session.send(b"*\r\n"), b"501 5.7.0 Authentication aborted [S1]\r\n")
        self.assertEqual(session.handler.calls, [])

    def test_badBase64(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH PLAIN !!!\r\n"), b"501 5.5.2 Cannot decode response [S1]\r\n")

    def test_unknownMechanism(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH CRAM-MD5\r\n"),
                         b"504 5.5.4 Unsupported authentication mechanism [S1]\r\n")

    def test_twice(self) -> None:
        session = self.authSession()
        session.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n")
        self.assertEqual(session.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n"),
                         b"503 5.5.1 Error: already authenticated [S1]\r\n")

    def test_inTransaction(self) -> None:
        session = self.authSession()
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        self.assertEqual(session.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n"),
                         b"503 5.5.1 Error: MAIL transaction in progress [S1]\r\n")

    def test_needsTLS(self) -> None:
        session = greeted(policy=makePolicy(auth=ListenerAuth("forward")), tlsOptions=object())
        self.assertEqual(
            session.send(b"AUTH PLAIN " + b64("\0user\0secret") + b"\r\n"),
            b"538 5.7.11 Encryption required for requested authentication mechanism [S1]\r\n",
        )
        self.assertEqual(session.handler.calls, [])

    def test_failuresLimited(self) -> None:
        session = self.authSession(script={"authenticate": replies.AUTH_FAILED})
        bad = b"AUTH PLAIN " + b64("\0user\0wrong") + b"\r\n"
        self.assertEqual(session.send(bad), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertFalse(session.closed)
        self.assertEqual(
            session.send(bad),
            b"535 5.7.8 Authentication credentials invalid\r\n"
            b"421 4.7.0 Too many authentication failures [S1]\r\n",
        )
        self.assertTrue(session.closed)
        self.assertIsNone(session.protocol.session.user)

    def test_authzidMismatch(self) -> None:
        session = self.authSession()
        self.assertEqual(session.send(b"AUTH PLAIN " + b64("other\0user\0secret") + b"\r\n"),
                         b"535 5.7.8 Authentication credentials invalid [S1]\r\n")
        self.assertEqual(session.handler.calls, [])

    def test_requiresEhlo(self) -> None:
        session = Session(makePolicy(auth=ListenerAuth("users", "/dev/null")), peer=UNIX)
        session.read()
        session.send(b"HELO c\r\n")
        self.assertEqual(session.send(b"AUTH PLAIN " + b64("\0u\0p") + b"\r\n"),
                         b"503 5.5.1 Error: send EHLO first [S1]\r\n")


class LimitTests(SynchronousTestCase):
    def test_lineTooLong(self) -> None:
        session = greeted(policy=makePolicy(maxCommandLength=100))
        out = session.send(b"NOOP " + b"x" * 200 + b"\r\nNOOP\r\n")
        self.assertEqual(out, b"500 5.5.2 Line too long [S1]\r\n250 2.0.0 OK\r\n")

    def test_lineTooLongStreamed(self) -> None:
        """
        An endless line without CRLF is discarded as it comes, never
        buffered, and the session stays in step.
        """
        session = greeted(policy=makePolicy(maxCommandLength=100))
        for _ in range(50):
            self.assertEqual(session.send(b"MAIL FROM:<" + b"x" * 999 + b"\r"), b"")
            self.assertLessEqual(len(session.protocol._input.data), 1)
        self.assertEqual(session.send(b"\nNOOP\r\n"), b"500 5.5.2 Line too long [S1]\r\n250 2.0.0 OK\r\n")
        self.assertEqual(session.handler.calls, [])

    def test_tooManyErrors(self) -> None:
        session = greeted(policy=makePolicy(maxErrors=3))
        out = session.send(b"FOO\r\n" * 3)
        self.assertEqual(out, b"500 5.5.2 Error: command not recognized [S1]\r\n" * 3)
        self.assertEqual(session.send(b"NOOP\r\n"), b"421 4.7.0 Too many errors [S1]\r\n")
        self.assertTrue(session.closed)

    def test_connectionLimit(self) -> None:
        first = Session(makePolicy(maxConnections=1))
        second = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(second.read(), b"421 4.7.0 Too many connections [S2]\r\n")
        self.assertTrue(second.closed)
        self.assertEqual(second.handlers.handlers, [])
        first.send(b"QUIT\r\n")
        third = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(third.read(), GREETING)

    def test_perHostLimit(self) -> None:
        first = Session(makePolicy(maxConnectionsPerIP=1, limitExceptions=()))
        other = Session(factory=first.factory, clock=first.clock, peer=STRANGER)
        self.assertEqual(other.read(), GREETING)
        second = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(second.read(), b"421 4.7.0 Too many connections [S3]\r\n")
        self.assertEqual(len(first.factory.sessions), 2)

    def test_allowedClientsExempt(self) -> None:
        """
        Clients in C{allow} (the default C{limit_exceptions}) are exempt
        from C{max_connections_per_ip}, as Postfix exempts C{$mynetworks}:
        120 concurrent sessions from 127.0.0.1 are all served; a client
        outside the exceptions is still limited.
        """
        first = Session(makePolicy(maxConnectionsPerIP=2))
        sessions = [first] + [Session(factory=first.factory, clock=first.clock) for _ in range(119)]
        for session in sessions:
            self.assertEqual(session.read(), GREETING)
        self.assertEqual(len(first.factory.sessions), 120)
        strangers = [Session(factory=first.factory, clock=first.clock, peer=STRANGER)
                     for _ in range(3)]
        self.assertEqual([s.read()[:3] for s in strangers], [b"220", b"220", b"421"])

    def test_limitExceptionsConfigured(self) -> None:
        """
        C{limit_exceptions} replaces the default: an allowed client outside
        it is limited, a client in it is not (allowed to relay or not).
        """
        listener = makePolicy(maxConnectionsPerIP=1,
                                limitExceptions=(ip_network("192.0.2.0/24"),))
        first = Session(listener)
        second = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(second.read(), b"421 4.7.0 Too many connections [S2]\r\n")
        strangers = [Session(factory=first.factory, clock=first.clock, peer=STRANGER)
                     for _ in range(3)]
        self.assertEqual([s.read() for s in strangers], [GREETING] * 3)

    def test_readTimeout(self) -> None:
        session = greeted(policy=makePolicy(readTimeout=60))
        session.clock.advance(59)
        session.send(b"NOOP\r\n")
        session.clock.advance(59)
        self.assertFalse(session.closed)
        session.clock.advance(1)
        self.assertEqual(session.read(), b"421 4.4.2 Timeout exceeded [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.closed, 1)

    def test_tricklePerCommandDeadline(self) -> None:
        """
        A command trickled one byte every 3 s does not restart the read
        timeout: the line must be complete within it (Postfix's
        smtpd_per_record_deadline), or the client gets C{421 4.4.2}.
        """
        session = greeted(policy=makePolicy(readTimeout=10), clock=MemoryReactorClock())
        command = b"MAIL FROM:<a@example.com>\r\n"
        for byte in command[:3]:
            session.clock.advance(3)
            self.assertEqual(session.send(bytes([byte])), b"")
        session.clock.advance(1)
        self.assertEqual(session.read(), b"421 4.4.2 Timeout exceeded [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.methods, ["close"])
        self.assertEqual(session.clock.getDelayedCalls(), [])

    def test_trickleInTime(self) -> None:
        """
        A line completed within the timeout is served, and the next one has
        a whole timeout of its own.
        """
        session = greeted(policy=makePolicy(readTimeout=10))
        out = b""
        for byte in b"NOOP\r\n":
            session.clock.advance(1)
            out += session.send(bytes([byte]))
        self.assertEqual(out, b"250 2.0.0 OK\r\n")
        session.clock.advance(9.9)
        self.assertFalse(session.closed)
        session.clock.advance(0.1)
        self.assertTrue(session.closed)

    def test_slowClientsBeforeData(self) -> None:
        """
        200 clients each sending one byte every 3 s before DATA, with
        C{read_timeout 10s}, are all cut off 10 s after their last reply
        (they held their sessions for as long as they trickled).
        """
        clock = MemoryReactorClock()
        first = greeted(policy=makePolicy(readTimeout=10, maxConnectionsPerIP=500), clock=clock)
        sessions = [first] + [Session(factory=first.factory, clock=clock) for _ in range(199)]
        for session in sessions[1:]:
            session.read()
            session.send(b"EHLO client.example\r\n")
        script = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
        for session in sessions:
            session.send(script[:30])  # MAIL served, RCPT begun
        for tick in range(1, 4):
            clock.advance(3)
            for session in sessions:
                session.send(script[29 + tick:30 + tick])
        clock.advance(1)
        for session in sessions:
            self.assertEqual(session.read(), b"421 4.4.2 Timeout exceeded [S%d]\r\n" % (
                sessions.index(session) + 1))
            self.assertTrue(session.closed)
        self.assertEqual(first.factory.sessions, set())

    def test_noTimeoutWhileHandlerBusy(self) -> None:
        session = greeted(policy=makePolicy(readTimeout=60), manual=("mail",))
        session.send(b"MAIL FROM:<a@example.com>\r\n")
        session.clock.advance(600)
        self.assertFalse(session.closed)
        session.handler.fire()
        self.assertEqual(session.read(), MAIL_OK)
        session.clock.advance(60)
        self.assertTrue(session.closed)

    def test_dataDeadline(self) -> None:
        """
        The DATA phase deadline runs from the 354 and a byte trickle does
        not extend it; the handler is closed without an end-of-data.
        """
        session = greeted(policy=makePolicy(readTimeout=30, dataTimeout=100))
        session.send(TRANSACTION)
        for _ in range(99):
            session.clock.advance(1)
            session.send(b"x")
        self.assertFalse(session.closed)
        session.clock.advance(1)
        self.assertEqual(session.read(), b"421 4.4.2 Timeout exceeded [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.closed, 1)
        self.assertNotIn("endData", session.handler.methods)
        self.assertEqual(session.clock.getDelayedCalls(), [])

    def test_stalledAbort(self) -> None:
        """
        A client that does not read our last reply is aborted later.
        """

        class Stuck(FakeTransport):
            def loseConnection(self) -> None:
                self.disconnecting = True

            def abortConnection(self) -> None:
                FakeTransport.loseConnection(self)

        session = greeted(transport=Stuck(LOOPBACK))
        session.send(b"QUIT\r\n")
        self.assertFalse(session.closed)
        session.clock.advance(30)
        self.assertTrue(session.closed)


class ShutdownTests(SynchronousTestCase):
    def test_idle(self) -> None:
        session = greeted()
        session.protocol.shutdown()
        self.assertEqual(session.read(), b"421 4.3.2 Service shutting down [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.factory.sessions, set())

    def test_afterTransaction(self) -> None:
        session = greeted()
        session.send(TRANSACTION)
        session.protocol.shutdown()
        self.assertFalse(session.closed)
        self.assertEqual(session.send(b"hi\r\n.\r\n"),
                         QUEUED + b"421 4.3.2 Service shutting down [S1]\r\n")
        self.assertTrue(session.closed)
        self.assertEqual(session.handler.methods[-2:], ["endData", "close"])


class _RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def rejected(self, reason: str) -> None:
        self.reasons.append(reason)


def _rejections(policy: Any = None, peer: Any = LOOPBACK, steps: Sequence[bytes | float] = (),
                script: Any = None, tlsOptions: Any = None, sessions: int = 1) -> list[str]:
    """
    The rejection reasons counted while C{sessions} clients connect and the
    last one sends C{steps} (bytes, or seconds to let pass).
    """
    metrics = _RecordingMetrics()
    clock = Clock()
    factory = SMTPServerFactory(policy or makePolicy(), RecordingHandlerFactory(), HOST, clock,
                                tlsOptions=tlsOptions, metrics=metrics)
    for _ in range(sessions):
        session = Session(factory=factory, clock=clock, peer=peer, script=script)
    for step in steps:
        if isinstance(step, bytes):
            session.send(step)
        else:
            clock.advance(step)
    return metrics.reasons


_EHLO = b"EHLO c\r\n"
_MAIL = b"MAIL FROM:<a@x.example>\r\n"
_AUTH = b"AUTH PLAIN AHUAcA==\r\n"
_BODY = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
_USERS = ListenerAuth("users", "/dev/null")


class RateLimitTests(SynchronousTestCase):
    """
    C{max_connection_rate}, C{max_message_rate}, C{max_recipient_rate}:
    Postfix's anvil replies, per client address in C{rate_limit_window}
    on the factory's clock, not for C{limit_exceptions}.
    """

    def test_connectionRate(self) -> None:
        """
        Past the rate, a new connection gets C{421 4.7.0} and is closed
        before the greeting; once the window is over it is served again.
        """
        listener = makePolicy(maxConnectionRate=2, rateLimitWindow=60)
        first = Session(listener, peer=STRANGER)
        Session(factory=first.factory, clock=first.clock, peer=STRANGER)
        third = Session(factory=first.factory, clock=first.clock, peer=STRANGER)
        self.assertEqual(third.read(), b"421 4.7.0 Error: too many connections from 192.0.2.7 [S3]\r\n")
        self.assertTrue(third.closed)
        self.assertEqual(third.handlers.handlers, [])
        other = Session(factory=first.factory, clock=first.clock, peer=IPv4Address("TCP", "192.0.2.8", 1))
        self.assertEqual(other.read(), GREETING)
        first.clock.advance(60)
        again = Session(factory=first.factory, clock=first.clock, peer=STRANGER)
        self.assertEqual(again.read(), GREETING)

    def test_exceptionsNotLimited(self) -> None:
        """
        Clients in C{allow} are exempt by default, as from
        C{max_connections_per_ip}; C{limit_exceptions} decides when given.
        """
        first = Session(makePolicy(maxConnectionRate=1))
        second = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(second.read(), GREETING)
        first = Session(makePolicy(maxConnectionRate=1, limitExceptions=()))
        second = Session(factory=first.factory, clock=first.clock)
        self.assertEqual(second.read(), b"421 4.7.0 Error: too many connections from 127.0.0.1 [S2]\r\n")

    def test_messageRate(self) -> None:
        """
        Past the rate, C{MAIL} gets C{450 4.7.1}, before the handler is
        asked; the session goes on, and the next window accepts again.
        """
        session = greeted(policy=makePolicy(maxMessageRate=1, limitExceptions=()))
        self.assertEqual(session.send(b"MAIL FROM:<a@x.example>\r\nRSET\r\n"),
                         MAIL_OK + b"250 2.0.0 OK\r\n")
        self.assertEqual(session.send(b"MAIL FROM:<a@x.example>\r\n"),
                         b"450 4.7.1 Error: too much mail from 127.0.0.1 [S1]\r\n")
        self.assertEqual([c[0] for c in session.handler.calls], ["mail", "reset"])
        session.clock.advance(60)
        self.assertEqual(session.send(b"MAIL FROM:<a@x.example>\r\n"), MAIL_OK)

    def test_recipientRate(self) -> None:
        """
        Past the rate, C{RCPT} gets C{450 4.7.1}; the recipients accepted
        before stay in the transaction.
        """
        session = greeted(policy=makePolicy(maxRecipientRate=2, limitExceptions=()))
        out = session.send(b"MAIL FROM:<a@x.example>\r\n" + b"".join(
            b"RCPT TO:<%d@x.example>\r\n" % i for i in range(3)) + b"DATA\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK * 2
                         + b"450 4.7.1 Error: too many recipients from 127.0.0.1 [S1]\r\n"
                         + b"354 End data with <CR><LF>.<CR><LF>\r\n")


class RejectionReasonTests(SynchronousTestCase):
    """
    Each local refusal is counted under the reason it was made for (not
    guessed from its reply code), and the documented reasons are exactly
    those.
    """

    CASES: list[tuple[str, dict[str, Any], list[str]]] = [
        ("relay denied", dict(peer=STRANGER, steps=[_EHLO, _MAIL, b"RCPT TO:<b@y.example>\r\n"]),
         ["relay_denied"]),
        ("submission without AUTH",
         dict(policy=makePolicy(kind="submission", auth=_USERS), peer=STRANGER,
              steps=[_EHLO, _MAIL]),
         ["auth_required"]),
        ("MAIL before STARTTLS",
         dict(policy=makePolicy(requireTLS=True), tlsOptions=object(), steps=[_EHLO, _MAIL]),
         ["tls_required"]),
        ("AUTH without TLS",
         dict(policy=makePolicy(auth=_USERS), tlsOptions=object(), steps=[_EHLO, _AUTH]),
         ["tls_required"]),
        ("SIZE too big", dict(steps=[_EHLO, b"MAIL FROM:<a@x.example> SIZE=99999999999\r\n"]),
         ["too_big"]),
        ("body too big",
         dict(policy=makePolicy(maxMessageSize=10),
              steps=[_EHLO, _BODY, b"0123456789ab\r\n.\r\n"]),
         ["too_big"]),
        ("bare LF in body", dict(steps=[_EHLO, _BODY, b"a\nb\r\n.\r\n"]), ["bare_lf"]),
        ("too many hops",
         dict(policy=makePolicy(maxHops=1),
              steps=[_EHLO, _BODY, b"Received: a\r\nReceived: b\r\n\r\n.\r\n"]),
         ["too_many_hops"]),
        ("too many recipients",
         dict(policy=makePolicy(maxRecipients=1),
              steps=[_EHLO, _MAIL, b"RCPT TO:<b@x.example>\r\n", b"RCPT TO:<c@x.example>\r\n"]),
         ["too_many_recipients"]),
        ("AUTH failures",
         dict(policy=makePolicy(auth=_USERS, maxAuthFailures=2), peer=UNIX,
              script={"authenticate": replies.AUTH_FAILED}, steps=[_EHLO, _AUTH, _AUTH]),
         ["auth_failed", "auth_failed", "too_many_auth_failures"]),
        ("AUTH cancelled",
         dict(policy=makePolicy(auth=_USERS), peer=UNIX,
              steps=[_EHLO, b"AUTH PLAIN\r\n", b"*\r\n"]),
         ["auth_aborted"]),
        ("pipelining without EHLO", dict(steps=[b"HELO c\r\n", b"NOOP\r\nNOOP\r\n"]), ["sync"]),
        ("body line too long",
         dict(policy=makePolicy(maxLineLength=1000),
              steps=[_EHLO, _BODY, b"x" * 1000 + b"\r\n.\r\n"]),
         ["line_too_long"]),
        ("command line too long",
         dict(policy=makePolicy(maxCommandLength=100), steps=[b"NOOP " + b"x" * 200 + b"\r\n"]),
         ["line_too_long"]),
        ("input overflow", dict(steps=[_EHLO, _MAIL * 50000]), ["too_much_input"]),
        ("unknown command", dict(steps=[b"FOO\r\n"]), ["unknown_command"]),
        ("EXPN", dict(steps=[b"EXPN list\r\n"]), ["not_implemented"]),
        ("bare CR in a command", dict(steps=[b"NO\rOP\r\n"]), ["syntax"]),
        ("bad address", dict(steps=[_EHLO, b"MAIL FROM:<a b@x.example>\r\n"]), ["syntax"]),
        ("RCPT before MAIL", dict(steps=[_EHLO, b"RCPT TO:<b@x.example>\r\n"]), ["bad_sequence"]),
        ("read timeout", dict(policy=makePolicy(readTimeout=5), steps=[5.0]), ["timeout"]),
        ("connection limit", dict(policy=makePolicy(maxConnections=1), sessions=2),
         ["too_many_connections"]),
        ("error limit", dict(policy=makePolicy(maxErrors=1), steps=[b"FOO\r\n", b"FOO\r\n"]),
         ["unknown_command", "too_many_errors"]),
        ("connection rate", dict(policy=makePolicy(maxConnectionRate=1), peer=STRANGER, sessions=2),
         ["rate_connections"]),
        ("message rate",
         dict(policy=makePolicy(maxMessageRate=1), peer=STRANGER, steps=[_EHLO, _MAIL, b"RSET\r\n", _MAIL]),
         ["rate_messages"]),
        ("recipient rate",
         dict(policy=makePolicy(maxRecipientRate=1, limitExceptions=()),
              steps=[_EHLO, _MAIL, b"RCPT TO:<b@x.example>\r\n", b"RCPT TO:<c@x.example>\r\n"]),
         ["rate_recipients"]),
    ]

    def test_eachRefusalItsReason(self) -> None:
        for name, kwargs, expected in self.CASES:
            with self.subTest(name):
                self.assertEqual(_rejections(**kwargs), expected)

    def test_everyReasonEmitted(self) -> None:
        """
        Every reason in L{REJECTION_REASONS} has a refusal that emits it.
        """
        emitted = {reason for _, _, reasons in self.CASES for reason in reasons}
        self.assertEqual(emitted, set(REJECTION_REASONS))

    def test_documented(self) -> None:
        """
        docs/operations.md documents exactly the reasons the code emits.
        """
        path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "operations.md")
        with open(path, encoding="utf-8") as f:
            readme = f.read()
        start = readme.index("- Rejection reasons:")
        paragraph = readme[start:readme.index("\n- ", start + 1)]
        # Explanations in parentheses may quote directives; the reasons are
        # the quoted words outside them.
        documented = set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^()]*\)", "", paragraph)))
        self.assertEqual(documented, set(REJECTION_REASONS))


ENVELOPE = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"


def chunkOk(size: int) -> bytes:
    return b"250 2.0.0 Ok: %d octets\r\n" % size


class InboundChunkingTests(SynchronousTestCase):
    """
    RFC 3030 inbound: C{BDAT count [LAST]} chunks are read exactly (never
    as commands) into the same body path as DATA, under the same rules.
    """

    def test_chunksIntoTheBody(self) -> None:
        """
        Each chunk's bytes go to the handler as they are (dots and all);
        every chunk but the last gets C{250}, the last the handler's final
        reply; DATA's 354 is never sent.
        """
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT 11\r\n.a\r\nb\r\nc.\r\nBDAT 6 LAST\r\n.\r\nd\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + chunkOk(11) + QUEUED)
        self.assertEqual(session.handler.body, b".a\r\nb\r\nc.\r\n.\r\nd\r\n")
        self.assertEqual([c[0] for c in session.handler.calls if c[0] != "dataChunk"],
                         ["mail", "rcpt", "data", "endData"])
        self.assertEqual(session.send(b"MAIL FROM:<x@example.com>\r\n"), MAIL_OK)

    def test_everyBoundary(self) -> None:
        """
        A command line and its chunk split at every position: the same
        replies and the same body.
        """
        wire = ENVELOPE + b"BDAT 5\r\nMAIL BDAT 0 LAST\r\nQUIT\r\n"
        for cut in range(len(wire) + 1):
            session = greeted()
            out = session.send(wire[:cut]) + session.send(wire[cut:])
            self.assertEqual(out, MAIL_OK + RCPT_OK + chunkOk(5) + QUEUED + b"221 2.0.0 Bye\r\n", cut)
            self.assertEqual(session.handler.body, b"MAIL ", cut)

    def test_bdatZeroLast(self) -> None:
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT 5\r\nx\r\n\r\nBDAT 0 LAST\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + chunkOk(5) + QUEUED)
        self.assertEqual(session.handler.body, b"x\r\n\r\n")

    def test_chunkThatLooksLikeCommands(self) -> None:
        """
        A chunk that holds command lines and an end-of-data is body, read
        by its count: nothing in it is a command (no smuggling).
        """
        chunk = b"\r\n.\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.net>\r\nDATA\r\n"
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk)
        self.assertEqual(out, MAIL_OK + RCPT_OK + QUEUED)
        self.assertEqual(session.handler.body, chunk)
        self.assertEqual([c[0] for c in session.handler.calls].count("mail"), 1)

    def test_chunkLongerThanAnnounced(self) -> None:
        """
        Bytes past the announced count are commands again: a client that
        sends more than it announced is answered for each line.
        """
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT 3 LAST\r\nabcdef\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + QUEUED + b"500 5.5.2 Error: command not recognized [S1]\r\n")
        self.assertEqual(session.handler.body, b"abc")

    def test_mixingRefused(self) -> None:
        """
        DATA after a BDAT chunk is refused; the chunked transaction goes
        on.
        """
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT 3\r\nabc")
        out += session.send(b"DATA\r\n")
        out += session.send(b"BDAT 2 LAST\r\n\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + chunkOk(3)
                         + b"503 5.5.1 Error: BDAT transaction in progress [S1]\r\n" + QUEUED)
        self.assertEqual(session.handler.body, b"abc\r\n")

    def test_refusedBdatStillRead(self) -> None:
        """
        A BDAT out of sequence is refused after its chunk was read and
        discarded.
        """
        session = greeted()
        out = session.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(out, b"503 5.5.1 Error: need MAIL command [S1]\r\n250 2.0.0 OK\r\n")
        self.assertEqual(session.handler.calls, [])

    def test_malformedCountCloses(self) -> None:
        """
        A chunk whose size cannot be read cannot be skipped: 501 and close.
        """
        for argument in (b"", b"x", b"-1", b"10 MORE", b"9999999999999999"):
            session = greeted()
            out = session.send(ENVELOPE + b"BDAT " + argument + b"\r\nNOOP\r\n")
            self.assertEqual(out, MAIL_OK + RCPT_OK + b"501 5.5.4 Syntax: BDAT count [LAST] [S1]\r\n", argument)
            self.assertTrue(session.closed)

    def test_failedChunkFailsTheRest(self) -> None:
        """
        A chunk that breaks a rule (here the size) fails the transaction:
        the body is aborted at the handler (the downstream never gets its
        end), every later chunk is read, discarded and gets the same reply.
        """
        session = greeted(policy=makePolicy(maxMessageSize=5))
        out = session.send(ENVELOPE + b"BDAT 8\r\n12345678BDAT 2\r\n\r\nBDAT 0 LAST\r\n")
        tooBig = b"552 5.3.4 Message size exceeds fixed limit [S1]\r\n"
        self.assertEqual(out, MAIL_OK + RCPT_OK + tooBig * 3)
        self.assertEqual([c[0] for c in session.handler.calls if c[0] != "dataChunk"],
                         ["mail", "rcpt", "data", "abortData", "reset"])
        self.assertEqual(session.send(b"MAIL FROM:<x@example.com>\r\n"), MAIL_OK)

    def test_handlerRefusesTheBody(self) -> None:
        """
        The handler's refusal of the body (a downstream's 554 to DATA) is
        the reply to every chunk of the transaction.
        """
        refused = reply(554, "5.7.1", "no")
        session = greeted(script={"data": refused})
        out = session.send(ENVELOPE + b"BDAT 2\r\nabBDAT 1 LAST\r\nc")
        self.assertEqual(out, MAIL_OK + RCPT_OK + b"554 5.7.1 no\r\n" * 2)
        self.assertEqual([c[0] for c in session.handler.calls], ["mail", "rcpt", "data", "reset"])
        self.assertEqual(session.send(b"MAIL FROM:<x@example.com>\r\n"), MAIL_OK)

    def test_pipelinedWhileTheHandlerOpens(self) -> None:
        """
        Chunks pipelined behind the first BDAT wait while the handler
        opens the body; nothing of them is read as a command.
        """
        session = greeted(manual=("data",))
        out = session.send(ENVELOPE + b"BDAT 6\r\nNOOP\r\nBDAT 6 LAST\r\nRSET\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK)
        session.handler.fire(replies.START_INPUT)
        self.assertEqual(session.read(), chunkOk(6) + QUEUED)
        self.assertEqual(session.handler.body, b"NOOP\r\nRSET\r\n")

    def test_rsetBetweenChunksAborts(self) -> None:
        """
        RSET between chunks abandons the body: aborted at the handler, never
        ended.
        """
        session = greeted()
        out = session.send(ENVELOPE + b"BDAT 3\r\nabcRSET\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK + chunkOk(3) + b"250 2.0.0 OK\r\n")
        self.assertEqual([c[0] for c in session.handler.calls if c[0] != "dataChunk"],
                         ["mail", "rcpt", "data", "abortData"])

    def test_clientGoneMidChunk(self) -> None:
        session = greeted()
        session.send(ENVELOPE + b"BDAT 100 LAST\r\nhalf")
        session.protocol.connectionLost(Failure(ConnectionLost("client gone")))
        self.assertEqual([c[0] for c in session.handler.calls if c[0] != "dataChunk"],
                         ["mail", "rcpt", "data", "close"])

    def test_lmtpRepliesPerRecipient(self) -> None:
        session = Session(makePolicy(kind="lmtp"))
        session.read()
        session.send(b"LHLO c\r\n")
        out = session.send(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\n"
                           b"BDAT 2\r\nabBDAT 2 LAST\r\n\r\n")
        self.assertEqual(out, MAIL_OK + RCPT_OK * 2 + chunkOk(2) + QUEUED * 2)
