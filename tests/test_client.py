"""
Tests for L{smtprelay.outbound.client}: the SMTP/LMTP client protocol against the
scripted fake downstream, in memory, asserting exact bytes.
"""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtprelay.protocol import replies
from smtprelay.app.targets import clientPolicy
from smtprelay.outbound.chunks import CHUNK_SIZE, CHUNKS_READY
from smtprelay.outbound.client import SMTPClientProtocol
from smtprelay.outbound.preamble import TLSFailed
from smtprelay.protocol.parameters import REQUIRETLS_UNAVAILABLE
from smtprelay.config.model import Address, Target
from smtprelay.net.tls import ClientOptions
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError, IDownstream, TLSInfo
from smtprelay.protocol.replies import Reply, reply
from smtprelay.testing.downstream import (
    CLOSE,
    DEFAULT_EHLO,
    STALL,
    FakeDownstream,
    Script,
    connectInMemory,
)

from .logcapture import Appender

EHLO_BARE = b"250-fake.example\r\n250 ENHANCEDSTATUSCODES\r\n"
EHLO_ALL = (
    b"250-fake.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 1000\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250-AUTH PLAIN LOGIN\r\n250-REQUIRETLS\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
UNUSED_OPTIONS = cast(ClientOptions, object())
"""Options for STARTTLS attempts that never reach a handshake."""


def makeTarget(**kw: Any) -> Target:
    kw.setdefault("protocol", "smtp")
    return Target(
        name="t",
        endpoints=(Address("tcp", "mx.example", 25),),
        hostname="relay.example",
        **kw,
    )


@implementer(IPushProducer)
class RecordingProducer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class Harness:
    """
    One client protocol connected to one fake downstream in memory.
    """

    def __init__(self, script: Script | None = None, lmtp: bool = False, **targetKw: Any) -> None:
        self.clock = Clock()
        self.target = makeTarget(protocol="lmtp" if lmtp else "smtp", **targetKw)
        self.client = SMTPClientProtocol(clientPolicy(self.target), self.clock, peer="mx.example[192.0.2.25]:25")
        self.server = FakeDownstream(script or Script(), lmtp)
        self.pump = connectInMemory(self.client, self.server, self.clock)

    def flush(self) -> None:
        self.pump.flush(advanceClock=False)

    def ready(self) -> Reply:
        """
        Greeting and EHLO/LHLO; return the hello reply.
        """
        results: list[Reply] = []
        self.client.greeting.addCallback(results.append)
        self.flush()
        self.client.hello("relay.example").addCallback(results.append)
        self.flush()
        assert len(results) == 2, results
        return results[1]

    def sent(self) -> bytes:
        """
        What the client wrote and has not been pumped yet.
        """
        return b"".join(self.pump.clientIO.stream)


def result(testCase: SynchronousTestCase, d: Any) -> Any:
    return testCase.successResultOf(d)


class HelloTests(SynchronousTestCase):
    def test_ehloCapabilities(self) -> None:
        """
        EHLO carries the target's hostname; the capabilities are parsed,
        keywords upper-cased.
        """
        h = Harness(Script(replies={"EHLO": b"250-fake\r\n250-size 100\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"}))
        reply = h.ready()
        self.assertEqual(reply.code, 250)
        self.assertEqual(bytes(h.server.received), b"EHLO relay.example\r\n")
        self.assertEqual(
            h.client.capabilities, {"SIZE": "100", "AUTH": "PLAIN LOGIN", "8BITMIME": ""}
        )

    def test_heloFallback(self) -> None:
        """
        A 500/502 to EHLO falls back to HELO (SMTP): no capabilities.
        """
        for code in (b"500", b"502"):
            h = Harness(Script(replies={"EHLO": code + b" 5.5.1 what\r\n"}))
            reply = h.ready()
            self.assertEqual(reply.code, 250)
            self.assertEqual(
                bytes(h.server.received), b"EHLO relay.example\r\nHELO relay.example\r\n"
            )
            self.assertEqual(h.client.capabilities, {})

    def test_ehloTemporaryNoFallback(self) -> None:
        """
        A 4xx to EHLO is returned, no HELO.
        """
        h = Harness(Script(replies={"EHLO": b"421 4.3.2 busy\r\n"}))
        self.assertEqual(h.ready().code, 421)
        self.assertEqual(bytes(h.server.received), b"EHLO relay.example\r\n")

    def test_lmtpNeverHelo(self) -> None:
        """
        LMTP says LHLO, and never falls back to HELO.
        """
        h = Harness(Script(replies={"LHLO": b"500 5.5.1 no\r\n"}), lmtp=True)
        self.assertEqual(h.ready().code, 500)
        self.assertEqual(bytes(h.server.received), b"LHLO relay.example\r\n")

    def test_implementsIDownstream(self) -> None:
        h = Harness()
        h.ready()
        self.assertTrue(verifyObject(IDownstream, h.client))
        self.assertFalse(h.client.lmtp)
        self.assertIsNone(h.client.tls)
        self.assertEqual(h.client.peer, "mx.example[192.0.2.25]:25")


class PipeliningTests(SynchronousTestCase):
    def test_pipelined(self) -> None:
        """
        With PIPELINING, MAIL, RCPTs and DATA called back to back are all
        written at once.
        """
        h = Harness(Script(replies={"EHLO": EHLO_ALL}))
        h.ready()
        got: list[Any] = []
        h.client.mail(b"a@example.org", {}).addCallback(got.append)
        h.client.rcpt(b"b@example.net", {}).addCallback(got.append)
        h.client.rcpt(b"c@example.net", {}).addCallback(got.append)
        h.client.data().addCallback(got.append)
        self.assertEqual(
            h.sent(),
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
            b"RCPT TO:<c@example.net>\r\nDATA\r\n",
        )
        h.flush()
        self.assertEqual([r.code for r in got], [250, 250, 250, 354])

    def test_lockStep(self) -> None:
        """
        Without PIPELINING each command waits for the previous reply.
        """
        h = Harness(Script(replies={"EHLO": EHLO_BARE}))
        h.ready()
        got: list[Reply] = []
        h.client.mail(b"a@example.org", {}).addCallback(got.append)
        h.client.rcpt(b"b@example.net", {}).addCallback(got.append)
        h.client.data().addCallback(got.append)
        self.assertEqual(h.sent(), b"MAIL FROM:<a@example.org>\r\n")
        h.pump.pump()  # MAIL goes
        h.pump.pump()  # its reply comes, RCPT is written
        self.assertEqual(h.sent(), b"RCPT TO:<b@example.net>\r\n")
        h.flush()
        self.assertEqual([r.code for r in got], [250, 250, 354])
        self.assertEqual(
            h.server.commands[-3:],
            [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"DATA"],
        )


class ParameterTests(SynchronousTestCase):
    """
    MAIL/RCPT parameters are filtered by what the downstream advertises.
    """

    def mailLine(self, ehlo: bytes, params: dict[str, str | None], tls: bool = False,
                 sender: bytes = b"a@example.org", user: str | None = "alice") -> tuple[Reply, bytes]:
        h = Harness(Script(replies={"EHLO": ehlo}))
        h.ready()
        if tls:
            h.client.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        before = len(h.server.received)
        client = ClientSession(id="C1", protocol="smtp", clientHost="192.0.2.7", user=user)
        d = h.client.mail(sender, params, client)
        h.flush()
        return result(self, d), bytes(h.server.received[before:])

    def test_authOnlyForAuthenticatedClients(self) -> None:
        """
        C{AUTH=} is forwarded only for authenticated clients (and only to a
        downstream that advertises AUTH).
        """
        for user, expected in ((None, b""), ("alice", b" AUTH=alice@example.org")):
            _reply, wire = self.mailLine(EHLO_ALL, {"AUTH": "alice@example.org"}, user=user)
            self.assertEqual(wire, b"MAIL FROM:<a@example.org>" + expected + b"\r\n")

    def test_allAdvertised(self) -> None:
        reply, wire = self.mailLine(
            EHLO_ALL,
            {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None, "RET": "HDRS",
             "ENVID": "x+2B", "AUTH": "<>", "REQUIRETLS": None},
            tls=True,
        )
        self.assertEqual(reply.code, 250)
        self.assertEqual(
            wire,
            b"MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME SMTPUTF8 RET=HDRS"
            b" ENVID=x+2B AUTH=<> REQUIRETLS\r\n",
        )

    def test_droppedWhenNotAdvertised(self) -> None:
        """
        SIZE, DSN's RET/ENVID, AUTH= and SMTPUTF8 (ASCII addresses) are
        dropped; BODY=7BIT is kept as the client declared it.
        """
        _reply, wire = self.mailLine(
            EHLO_BARE,
            {"SIZE": "100", "BODY": "7BIT", "SMTPUTF8": None, "RET": "FULL", "ENVID": "e", "AUTH": "u"},
        )
        self.assertEqual(wire, b"MAIL FROM:<a@example.org> BODY=7BIT\r\n")

    def test_8bitmimeConversionRequired(self) -> None:
        reply, wire = self.mailLine(EHLO_BARE, {"BODY": "8BITMIME"})
        self.assertEqual(reply, replies.CONVERSION_REQUIRED)
        self.assertEqual(wire, b"")

    def test_requireTLSUnavailable(self) -> None:
        """
        REQUIRETLS needs TLS and the extension: else 550 5.7.30 locally.
        """
        for ehlo, tls in ((EHLO_ALL, False), (EHLO_BARE, True)):
            reply, wire = self.mailLine(ehlo, {"REQUIRETLS": None}, tls=tls)
            self.assertEqual(reply, REQUIRETLS_UNAVAILABLE)
            self.assertEqual((reply.code, reply.enhanced), (550, "5.7.30"))
            self.assertEqual(wire, b"")

    def test_utf8Downconvert(self) -> None:
        """
        Without SMTPUTF8 downstream, IDN domains become A-labels.
        """
        h = Harness(Script(replies={"EHLO": EHLO_BARE}))
        h.ready()
        h.client.mail("a@bücher.example".encode(), {"SMTPUTF8": None})
        h.flush()
        h.client.rcpt("b@münchen.example".encode(), {})
        h.flush()
        self.assertEqual(
            h.server.commands[-2:],
            [b"MAIL FROM:<a@xn--bcher-kva.example>", b"RCPT TO:<b@xn--mnchen-3ya.example>"],
        )

    def test_utf8KeptWhenAdvertised(self) -> None:
        h = Harness(Script(replies={"EHLO": EHLO_ALL}))
        h.ready()
        h.client.mail("ä@bücher.example".encode(), {"SMTPUTF8": None})
        h.client.rcpt("ö@münchen.example".encode(), {})
        h.flush()
        self.assertEqual(
            h.server.commands[-2:],
            ["MAIL FROM:<ä@bücher.example> SMTPUTF8".encode(), "RCPT TO:<ö@münchen.example>".encode()],
        )

    def test_utf8SenderRefused(self) -> None:
        reply, wire = self.mailLine(EHLO_BARE, {"SMTPUTF8": None}, sender="ä@example.org".encode())
        self.assertEqual(reply, replies.UTF8_SENDER)
        self.assertEqual(wire, b"")

    def test_utf8RecipientRefused(self) -> None:
        h = Harness(Script(replies={"EHLO": EHLO_BARE}))
        h.ready()
        h.client.mail(b"a@example.org", {"SMTPUTF8": None})
        h.flush()
        before = len(h.server.received)
        d = h.client.rcpt("ö@example.net".encode(), {})
        h.flush()
        self.assertEqual(result(self, d), replies.UTF8_RECIPIENT)
        self.assertEqual(bytes(h.server.received[before:]), b"")

    def test_rcptDSN(self) -> None:
        for ehlo, expected in (
            (EHLO_ALL, b"RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net"),
            (EHLO_BARE, b"RCPT TO:<b@example.net>"),
        ):
            h = Harness(Script(replies={"EHLO": ehlo}))
            h.ready()
            h.client.mail(b"", {})
            h.flush()
            h.client.rcpt(b"b@example.net", {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b@example.net"})
            h.flush()
            self.assertEqual(h.server.commands[-2:], [b"MAIL FROM:<>", expected])


class BodyTests(SynchronousTestCase):
    def transaction(self, h: Harness, rcpts: tuple[bytes, ...] = (b"b@example.net",)) -> None:
        h.ready()
        h.client.mail(b"a@example.org", {})
        for r in rcpts:
            h.client.rcpt(r, {})
        d = h.client.data()
        h.flush()
        self.assertEqual(result(self, d).code, 354)

    def test_stuffedAndEnded(self) -> None:
        """
        The body is dot-stuffed (first line too), one transport write per
        chunk, and ends with the end-of-data line; the final reply is
        returned as a one-element list.
        """
        h = Harness()
        self.transaction(h)
        writes: list[bytes] = []
        original = h.pump.clientIO.write

        def write(data: bytes) -> None:
            writes.append(data)
            original(data)

        h.pump.clientIO.write = write
        h.client.write(b".first\r\nline\r\n.")
        h.client.write(b"second\r\n")
        d = h.client.endData()
        self.assertEqual(writes, [b"..first\r\nline\r\n..", b"second\r\n", b".\r\n"])
        h.flush()
        self.assertEqual(h.server.messages, [b"..first\r\nline\r\n..second\r\n.\r\n"])
        final = result(self, d)
        self.assertEqual([(r.code, r.enhanced) for r in final], [(250, "2.0.0")])

    def test_unterminatedLastLine(self) -> None:
        h = Harness()
        self.transaction(h)
        h.client.write(b"no newline")
        d = h.client.endData()
        h.flush()
        self.assertEqual(h.server.messages, [b"no newline\r\n.\r\n"])
        self.assertEqual(len(result(self, d)), 1)

    def test_lmtpPerRecipient(self) -> None:
        """
        LMTP: one reply per accepted recipient, in RCPT order.
        """
        script = Script(
            rcpt={b"x@example.net": b"550 5.1.1 unknown\r\n"},
            lmtp={b"a@example.net": b"250 2.0.0 a ok\r\n", b"c@example.net": b"452 4.2.2 c full\r\n"},
        )
        h = Harness(script, lmtp=True)
        self.transaction(h, (b"a@example.net", b"x@example.net", b"c@example.net"))
        h.client.write(b"Subject: x\r\n\r\nhi\r\n")
        d = h.client.endData()
        h.flush()
        final = result(self, d)
        self.assertEqual([(r.code, r.text) for r in final], [(250, "a ok"), (452, "c full")])

    def test_lmtpLostAfterSomeReplies(self) -> None:
        """
        LMTP: the connection is lost after the first recipient's reply; the
        failure carries that reply (issue 14 C).
        """
        script = Script(lmtp={b"a@example.net": b"250 2.0.0 a ok\r\n", b"b@example.net": CLOSE})
        h = Harness(script, lmtp=True)
        self.transaction(h, (b"a@example.net", b"b@example.net"))
        d = h.client.endData()
        h.flush()
        error = self.failureResultOf(d, DownstreamError).value
        self.assertEqual(error.reply, replies.DOWNSTREAM_LOST)
        self.assertEqual(error.received, (reply(250, "2.0.0", "a ok"),))

    def test_abortNeverSendsDot(self) -> None:
        h = Harness()
        self.transaction(h)
        h.client.write(b"partial body\r\n")
        h.client.abort()
        h.flush()
        self.assertEqual(h.server.messages, [])
        self.assertTrue(h.server.received.endswith(b"DATA\r\npartial body\r\n"))
        self.assertTrue(h.server.lost)

    def test_backpressure(self) -> None:
        """
        The downstream transport pausing us pauses the client's producer;
        resuming resumes it.
        """
        h = Harness()
        self.transaction(h)
        producer = RecordingProducer()
        h.client.registerProducer(producer, True)
        transportProducer = h.pump.clientIO.producer
        self.assertIsNotNone(transportProducer)
        transportProducer.pauseProducing()
        transportProducer.resumeProducing()
        self.assertEqual(producer.events, ["pause", "resume"])
        h.client.unregisterProducer()
        h.client.endData()
        self.assertIsNone(h.pump.clientIO.producer)

    def test_lostInBodyReleasesTheProducer(self) -> None:
        """
        The downstream going away in the body stops the paused client's
        producer at once (its body is then read and discarded), and the
        end-of-data fails without a dot: issue 14 A.
        """
        h = Harness()
        self.transaction(h)
        producer = RecordingProducer()
        h.client.registerProducer(producer, True)
        h.pump.clientIO.producer.pauseProducing()
        h.server.transport.loseConnection()
        h.flush()
        self.assertEqual(producer.events, ["pause", "stop"])
        h.client.write(b"more\r\n")
        h.client.unregisterProducer()
        failure = self.failureResultOf(h.client.endData(), DownstreamError)
        self.assertEqual(failure.value.reply, replies.DOWNSTREAM_LOST)
        self.assertNotIn(b"more", bytes(h.server.received))

    def test_registerWhilePaused(self) -> None:
        h = Harness()
        self.transaction(h)
        h.pump.clientIO.producer.pauseProducing()
        producer = RecordingProducer()
        h.client.registerProducer(producer, True)
        self.assertEqual(producer.events, ["pause"])


@st.composite
def chunkedBodies(draw: Any) -> list[bytes]:
    lines = draw(
        st.lists(
            st.one_of(
                st.sampled_from([b".", b"..", b".x", b"", b"a.b", b"x."]),
                st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            ),
            max_size=12,
        )
    )
    body = b"".join(line + b"\r\n" for line in lines)
    if draw(st.booleans()):
        body += draw(st.sampled_from([b".", b"abc", b"."]))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=6)))
    chunks, last = [], 0
    for cut in cuts + [len(body)]:
        chunks.append(body[last:cut])
        last = cut
    return chunks


