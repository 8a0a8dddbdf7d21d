"""
Tests for L{smtprelay.relay.failover}: which failure moves on to the next target,
back-off, TLS and AUTH rules, all in memory against scripted fakes.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app.tls import clientOptions
from smtprelay.protocol import replies
from smtprelay.config.model import Address, ClientTLS, DownstreamAuth, Secret, Target
from smtprelay.app.targets import makeFailover
from smtprelay.relay.failover import Failover
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError, IDownstream
from smtprelay.protocol.replies import Reply, reply
from smtprelay.testing.downstream import CLOSE, STALL, MemoryNetwork, Script

from .logcapture import captureEvents

MX1 = Address("tcp", "mx1.example", 25)
MX2 = Address("tcp", "mx2.example", 25)
MX3 = Address("tcp", "mx3.example", 25)
TLS_EHLO = b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
MAIL: tuple[bytes, dict[str, str | None]] = (b"a@example.org", {})


def makeTarget(*endpoints: Address, **kw: Any) -> Target:
    kw.setdefault("protocol", "smtp")
    kw.setdefault("attemptStartTLS", False)
    # In memory TLS is pretended: there is no certificate to verify (the
    # verification rules are tested over real TLS in test_tls).
    kw.setdefault("tlsClient", ClientTLS(insecureSkipVerify=True))
    return Target(name="t", endpoints=endpoints or (MX1, MX2), hostname="relay.example", **kw)


class FailoverTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.net = MemoryNetwork(self.clock)

    def failover(self, target: Target, loopToken: str = "") -> Failover:
        return makeFailover(target, reactor=None, loopToken=loopToken, clock=self.clock,
                            endpointFactory=self.net)

    def open(self, failover: Failover, **kw: Any) -> Any:
        d = failover.open(**kw)
        self.net.flush()
        return d

    def opened(self, failover: Failover, **kw: Any) -> tuple[IDownstream, Reply | None]:
        return self.successResultOf(self.open(failover, **kw))

    def failed(self, failover: Failover, **kw: Any) -> DownstreamError:
        return self.failureResultOf(self.open(failover, **kw), DownstreamError).value


class OrderTests(FailoverTestCase):
    def test_first(self) -> None:
        first = self.net.add(str(MX1))
        self.net.add(str(MX2))
        session, mailReply = self.opened(self.failover(makeTarget()))
        self.assertIsNone(mailReply)
        self.assertEqual(self.net.attempts, [str(MX1)])
        self.assertEqual(session.peer, "mx1.example[192.0.2.25]:25")
        self.assertEqual(session.policy.name, "t")
        self.assertEqual(bytes(first.connections[0].received), b"EHLO relay.example\r\n")

    def test_refusedThenNext(self) -> None:
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget()))
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2)])
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_badGreetingThenNext(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"greeting": b"554 5.3.2 go away\r\n"}))
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget()))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.assertEqual(first.connections[0].commands, [b"QUIT"])

    def test_ehloErrorThenNext(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"EHLO": b"421 4.3.2 busy\r\n"}))
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget()))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.assertTrue(first.connections[0].lost)

    def test_heloFallback(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"EHLO": b"502 5.5.1 no\r\n"}))
        session, _ = self.opened(self.failover(makeTarget()))
        self.assertEqual(first.connections[0].commands, [b"EHLO relay.example", b"HELO relay.example"])
        self.assertEqual(session.capabilities, {})

    def test_lmtp(self) -> None:
        first = self.net.add(str(MX1), lmtp=True)
        self.opened(self.failover(makeTarget(protocol="lmtp")))
        self.assertEqual(first.connections[0].commands, [b"LHLO relay.example"])

    def test_malformedGreetingThenNext(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": b"HTTP/1.1 400 Bad\r\n"}))
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget()))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_allFailed(self) -> None:
        error = self.failed(self.failover(makeTarget()))
        self.assertEqual(error.reply, replies.NO_DOWNSTREAM)
        self.assertIn("mx1.example", error.reason)
        self.assertIn("mx2.example", error.reason)

    def test_dns(self) -> None:
        """
        Every failure a DNS failure: 451 4.4.4; mixed: 451 4.4.1.
        """
        self.net.unresolvable(str(MX1))
        self.net.unresolvable(str(MX2))
        self.assertEqual(self.failed(self.failover(makeTarget())).reply, replies.DOWNSTREAM_DNS)
        self.assertEqual(
            self.failed(self.failover(makeTarget(MX1, MX2, MX3))).reply, replies.NO_DOWNSTREAM
        )


class MailTests(FailoverTestCase):
    def test_mailAccepted(self) -> None:
        first = self.net.add(str(MX1))
        _session, mailReply = self.opened(self.failover(makeTarget()), mail=MAIL)
        assert mailReply is not None
        self.assertEqual(mailReply.code, 250)
        self.assertEqual(first.connections[0].commands[-1], b"MAIL FROM:<a@example.org>")

    def test_temporaryMailThenNext(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"MAIL": b"451 4.3.0 try later\r\n"}))
        self.net.add(str(MX2))
        session, _mailReply = self.opened(self.failover(makeTarget()), mail=MAIL)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")

    def test_mailConnectionLostThenNext(self) -> None:
        self.net.add(str(MX1), Script(replies={"MAIL": CLOSE}))
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget()), mail=MAIL)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_permanentMailReturned(self) -> None:
        self.net.add(str(MX1), Script(replies={"MAIL": b"550 5.7.1 sender rejected\r\n"}))
        self.net.add(str(MX2))
        _session, mailReply = self.opened(self.failover(makeTarget()), mail=MAIL)
        self.assertEqual(mailReply, reply(550, "5.7.1", "sender rejected"))
        self.assertEqual(self.net.attempts, [str(MX1)])


class LoopTests(FailoverTestCase):
    def test_loopToken(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": b"220 relay.example ESMTP smtprelay 3f9a1c\r\n"}))
        self.net.add(str(MX2))
        error = self.failed(self.failover(makeTarget(), loopToken="3f9a1c"))
        self.assertEqual(error.reply, replies.LOOP)
        self.assertEqual(self.net.attempts, [str(MX1)])

    def test_otherToken(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": b"220 relay.example ESMTP smtprelay 3f9a1c\r\n"}))
        session, _ = self.opened(self.failover(makeTarget(), loopToken="aaaaaa"))
        self.assertEqual(session.peer, "mx1.example[192.0.2.25]:25")


class BackoffTests(FailoverTestCase):
    def test_backoffAndRecovery(self) -> None:
        """
        A dead first target is skipped while it rests and tried first again
        once its back-off expired.
        """
        failover = self.failover(makeTarget(backoff=30))
        self.net.add(str(MX2))
        self.opened(failover)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2)])
        self.clock.advance(29)
        self.opened(failover)
        self.assertEqual(self.net.attempts[2:], [str(MX2)])
        self.net.add(str(MX1))
        self.clock.advance(1)
        session, _ = self.opened(failover)
        self.assertEqual(self.net.attempts[3:], [str(MX1)])
        self.assertEqual(session.peer, "mx1.example[192.0.2.25]:25")

    def test_allResting(self) -> None:
        """
        When every target rests they are all tried anyway, in order.
        """
        failover = self.failover(makeTarget(backoff=30))
        self.failed(failover)
        self.net.add(str(MX2))
        self.opened(failover)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2), str(MX1), str(MX2)])

    def test_greetingFailureRests(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": b"421 4.3.2 busy\r\n"}))
        self.net.add(str(MX2))
        failover = self.failover(makeTarget(backoff=30))
        self.opened(failover)
        self.opened(failover)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2), str(MX2)])

    def test_mailFailureDoesNotRest(self) -> None:
        self.net.add(str(MX1), Script(replies={"MAIL": b"451 4.3.0 later\r\n"}))
        self.net.add(str(MX2))
        failover = self.failover(makeTarget(backoff=30))
        self.opened(failover, mail=MAIL)
        self.opened(failover, mail=MAIL)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2), str(MX1), str(MX2)])


class TimeoutTests(FailoverTestCase):
    def test_connectTimeout(self) -> None:
        self.net.hang(str(MX1))
        self.net.add(str(MX2))
        d = self.failover(makeTarget(connectTimeout=10)).open()
        self.net.flush()
        self.clock.advance(9)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.net.flush()
        session, _ = self.successResultOf(d)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_greetingTimeout(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": STALL}))
        self.net.add(str(MX2))
        d = self.failover(makeTarget(commandTimeout=20)).open()
        self.net.flush()
        self.clock.advance(20)
        self.net.flush()
        session, _ = self.successResultOf(d)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_mailTimeout(self) -> None:
        self.net.add(str(MX1), Script(replies={"MAIL": STALL}))
        self.net.add(str(MX2))
        d = self.failover(makeTarget(commandTimeout=20)).open(mail=MAIL)
        self.net.flush()
        self.clock.advance(20)
        self.net.flush()
        session, _mailReply = self.successResultOf(d)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")


class StartTLSTests(FailoverTestCase):
    def test_startTLSThenEhloAgain(self) -> None:
        """
        STARTTLS when offered; capabilities forgotten and learned again.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        session, _ = self.opened(self.failover(makeTarget(attemptStartTLS=True)))
        self.assertEqual(
            first.connections[0].commands,
            [b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example"],
        )
        self.assertIsNotNone(session.tls)
        self.assertNotIn("STARTTLS", session.capabilities)

    def test_optionsCached(self) -> None:
        """
        TLS options are built once per target host, not per session.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        failover = self.failover(makeTarget(attemptStartTLS=True))
        self.opened(failover)
        self.opened(failover)
        first, second = (p.clientIO.tlsStarted[0] for p in self.net.pumps)
        self.assertIs(first, second)

    def test_notOfferedRequireTLS(self) -> None:
        for key in (MX1, MX2):
            self.net.add(str(key))
        error = self.failed(self.failover(makeTarget(requireTLS=True)))
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)

    def test_notOfferedPlain(self) -> None:
        """
        attempt_starttls without require_tls: no STARTTLS offered, plain
        text it is.
        """
        first = self.net.add(str(MX1))
        session, _ = self.opened(self.failover(makeTarget(attemptStartTLS=True)))
        self.assertIsNone(session.tls)
        self.assertEqual(first.connections[0].commands, [b"EHLO relay.example"])

    def test_refused454(self) -> None:
        """
        454 to STARTTLS: plain text on the same connection, unless
        require_tls, which moves on.
        """
        script = Script(replies={"EHLO": TLS_EHLO, "STARTTLS": b"454 4.7.0 TLS not available\r\n"})
        first = self.net.add(str(MX1), script)
        session, _ = self.opened(self.failover(makeTarget(attemptStartTLS=True)))
        self.assertIsNone(session.tls)
        self.assertEqual(len(first.connections), 1)
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        session, _ = self.opened(self.failover(makeTarget(requireTLS=True)))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.assertIsNotNone(session.tls)

    def test_handshakeFailureRetriedPlain(self) -> None:
        """
        Seed rule: a failed handshake is retried on a new connection without
        STARTTLS when TLS is not required.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        session, _mailReply = self.opened(self.failover(makeTarget(attemptStartTLS=True)), mail=MAIL)
        self.assertEqual(len(first.connections), 2)
        self.assertEqual(first.connections[0].commands, [b"EHLO relay.example", b"STARTTLS"])
        self.assertEqual(
            first.connections[1].commands, [b"EHLO relay.example", b"MAIL FROM:<a@example.org>"]
        )
        self.assertIsNone(session.tls)

    def test_handshakeFailureRequireTLS(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        session, _ = self.opened(self.failover(makeTarget(requireTLS=True)))
        self.assertEqual(len(first.connections), 1)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")

    def test_injectionAfterStartTLS(self) -> None:
        """
        Bytes after the 220 to STARTTLS are an injection: that endpoint
        cannot give TLS (C{require_tls} gets C{4.7.5} when none can), and
        it is never retried in plain text.
        """
        injecting = Script(replies={"EHLO": TLS_EHLO, "STARTTLS": b"220 go\r\n250 injected\r\n"})
        first = self.net.add(str(MX1), injecting)
        self.net.add(str(MX2))
        session, _ = self.opened(self.failover(makeTarget(attemptStartTLS=True)))
        self.assertEqual(len(first.connections), 1)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.net.add(str(MX2), injecting)
        error = self.failed(self.failover(makeTarget(requireTLS=True)))
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)

    def test_handshakeFailureEveryTarget(self) -> None:
        for key in (MX1, MX2):
            self.net.add(str(key), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        error = self.failed(self.failover(makeTarget(requireTLS=True)))
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2)])

    def test_neverInsideImplicitTLS(self) -> None:
        """
        tls:// targets are TLS already: no STARTTLS even when offered.
        """
        implicit = Address("tls", "mx1.example", 465)
        first = self.net.add(str(implicit), Script(replies={"EHLO": TLS_EHLO}))
        self.opened(self.failover(makeTarget(implicit, attemptStartTLS=True)))
        self.assertEqual(first.connections[0].commands, [b"EHLO relay.example"])


