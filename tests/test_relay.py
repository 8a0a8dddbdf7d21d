"""
Tests for L{smtprelay.relay.session}: the transparency rules,
with a scripted in-memory downstream standing in for the outbound engine.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, TypeVar

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtprelay.protocol import replies
from smtprelay.config.model import Address, Destinations, Listener, ListenerAuth, Reject, Routing, Target
from smtprelay.interfaces import (
    ClientSession,
    Credentials,
    DownstreamError,
    IDownstream,
    IRelayHandler,
    Params,
    TLSInfo,
)
from smtprelay.relay.session import RelaySession
from smtprelay.app.targets import clientPolicy, makeRouter, targetRoute
from smtprelay.relay import routing
from smtprelay.relay.routing import Releaser, Route, Router
from smtprelay.protocol.replies import Reply, reply

from .logcapture import captureEvents

SINK = Address("tcp", "127.0.0.1", 2526)


def target(protocol: Literal["smtp", "lmtp"] = "smtp", **kw: Any) -> Target:
    kw.setdefault("name", "t")
    return Target(protocol=protocol, endpoints=(SINK,), **kw)


def listener(kind: Literal["smtp", "submission", "lmtp"] = "smtp", **kw: Any) -> Listener:
    kw.setdefault("deliverTo", target())
    return Listener(kind=kind, addresses=(Address("tcp", "127.0.0.1", 2525),), **kw)


@implementer(IDownstream)
class ScriptedDownstream:
    """
    An IDownstream whose replies come from a dict and whose calls are
    recorded; a reply may be a Reply, a list of Replies (LMTP end-of-data),
    a Deferred (fired by the test) or a DownstreamError.
    """

    def __init__(self, script: dict[str, object] | None = None, lmtp: bool = False) -> None:
        self.script = script or {}
        self.calls: list[tuple] = []
        self.body = b""
        self.writes: list[bytes] = []
        self.lmtp = lmtp
        self.capabilities: dict[str, str] = {}
        self.tls: TLSInfo | None = None
        self.peer = "sink.test[127.0.0.1]:2526"
        self.policy = clientPolicy(target())
        self.address = Address("tcp", "sink.test", 2526)
        self.connectedAt = 0.0
        self.idle = True
        self.producer: object = None
        self.aborted = False
        self.quitted = False

    def _answer(self, key: str, default: object) -> Deferred:
        answer = self.script.get(key, default)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, DownstreamError):
            self.aborted = True
            return fail(answer)
        return succeed(answer)

    def mail(self, sender: bytes, params: Params, client: ClientSession | None = None) -> Deferred[Reply]:
        self.calls.append(("mail", sender, dict(params)))
        self.client = client
        return self._answer("mail", reply(250, "2.1.0", "Sender ok"))

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        self.calls.append(("rcpt", recipient))
        key = "rcpt:" + recipient.decode()
        return self._answer(key, reply(250, "2.1.5", "Recipient ok"))

    def data(self) -> Deferred[Reply]:
        self.calls.append(("data",))
        return self._answer("data", reply(354, None, "Go ahead"))

    def write(self, data: bytes) -> None:
        self.body += data
        self.writes.append(data)

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def endData(self) -> Deferred[Sequence[Reply]]:
        self.calls.append(("end",))
        return self._answer("end", [reply(250, "2.0.0", "Ok: queued as ABC")])

    def rset(self) -> Deferred[Reply]:
        self.calls.append(("rset",))
        return self._answer("rset", reply(250, "2.0.0", "Ok"))

    def quit(self) -> None:
        self.calls.append(("quit",))
        self.quitted = True

    def abort(self) -> None:
        self.calls.append(("abort",))
        self.aborted = True


class Opener:
    """
    Stands in for C{Failover.open}: hands out the scripted downstream and
    does its MAIL, or fails with a scripted error.
    """

    def __init__(self, downstream: ScriptedDownstream | None = None, error: DownstreamError | None = None):
        self.downstream = downstream or ScriptedDownstream()
        self.error = error
        self.calls: list[dict] = []

    def __call__(self, credentials: Credentials | None = None, mail: tuple[bytes, Params] | None = None,
                 sessionId: str = "-", client: ClientSession | None = None) -> Deferred:
        self.calls.append({"credentials": credentials, "mail": mail, "client": client})
        self.sessionId = sessionId
        if self.error is not None:
            return fail(self.error)
        if mail is None:
            return succeed((self.downstream, None))
        return self.downstream.mail(*mail, client).addCallback(lambda r: (self.downstream, r))


def router(listener_: Listener, opener: routing.Opener, release: Releaser | None = None) -> Router:
    """
    The listener's one target reached through C{opener}; C{release} (by
    default QUIT) takes the downstreams the relay is done with.
    """
    assert isinstance(listener_.deliverTo, Target)
    return Router.single(targetRoute(listener_.deliverTo, opener, release or (lambda d: d.quit())))


def relaySession(session: ClientSession, listener_: Listener, opener: routing.Opener, clock: Clock,
                 release: Releaser | None = None) -> RelaySession:
    return RelaySession(session, listener_.auth.mode, router(listener_, opener, release), "relay.test", clock)


T = TypeVar("T")


def result(d: Deferred[T]) -> T:
    """
    What C{d} has already succeeded with; its failure is raised.
    """
    out: list[T | Failure] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


@implementer(IPushProducer)
class Producer:
    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class RelaySessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1764057600)  # 2025-11-25 08:00:00 UTC
        self.session = ClientSession(id="S1D", protocol="smtp", clientHost="127.0.0.1",
                                     clientPort=40000, heloName="client.test", esmtp=True)
        self.opener = Opener()
        self.downstream = self.opener.downstream
        self.events = captureEvents(self)

    def relay(self, **listenerArgs: Any) -> RelaySession:
        return relaySession(self.session, listener(**listenerArgs), self.opener, self.clock)

    def transaction(self, relay: RelaySession, rcpts: Sequence[bytes] = (b"rcpt@example.org",),
                    body: bytes = b"Subject: hi\r\n\r\nbody\r\n",
                    ) -> tuple[Reply, list[Reply], Reply, Sequence[Reply]]:
        mailReply = result(relay.mail(b"sender@example.org", {}))
        rcptReplies = [result(relay.rcpt(r, {})) for r in rcpts]
        dataReply = result(relay.data(Producer()))
        relay.dataChunk(body)
        final = result(relay.endData())
        return mailReply, rcptReplies, dataReply, final

    def test_providesInterface(self) -> None:
        self.assertTrue(verifyObject(IRelayHandler, self.relay()))

    def test_mailOpensDownstreamWithClientParameters(self) -> None:
        """
        The downstream session is opened at MAIL with the client's sender
        and parameters; the client's MAIL reply is the downstream's.
        """
        self.downstream.script["mail"] = reply(250, "2.1.0", "Sender <s> looks fine")
        got = result(self.relay().mail(b"s@example.org", {"SIZE": "100", "BODY": "8BITMIME"}))
        self.assertEqual(got, reply(250, "2.1.0", "Sender <s> looks fine"))
        self.assertEqual(self.opener.calls, [
            {"credentials": None, "mail": (b"s@example.org", {"SIZE": "100", "BODY": "8BITMIME"}),
             "client": self.session}])

    def test_authParameterGoesWithTheClientSession(self) -> None:
        """
        C{AUTH=} reaches the downstream session with the client's session,
        which tells whether the client authenticated: the downstream session
        forwards it only then (L{smtprelay.protocol.parameters}; see
        C{test_client.ParameterTests.test_authOnlyForAuthenticatedClients}).
        """
        relay = self.relay()
        result(relay.mail(b"s@example.org", {"AUTH": "<>", "SIZE": "5"}))
        self.assertEqual(self.downstream.calls[0], ("mail", b"s@example.org", {"AUTH": "<>", "SIZE": "5"}))
        self.assertIs(self.downstream.client, self.session)

    def test_downstreamRepliesPassVerbatimButSanitized(self) -> None:
        """
        RCPT replies are the downstream's code, enhanced code and text, with
        control characters replaced; a reply without an enhanced code gets
        X.0.0.
        """
        self.downstream.script["rcpt:a@x"] = reply(550, "5.1.1", "<a@x>: no such user\x1b[31m")
        self.downstream.script["rcpt:b@x"] = reply(451, None, "greylisted")
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        self.assertEqual(result(relay.rcpt(b"a@x", {})), reply(550, "5.1.1", "<a@x>: no such user?[31m"))
        self.assertEqual(result(relay.rcpt(b"b@x", {})), reply(451, "4.0.0", "greylisted"))

    def test_fullTransactionStreamsBodyAfterReceivedHeader(self) -> None:
        """
        354 comes from the downstream; the body reaches the downstream after
        exactly one Received: header; 250 to end-of-data is the
        downstream's.
        """
        mailReply, rcptReplies, dataReply, final = self.transaction(self.relay())
        self.assertEqual(dataReply, reply(354, None, "Go ahead"))
        self.assertEqual(final, [reply(250, "2.0.0", "Ok: queued as ABC")])
        header, rest = self.downstream.body.split(b"\r\nSubject:", 1)
        self.assertEqual(rest, b" hi\r\n\r\nbody\r\n")
        self.assertEqual(
            header,
            b"Received: from client.test ([127.0.0.1])\r\n"
            b"\tby relay.test (smtprelay) with ESMTP id S1D\r\n"
            b"\tfor <rcpt@example.org>; "
            + self.downstreamDate(),
        )
        self.assertEqual([c[0] for c in self.downstream.calls], ["mail", "rcpt", "data", "end"])

    def test_receivedHeaderGoesWithTheFirstBodyWrite(self) -> None:
        """
        The C{Received:} header is written with the first piece of the body,
        not alone at 354 (one send() fewer per message); an empty body
        still gets it before the end of data.
        """
        relay = self.relay()
        self.transaction(relay, body=b"Subject: hi\r\n\r\nbody\r\n")
        [first] = self.downstream.writes
        self.assertTrue(first.startswith(b"Received: from client.test"))
        self.assertTrue(first.endswith(b"\r\nSubject: hi\r\n\r\nbody\r\n"))

        self.downstream.writes.clear()
        result(relay.mail(b"sender@example.org", {}))
        result(relay.rcpt(b"rcpt@example.org", {}))
        result(relay.data(Producer()))
        self.assertEqual(self.downstream.writes, [])
        result(relay.endData())
        [header] = self.downstream.writes
        self.assertTrue(header.startswith(b"Received: from client.test"))
        self.assertEqual(self.downstream.calls[-1], ("end",))

    def test_receivedHeaderDateFollowsTheClock(self) -> None:
        """
        The header's date is the time of each message, also when the date
        string is made once per second: a second later, the next header
        says so.
        """
        relay = self.relay()
        dates = []
        for _ in range(2):
            self.downstream.body = b""
            self.transaction(relay)
            dates.append(self.downstream.body.split(b"Subject:")[0].rsplit(b"; ", 1)[1])
            self.assertEqual(dates[-1], self.downstreamDate() + b"\r\n")
            self.clock.advance(1)
        self.assertNotEqual(dates[0], dates[1])

    def downstreamDate(self) -> bytes:
        import email.utils
        return email.utils.formatdate(self.clock.seconds(), localtime=True).encode()

    def test_receivedHeaderNamesTLSAndAuth(self) -> None:
        """
        The header says ESMTPSA and names the TLS version and cipher; with
        several recipients it names none of them.
        """
        self.session.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384")
        self.session.user = "alice"
        self.transaction(self.relay(), rcpts=[b"a@x", b"b@x"])
        header = self.downstream.body.split(b"Subject:")[0]
        self.assertEqual(
            header,
            b"Received: from client.test ([127.0.0.1])\r\n"
            b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
            b"\tby relay.test (smtprelay) with ESMTPSA id S1D;\r\n\t"
            + self.downstreamDate() + b"\r\n",
        )

    def test_receivedHeaderAndLogNameTheDownstreamTLS(self) -> None:
        """
        Issue 13 item 2: the TLS the message leaves by is a comment of the
        C{Received:} header, Postfix-like, with whether the downstream's
        certificate was verified; the transaction log says the same in one
        word.
        """
        for verified, word in ((False, "untrusted"), (True, "verified")):
            self.events.clear()
            self.downstream.body = b""
            self.downstream.tls = TLSInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", (256, 256), verified)
            relay = self.relay()
            self.transaction(relay)
            header = self.downstream.body.split(b"Subject:")[0]
            self.assertEqual(
                header,
                b"Received: from client.test ([127.0.0.1])\r\n"
                b"\tby relay.test (smtprelay) with ESMTP id S1D\r\n"
                b"\t(relayed using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits), "
                + word.encode() + b")\r\n"
                b"\tfor <rcpt@example.org>; " + self.downstreamDate() + b"\r\n",
            )
            self.clock.advance(0)
            [event] = [e for e in self.events if e.get("transaction")]
            self.assertEqual(event["tls"], word)
            self.assertIn(f" tls={word} ", formatEvent(event))

    def test_dataWithoutAcceptedRecipientsNeverReachesDownstream(self) -> None:
        """
        Never DATA downstream without an accepted recipient.
        """
        self.downstream.script["rcpt:a@x"] = reply(550, "5.1.1", "unknown")
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        got = result(relay.data(Producer()))
        self.assertEqual(got, reply(554, "5.5.1", "No valid recipients [S1D]"))
        self.assertNotIn(("data",), self.downstream.calls)

    def test_refused354IsPassedThrough(self) -> None:
        self.downstream.script["data"] = reply(554, "5.5.1", "Error: no valid recipients")
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        self.assertEqual(result(relay.data(Producer())), reply(554, "5.5.1", "Error: no valid recipients"))

    def test_backPressureProducerIsTheClient(self) -> None:
        """
        The client's socket is registered with the downstream as producer
        during the body and unregistered at its end.
        """
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        producer = Producer()
        result(relay.data(producer))
        self.assertIs(self.downstream.producer, producer)
        result(relay.endData())
        self.assertIsNone(self.downstream.producer)

    def test_finalReplyPermanentPassesThrough(self) -> None:
        """
        A downstream 5xx to end-of-data reaches the client unchanged (no
        552→452 rewrite) and is logged as bounced.
        """
        self.downstream.script["end"] = [reply(552, "5.3.4", "Message size exceeds fixed limit")]
        *_, final = self.transaction(self.relay())
        self.assertEqual(final, [reply(552, "5.3.4", "Message size exceeds fixed limit")])
        self.clock.advance(0)  # the event follows the reply by one turn
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual(event["status"], "bounced")

    def test_lostAfterDotIsTemporaryNever250(self) -> None:
        """
        The connection lost after the dot → 451 4.4.2, with the
        session id.
        """
        self.downstream.script["end"] = DownstreamError(replies.DOWNSTREAM_LOST, "connection lost")
        *_, final = self.transaction(self.relay())
        self.assertEqual(final, [replies.DOWNSTREAM_LOST.withSession("S1D")])
        self.clock.advance(0)  # the event follows the reply by one turn
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual(event["status"], "deferred")

    def test_allTargetsDownGives451(self) -> None:
        self.opener.error = DownstreamError(replies.NO_DOWNSTREAM, "refused; refused")
        got = result(self.relay().mail(b"s@x", {}))
        self.assertEqual(got.toBytes(), b"451 4.4.1 No downstream server available [S1D]\r\n")

    def test_permanentMailFromEveryTargetPassesThrough(self) -> None:
        self.downstream.script["mail"] = reply(553, "5.7.1", "Sender address rejected")
        got = result(self.relay().mail(b"s@x", {}))
        self.assertEqual(got, reply(553, "5.7.1", "Sender address rejected"))

    def test_localConversionReplyGetsSessionId(self) -> None:
        """
        A reply the outbound engine decided locally (no SMTPUTF8 downstream)
        carries the session id like every local reply.
        """
        self.downstream.script["mail"] = DownstreamError(replies.UTF8_SENDER)
        got = result(self.relay().mail("ü@x".encode(), {"SMTPUTF8": None}))
        self.assertEqual(got, replies.UTF8_SENDER.withSession("S1D"))

    def test_abortDataNeverSendsTheDot(self) -> None:
        """
        A body refused locally (bare LF, too many hops) closes the
        downstream without the end-of-data.
        """
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        result(relay.data(Producer()))
        relay.dataChunk(b"Received: x\r\n")
        relay.abortData(replies.TOO_MANY_HOPS)
        self.assertEqual(self.downstream.calls[-1], ("abort",))
        self.assertNotIn(("end",), self.downstream.calls)

    def test_clientGoneDuringBodyAbortsWithoutDot(self) -> None:
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        result(relay.data(Producer()))
        relay.dataChunk(b"partial")
        relay.close()
        self.assertTrue(self.downstream.aborted)
        self.assertNotIn(("end",), self.downstream.calls)
        self.clock.advance(0)  # the event follows the reply by one turn
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual(event["status"], "aborted")

    def test_clientGoneAfterDotFinishesAndLogs(self) -> None:
        """
        A client that leaves after its dot does not abort the
        downstream transaction; its outcome is logged, then QUIT.
        """
        pending: Deferred = Deferred()
        self.downstream.script["end"] = pending
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        result(relay.rcpt(b"a@x", {}))
        result(relay.data(Producer()))
        relay.dataChunk(b"x\r\n")
        final = relay.endData()
        relay.close()
        self.assertFalse(self.downstream.aborted)
        self.assertFalse(self.downstream.quitted)
        pending.callback([reply(250, "2.0.0", "queued")])
        self.assertEqual(result(final), [reply(250, "2.0.0", "queued")])
        self.assertTrue(self.downstream.quitted)
        self.clock.advance(0)  # the event follows the reply by one turn
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual((event["status"], event["reply"]), ("sent", "250 2.0.0 queued"))

    def test_resetThenNewTransactionReusesDownstream(self) -> None:
        """
        RSET is relayed; the next MAIL goes over the same downstream session
        after the RSET's reply.
        """
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        relay.reset()
        result(relay.mail(b"t@x", {}))
        self.assertEqual([c[0] for c in self.downstream.calls], ["mail", "rset", "mail"])
        self.assertEqual(len(self.opener.calls), 1)

    def test_deadDownstreamIsReopenedForNextTransaction(self) -> None:
        relay = self.relay()
        self.transaction(relay)
        self.downstream.script["mail"] = DownstreamError(replies.DOWNSTREAM_LOST)
        fresh = ScriptedDownstream()
        first = self.downstream
        self.opener.downstream = fresh
        got = result(relay.mail(b"s2@x", {}))
        self.assertEqual(got.code, 250)
        self.assertEqual(fresh.calls, [("mail", b"s2@x", {})])
        self.assertEqual(first.calls[-1][0], "mail")

    def test_closeQuitsIdleDownstream(self) -> None:
        relay = self.relay()
        self.transaction(relay)
        relay.close()
        self.assertEqual(self.downstream.calls[-1], ("quit",))

    def test_doneDownstreamGoesToReleaser(self) -> None:
        """
        A downstream this client is done with (after its transaction, or
        after a client that quits before its dot's reply comes) is handed
        to C{releaseDownstream}, which may keep it for another client; an
        aborted body's downstream is aborted, never released.
        """
        released: list[object] = []
        relay = relaySession(self.session, listener(), self.opener, self.clock, released.append)
        self.transaction(relay)
        relay.close()
        self.assertEqual(released, [self.downstream])
        self.assertNotIn(("quit",), self.downstream.calls)

        aborted = relaySession(self.session, listener(), self.opener, self.clock, released.append)
        result(aborted.mail(b"s@x", {}))
        result(aborted.rcpt(b"r@x", {}))
        result(aborted.data(Producer()))
        aborted.close()
        self.assertEqual(released, [self.downstream])
        self.assertEqual(self.downstream.calls[-1], ("abort",))

    def test_clientGoneWhileOpeningReleasesTheDownstream(self) -> None:
        """
        Issue 14: a client that leaves while its MAIL opens the downstream
        session: once open, the session goes to the releaser (which QUITs a
        session with a MAIL on it), not into the closed relay session, where
        no timer would ever close it.
        """
        pending: Deferred = Deferred()
        self.downstream.script["mail"] = pending
        released: list[object] = []
        relay = relaySession(self.session, listener(), self.opener, self.clock, released.append)
        mail = relay.mail(b"s@x", {})
        relay.close()
        self.assertEqual(released, [])
        pending.callback(reply(250, "2.1.0", "Sender ok"))
        self.assertEqual(result(mail), reply(250, "2.1.0", "Sender ok"))
        self.assertEqual(released, [self.downstream])
        self.assertEqual(self.downstream.calls, [("mail", b"s@x", {})])

    def test_clientGoneWhileResettingOpensNothing(self) -> None:
        """
        A client that sends RSET and MAIL and leaves before the RSET's
        reply: its MAIL opens no downstream session for nobody.
        """
        pending: Deferred = Deferred()
        self.downstream.script["rset"] = pending
        relay = self.relay()
        result(relay.mail(b"s@x", {}))
        relay.reset()
        mail = relay.mail(b"t@x", {})
        relay.close()
        pending.callback(reply(250, "2.0.0", "Ok"))
        self.assertEqual(result(mail), replies.DOWNSTREAM_LOST.withSession("S1D"))
        self.assertEqual(len(self.opener.calls), 1)
        self.assertEqual([c[0] for c in self.downstream.calls], ["mail", "rset", "quit"])

    def test_transactionLogEvent(self) -> None:
        """
        One event per transaction with stable keys.  It is emitted
        one reactor turn after the final reply (formatting it is not the
        client's wait) with the values of that transaction, even when the
        client's next MAIL has started another.
        """
        relay = self.relay()
        self.transaction(relay, rcpts=[b"a@x", b"b@x"])
        self.assertEqual([e for e in self.events if e.get("transaction")], [])
        result(relay.mail(b"next@example.org", {}))
        self.clock.advance(0)
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual(
            {k: event[k] for k in ("session", "client", "helo", "sender", "to", "relay", "status", "reply", "tls")},
            {"session": "S1D", "client": "127.0.0.1", "helo": "client.test", "sender": "sender@example.org",
             "to": 2, "relay": "sink.test[127.0.0.1]:2526", "status": "sent",
             "reply": "250 2.0.0 Ok: queued as ABC", "tls": "no"},
        )
        self.assertEqual(event["size"], len(b"Subject: hi\r\n\r\nbody\r\n"))


class LMTPMappingTests(SynchronousTestCase):
    """
    LMTP replies: one per recipient, or one for all (C{lmtp_split}).
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = Opener(ScriptedDownstream(lmtp=True))
        self.downstream = self.opener.downstream

    def run_(self, protocol: Literal["smtp", "lmtp"], target_: Target, rcpts: Sequence[bytes],
             end: object) -> tuple[list[Reply], Sequence[Reply]]:
        session = ClientSession(id="L1", protocol=protocol, clientHost="127.0.0.1")
        relay = relaySession(session, listener("lmtp" if protocol == "lmtp" else "smtp", deliverTo=target_),
                             self.opener, self.clock)
        self.downstream.script["end"] = end
        result(relay.mail(b"s@x", {}))
        rcptReplies = [result(relay.rcpt(r, {})) for r in rcpts]
        result(relay.data(Producer()))
        relay.dataChunk(b"x\r\n")
        return rcptReplies, result(relay.endData())

    def test_lmtpToLmtpOneToOne(self) -> None:
        ok = reply(250, "2.0.0", "<a@x> Saved")
        over = reply(552, "5.2.2", "<b@x> Quota exceeded")
        _, final = self.run_("lmtp", target("lmtp"), [b"a@x", b"b@x"], [ok, over])
        self.assertEqual(final, [ok, over])

    def test_lmtpToSmtpRepeatsTheReply(self) -> None:
        ok = reply(250, "2.0.0", "queued")
        _, final = self.run_("lmtp", target("smtp"), [b"a@x", b"b@x", b"c@x"], [ok])
        self.assertEqual(final, [ok, ok, ok])

    def test_smtpToLmtpOneRecipientPerTransaction(self) -> None:
        """
        lmtp_split one_rcpt: the second RCPT gets 452 4.5.3 locally and is
        never sent downstream.
        """
        ok = reply(250, "2.0.0", "<a@x> Saved")
        rcptReplies, final = self.run_("smtp", target("lmtp"), [b"a@x", b"b@x"], [ok])
        self.assertEqual(rcptReplies[1], replies.LMTP_SPLIT)
        self.assertEqual(final, [ok])
        self.assertNotIn(("rcpt", b"b@x"), self.downstream.calls)

    def test_smtpToLmtpTempfailMixed(self) -> None:
        """
        lmtp_split tempfail: mixed results → 451, never a 250 that loses a
        recipient, never a 5xx for a delivered one.
        """
        ok = reply(250, "2.0.0", "<a@x> Saved")
        over = reply(552, "5.2.2", "<b@x> Quota exceeded")
        _, final = self.run_("smtp", target("lmtp", lmtpSplit="tempfail"), [b"a@x", b"b@x"], [ok, over])
        self.assertEqual(final, [replies.LMTP_MIXED.withSession("L1")])

    def test_smtpToLmtpTempfailAgreeing(self) -> None:
        ok1 = reply(250, "2.0.0", "<a@x> Saved")
        ok2 = reply(250, "2.0.0", "<b@x> Saved")
        _, final = self.run_("smtp", target("lmtp", lmtpSplit="tempfail"), [b"a@x", b"b@x"], [ok1, ok2])
        self.assertEqual(final, [ok1])

    def test_smtpToLmtpTempfailAgreeingByClass(self) -> None:
        """
        Issue 14 D: agreement is by outcome class, not by identical text:
        C{250 2.0.0 ok} and C{250 2.1.5 delivered} are one success, answered
        with the first recipient's reply; likewise for failures of one
        class.
        """
        tempfail = target("lmtp", lmtpSplit="tempfail")
        ok = reply(250, "2.0.0", "ok")
        delivered = reply(250, "2.1.5", "delivered")
        _, final = self.run_("smtp", tempfail, [b"a@x", b"b@x"], [ok, delivered])
        self.assertEqual(final, [ok])
        full = reply(452, "4.2.2", "<a@x> Mailbox full")
        busy = reply(451, "4.3.0", "<b@x> Try later")
        _, final = self.run_("smtp", tempfail, [b"a@x", b"b@x"], [full, busy])
        self.assertEqual(final, [full])

    def test_smtpToLmtpTempfailLostAfterFirst(self) -> None:
        """
        The LMTP downstream is lost after the first recipient's 250: the
        SMTP client gets a 451 (the first recipient may be delivered twice,
        the second is never lost).
        """
        ok = reply(250, "2.0.0", "<a@x> Saved")
        lost = DownstreamError(replies.DOWNSTREAM_LOST, "connection lost", received=[ok])
        _, final = self.run_("smtp", target("lmtp", lmtpSplit="tempfail"), [b"a@x", b"b@x"], lost)
        self.assertEqual(final, [replies.LMTP_MIXED.withSession("L1")])


class LogLineTests(SynchronousTestCase):
    """
    The lines a postmaster reads: one per refused command, one per
    recipient where an LMTP target answers per recipient, and the true
    cause of an abort.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = ClientSession(id="S1D", protocol="smtp", clientHost="192.0.2.7",
                                     clientPort=40000, heloName="client.test", esmtp=True)
        self.events = captureEvents(self)

    def relay(self, downstream: ScriptedDownstream | None = None, **listenerArgs: Any) -> RelaySession:
        self.opener = Opener(downstream)
        self.downstream = self.opener.downstream
        return relaySession(self.session, listener(**listenerArgs), self.opener, self.clock)

    def lines(self, key: str) -> list[str]:
        self.clock.advance(0)  # transaction and recipient events follow the reply by one turn
        return [formatEvent(e) for e in self.events if e.get(key)]

    def test_rcptRefusedByDownstream(self) -> None:
        """
        A downstream's refusal of RCPT: Postfix's C{NOQUEUE: reject} line,
        naming the downstream; the accepted recipient gets no line.
        """
        relay = self.relay()
        self.downstream.script["rcpt:nobody@example.org"] = reply(550, "5.1.1", "<nobody@example.org>: unknown")
        result(relay.mail(b"a@example.net", {}))
        result(relay.rcpt(b"ok@example.org", {}))
        result(relay.rcpt(b"nobody@example.org", {}))
        self.assertEqual(
            self.lines("reject"),
            ["S1D: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 <nobody@example.org>: unknown; "
             "from=<a@example.net> to=<nobody@example.org> proto=ESMTP helo=<client.test> "
             "relay=sink.test[127.0.0.1]:2526"],
        )
        [event] = [e for e in self.events if e.get("reject")]
        self.assertEqual(
            {k: event[k] for k in ("session", "command", "client", "sender", "recipient", "relay")},
            {"session": "S1D", "command": "RCPT", "client": "unknown[192.0.2.7]",
             "sender": "a@example.net", "recipient": "nobody@example.org",
             "relay": "sink.test[127.0.0.1]:2526"},
        )
        self.assertEqual(self.opener.sessionId, "S1D")

    def test_mailRefusedByDownstream(self) -> None:
        relay = self.relay()
        self.downstream.script["mail"] = reply(553, "5.7.1", "Sender address rejected")
        result(relay.mail(b"spam@example.net", {}))
        self.assertEqual(
            self.lines("reject"),
            ["S1D: reject: MAIL from unknown[192.0.2.7]: 553 5.7.1 Sender address rejected; "
             "from=<spam@example.net> proto=ESMTP helo=<client.test> relay=sink.test[127.0.0.1]:2526"],
        )

    def test_mailWithoutDownstream(self) -> None:
        """
        No target reachable: the client's 451 at MAIL is a refusal too, with
        no relay.
        """
        relay = self.relay()
        self.opener.error = DownstreamError(replies.NO_DOWNSTREAM, "refused")
        result(relay.mail(b"a@example.net", {}))
        self.assertEqual(
            self.lines("reject"),
            ["S1D: reject: MAIL from unknown[192.0.2.7]: 451 4.4.1 No downstream server available [S1D]; "
             "from=<a@example.net> proto=ESMTP helo=<client.test> relay=none"],
        )

    def test_dataRefused(self) -> None:
        relay = self.relay()
        self.downstream.script["data"] = reply(554, "5.5.1", "Error: no valid recipients")
        result(relay.mail(b"a@example.net", {}))
        result(relay.rcpt(b"b@example.org", {}))
        result(relay.data(Producer()))
        self.assertEqual(
            self.lines("reject"),
            ["S1D: reject: DATA from unknown[192.0.2.7]: 554 5.5.1 Error: no valid recipients; "
             "from=<a@example.net> proto=ESMTP helo=<client.test> relay=sink.test[127.0.0.1]:2526"],
        )

    def test_acceptedLeavesNoRejectLine(self) -> None:
        relay = self.relay()
        result(relay.mail(b"a@example.net", {}))
        result(relay.rcpt(b"b@example.org", {}))
        self.assertEqual(result(relay.data(Producer())).code, 354)
        self.assertEqual(self.lines("reject"), [])

    def transaction(self, relay: RelaySession, rcpts: Sequence[bytes], end: object) -> Sequence[Reply]:
        self.downstream.script["end"] = end
        result(relay.mail(b"a@example.net", {}))
        for r in rcpts:
            result(relay.rcpt(r, {}))
        result(relay.data(Producer()))
        relay.dataChunk(b"x\r\n")
        return result(relay.endData())

    def test_lmtpPerRecipient(self) -> None:
        """
        An LMTP target's mixed verdicts: one line per recipient with its
        own status and reply; the transaction's status and reply agree
        (never C{status=bounced reply=250}).
        """
        self.session.protocol = "lmtp"
        relay = self.relay(ScriptedDownstream(lmtp=True), kind="lmtp", deliverTo=target("lmtp"))
        self.transaction(relay, [b"a@x", b"b@x"], [reply(250, "2.0.0", "<a@x> Saved"),
                                                   reply(552, "5.2.2", "<b@x> Quota exceeded")])
        self.assertEqual(
            self.lines("delivery"),
            ["S1D: to=<a@x> relay=sink.test[127.0.0.1]:2526 status=sent reply=250 2.0.0 <a@x> Saved",
             "S1D: to=<b@x> relay=sink.test[127.0.0.1]:2526 status=bounced "
             "reply=552 5.2.2 <b@x> Quota exceeded"],
        )
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual((event["status"], event["reply"]), ("bounced", "552 5.2.2 <b@x> Quota exceeded"))

    def test_namespace(self) -> None:
        """
        The transaction and per-recipient lines keep the namespace that
        JSON logs show for them.
        """
        self.session.protocol = "lmtp"
        relay = self.relay(ScriptedDownstream(lmtp=True), kind="lmtp", deliverTo=target("lmtp"))
        self.transaction(relay, [b"a@x"], [reply(250, "2.0.0", "<a@x> Saved")])
        self.clock.advance(0)
        events = [e for e in self.events if e.get("transaction") or e.get("delivery")]
        self.assertEqual(
            [e["log_namespace"] for e in events], ["smtprelay.relay.session.RelaySession"] * 2
        )

    def test_tempfailSplitTellsWhoWasDelivered(self) -> None:
        """
        C{lmtp_split tempfail}: the client is told 451 (the transaction is
        deferred), and the recipient lines say which were delivered.
        """
        relay = self.relay(ScriptedDownstream(lmtp=True), deliverTo=target("lmtp", lmtpSplit="tempfail"))
        final = self.transaction(relay, [b"a@x", b"b@x", b"c@x"], [
            reply(250, "2.0.0", "<a@x> Saved"), reply(250, "2.0.0", "<b@x> Saved"),
            reply(452, "4.2.2", "<c@x> Mailbox full")])
        self.assertEqual(final, [replies.LMTP_MIXED.withSession("S1D")])
        self.assertEqual(
            [line.split(" relay=")[0] + " " + line.split(" status=")[1] for line in self.lines("delivery")],
            ["S1D: to=<a@x> sent reply=250 2.0.0 <a@x> Saved",
             "S1D: to=<b@x> sent reply=250 2.0.0 <b@x> Saved",
             "S1D: to=<c@x> deferred reply=452 4.2.2 <c@x> Mailbox full"],
        )
        [event] = [e for e in self.events if e.get("transaction")]
        self.assertEqual(
            (event["status"], event["reply"]),
            ("deferred", "451 4.3.0 Recipients had different results, try again later [S1D]"),
        )

    def test_smtpTargetHasNoRecipientLines(self) -> None:
        relay = self.relay()
        self.transaction(relay, [b"a@x", b"b@x"], [reply(250, "2.0.0", "queued")])
        self.assertEqual(self.lines("delivery"), [])
        self.assertEqual(len(self.lines("transaction")), 1)

    def test_clientGoneDuringData(self) -> None:
        """
        A client that drops during the body: the line says so, not that the
        downstream was lost.
        """
        relay = self.relay()
        result(relay.mail(b"a@example.net", {}))
        result(relay.rcpt(b"b@example.org", {}))
        result(relay.data(Producer()))
        relay.dataChunk(b"partial")
        relay.close()
        [line] = self.lines("transaction")
        self.assertTrue(
            line.endswith(" status=aborted reply=client connection closed during DATA"), line
        )


class AuthForwardTests(SynchronousTestCase):
    """
    C{auth forward} checks the client's credentials at AUTH time
    against the downstream and binds that session to this client.
    """

    def setUp(self) -> None:
        self.session = ClientSession(id="A1", protocol="smtp", clientHost="192.0.2.7")
        self.opener = Opener()

    def relay(self) -> RelaySession:
        return relaySession(self.session, listener("submission", auth=ListenerAuth("forward")),
                            self.opener, Clock())

    def test_acceptedCredentialsBindTheDownstream(self) -> None:
        relay = self.relay()
        self.assertEqual(result(relay.authenticate("PLAIN", "alice", "s3cret")), replies.AUTH_OK)
        self.assertEqual(self.opener.calls, [{"credentials": Credentials("alice", "s3cret"), "mail": None, "client": self.session}])
        self.session.user = "alice"
        result(relay.mail(b"alice@x", {}))
        self.assertEqual(len(self.opener.calls), 1, "MAIL must reuse the authenticated session")
        self.assertEqual(self.opener.downstream.calls, [("mail", b"alice@x", {})])

    def test_downstreamVerdictReachesClient(self) -> None:
        verdict = reply(535, "5.7.8", "Error: authentication failed: bad password")
        self.opener.error = DownstreamError(verdict, "535 from downstream")
        self.assertEqual(result(self.relay().authenticate("LOGIN", "alice", "wrong")), verdict)

    def test_noVerdictIsTemporary(self) -> None:
        """
        No downstream reachable: 454 4.7.0, never 535.
        """
        self.opener.error = DownstreamError(replies.NO_DOWNSTREAM, "refused")
        got = result(self.relay().authenticate("PLAIN", "alice", "pw"))
        self.assertEqual(got, replies.AUTH_TEMPFAIL.withSession("A1"))

    def test_credentialsReusedWhenBoundSessionDied(self) -> None:
        relay = self.relay()
        result(relay.authenticate("PLAIN", "alice", "pw"))
        self.opener.downstream.script["mail"] = DownstreamError(replies.DOWNSTREAM_LOST)
        self.opener.downstream = ScriptedDownstream()
        self.assertEqual(result(relay.mail(b"alice@x", {})).code, 250)
        self.assertEqual([c["credentials"] for c in self.opener.calls[1:]], [Credentials("alice", "pw")])

    def test_clientGoneWhileAuthenticatingReleasesTheDownstream(self) -> None:
        """
        A client that leaves while its AUTH opens the downstream session:
        once open, the session is released (never kept: it carries the
        client's identity) and the credentials are not kept either.
        """
        opening: Deferred = Deferred()
        released: list[object] = []
        relay = relaySession(self.session, listener("submission", auth=ListenerAuth("forward")),
                             lambda **kw: opening, Clock(), released.append)
        auth = relay.authenticate("PLAIN", "alice", "s3cret")
        relay.close()
        opening.callback((self.opener.downstream, None))
        self.assertEqual(result(auth), replies.AUTH_OK)
        self.assertEqual(released, [self.opener.downstream])
        self.assertIsNone(relay._credentials)

    def test_credentialsNotInRepr(self) -> None:
        self.assertNotIn("s3cret", repr(Credentials("alice", "s3cret")))


class RoutingTests(SynchronousTestCase):
    """
    Routing: one target per transaction, chosen by the sender at
    MAIL or by the first routed recipient at RCPT.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = ClientSession(id="R1", protocol="smtp", clientHost="127.0.0.1")
        self.openers = {name: Opener() for name in ("a", "b", "corp", "lists")}
        self.released: list[tuple[str, object]] = []
        targets = {name: target(name=name) for name in self.openers}
        targets["lists"] = target("lmtp", name="lists")
        routing = Routing(
            (("corp.test", targets["corp"]), ("spam.test", Reject(550, "5.7.1", "go away"))),
            Destinations(
                (("a.test", targets["a"]), ("b.test", targets["b"]),
                 ("lists.test", targets["lists"]),
                 ("nobody@a.test", Reject(550, "5.1.1", "no such user"))),
                Reject(550, "5.1.2", "unknown domain"),
            ),
        )

        def routeFor(t: Target) -> Route:
            return targetRoute(t, self.openers[t.name], lambda d: self.released.append((t.name, d)))

        self.relay = RelaySession(self.session, listener(deliverTo=routing).auth.mode, makeRouter(routing, routeFor),
                                  "relay.test", self.clock)

    def calls(self, name: str) -> list[str]:
        return [c[0] for c in self.openers[name].downstream.calls]

    def test_firstRecipientOpensItsTarget(self) -> None:
        """
        Under recipient routing MAIL is answered here and contacts no one;
        the first RCPT opens its target with the client's MAIL, and the
        transaction's other recipients for that target go on that session.
        """
        self.assertEqual(result(self.relay.mail(b"s@x.test", {"SIZE": "10"})),
                         reply(250, "2.1.0", "OK"))
        self.assertEqual([o.calls for o in self.openers.values()], [[], [], [], []])
        self.assertEqual(result(self.relay.rcpt(b"r1@A.test", {})), reply(250, "2.1.5", "Recipient ok"))
        self.assertEqual(self.openers["a"].calls, [{"credentials": None, "mail": (b"s@x.test", {"SIZE": "10"}), "client": self.session}])
        self.assertEqual(result(self.relay.rcpt(b"r2@a.test", {})).code, 250)
        self.assertEqual(result(self.relay.data(Producer())).code, 354)
        self.relay.dataChunk(b"x\r\n")
        self.assertEqual(result(self.relay.endData())[0].code, 250)
        self.assertEqual(self.openers["a"].downstream.calls[:3],
                         [("mail", b"s@x.test", {"SIZE": "10"}), ("rcpt", b"r1@A.test"), ("rcpt", b"r2@a.test")])
        self.assertEqual([len(o.calls) for o in self.openers.values()], [1, 0, 0, 0])

    def test_recipientRoutedElsewhere(self) -> None:
        """
        A recipient whose target is not the transaction's is told to come
        back in another transaction, and never reaches either target; a
        recipient rejected by a rule does not choose the target.
        """
        result(self.relay.mail(b"s@x.test", {}))
        self.assertEqual(result(self.relay.rcpt(b"nobody@a.test", {})), reply(550, "5.1.1", "no such user"))
        self.assertEqual(result(self.relay.rcpt(b"r@unknown.test", {})), reply(550, "5.1.2", "unknown domain"))
        self.assertEqual(result(self.relay.rcpt(b"r@b.test", {})).code, 250)
        self.assertEqual(
            result(self.relay.rcpt(b"r@a.test", {})),
            reply(451, "4.5.3", "Recipient routed elsewhere, send it in a separate transaction [R1]"),
        )
        self.assertEqual(self.openers["a"].calls, [])
        self.assertEqual(self.calls("b"), ["mail", "rcpt"])

    def test_nextTransactionElsewhere(self) -> None:
        """
        The next transaction of the session may go to another target: the
        held session is released to its own target's pool first.
        """
        result(self.relay.mail(b"s@x.test", {}))
        result(self.relay.rcpt(b"r@a.test", {}))
        self.relay.reset()
        result(self.relay.mail(b"s@x.test", {}))
        self.assertEqual(self.released, [])
        result(self.relay.rcpt(b"r@b.test", {}))
        self.assertEqual(self.released, [("a", self.openers["a"].downstream)])
        self.assertEqual(self.calls("a"), ["mail", "rcpt", "rset"])
        self.assertEqual(self.calls("b"), ["mail", "rcpt"])
        result(self.relay.mail(b"s2@x.test", {}))
        result(self.relay.rcpt(b"r@b.test", {}))
        self.assertEqual(len(self.openers["b"].calls), 1, "same target: the held session is reused")
        self.relay.close()
        self.assertEqual([name for name, _ in self.released], ["a", "b"])

    def test_mailRefusedAtFirstRecipient(self) -> None:
        """
        The target's refusal of the MAIL sent at the first RCPT is that
        RCPT's reply and every later one's for that target; no RCPT is
        sent after a refused MAIL, and DATA finds no recipient.
        """
        self.openers["a"].downstream.script["mail"] = reply(550, "5.1.8", "Sender rejected")
        result(self.relay.mail(b"s@x.test", {}))
        self.assertEqual(result(self.relay.rcpt(b"r1@a.test", {})), reply(550, "5.1.8", "Sender rejected"))
        self.assertEqual(result(self.relay.rcpt(b"r2@a.test", {})), reply(550, "5.1.8", "Sender rejected"))
        self.assertEqual(self.calls("a"), ["mail"])
        self.assertEqual(result(self.relay.data(Producer())).code, 554)

    def test_clientGoneWhileFirstRecipientOpens(self) -> None:
        """
        A client that leaves while its first routed RCPT opens the target:
        once open, the session is released to that target, and no RCPT is
        sent on it.
        """
        pending: Deferred = Deferred()
        downstream = self.openers["a"].downstream
        downstream.script["mail"] = pending
        result(self.relay.mail(b"s@x.test", {}))
        rcpt = self.relay.rcpt(b"r@a.test", {})
        self.relay.close()
        self.assertEqual(self.released, [])
        pending.callback(reply(250, "2.1.0", "Sender ok"))
        self.assertEqual(result(rcpt), replies.DOWNSTREAM_LOST.withSession("R1"))
        self.assertEqual(self.released, [("a", downstream)])
        self.assertEqual(self.calls("a"), ["mail"])

    def test_noTargetReachable(self) -> None:
        """
        When the first routed recipient's target cannot be reached, it and
        the later recipients for it get the temporary failure.
        """
        self.openers["a"].error = DownstreamError(replies.NO_DOWNSTREAM)
        result(self.relay.mail(b"s@x.test", {}))
        self.assertEqual(result(self.relay.rcpt(b"r1@a.test", {})), replies.NO_DOWNSTREAM.withSession("R1"))
        self.assertEqual(result(self.relay.rcpt(b"r2@a.test", {})), replies.NO_DOWNSTREAM.withSession("R1"))
        self.assertEqual(len(self.openers["a"].calls), 1)

    def test_senderRoute(self) -> None:
        """
        A sender rule chooses the target at MAIL, whose reply is the
        downstream's; the recipients' rules do not apply.
        """
        self.assertEqual(result(self.relay.mail(b"boss@Corp.Test", {})), reply(250, "2.1.0", "Sender ok"))
        self.assertEqual(result(self.relay.rcpt(b"r@unknown.test", {})).code, 250)
        self.assertEqual(self.calls("corp"), ["mail", "rcpt"])

    def test_senderRejected(self) -> None:
        """
        A C{reject} sender rule answers MAIL, contacts no one, and leaves
        no transaction open.
        """
        events = captureEvents(self)
        self.assertEqual(result(self.relay.mail(b"x@spam.test", {})), reply(550, "5.7.1", "go away"))
        self.assertEqual([o.calls for o in self.openers.values()], [[], [], [], []])
        self.assertEqual([formatEvent(e) for e in events],
                         ["R1: reject: MAIL from unknown[127.0.0.1]: 550 5.7.1 go away; "
                          "from=<x@spam.test> proto=SMTP helo=<> relay=none"])
        self.assertEqual(result(self.relay.rcpt(b"r@a.test", {})), replies.DOWNSTREAM_LOST.withSession("R1"))

    def test_lmtpSplitFollowsTheRoute(self) -> None:
        """
        C{lmtp_split one_rcpt} applies when the transaction's target is
        LMTP, whatever the listener's other targets.
        """
        result(self.relay.mail(b"s@x.test", {}))
        self.assertEqual(result(self.relay.rcpt(b"r1@lists.test", {})).code, 250)
        self.assertEqual(result(self.relay.rcpt(b"r2@lists.test", {})), replies.LMTP_SPLIT)