def stuffed(body: bytes) -> bytes:
    """
    The reference: RFC 5321 §4.5.2 on the whole body at once.
    """
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")[:-1] if body else []
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


class DotStuffingPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(chunkedBodies())
    def test_anyChunking(self, chunks: list[bytes]) -> None:
        """
        Whatever the body and its chunking, the downstream receives exactly
        the stuffed body and one correct end-of-data.
        """
        h = Harness()
        h.ready()
        h.client.mail(b"a@example.org", {})
        h.client.rcpt(b"b@example.net", {})
        h.client.data()
        h.flush()
        for chunk in chunks:
            h.client.write(chunk)
        d = h.client.endData()
        h.flush()
        self.assertEqual(h.server.messages, [stuffed(b"".join(chunks))])
        self.assertEqual(len(self.successResultOf(d)), 1)


class AuthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []

    def harness(self, auth: list[bytes]) -> Harness:
        h = Harness(Script(replies={"EHLO": EHLO_ALL}, auth=auth), debug=True)
        h.client._log = Logger(observer=Appender(self.events))
        h.ready()
        return h

    def assertNoSecret(self, *secrets: bytes) -> None:
        text = "\n".join(formatEvent(e) for e in self.events)
        self.assertIn("S: 250", text)  # the trace is on
        for secret in secrets:
            self.assertNotIn(secret.decode(), text)

    def test_plain(self) -> None:
        h = self.harness([b"235 2.7.0 Authentication successful\r\n"])
        d = h.client.authenticate("plain", Credentials("user", "s3cret"))
        h.flush()
        self.assertEqual(result(self, d).code, 235)
        self.assertEqual(h.server.commands[-1], b"AUTH PLAIN AHVzZXIAczNjcmV0")
        self.assertNoSecret(b"AHVzZXIAczNjcmV0", b"s3cret")
        self.assertIn("C: AUTH PLAIN ****", "\n".join(formatEvent(e) for e in self.events))

    def test_login(self) -> None:
        h = self.harness(
            [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"235 2.7.0 ok\r\n"]
        )
        d = h.client.authenticate("login", Credentials("user", "s3cret"))
        h.flush()
        self.assertEqual(result(self, d).code, 235)
        self.assertEqual(h.server.commands[-3:], [b"AUTH LOGIN", b"dXNlcg==", b"czNjcmV0"])
        self.assertNoSecret(b"dXNlcg==", b"czNjcmV0", b"s3cret", b"VXNlcm5hbWU6")

    def test_external(self) -> None:
        h = self.harness([b"235 2.7.0 ok\r\n"])
        d = h.client.authenticate("external", None)
        h.flush()
        self.assertEqual(result(self, d).code, 235)
        self.assertEqual(h.server.commands[-1], b"AUTH EXTERNAL =")

    def test_refusedWhole(self) -> None:
        """
        The downstream's refusal comes back whole: code, enhanced code,
        every line.
        """
        h = self.harness([b"535-5.7.8 Username and Password not accepted.\r\n535 5.7.8 Learn more\r\n"])
        d = h.client.authenticate("plain", Credentials("user", "s3cret"))
        h.flush()
        self.assertEqual(
            result(self, d),
            reply(535, "5.7.8", "Username and Password not accepted.", "Learn more"),
        )


