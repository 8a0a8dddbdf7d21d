"""
The outbound engine against real servers on 127.0.0.1: Postfix's
C{smtp-sink} (SMTP and LMTP), C{aiosmtpd} with STARTTLS and AUTH, and
Dovecot LMTP on a unix socket.  Every process is stopped in cleanup; a test
is skipped only when its peer program is missing.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from smtprelay.protocol import replies
from smtprelay.config.model import Address, DownstreamAuth, Secret
from smtprelay.interfaces import Credentials, DownstreamError
from smtprelay.protocol.replies import reply
from tests.procs import HOST, Processes, freePort, sinkMessages
from tests.test_tls import PKI, Loopback, makeTarget

BODY = b"Subject: test\r\n\r\n.leading dot\r\n..two dots\r\nend\r\n"


class SmtpSinkTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.procs = Processes(self)
        self.net = Loopback(self)

    @inlineCallbacks
    def test_smtp(self) -> Any:
        """
        A whole transaction; smtp-sink stores exactly the unstuffed body.
        A refused first target fails over to smtp-sink.
        """
        port, dumps = self.procs.smtpSink()
        refused = Address("tcp", HOST, freePort())
        target = makeTarget(refused, Address("tcp", HOST, port))
        session, mailReply = yield self.net.failover(target).open(mail=(b"a@example.org", {"SIZE": "50"}))
        self.assertEqual(mailReply.code, 250)
        self.assertIn("PIPELINING", session.capabilities)
        rcpt = yield session.rcpt(b"b@example.net", {})
        self.assertEqual(rcpt.code, 250)
        started = yield session.data()
        self.assertEqual(started.code, 354)
        session.write(BODY[:20])
        session.write(BODY[20:])
        final = yield session.endData()
        self.assertEqual([r.code for r in final], [250])
        session.quit()
        [dump] = sinkMessages(dumps)
        self.assertIn(b".leading dot\n..two dots\nend\n", dump.replace(b"\r\n", b"\n"))

    @inlineCallbacks
    def test_lmtp(self) -> Any:
        """
        smtp-sink -L: LHLO, one end-of-data reply per accepted recipient.
        """
        port, _dumps = self.procs.smtpSink(lmtp=True)
        target = makeTarget(Address("tcp", HOST, port), protocol="lmtp", attemptStartTLS=False)
        session, mailReply = yield self.net.failover(target).open(mail=(b"a@example.org", {}))
        self.assertEqual(mailReply.code, 250)
        for rcpt in (b"b@example.net", b"c@example.net"):
            r = yield session.rcpt(rcpt, {})
            self.assertEqual(r.code, 250)
        yield session.data()
        session.write(BODY)
        final = yield session.endData()
        self.assertEqual([r.code for r in final], [250, 250])
        session.quit()


class AiosmtpdTests(TestCase):
    """
    aiosmtpd as a STARTTLS + AUTH downstream (in a thread).
    """

    timeout = 60

    def setUp(self) -> None:
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError:
            raise SkipTest("aiosmtpd is not installed (pip install .[test])")
        self.pki = PKI(self.mktemp())
        tls = self.pki.server("mx.example")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        self.received: list[Any] = []
        received = self.received

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                received.append(envelope)
                return "250 2.0.0 Message accepted"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = isinstance(data, LoginPassword) and data.login == b"relay" and data.password == b"s3cret"
            return AuthResult(success=ok, handled=ok)

        self.port = freePort()
        self.controller = Controller(
            Handler(), hostname=HOST, port=self.port, tls_context=context,
            require_starttls=True, authenticator=authenticator, auth_require_tls=True,
        )
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.net = Loopback(self)

    def target(self, mechanism: str, password: str = "s3cret") -> Any:
        auth = DownstreamAuth(mechanism, "relay", Secret(password))  # type: ignore[arg-type]  # the tests pass the Literal's words
        return makeTarget(
            Address("tcp", HOST, self.port), auth=auth,
            tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )

    @inlineCallbacks
    def test_plainAndLogin(self) -> Any:
        for mechanism in ("plain", "login"):
            session, mailReply = yield self.net.failover(self.target(mechanism)).open(
                mail=(b"a@example.org", {})
            )
            self.assertEqual(mailReply.code, 250)
            self.assertIsNotNone(session.tls)
            yield session.rcpt(b"b@example.net", {})
            yield session.data()
            session.write(BODY)
            final = yield session.endData()
            self.assertEqual(final[0], reply(250, "2.0.0", "Message accepted"))
            session.quit()
        self.assertEqual(len(self.received), 2)
        self.assertEqual(self.received[0].content.replace(b"\r\n", b"\n"), BODY.replace(b"\r\n", b"\n"))

    @inlineCallbacks
    def test_badPassword(self) -> Any:
        """
        aiosmtpd's 535 to the relay's own password is a configuration
        fault: a soft bounce (454 4.7.0).  To a client's own credentials
        (C{auth forward}) it comes back whole, as the error's reply.
        """
        error = yield self.assertFailure(
            self.net.failover(self.target("plain", "wrong")).open(), DownstreamError
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_AUTH)
        self.assertNotIn("wrong", error.reason)
        forward = makeTarget(
            Address("tcp", HOST, self.port), auth=DownstreamAuth("forward"),
            tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )
        error = yield self.assertFailure(
            self.net.failover(forward).open(credentials=Credentials("relay", "wrong")), DownstreamError
        )
        self.assertEqual(error.reply.code, 535)
        self.assertEqual(error.reply.enhanced, "5.7.8")
        self.assertEqual(error.reply.text, "Authentication credentials invalid")
        self.assertNotIn("wrong", error.reason)

    @inlineCallbacks
    def test_forward(self) -> Any:
        target = makeTarget(
            Address("tcp", HOST, self.port), auth=DownstreamAuth("forward"),
            tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )
        session, _ = yield self.net.failover(target).open(credentials=Credentials("relay", "s3cret"))
        self.assertIsNotNone(session.tls)
        session.quit()


class DovecotLMTPTests(TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.procs = Processes(self)
        self.dir = self.procs.dovecot()
        self.net = Loopback(self)

    @inlineCallbacks
    def test_perRecipient(self) -> Any:
        """
        alice and bob deliver, an unknown user is refused at RCPT (550
        5.1.1), a full mailbox gets 552 5.2.2 after the dot: replies in
        RCPT order for the accepted ones.
        """
        target = makeTarget(Address("unix", path=os.path.join(self.dir, "lmtp")),
                            protocol="lmtp", attemptStartTLS=False)
        session, mailReply = yield self.net.failover(target).open(mail=(b"a@example.org", {}))
        self.assertEqual(mailReply.code, 250)
        self.assertEqual(session.peer, os.path.join(self.dir, "lmtp"))
        codes = []
        for rcpt in (b"alice", b"nobody-here", b"full", b"bob"):
            r = yield session.rcpt(rcpt, {})
            codes.append((r.code, r.enhanced))
        self.assertEqual(codes[1], (550, "5.1.1"))
        self.assertEqual([c[0] for c in codes], [250, 550, 250, 250])
        yield session.data()
        session.write(b"Subject: hi\r\n\r\n" + b"x" * 4096 + b"\r\n")
        final = yield session.endData()
        self.assertEqual(
            [(r.code, r.enhanced) for r in final], [(250, "2.0.0"), (552, "5.2.2"), (250, "2.0.0")]
        )
        session.quit()