class AuthTests(FailoverTestCase):
    def auth(self, mechanism: str) -> DownstreamAuth:
        if mechanism in ("plain", "login"):
            return DownstreamAuth(mechanism, "relay-user", Secret("pa55word"))  # type: ignore[arg-type]  # the tests pass the Literal's words
        return DownstreamAuth(mechanism)  # type: ignore[arg-type]  # the tests pass the Literal's words

    def test_plainAfterTLS(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        self.opened(self.failover(makeTarget(auth=self.auth("plain"))))
        self.assertEqual(
            first.connections[0].commands,
            [b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example",
             b"AUTH PLAIN AHJlbGF5LXVzZXIAcGE1NXdvcmQ="],
        )

    def test_loginAfterTLS(self) -> None:
        script = Script(replies={"EHLO": TLS_EHLO}, auth=[b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 ok\r\n"])
        first = self.net.add(str(MX1), script)
        self.opened(self.failover(makeTarget(auth=self.auth("login"))))
        self.assertEqual(
            first.connections[0].commands[3:], [b"AUTH LOGIN", b"cmVsYXktdXNlcg==", b"cGE1NXdvcmQ="]
        )

    def test_forward(self) -> None:
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        self.opened(self.failover(makeTarget(auth=self.auth("forward"))),
                    credentials=Credentials("alice", "wonder"))
        self.assertEqual(first.connections[0].commands[-1], b"AUTH PLAIN AGFsaWNlAHdvbmRlcg==")

    def test_external(self) -> None:
        ehlo = TLS_EHLO.replace(b"AUTH PLAIN LOGIN", b"AUTH EXTERNAL")
        first = self.net.add(str(MX1), Script(replies={"EHLO": ehlo}))
        self.opened(self.failover(makeTarget(auth=self.auth("external"))))
        self.assertEqual(first.connections[0].commands[-1], b"AUTH EXTERNAL =")

    def test_neverOverPlaintext(self) -> None:
        """
        A target that would need AUTH without TLS is skipped; AUTH is never
        sent.
        """
        first = self.net.add(str(MX1))
        second = self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        for mechanism in ("plain", "login", "forward"):
            error = self.failed(self.failover(makeTarget(auth=self.auth(mechanism))),
                                credentials=Credentials("alice", "wonder"))
            self.assertEqual(error.reply, replies.NO_DOWNSTREAM)
        for server in (first, second):
            for connection in server.connections:
                self.assertFalse(any(c.startswith(b"AUTH") for c in connection.commands))
        # No plain-text retry after the failed handshake: it could not AUTH.
        self.assertEqual(len(second.connections), 3)

    def test_clientsCredentialsRefusedPassedWhole(self) -> None:
        """
        C{auth forward}: a 5xx to AUTH is the downstream's verdict on the
        client's own credentials: returned whole, no next target.
        """
        script = Script(replies={"EHLO": TLS_EHLO}, auth=[b"535-5.7.8 Bad credentials\r\n535 5.7.8 see docs\r\n"])
        self.net.add(str(MX1), script)
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        error = self.failed(self.failover(makeTarget(auth=self.auth("forward"))),
                            credentials=Credentials("alice", "wonder"))
        self.assertEqual(error.reply, reply(535, "5.7.8", "Bad credentials", "see docs"))
        self.assertEqual(self.net.attempts, [str(MX1)])
        self.assertNotIn("wonder", error.reason)
        self.assertNotIn("wonder", str(error))

    def assertSoftBounce(self, *scripts: Script, mechanism: str = "plain") -> list[Any]:
        """
        The relay's own credentials cannot be used at any endpoint: each is
        tried once, the failure is C{454 4.7.0} (never the downstream's
        5xx), and an error names the target and the endpoint.
        """
        for address, script in zip((MX1, MX2), scripts):
            self.net.add(str(address), script)
        events = captureEvents(self)
        error = self.failed(self.failover(makeTarget(auth=self.auth(mechanism))))
        self.assertEqual(error.reply, replies.DOWNSTREAM_AUTH)
        self.assertEqual(replies.DOWNSTREAM_AUTH.toBytes(),
                         b"454 4.7.0 Relay cannot authenticate downstream, try again later\r\n")
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2)])
        self.assertNotIn("pa55word", str(error))
        errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 2, errors)
        self.assertIn("target t: cannot authenticate at mx1.example[192.0.2.25]:25", errors[0])
        self.assertIn("target t: cannot authenticate at mx2.example[192.0.2.25]:25", errors[1])
        return errors

    def test_ownCredentialsRefused(self) -> None:
        """
        Issue 13 item 3: C{auth plain relayuser wrongpass}, the downstream
        answers 535: a configuration fault, soft-bounced.
        """
        refused = Script(replies={"EHLO": TLS_EHLO}, auth=[b"535 5.7.8 Error: authentication failed\r\n"])
        errors = self.assertSoftBounce(refused, refused)
        self.assertIn("PLAIN authentication refused: 535 Error: authentication failed", errors[0])

    def test_authNotOffered(self) -> None:
        """
        A target that offers no AUTH, or not the configured mechanism, is
        never sent our credentials.
        """
        noAuth = Script(replies={"EHLO": TLS_EHLO.replace(b"250-AUTH PLAIN LOGIN\r\n", b"")})
        loginOnly = Script(replies={"EHLO": TLS_EHLO.replace(b"AUTH PLAIN LOGIN", b"AUTH LOGIN")})
        errors = self.assertSoftBounce(noAuth, loginOnly)
        self.assertIn("PLAIN authentication not offered", errors[0])
        for server in self.net._servers.values():
            self.assertFalse(any(c.startswith(b"AUTH") for c in server.connections[0].commands))

    def test_ownCredentialsRefusedThenNext(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}, auth=[b"535 5.7.8 no\r\n"]))
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        session, mailReply = self.opened(self.failover(makeTarget(auth=self.auth("plain"))), mail=MAIL)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        assert mailReply is not None
        self.assertEqual(mailReply.code, 250)

    def test_temporaryThenNext(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}, auth=[b"454 4.7.0 try later\r\n"]))
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        session, _ = self.opened(self.failover(makeTarget(auth=self.auth("plain"))))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")