class MalformedTests(SynchronousTestCase):
    def assertLost(self, h: Harness, d: Any, reply: Reply = replies.DOWNSTREAM_LOST) -> None:
        h.flush()
        error = self.failureResultOf(d, DownstreamError).value
        self.assertEqual(error.reply, reply)
        self.assertTrue(h.server.lost)

    def mailWith(self, answer: bytes) -> tuple[Harness, Any]:
        h = Harness(Script(replies={"MAIL": answer}))
        h.ready()
        return h, h.client.mail(b"a@example.org", {})

    def test_notNumeric(self) -> None:
        self.assertLost(*self.mailWith(b"hello there\r\n"))

    def test_mixedCodes(self) -> None:
        self.assertLost(*self.mailWith(b"250-ok\r\n251 ok\r\n"))

    def test_tooBig(self) -> None:
        self.assertLost(*self.mailWith((b"250-" + b"x" * 1000 + b"\r\n") * 70 + b"250 ok\r\n"))

    def test_endlessContinuation(self) -> None:
        self.assertLost(*self.mailWith(b"250-x\r\n" * 1001 + b"250 ok\r\n"))

    def test_lineTooLong(self) -> None:
        self.assertLost(*self.mailWith(b"250 " + b"x" * (64 * 1024) + b"\r\n"))

    def test_unsolicited(self) -> None:
        h = Harness()
        h.ready()
        d = h.client.greeting  # already fired; watch the connection instead
        h.server.transport.write(b"250 surprise\r\n")
        h.flush()
        self.assertTrue(h.server.lost)
        self.assertEqual(h.client._error.reply, replies.DOWNSTREAM_LOST)  # type: ignore[union-attr]  # the client has failed by now, so _error is set
        self.failureResultOf(h.client.rset(), DownstreamError)
        del d

    def test_unexpectedClass(self) -> None:
        """
        A 354 to MAIL, or a 250 where 354 was due, is confusion: 451 4.3.0.
        """
        self.assertLost(*self.mailWith(b"354 go\r\n"), reply=replies.DOWNSTREAM_CONFUSED)
        h = Harness(Script(replies={"DATA": b"250 ok\r\n"}))
        h.ready()
        h.client.mail(b"a@example.org", {})
        h.client.rcpt(b"b@example.net", {})
        self.assertLost(h, h.client.data(), reply=replies.DOWNSTREAM_CONFUSED)

    def test_connectionLost(self) -> None:
        """
        The downstream closing while a command waits: 451 4.4.2 for it and
        everything queued after it.
        """
        h = Harness(Script(replies={"MAIL": CLOSE, "EHLO": EHLO_BARE}))
        h.ready()
        d1 = h.client.mail(b"a@example.org", {})
        d2 = h.client.rcpt(b"b@example.net", {})
        h.flush()
        for d in (d1, d2):
            self.assertEqual(self.failureResultOf(d, DownstreamError).value.reply, replies.DOWNSTREAM_LOST)


