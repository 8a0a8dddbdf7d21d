"""
Tests for L{smtprelay.inbound.transfer}: a message body on its own, between a
recording L{Dialogue} and a L{RecordingHandler}, without a socket.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.framing import Chunk, InputBuffer
from smtprelay.inbound.policy import SessionPolicy
from smtprelay.inbound.states import Stage
from smtprelay.inbound.transfer import BodyTransfer
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.observe.metrics import NullMetrics
from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal, Reply, reply
from smtprelay.testing.handler import QUEUED, RecordingHandler

from .logcapture import captureEvents

START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
DOWN = reply(451, "4.4.2", "down")


class RecordingDialogue:
    """
    A session as a body sees it: the replies as wire bytes, every other
    call in order; the handler answers at once.
    """

    def __init__(self, handler: RecordingHandler, recipients: int = 1) -> None:
        self._handler = handler
        self.stage = Stage.RCPT
        self.recipients = recipients
        self.wire = b""
        self.events: list[tuple[str, Any]] = []

    @property
    def handler(self) -> IRelayHandler:
        return self._handler

    def reply(self, r: Reply) -> None:
        self.wire += r.toBytes()

    def wait(self, call: Callable[..., Any], *args: Any, then: Callable[[Any], None]) -> None:
        def fired(result: Any) -> None:
            then(None if isinstance(result, Failure) else result)

        maybeDeferred(call, *args).addBoth(fired)

    def answer(self, result: Reply | None) -> Reply:
        return replies.LOCAL_ERROR.withSession("S1") if result is None else result

    def pause(self, reason: str) -> None:
        self.events.append(("pause", reason))

    def resume(self, reason: str) -> None:
        self.events.append(("resume", reason))

    def timeBody(self, on: bool) -> None:
        self.events.append(("timeBody", on))

    def disconnect(self, refusal: Refusal) -> None:
        self.events.append(("disconnect", refusal))

    def ended(self) -> None:
        self.events.append(("ended", None))
        self.stage = Stage.READY


class _Metrics(NullMetrics):
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def rejected(self, reason: str) -> None:
        self.reasons.append(reason)


class Body:
    """
    A L{BodyTransfer} with its input, dialogue, handler and metrics.
    """

    def __init__(self, policy: SessionPolicy | None = None, recipients: int = 1,
                 script: Any = None) -> None:
        policy = policy or SessionPolicy(kind="smtp")
        session = ClientSession(id="S1", protocol="lmtp" if policy.lmtp else "smtp",
                                clientHost="127.0.0.1")
        self.handler = RecordingHandler(session, script)
        self.dialogue = RecordingDialogue(self.handler, recipients)
        self.input = InputBuffer()
        self.metrics = _Metrics()
        self.transfer = BodyTransfer(policy, session, self.input, self.dialogue, self.metrics,
                                     Logger())

    def send(self, data: bytes) -> bytes:
        """
        The client sends C{data}: the body reads what is its own; return the
        replies since the last call.
        """
        self.input.feed(data)
        while self.input.data and self.transfer.read is not None:
            self.transfer.read()
        return self.read()

    def read(self) -> bytes:
        wire, self.dialogue.wire = self.dialogue.wire, b""
        return wire

    def bdat(self, argument: bytes, refusal: Reply | None = None) -> bytes:
        chunk = Chunk.parse(argument)
        assert chunk is not None
        chunk.refusal = refusal
        self.transfer.bdat(chunk)
        return self.read()


class DataTests(SynchronousTestCase):
    """
    A DATA body: dot-stuffed, up to C{CRLF . CRLF}.
    """

    def test_message(self) -> None:
        """
        After the handler's C{354} the body is unstuffed into C{dataChunk}
        up to its end; the handler's final reply follows, the transaction
        ends, and what came after the dot stays for the session.
        """
        body = Body()
        body.transfer.data()
        self.assertEqual(body.read(), START)
        self.assertIs(body.dialogue.stage, Stage.DATA)
        self.assertTrue(body.transfer.open)
        out = body.send(b"Subject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\n")
        self.assertEqual(out, b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(body.handler.body, b"Subject: x\r\n\r\n.dot\r\n")
        self.assertEqual(body.input.takeAll(), b"NOOP\r\n")
        self.assertFalse(body.transfer.open)
        self.assertEqual(body.dialogue.events, [
            ("timeBody", True), ("timeBody", False), ("resume", "body"), ("ended", None),
        ])

    def test_commandsAfterTheEnd(self) -> None:
        """
        Once the body is over, the next bytes are not the body's.
        """
        body = Body()
        body.transfer.data()
        body.send(b"x\r\n.\r\n")
        body.input.feed(b"QUIT\r\n")
        self.assertIsNone(body.transfer.read)
        self.assertEqual(body.input.takeAll(), b"QUIT\r\n")

    def test_refusedByHandler(self) -> None:
        """
        A handler that does not say C{354}: its reply, no body, the
        session's pause for the body released.
        """
        body = Body(script={"data": DOWN})
        body.transfer.data()
        self.assertEqual(body.read(), b"451 4.4.2 down\r\n")
        self.assertFalse(body.transfer.open)
        self.assertIs(body.dialogue.stage, Stage.RCPT)
        self.assertEqual(body.dialogue.events, [("resume", "body")])

    def test_handlerFailed(self) -> None:
        """
        A handler whose C{data} fails: the local error, no body.
        """
        body = Body()
        body.handler.data = lambda producer: fail(RuntimeError("boom"))  # type: ignore[method-assign]  # a failing handler
        body.transfer.data()
        self.assertEqual(body.read(), b"451 4.3.0 Local error in processing [S1]\r\n")
        self.assertFalse(body.transfer.open)

    def test_bodyBefore354(self) -> None:
        """
        Body bytes that came before the C{354} are out of step: the session
        is closed with the synchronization error, no body is opened.
        """
        body = Body()
        body.input.feed(b"early\r\n")
        body.transfer.data()
        self.assertEqual(body.read(), b"")
        self.assertEqual(body.dialogue.events,
                         [("resume", "body"), ("disconnect", replies.SYNC_ERROR)])
        self.assertFalse(body.transfer.open)

    def test_tooBig(self) -> None:
        """
        A body over the size limit: the handler's C{abortData} and the
        client get the local reply at the end, counted as C{too_big} and
        logged; the handler never gets the end.
        """
        events = captureEvents(self)
        body = Body(SessionPolicy(kind="smtp", maxMessageSize=10))
        body.transfer.data()
        body.read()
        self.assertEqual(body.send(b"0123456789\r\nmore\r\n"), b"")
        self.assertEqual(body.send(b".\r\n"),
                         b"552 5.3.4 Message size exceeds fixed limit [S1]\r\n")
        self.assertEqual(body.handler.aborted, replies.MESSAGE_TOO_BIG.withSession("S1"))
        self.assertNotIn("endData", body.handler.methods)
        self.assertEqual(body.metrics.reasons, ["too_big"])
        self.assertEqual(body.dialogue.events[-1], ("ended", None))
        refused = [e for e in events if e.get("log_format", "").startswith("body refused")]
        self.assertEqual([(e["session"], e["reply"]) for e in refused],
                         [("S1", "Message size exceeds fixed limit")])

    def test_lmtpVerdictPerRecipient(self) -> None:
        """
        LMTP: a local verdict is repeated for each accepted recipient.
        """
        body = Body(SessionPolicy(kind="lmtp", maxHops=0), recipients=3)
        body.transfer.data()
        body.read()
        self.assertEqual(body.send(b"Received: x\r\n\r\nb\r\n.\r\n"),
                         b"554 5.4.6 Too many hops [S1]\r\n" * 3)

    def test_lmtpFinalRepliesPadded(self) -> None:
        """
        LMTP: exactly one final reply per accepted recipient, whatever the
        handler returned (the last repeated, the surplus dropped).
        """
        for given, expected in [
            ([QUEUED], b"250 2.0.0 Ok: queued\r\n" * 3),
            ([QUEUED, DOWN], b"250 2.0.0 Ok: queued\r\n" + b"451 4.4.2 down\r\n" * 2),
            ([DOWN] * 5, b"451 4.4.2 down\r\n" * 3),
            ([], b"451 4.3.0 Local error in processing [S1]\r\n" * 3),
        ]:
            body = Body(SessionPolicy(kind="lmtp"), recipients=3, script={"endData": given})
            body.transfer.data()
            body.read()
            self.assertEqual(body.send(b"x\r\n.\r\n"), expected, given)

    def test_backPressure(self) -> None:
        """
        The handler's pause of the body pauses the session's reading for
        C{"body"}; the end of the body releases it.
        """
        body = Body()
        body.transfer.data()
        assert body.handler.producer is not None
        body.handler.pause()
        self.assertEqual(body.dialogue.events[-1], ("pause", "body"))
        body.send(b"x\r\n.\r\n")
        self.assertIn(("resume", "body"), body.dialogue.events)


class ChunkTests(SynchronousTestCase):
    """
    BDAT chunks: counted, taken as they are.
    """

    def test_chunks(self) -> None:
        """
        Each chunk is read exactly and passed on unchanged (dots and all);
        a chunk gets its C{250}, the C{LAST} one the handler's final reply.
        """
        body = Body()
        self.assertEqual(body.bdat(b"5"), b"")
        self.assertIs(body.dialogue.stage, Stage.BDAT)
        self.assertEqual(body.send(b".a\r\nb"), b"250 2.0.0 Ok: 5 octets\r\n")
        self.assertIsNone(body.transfer.read)
        self.assertEqual(body.bdat(b"5 LAST"), b"")
        self.assertEqual(body.send(b"\r\n.\r\nRSET\r\n"), b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(body.handler.body, b".a\r\nb\r\n.\r\n")
        self.assertEqual(body.input.takeAll(), b"RSET\r\n")
        self.assertEqual(body.handler.methods[0], "data")
        self.assertEqual(body.dialogue.events[-1], ("ended", None))

    def test_emptyLastChunk(self) -> None:
        """
        C{BDAT 0 LAST} ends the body at once, with the verdict on what came
        before.
        """
        body = Body()
        body.bdat(b"3")
        body.send(b"ab\n")
        # The bare LF of the first chunk refuses the body at its end.
        self.assertEqual(body.bdat(b"0 LAST"), b"550 5.5.2 Bare LF/CR not allowed [S1]\r\n")
        self.assertEqual(body.handler.aborted, replies.BARE_LF.withSession("S1"))

    def test_refusedChunkIsDiscarded(self) -> None:
        """
        A chunk refused by the session (out of sequence) is read and
        discarded; its C{LAST} ends no transaction.
        """
        body = Body()
        body.dialogue.stage = Stage.READY
        refusal = reply(503, "5.5.1", "Error: need MAIL command")
        self.assertEqual(body.bdat(b"4 LAST", refusal), b"")
        self.assertEqual(body.send(b"QUIT"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(body.handler.calls, [])
        self.assertEqual(body.dialogue.events, [])

    def test_openRefusedFailsEveryChunk(self) -> None:
        """
        A handler that does not take the body: every chunk of the
        transaction gets its reply, the C{LAST} one once per LMTP recipient,
        and the handler is reset at the end.
        """
        body = Body(SessionPolicy(kind="lmtp"), recipients=2, script={"data": DOWN})
        body.bdat(b"2")
        self.assertEqual(body.send(b"ab"), b"451 4.4.2 down\r\n")
        self.assertEqual(body.bdat(b"1 LAST"), b"")
        self.assertEqual(body.send(b"c"), b"451 4.4.2 down\r\n" * 2)
        self.assertEqual(body.handler.body, b"")
        self.assertEqual(body.handler.methods, ["data", "reset"])
        self.assertEqual(body.dialogue.events, [("resume", "body"), ("ended", None)])

    def test_verdictFailsTheRest(self) -> None:
        """
        A chunk that breaks a local rule is refused at once; the handler's
        C{abortData} gets the reply once, and every later chunk gets it.
        """
        body = Body(SessionPolicy(kind="smtp", maxMessageSize=3))
        body.bdat(b"4")
        tooBig = b"552 5.3.4 Message size exceeds fixed limit [S1]\r\n"
        self.assertEqual(body.send(b"abcd"), tooBig)
        self.assertFalse(body.transfer.open)
        body.bdat(b"2 LAST")
        self.assertEqual(body.send(b"ef"), tooBig)
        self.assertEqual([m for m in body.handler.methods if m == "abortData"], ["abortData"])
        self.assertEqual(body.metrics.reasons, ["too_big"])
        self.assertEqual(body.dialogue.events[-1], ("ended", None))
        body.dialogue.stage = Stage.RCPT
        body.bdat(b"1 LAST")
        self.assertEqual(body.send(b"g"), b"250 2.0.0 Ok: queued\r\n")

    def test_abandon(self) -> None:
        """
        A reset between chunks abandons the open body at the handler.
        """
        body = Body()
        self.assertFalse(body.transfer.abandon())
        body.bdat(b"2")
        body.send(b"ab")
        self.assertTrue(body.transfer.abandon())
        self.assertEqual(body.handler.aborted, replies.BDAT_RESET.withSession("S1"))
        self.assertFalse(body.transfer.open)
        self.assertEqual(body.dialogue.events[-2:], [("timeBody", False), ("resume", "body")])
        self.assertFalse(body.transfer.abandon())

    def test_abandonForgetsAFailure(self) -> None:
        """
        A reset after a failed chunk: the next transaction's chunks are
        read into a new body.
        """
        body = Body(script={"data": DOWN})
        body.bdat(b"1")
        self.assertEqual(body.send(b"a"), b"451 4.4.2 down\r\n")
        self.assertFalse(body.transfer.abandon())
        body.handler.script["data"] = replies.START_INPUT
        body.dialogue.stage = Stage.RCPT
        body.bdat(b"1 LAST")
        self.assertEqual(body.send(b"b"), b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(body.handler.body, b"b")