class ReuseTests(FailoverTestCase):
    """
    L{Failover.release} keeps a connection that is between transactions
    for the next client session (Postfix's connection cache).
    """

    def transaction(self, failover: Failover) -> IDownstream:
        """
        A whole transaction on a session from C{failover}, ended by the
        downstream's 250.
        """
        session, mailReply = self.opened(failover, mail=MAIL)
        assert mailReply is not None and mailReply.code == 250
        rcpt = session.rcpt(b"b@example.org", {})
        data = session.data()
        self.net.flush()
        self.assertEqual(self.successResultOf(rcpt).code, 250)
        self.assertEqual(self.successResultOf(data).code, 354)
        session.write(b"Subject: x\r\n\r\nbody\r\n")
        end = session.endData()
        self.net.flush()
        self.assertEqual([r.code for r in self.successResultOf(end)], [250])
        return session

    def test_reusedAfterTransaction(self) -> None:
        """
        The next MAIL goes out on the released connection: no new connect,
        greeting or EHLO.
        """
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget())
        session = self.transaction(failover)
        failover.release(session)
        again, mailReply = self.opened(failover, mail=MAIL)
        self.assertIs(again, session)
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(self.net.attempts, [str(MX1)])
        commands = first.connections[0].commands
        self.assertEqual(
            [c for c in commands if not c.startswith(b"Subject") and c not in (b"", b"body", b".")],
            [b"EHLO relay.example", b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>",
             b"DATA", b"MAIL FROM:<a@example.org>"],
        )

    def test_midTransactionQuits(self) -> None:
        """
        A connection released with a transaction open (MAIL accepted, no
        end-of-data) is not kept: QUIT.
        """
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget())
        session, _ = self.opened(failover, mail=MAIL)
        failover.release(session)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")
        self.opened(failover, mail=MAIL)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX1)])

    def test_rejectedMailIsBetweenTransactions(self) -> None:
        """
        After a refused MAIL the connection has no transaction: kept.
        """
        first = self.net.add(str(MX1), Script(replies={"MAIL": b"550 5.7.1 no\r\n"}))
        failover = self.failover(makeTarget())
        session, _ = self.opened(failover, mail=MAIL)
        failover.release(session)
        again, _ = self.opened(failover, mail=MAIL)
        self.assertIs(again, session)
        self.assertEqual(len(first.connections), 1)

    def test_afterRset(self) -> None:
        self.net.add(str(MX1))
        failover = self.failover(makeTarget())
        session, _ = self.opened(failover, mail=MAIL)
        reset = session.rset()
        self.net.flush()
        self.assertEqual(self.successResultOf(reset).code, 250)
        failover.release(session)
        again, _ = self.opened(failover, mail=MAIL)
        self.assertIs(again, session)

    def test_idleExpiry(self) -> None:
        """
        An idle connection waits C{reuse_idle_time}, then gets QUIT.
        """
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget(reuseIdleTime=2.0))
        session, _ = self.opened(failover)
        failover.release(session)
        self.net.flush()
        self.clock.advance(1.9)
        self.net.flush()
        self.assertNotIn(b"QUIT", first.connections[0].commands)
        self.clock.advance(0.1)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")
        self.assertTrue(first.connections[0].lost)
        self.opened(failover, mail=MAIL)
        self.assertEqual(len(first.connections), 2)

    def test_timeLimit(self) -> None:
        """
        A connection older than C{reuse_time_limit} is not kept.
        """
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget(reuseTimeLimit=60.0))
        session, _ = self.opened(failover)
        self.clock.advance(60)
        failover.release(session)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")

    def test_disabled(self) -> None:
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget(reuseConnections=False))
        session, _ = self.opened(failover)
        failover.release(session)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")

    def test_forwardNeverKept(self) -> None:
        """
        A connection authenticated with a client's own credentials serves
        that client only.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        failover = self.failover(
            makeTarget(auth=DownstreamAuth("forward"), attemptStartTLS=True)
        )
        session, _ = self.opened(failover, credentials=Credentials("u", "p"))
        failover.release(session)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")

    def test_closedWhileIdle(self) -> None:
        """
        A kept connection the downstream closed is skipped; the client's
        MAIL goes to a new one and never sees the failure.
        """
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget())
        session, _ = self.opened(failover)
        failover.release(session)
        first.connections[0].transport.loseConnection()
        self.net.flush()
        again, mailReply = self.opened(failover, mail=MAIL)
        self.assertIsNot(again, session)
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(len(first.connections), 2)

    def test_staleAnswersMail(self) -> None:
        """
        The downstream timed the idle connection out just as MAIL went out
        (421, or the connection drops): a new connection takes the MAIL.
        """
        for stale in (b"421 4.4.2 fake.example idle too long\r\n" + CLOSE, CLOSE):
            self.net = MemoryNetwork(self.clock)
            first = self.net.add(str(MX1))
            failover = self.failover(makeTarget())
            session, _ = self.opened(failover)
            failover.release(session)
            first.connections[0].script = Script(replies={"MAIL": stale})
            again, mailReply = self.opened(failover, mail=MAIL)
            self.assertIsNot(again, session)
            self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
            self.assertEqual(len(first.connections), 2)

    def test_preferredEndpointOnly(self) -> None:
        """
        A connection to a fallback endpoint is not reused once the first
        endpoint is back: the configured order wins.
        """
        self.net.add(str(MX2))
        failover = self.failover(makeTarget(backoff=30))
        session, _ = self.opened(failover)
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        failover.release(session)
        self.clock.advance(1)
        again, _ = self.opened(failover, mail=MAIL)
        self.assertIs(again, session)
        failover.release(again)
        self.net.add(str(MX1))
        self.clock.advance(30)
        fresh, _ = self.opened(failover, mail=MAIL)
        self.assertEqual(fresh.peer, "mx1.example[192.0.2.25]:25")

    def test_closeQuitsIdle(self) -> None:
        first = self.net.add(str(MX1))
        failover = self.failover(makeTarget())
        session, _ = self.opened(failover)
        failover.release(session)
        failover.close()
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")
        other, _ = self.opened(failover)
        failover.release(other)
        self.net.flush()
        self.assertEqual(first.connections[1].commands[-1], b"QUIT")


class AttemptLogTests(FailoverTestCase):
    """
    One log line per failed attempt (target, endpoint, stage,
    reason), even when a later endpoint succeeds, as Postfix logs each MX
    it could not use.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events = captureEvents(self)

    def attempts(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events if e.get("attempt")]

    def test_connectRefusedThenNext(self) -> None:
        self.net.add(str(MX2))
        self.opened(self.failover(makeTarget()), sessionId="S1D")
        self.assertEqual(
            self.attempts(),
            ["S1D: target t: tcp://mx1.example:25 failed at connect: "
             "connect failed: ConnectionRefusedError: Connection was refused by other side: "
             "tcp://mx1.example:25."],
        )
        [event] = [e for e in self.events if e.get("attempt")]
        self.assertEqual(
            {k: event[k] for k in ("session", "target", "endpoint", "stage")},
            {"session": "S1D", "target": "t", "endpoint": "tcp://mx1.example:25", "stage": "connect"},
        )

    def test_stages(self) -> None:
        """
        Each step names itself: greeting, EHLO, STARTTLS (under
        C{require_tls}), AUTH, MAIL, and a connection lost in reply to a
        command is the stage of that command.
        """
        cases: list[tuple[Script, dict[str, Any], str, str]] = [
            (Script(replies={"greeting": b"554 5.3.2 go away\r\n"}), {},
             "greeting", "greeting 554 go away"),
            (Script(replies={"EHLO": b"421 4.3.2 busy\r\n"}), {},
             "ehlo", "EHLO/HELO refused: 421 busy"),
            (Script(replies={"EHLO": b"250 fake.example\r\n"}), {"requireTLS": True},
             "starttls", "no TLS available"),
            (Script(replies={"EHLO": TLS_EHLO, "STARTTLS": CLOSE}), {"requireTLS": True},
             "starttls", "connection to mx1.example[192.0.2.25]:25 lost"),
            (Script(replies={"EHLO": TLS_EHLO}, auth=[b"454 4.7.0 try later\r\n"]),
             {"auth": DownstreamAuth("plain", "u", Secret("p"))},
             "auth", "PLAIN authentication refused: 454 try later at mx1.example[192.0.2.25]:25"),
            (Script(replies={"MAIL": b"451 4.3.0 try later\r\n"}), {},
             "mail", "451 4.3.0 try later"),
        ]
        for script, options, stage, reason in cases:
            self.events.clear()
            self.net = MemoryNetwork(self.clock)
            self.net.add(str(MX1), script)
            self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
            session, _ = self.opened(self.failover(makeTarget(**options)), mail=MAIL, sessionId="S2")
            self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
            self.assertEqual(
                self.attempts(), [f"S2: target t: tcp://mx1.example:25 failed at {stage}: {reason}"]
            )

    def test_authFailureReadableAfterRedaction(self) -> None:
        """
        The redacting observers mask what follows C{AUTH MECHANISM}: the
        reasons of AUTH failures do not start that way, so the line stays
        whole.
        """
        from smtprelay.observe.logs import redact

        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}, auth=[b"454 4.7.0 try later\r\n"]))
        self.net.add(str(MX2), Script(replies={"EHLO": TLS_EHLO}))
        self.net.add(str(MX3))  # no STARTTLS
        self.opened(self.failover(makeTarget(auth=DownstreamAuth("plain", "u", Secret("p")))))
        self.failed(self.failover(makeTarget(MX2, auth=DownstreamAuth("forward"))))
        self.failed(self.failover(makeTarget(MX3, auth=DownstreamAuth("login", "u", Secret("p")))))
        self.assertEqual(
            [line.split(" failed at auth: ")[1] for line in self.attempts()],
            ["PLAIN authentication refused: 454 try later at mx1.example[192.0.2.25]:25",
             "no client credentials to forward",
             "login authentication needs TLS, which was not available"],
        )
        for line in self.attempts():
            self.assertEqual(redact(line), line)

    def test_tlsRetryLogged(self) -> None:
        """
        A failed handshake is an attempt of its own before the plain-text
        retry on the same endpoint.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        self.opened(self.failover(makeTarget(attemptStartTLS=True)), mail=MAIL, sessionId="S3")
        self.assertEqual(
            self.attempts(),
            ["S3: target t: tcp://mx1.example:25 failed at starttls: "
             "TLS handshake with mx1.example[192.0.2.25]:25 failed"],
        )


XFORWARD_EHLO = b"250-fake.example\r\n250-PIPELINING\r\n250-XFORWARD NAME ADDR PROTO HELO SOURCE PORT IDENT\r\n250 8BITMIME\r\n"
XCLIENT_EHLO = (
    b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN\r\n"
    b"250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT\r\n250 8BITMIME\r\n"
)


def clientSession(host: str, helo: str, sessionId: str = "S1D") -> ClientSession:
    return ClientSession(id=sessionId, protocol="smtp", clientHost=host, clientPort=40000,
                         heloName=helo, esmtp=True)


class ClientInfoTests(FailoverTestCase):
    """
    C{forward_client_info}: XFORWARD before every MAIL, XCLIENT once per
    connection, only when the downstream advertises them.
    """

    def test_xforwardBeforeMail(self) -> None:
        """
        XFORWARD goes before MAIL, in Postfix's two commands, pipelined with
        it; the client gets the MAIL reply.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": XFORWARD_EHLO}))
        client = clientSession("192.0.2.7", "client.example")
        _, mailReply = self.opened(self.failover(makeTarget(forwardClientInfo="xforward")), mail=MAIL,
                                   client=client)
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(bytes(first.connections[0].received), (
            b"EHLO relay.example\r\n"
            b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000\r\n"
            b"XFORWARD PROTO=ESMTP HELO=client.example IDENT=S1D SOURCE=REMOTE\r\n"
            b"MAIL FROM:<a@example.org>\r\n"
        ))

    def test_onlyWhenAdvertisedAndConfigured(self) -> None:
        """
        A downstream that does not advertise XFORWARD gets none; a target
        without C{forward_client_info} sends none to one that does.
        """
        client = clientSession("192.0.2.7", "client.example")
        plain = self.net.add(str(MX1))
        self.opened(self.failover(makeTarget(MX1, forwardClientInfo="xforward")), mail=MAIL, client=client)
        offered = self.net.add(str(MX2), Script(replies={"EHLO": XFORWARD_EHLO}))
        self.opened(self.failover(makeTarget(MX2)), mail=MAIL, client=client)
        for fake in (plain, offered):
            self.assertEqual(fake.connections[0].commands, [b"EHLO relay.example", b"MAIL FROM:<a@example.org>"])

    def test_xforwardRefusedStillDelivers(self) -> None:
        """
        A refused XFORWARD is logged, as Postfix's C{smtp} warns, and the
        transaction goes on under the relay's identity.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": XFORWARD_EHLO, "XFORWARD": b"550 5.7.0 not authorized\r\n"}))
        events = captureEvents(self)
        _, mailReply = self.opened(self.failover(makeTarget(forwardClientInfo="xforward")), mail=MAIL,
                                   client=clientSession("192.0.2.7", "client.example"))
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn]
        self.assertEqual(warnings[0], "mx1.example[192.0.2.25]:25 said: 550 5.7.0 not authorized "
                                      "(in reply to XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000)")

    def test_reusedConnectionCarriesTheNextClient(self) -> None:
        """
        A pooled connection's next transaction has the XFORWARD of its own
        client, not of the client that used the connection before.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": XFORWARD_EHLO}))
        failover = self.failover(makeTarget(forwardClientInfo="xforward"))
        session, _ = self.opened(failover, mail=MAIL, client=clientSession("192.0.2.7", "one.example", "S1A"))
        session.rset()
        self.net.flush()
        failover.release(session)
        again, mailReply = self.opened(failover, mail=MAIL, client=clientSession("2001:db8::9", "two.example", "S2B"))
        self.assertIs(again, session)
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(first.connections[0].commands[-3:], [
            b"XFORWARD NAME=[UNAVAILABLE] ADDR=IPv6:2001:db8::9 PORT=40000",
            b"XFORWARD PROTO=ESMTP HELO=two.example IDENT=S2B SOURCE=REMOTE",
            b"MAIL FROM:<a@example.org>",
        ])

    def test_xclientAfterStartTLSBeforeAuth(self) -> None:
        """
        XCLIENT comes after STARTTLS and its EHLO (it keeps TLS), then EHLO
        again after its 220 (a new session) with the client's HELO name,
        then AUTH (which XCLIENT would have forgotten), then MAIL without
        XFORWARD.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": XCLIENT_EHLO}))
        target = makeTarget(forwardClientInfo="xclient", auth=DownstreamAuth("plain", "relay", Secret("pw")))
        client = clientSession("192.0.2.7", "client.example")
        client.user = "alice"
        _, mailReply = self.opened(self.failover(target), mail=MAIL, client=client)
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(first.connections[0].commands, [
            b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example",
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000 PROTO=ESMTP HELO=client.example LOGIN=alice",
            b"EHLO client.example", b"AUTH PLAIN AHJlbGF5AHB3", b"MAIL FROM:<a@example.org>",
        ])

    def test_xclientConnectionNotPooled(self) -> None:
        """
        A connection that took on one client's identity with XCLIENT is not
        kept for another client session: QUIT.
        """
        first = self.net.add(str(MX1), Script(replies={"EHLO": XCLIENT_EHLO.replace(b"250-STARTTLS\r\n", b"")}))
        failover = self.failover(makeTarget(forwardClientInfo="xclient"))
        session, _ = self.opened(failover, mail=MAIL, client=clientSession("192.0.2.7", "one.example"))
        session.rset()
        self.net.flush()
        failover.release(session)
        self.net.flush()
        self.assertEqual(first.connections[0].commands[-1], b"QUIT")
        self.opened(failover, mail=MAIL, client=clientSession("192.0.2.8", "two.example"))
        self.assertEqual(self.net.attempts, [str(MX1), str(MX1)])
        self.assertEqual(first.connections[1].commands[1],
                         b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.8 PORT=40000 PROTO=ESMTP HELO=two.example "
                         b"LOGIN=[UNAVAILABLE]")

    def test_xclientRefusedThenNext(self) -> None:
        """
        A refused XCLIENT fails that endpoint (stage C{xclient}); the next
        one is tried.
        """
        ehlo = XCLIENT_EHLO.replace(b"250-STARTTLS\r\n", b"")
        first = self.net.add(str(MX1), Script(replies={"EHLO": ehlo, "XCLIENT": b"550 5.7.0 Not authorized\r\n"}))
        self.net.add(str(MX2), Script(replies={"EHLO": ehlo}))
        session, _ = self.opened(self.failover(makeTarget(forwardClientInfo="xclient")), mail=MAIL,
                                 client=clientSession("192.0.2.7", "client.example"))
        self.assertEqual(session.peer, "mx2.example[192.0.2.25]:25")
        self.assertTrue(first.connections[0].lost)

    def test_xclientEhloWithoutUsableHeloName(self) -> None:
        """
        A client HELO name that cannot go on an EHLO line as it is (not
        ASCII) gives the relay's own name after XCLIENT; the XCLIENT
        attribute carries it in xtext.
        """
        ehlo = XCLIENT_EHLO.replace(b"250-STARTTLS\r\n", b"")
        first = self.net.add(str(MX1), Script(replies={"EHLO": ehlo}))
        _, mailReply = self.opened(self.failover(makeTarget(forwardClientInfo="xclient")), mail=MAIL,
                                   client=clientSession("192.0.2.7", "bücher.example"))
        self.assertEqual(mailReply, reply(250, "2.1.0", "Ok"))
        self.assertEqual(first.connections[0].commands[1:3], [
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000 PROTO=ESMTP HELO=b+C3+BCcher.example "
            b"LOGIN=[UNAVAILABLE]",
            b"EHLO relay.example",
        ])