class UnrequestedReplyTests(SynchronousTestCase):
    """
    Bytes that arrive together left the downstream before any command that
    a reply among them makes the client write: they answer only the
    commands already waiting, and one reply more is unrequested.  (Issue
    14: such a reply after the greeting or EHLO was taken as the next
    command's, and every later reply answered the command before it.)
    """

    def assertLostAfter(self, h: Harness, d: Any, received: bytes) -> None:
        h.flush()
        self.assertEqual(self.failureResultOf(d, DownstreamError).value.reply, replies.DOWNSTREAM_LOST)
        self.assertEqual(bytes(h.server.received), received)
        self.assertTrue(h.server.lost)

    def test_afterGreeting(self) -> None:
        """
        A greeting and a reply nobody asked for in one segment: EHLO,
        written when the greeting is parsed, does not take that reply.
        """
        h = Harness(Script(replies={"greeting": b"220 fake.example ESMTP\r\n250 2.0.0 Nobody asked\r\n"}))
        hello = h.client.greeting.addCallback(lambda _: h.client.hello("relay.example"))
        self.assertLostAfter(h, hello, b"EHLO relay.example\r\n")
        self.assertEqual(h.client.capabilities, {})

    def test_afterHello(self) -> None:
        """
        One more line after the EHLO reply: MAIL, written from the EHLO
        reply's callback as the failover does, does not take it.
        """
        h = Harness(Script(replies={"EHLO": DEFAULT_EHLO + b"250 2.0.0 Nobody asked\r\n"}))
        h.flush()
        mail = h.client.hello("relay.example").addCallback(lambda _: h.client.mail(b"a@example.org", {}))
        self.assertLostAfter(h, mail, b"EHLO relay.example\r\nMAIL FROM:<a@example.org>\r\n")

    def test_pipelinedGroupInOneSegment(self) -> None:
        """
        The replies to a pipelined group arrive in one segment, and the
        first one's callback writes another command: the rest of the
        segment answers the group, the new command waits for its own.
        """
        h = Harness(Script(replies={"EHLO": EHLO_ALL}))
        h.ready()
        segments: list[bytes] = []
        receive = h.client.dataReceived

        def dataReceived(data: bytes) -> None:
            segments.append(data)
            receive(data)

        h.client.dataReceived = dataReceived  # type: ignore[method-assign]  # a spy on the protocol's method
        got: list[Reply] = []

        def mailed(r: Reply) -> None:
            got.append(r)
            h.client.command(b"NOOP").addCallback(got.append)

        h.client.mail(b"a@example.org", {}).addCallback(mailed)
        h.client.rcpt(b"b@example.net", {}).addCallback(got.append)
        h.client.rcpt(b"c@example.net", {}).addCallback(got.append)
        h.flush()
        self.assertEqual(segments, [b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 2, b"250 2.0.0 Ok\r\n"])
        self.assertEqual([r.code for r in got], [250, 250, 250, 250])
        self.assertEqual(got[-1].text, "Ok")
        self.assertEqual(
            h.server.commands[-4:],
            [b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"RCPT TO:<c@example.net>", b"NOOP"],
        )
        self.assertFalse(h.server.lost)

    def test_wrongClassFailsInOrder(self) -> None:
        """
        A reply of the wrong class fails its command before those queued
        behind it, even when the transport reports the loss at once.
        """
        transport = StringTransportWithDisconnection()
        client = SMTPClientProtocol(clientPolicy(makeTarget()), Clock(), peer="mx.example")
        transport.protocol = client
        client.makeConnection(transport)
        order: list[str] = []
        client.greeting.addErrback(lambda f: order.append("greeting"))
        client.command(b"NOOP").addErrback(lambda f: order.append("NOOP"))
        client.dataReceived(b"334 what\r\n")
        self.assertEqual(order, ["greeting", "NOOP"])
        self.assertEqual(transport.value(), b"")


