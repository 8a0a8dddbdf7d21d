"""
The message body of an inbound transaction, from the wire to the handler.

A L{BodyTransfer} asks the handler to take a body (its C{354}), reads what
follows C{DATA} (dot-stuffed, up to C{CRLF . CRLF}) or each C{BDAT} chunk
(exactly its count of bytes, whatever its reply) through a
L{DataScanner} under the listener's size, line-length and hops rules, and
streams the message to the handler's C{dataChunk} with back-pressure.  At the
end it answers with the handler's final replies, one per recipient for LMTP,
or with the local verdict, which the handler's C{abortData} gets too.  What
it needs of its session is a L{Dialogue}.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from twisted.logger import Logger

from smtprelay.inbound.framing import Chunk, InputBuffer, Pauser
from smtprelay.inbound.policy import SessionPolicy
from smtprelay.inbound.states import Stage
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.observe.metrics import IMetrics
from smtprelay.protocol import replies
from smtprelay.protocol.body import DataScanner
from smtprelay.protocol.parameters import finalReplies
from smtprelay.protocol.replies import Refusal, Reply


class Dialogue(Protocol):
    """
    What a body needs of the session it belongs to.
    """

    @property
    def handler(self) -> IRelayHandler:
        """The session's handler."""

    @property
    def stage(self) -> Stage:
        """Where the transaction is; a body moves it to DATA or BDAT."""

    @stage.setter
    def stage(self, stage: Stage) -> None: ...

    @property
    def recipients(self) -> int:
        """The recipients accepted in this transaction."""

    def reply(self, r: Reply) -> None:
        """Send C{r} to the client, after the replies before it."""

    def wait(self, call: Callable[..., Any], *args: Any, then: Callable[[Any], None]) -> None:
        """
        Call the handler's C{call(*args)}, read nothing more until it
        answers, and give C{then} its result (L{None} if it failed).
        """

    def answer(self, result: Reply | None) -> Reply:
        """The handler's reply, or the local error that stands for its failure."""

    def pause(self, reason: str) -> None:
        """Stop reading the client's socket for C{reason}."""

    def resume(self, reason: str) -> None:
        """C{reason} to stop reading holds no longer."""

    def timeBody(self, on: bool) -> None:
        """Start the deadline of a whole body (C{data_timeout}), or stop it."""

    def disconnect(self, refusal: Refusal) -> None:
        """Send C{refusal} and close the session."""

    def ended(self) -> None:
        """The transaction is over, its replies queued."""