class TimeoutTests(SynchronousTestCase):
    def test_greeting(self) -> None:
        h = Harness(Script(replies={"greeting": STALL}), commandTimeout=30)
        h.flush()
        h.clock.advance(29)
        self.assertNoResult(h.client.greeting)
        h.clock.advance(1)
        h.flush()
        self.assertEqual(
            self.failureResultOf(h.client.greeting, DownstreamError).value.reply,
            replies.DOWNSTREAM_LOST,
        )
        self.assertTrue(h.server.lost)

    def test_command(self) -> None:
        h = Harness(Script(replies={"MAIL": STALL}), commandTimeout=30)
        h.ready()
        h.clock.advance(100)  # idle between commands: no timer
        d = h.client.mail(b"a@example.org", {})
        h.flush()
        h.clock.advance(30)
        h.flush()
        self.assertEqual(self.failureResultOf(d, DownstreamError).value.reply, replies.DOWNSTREAM_LOST)

    def test_submission(self) -> None:
        """
        After the dot the wait is submission_timeout, not command_timeout.
        """
        h = Harness(Script(replies={"END": STALL}), commandTimeout=30, submissionTimeout=600)
        BodyTests.transaction(self, h)  # type: ignore[arg-type]  # BodyTests.transaction uses only what every test case has
        d = h.client.endData()
        h.flush()
        h.clock.advance(599)
        self.assertNoResult(d)
        h.clock.advance(1)
        h.flush()
        self.assertEqual(self.failureResultOf(d, DownstreamError).value.reply, replies.DOWNSTREAM_LOST)
        self.assertEqual(h.server.messages, [b".\r\n"])

    def test_data(self) -> None:
        """
        A write buffer that does not drain for data_timeout ends the
        transaction; draining in time resets the clock.
        """
        h = Harness(dataTimeout=60)
        BodyTests.transaction(self, h)  # type: ignore[arg-type]  # BodyTests.transaction uses only what every test case has
        transportProducer = h.pump.clientIO.producer
        transportProducer.pauseProducing()
        h.clock.advance(59)
        transportProducer.resumeProducing()
        transportProducer.pauseProducing()
        h.clock.advance(59)
        self.assertFalse(h.server.lost)
        h.clock.advance(1)
        h.flush()
        self.assertTrue(h.server.lost)
        self.assertEqual(self.failureResultOf(h.client.endData(), DownstreamError).value.reply,
                         replies.DOWNSTREAM_LOST)
        self.assertEqual(h.server.messages, [])


class StartTLSTests(SynchronousTestCase):
    def test_injection(self) -> None:
        """
        Bytes after the 220 to STARTTLS and before the handshake abort the
        attempt; nothing is sent after STARTTLS.
        """
        h = Harness(Script(replies={"EHLO": EHLO_ALL + b"", "STARTTLS": b"220 go\r\n250 injected\r\n"}))
        h.ready()
        d = h.client.startTLS(UNUSED_OPTIONS)
        h.flush()
        error = self.failureResultOf(d, TLSFailed).value
        self.assertFalse(error.retryPlain)
        self.assertTrue(h.server.lost)
        self.assertTrue(h.server.received.endswith(b"STARTTLS\r\n"))

    def test_refused(self) -> None:
        """
        A refusal comes back as a reply; the connection stays usable.
        """
        h = Harness(Script(replies={"STARTTLS": b"454 4.7.0 TLS not available\r\n"}))
        h.ready()
        d = h.client.startTLS(UNUSED_OPTIONS)
        h.flush()
        self.assertEqual(result(self, d).code, 454)
        self.assertFalse(h.server.lost)

    def test_handshakeTimeout(self) -> None:
        """
        A handshake that never completes fails after command_timeout and
        may be retried without TLS.
        """
        h = Harness(commandTimeout=30)
        h.ready()
        started: list[Any] = []
        h.pump.clientIO.startTLS = started.append
        d = h.client.startTLS(UNUSED_OPTIONS)
        h.flush()
        self.assertEqual(started, [UNUSED_OPTIONS])
        h.clock.advance(30)
        h.flush()
        error = self.failureResultOf(d, TLSFailed).value
        self.assertTrue(error.retryPlain)