class BodyTransfer:
    """
    The bodies of one session's transactions: C{DATA}'s, or the chunks of
    C{BDAT}.

    @ivar read: when the client's next bytes are the body's (a C{DATA} body
        after its C{354}, or the rest of a C{BDAT} chunk), takes them from
        the input (what follows a C{DATA} body's end stays there); L{None}
        when they are a command line.
    """

    def __init__(self, policy: SessionPolicy, session: ClientSession, input: InputBuffer,
                 dialogue: Dialogue, metrics: IMetrics, log: Logger) -> None:
        """
        @param policy: the listener's size, line-length, hops and bare-LF
            rules, and whether the session is LMTP.
        @param session: the client session (its id goes into local replies).
        @param input: the session's buffer of the client's bytes.
        @param dialogue: the session.
        @param metrics: where a refused body is counted.
        @param log: the session's logger.
        """
        self._policy = policy
        self._session = session
        self._input = input
        self._dialogue = dialogue
        self._metrics = metrics
        self._log = log
        self.read: Callable[[], None] | None = None
        self._scanner: DataScanner | None = None
        self._pauser: Pauser | None = None
        # The BDAT chunk being read.
        self._chunk: Chunk | None = None
        # The reply to every later BDAT chunk once one failed (RFC 3030 §2).
        self._failed: Reply | None = None

    @property
    def open(self) -> bool:
        """
        Whether a body is open at the handler (from its C{354} to its end).
        """
        return self._scanner is not None

    def data(self) -> None:
        """
        C{DATA} may run: open the body at the handler, which says C{354} or
        refuses it.
        """
        dialogue = self._dialogue
        handler = dialogue.handler
        pauser = Pauser(dialogue.pause, dialogue.resume, "body")

        def done(result: Reply | None) -> None:
            r = dialogue.answer(result)
            if r.code != 354:
                pauser.detach()
                dialogue.reply(r)
                return
            if self._input.data:
                # The body came before our 354: out of step.
                pauser.detach()
                dialogue.disconnect(replies.SYNC_ERROR)
                return
            dialogue.stage = Stage.DATA
            self._open(handler, pauser, stuffed=True)
            self.read = self._readData
            dialogue.reply(r)

        dialogue.wait(handler.data, pauser, then=done)

    def bdat(self, chunk: Chunk) -> None:
        """
        RFC 3030: C{chunk} follows, read exactly whatever its reply; the first
        chunk of a transaction opens the body at the handler as C{DATA} does.

        @param chunk: its C{refusal} is set when C{BDAT} may not run now.
        """
        self._chunk = chunk
        if chunk.left:
            self.read = self._readChunk
        dialogue = self._dialogue
        if chunk.refusal is None and self._failed is not None:
            chunk.refusal = self._failed
        elif chunk.refusal is None and self._scanner is None:
            # Neither open nor failed: the transaction's first chunk.
            dialogue.stage = Stage.BDAT
            handler = dialogue.handler
            pauser = Pauser(dialogue.pause, dialogue.resume, "body")

            def opened(result: Reply | None) -> None:
                r = dialogue.answer(result)
                if r.code == 354:
                    self._open(handler, pauser, stuffed=False)
                else:
                    pauser.detach()
                    self._failed = chunk.refusal = r
                if not chunk.left:
                    self._chunkRead(chunk)

            dialogue.wait(handler.data, pauser, then=opened)
            return
        if not chunk.left:
            self._chunkRead(chunk)

    def abandon(self) -> bool:
        """
        The client resets the transaction: forget a failed chunk, and
        abandon a body open at the handler between BDAT chunks (the
        downstream never gets its last chunk).

        @return: whether a body was open: the handler has its abort.
        """
        self._failed = None
        if self._dialogue.stage is not Stage.BDAT or self._scanner is None:
            return False
        self._close()
        self._dialogue.handler.abortData(replies.BDAT_RESET.withSession(self._session.id))
        return True

    def _open(self, handler: IRelayHandler, pauser: Pauser, stuffed: bool) -> None:
        """
        The handler takes the body (its C{354}): scan what comes, under the
        listener's rules and C{data_timeout}.
        """
        self._pauser = pauser
        policy = self._policy
        self._scanner = DataScanner(
            handler.dataChunk,
            policy.maxMessageSize,
            policy.maxHops,
            normalize=policy.bareLF == "normalize",
            maxLineLength=policy.maxLineLength,
            stuffed=stuffed,
        )
        self._dialogue.timeBody(True)

    def _close(self) -> None:
        """
        The body is complete or abandoned: stop scanning and timing it.
        """
        self.read = None
        self._scanner = None
        self._dialogue.timeBody(False)
        if self._pauser is not None:
            self._pauser.detach()
            self._pauser = None

    def _readData(self) -> None:
        scanner = self._scanner
        assert scanner is not None
        rest = scanner.feed(self._input.takeAll())
        if rest is not None:
            if rest:
                self._input.unread(rest)
            self._end(scanner)

    def _readChunk(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        data = self._input.take(chunk.left)
        chunk.left -= len(data)
        if chunk.refusal is None and self._scanner is not None:
            self._scanner.feed(data)
        if not chunk.left:
            self._chunkRead(chunk)

    def _chunkRead(self, chunk: Chunk) -> None:
        """
        A chunk is in: its reply, or the end of the body after C{LAST}.
        """
        self._chunk = self.read = None
        dialogue = self._dialogue
        last = chunk.last and dialogue.stage is Stage.BDAT
        if chunk.refusal is not None:
            for _ in range(dialogue.recipients if last and self._policy.lmtp else 1):
                dialogue.reply(chunk.refusal)
            if last:
                # The failed transaction ends here, at the handler too.
                self._failed = None
                dialogue.handler.reset()
                dialogue.ended()
            return
        scanner = self._scanner
        assert scanner is not None
        if last:
            scanner.finish()
            self._end(scanner)
            return
        verdict = scanner.verdict
        if verdict is None:
            dialogue.reply(replies.chunkReceived(chunk.size))
            return
        # A refused chunk fails the transaction: the rest is read and
        # discarded, each chunk gets this reply.
        self._close()
        self._failed = self._refuse(verdict)
        dialogue.reply(self._failed)

    def _refuse(self, verdict: Refusal) -> Reply:
        """
        The body broke a local rule: the downstream never gets its end, and
        the client gets the returned reply.
        """
        self._log.info(
            "body refused in {session}: {reply}", session=self._session.id,
            reply=verdict.reply.text,
        )
        self._metrics.rejected(verdict.reason)
        local = verdict.reply.withSession(self._session.id)
        self._dialogue.handler.abortData(local)
        return local

    def _end(self, scanner: DataScanner) -> None:
        """
        The whole body is in (the dot, or the C{LAST} chunk): refuse it
        under a local rule, or end it at the handler; either way one reply
        per recipient for LMTP.
        """
        self._close()
        dialogue = self._dialogue
        count = finalReplies(self._policy.lmtp, dialogue.recipients)
        verdict = scanner.verdict
        if verdict is not None:
            local = self._refuse(verdict)
            for _ in range(count):
                dialogue.reply(local)
            dialogue.ended()
            return

        def done(result: Sequence[Reply] | None) -> None:
            final = list(result or ())
            if not final:
                final = [dialogue.answer(None)]
            # Exactly one reply per accepted recipient keeps an LMTP client
            # in step, whatever the handler returned.
            final = (final + [final[-1]] * count)[:count]
            for r in final:
                dialogue.reply(r)
            dialogue.ended()

        dialogue.wait(dialogue.handler.endData, then=done)