class QuitTests(SynchronousTestCase):
    def test_quit(self) -> None:
        h = Harness()
        h.ready()
        h.client.quit()
        h.flush()
        self.assertEqual(h.server.commands[-1], b"QUIT")
        self.assertTrue(h.server.lost)

    def test_rset(self) -> None:
        h = Harness()
        h.ready()
        d = h.client.rset()
        h.flush()
        self.assertEqual(result(self, d).code, 250)
        self.assertEqual(h.server.commands[-1], b"RSET")



EHLO_CHUNKING = b"250-fake.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n"


class ChunkingTests(SynchronousTestCase):
    """
    RFC 3030: the body as BDAT chunks to a downstream that advertises
    CHUNKING (and PIPELINING), never dot-stuffed, the C{LAST} chunk only
    once every chunk was accepted.
    """

    def transaction(self, h: Harness, rcpts: tuple[bytes, ...] = (b"b@example.net",)) -> None:
        h.ready()
        h.client.mail(b"a@example.org", {})
        for r in rcpts:
            h.client.rcpt(r, {})
        h.flush()
        d = h.client.data()
        self.assertEqual(result(self, d), CHUNKS_READY)
        h.flush()

    def test_smallBodyOneLastChunk(self) -> None:
        """
        No DATA; a body under a chunk goes whole as C{BDAT n LAST}, its
        dot lines as they are; the final reply is the LAST chunk's.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING, "END": b"250 2.0.0 Ok: queued as X\r\n"}))
        self.transaction(h)
        h.client.write(b".first\r\n.\r\n")
        h.client.write(b"last\r\n")
        self.assertEqual(h.sent(), b"")
        d = h.client.endData()
        h.flush()
        self.assertEqual(bytes(h.server.received).split(b"\r\n", 3)[3],
                         b"BDAT 17 LAST\r\n.first\r\n.\r\nlast\r\n")
        self.assertEqual(h.server.messages, [b".first\r\n.\r\nlast\r\n"])
        self.assertEqual(result(self, d), [reply(250, "2.0.0", "Ok: queued as X")])
        self.assertTrue(h.client.idle)

    def test_chunksAsTheBodyStreams(self) -> None:
        """
        Whenever a chunk's worth is buffered it is sent with its size; an
        empty rest ends with C{BDAT 0 LAST}.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING}))
        self.transaction(h)
        h.client.write(b"x" * (CHUNK_SIZE - 1))
        self.assertEqual(h.sent(), b"")
        h.client.write(b"yz")
        self.assertEqual(h.sent(), b"BDAT %d\r\n" % (CHUNK_SIZE + 1) + b"x" * (CHUNK_SIZE - 1) + b"yz")
        d = h.client.endData()
        h.flush()
        self.assertEqual(h.server.chunks, [CHUNK_SIZE + 1, 0, -1])
        self.assertEqual(bytes(h.server.received)[-13:], b"BDAT 0 LAST\r\n")
        self.assertEqual([r.code for r in result(self, d)], [250])

    @given(st.lists(st.binary(min_size=0, max_size=3 * CHUNK_SIZE // 2), max_size=6))
    @settings(max_examples=40, deadline=None)
    def test_anySplitArrivesIntact(self, pieces: list[bytes]) -> None:
        """
        Whatever the writes, the chunks carry the body byte for byte, each
        announced with its exact size, and only the last says LAST.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING}))
        self.transaction(h)
        for piece in pieces:
            h.client.write(piece)
            h.flush()
        d = h.client.endData()
        h.flush()
        body = b"".join(pieces)
        self.assertEqual(h.server.messages, [body])
        self.assertEqual(sum(h.server.chunks[:-1]), len(body))
        self.assertEqual(h.server.chunks[-1], -1)
        self.assertEqual([r.code for r in result(self, d)], [250])

    def test_refusedChunkNoLast(self) -> None:
        """
        A refused chunk is the transaction's outcome: no more chunks, no
        LAST, and RSET ends the downstream's transaction.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING, "BDAT": b"552 5.3.4 Message too big\r\n"}))
        self.transaction(h)
        h.client.write(b"x" * CHUNK_SIZE)
        h.flush()
        h.client.write(b"y" * CHUNK_SIZE)
        d = h.client.endData()
        h.flush()
        self.assertEqual(h.server.chunks, [CHUNK_SIZE])
        self.assertEqual(h.server.commands[-2:], [b"BDAT %d" % CHUNK_SIZE, b"RSET"])
        self.assertEqual(result(self, d), [reply(552, "5.3.4", "Message too big")])
        self.assertTrue(h.client.idle)

    def test_lastWaitsForEveryChunkReply(self) -> None:
        """
        The LAST chunk goes only after the replies to the earlier chunks.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING}))
        self.transaction(h)
        h.client.write(b"x" * CHUNK_SIZE)
        d = h.client.endData()
        self.assertNotIn(b"LAST", h.sent())
        h.flush()
        self.assertEqual(h.server.chunks, [CHUNK_SIZE, 0, -1])
        self.assertEqual([r.code for r in result(self, d)], [250])

    def test_abortedNeverLast(self) -> None:
        """
        A body aborted in the middle (the client left) never gets its LAST
        chunk; what was buffered is not sent.
        """
        h = Harness(Script(replies={"EHLO": EHLO_CHUNKING}))
        self.transaction(h)
        h.client.write(b"x" * (CHUNK_SIZE + 5))
        h.client.write(b"half a line")
        h.client.abort()
        h.flush()
        self.assertEqual(h.server.chunks, [CHUNK_SIZE + 5])
        self.assertNotIn(b"LAST", bytes(h.server.received))
        self.assertNotIn(b"half a line", bytes(h.server.received))

    def test_lmtpRepliesAfterLast(self) -> None:
        """
        LMTP: one reply per accepted recipient to the LAST chunk.
        """
        script = Script(replies={"LHLO": EHLO_CHUNKING},
                        lmtp={b"a@example.net": b"250 2.0.0 a ok\r\n", b"c@example.net": b"452 4.2.2 c full\r\n"})
        h = Harness(script, lmtp=True)
        self.transaction(h, (b"a@example.net", b"c@example.net"))
        h.client.write(b"Subject: x\r\n\r\nhi\r\n")
        d = h.client.endData()
        h.flush()
        self.assertEqual([(r.code, r.text) for r in result(self, d)], [(250, "a ok"), (452, "c full")])
        self.assertEqual(h.server.chunks, [18, -1])

    def test_dataWithoutChunkingOrPipelining(self) -> None:
        """
        C{chunking no}, or a downstream without CHUNKING or PIPELINING:
        DATA and a dot-stuffed body.
        """
        for ehlo, kw in [
            (EHLO_CHUNKING, {"chunking": False}),
            (EHLO_CHUNKING.replace(b"250-PIPELINING\r\n", b""), {}),
            (DEFAULT_EHLO, {}),
        ]:
            with self.subTest(ehlo=ehlo, kw=kw):
                h = Harness(Script(replies={"EHLO": ehlo}), **kw)
                h.ready()
                h.client.mail(b"a@example.org", {})
                h.client.rcpt(b"b@example.net", {})
                h.flush()
                d = h.client.data()
                h.flush()
                self.assertEqual(result(self, d).code, 354)
                h.client.write(b".x\r\n")
                h.client.endData()
                h.flush()
                self.assertEqual(h.server.messages, [b"..x\r\n.\r\n"])
                self.assertEqual(h.server.chunks, [])
