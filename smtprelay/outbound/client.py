"""
The outbound SMTP/LMTP client protocol: one connection to one downstream.

Commands and replies go through
L{smtprelay.outbound.pipeline.CommandPipeline} (first in, first out,
strictly parsed); the steps before the transaction (EHLO/LHLO, STARTTLS
and the judgement of the peer, AUTH) are
L{smtprelay.outbound.preamble.Preamble}'s.  This protocol adds the
transaction itself (L{IDownstream}).  The body goes as C{BDAT} chunks
(RFC 3030, no dot-stuffing) to a downstream that advertises CHUNKING and
PIPELINING, else after C{DATA}, dot-stuffed by L{DotStuffer} at every
position, whatever the chunking; an aborted body never gets its
end-of-data (the dot, or the C{LAST} chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.net.address import Address
from smtprelay.interfaces import ClientSession, DownstreamError, IDownstream, Params
from smtprelay.net.wire import writeNow
from smtprelay.outbound.backpressure import Backpressure
from smtprelay.outbound.chunks import CHUNKS_READY, Chunks
from smtprelay.outbound.clientinfo import advertised, xforwardCommands
from smtprelay.outbound.pipeline import ANY, DATA
from smtprelay.outbound.policy import ClientPolicy, ClientTLSOptions
from smtprelay.outbound.preamble import Preamble
from smtprelay.protocol import replies
from smtprelay.protocol.addresses import downconvert
from smtprelay.protocol.body import DotStuffer
from smtprelay.protocol.parameters import Forwarded, finalReplies, mailParameters, rcptParameters
from smtprelay.protocol.replies import Reply


def _formatParams(forwarded: Forwarded) -> bytes:
    return b"".join(
        b" " + key.encode("ascii") + (b"" if value is None else b"=" + value.encode("utf-8"))
        for key, value in forwarded.params.items()
    )


@implementer(IDownstream)
class SMTPClientProtocol(Preamble):
    """
    One downstream connection.  L{smtprelay.outbound.handshake.Handshake}
    drives the steps before the transaction (L{Preamble}) and the relay
    uses it as an L{IDownstream}.
    """

    def __init__(
        self,
        policy: ClientPolicy,
        clock: IReactorTime,
        peer: str = "",
        address: Address | None = None,
        tlsOptions: ClientTLSOptions | None = None,
    ) -> None:
        super().__init__(policy, clock, peer, address, tlsOptions)
        self._accepted = 0
        self._downconvert = False
        self._body: DotStuffer | Chunks | None = None
        self._backpressure = Backpressure(clock, policy.dataTimeout, self._bodyStalled)
        self._inTransaction = False

    def _lost(self, reason: Failure | None) -> None:
        self._backpressure.stopProducing()
        self._backpressure.release()
        super()._lost(reason)

    @property
    def idle(self) -> bool:
        """
        Open, between transactions, with nothing outstanding: the
        connection could serve another transaction as it is.
        """
        return not (
            self._closed
            or self._error is not None
            or self._waiting
            or self._queued
            or self._handshake is not None
            or self._body is not None
            or self._inTransaction
        )

    # -- IDownstream: the transaction -------------------------------------

    def mail(self, sender: bytes, params: Params, client: ClientSession | None = None) -> Deferred[Reply]:
        caps = self.capabilities
        self._accepted = 0
        self._downconvert = "SMTPUTF8" in params and "SMTPUTF8" not in caps
        if self._downconvert:
            converted = downconvert(sender)
            if converted is None:
                return succeed(replies.UTF8_SENDER)
            sender = converted
        forwarded = mailParameters(
            params, caps, tls=self.tls is not None, authenticated=client is not None and client.user is not None
        )
        if isinstance(forwarded, Reply):
            return succeed(forwarded)
        if forwarded.droppedDSN:
            self._log.debug(
                "{peer} does not advertise DSN: dropped {params}", peer=self.peer, params=list(forwarded.droppedDSN)
            )
        if client is not None and self.policy.forwardClientInfo == "xforward":
            self._xforward(client)
        return self.command(b"MAIL FROM:<" + sender + b">" + _formatParams(forwarded)).addCallback(
            self._transactionOpen
        )

    def _xforward(self, client: ClientSession) -> None:
        """
        XFORWARD before MAIL, on every transaction (the downstream forgets
        the attributes at its end, and a reused connection served another
        client before), with the attributes the downstream advertised.  A
        refusal is only logged, as Postfix's C{smtp} does: the message is
        still delivered, under the relay's own identity.
        """

        def answered(r: Reply, line: bytes) -> None:
            if not r.positive:
                self._log.warn(
                    "{peer} said: {reply} (in reply to {command})",
                    peer=self.peer, reply=r.summary, command=line.decode("ascii"),
                )

        for line in xforwardCommands(client, advertised(self.capabilities.get("XFORWARD", ""))):
            # A lost connection fails the MAIL that follows; nothing to add.
            self.command(line).addCallbacks(answered, lambda f: None, (line,))

    def _transactionOpen(self, reply_: Reply) -> Reply:
        self._inTransaction = reply_.positive
        return reply_

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        if self._downconvert or (not recipient.isascii() and "SMTPUTF8" not in self.capabilities):
            converted = downconvert(recipient)
            if converted is None:
                return succeed(replies.UTF8_RECIPIENT)
            recipient = converted
        forwarded = rcptParameters(params, self.capabilities)
        if forwarded.droppedDSN:
            self._log.debug("{peer} does not advertise DSN: dropped NOTIFY/ORCPT", peer=self.peer)

        def counted(r: Reply) -> Reply:
            if r.positive:
                self._accepted += 1
            return r

        line = b"RCPT TO:<" + recipient + b">" + _formatParams(forwarded)
        return self.command(line).addCallback(counted)

    @property
    def chunking(self) -> bool:
        """
        The body goes as BDAT chunks: the downstream advertised CHUNKING,
        and PIPELINING (chunks stream without waiting for each reply), and
        the target's C{chunking} is on.
        """
        caps = self.capabilities
        return self.policy.chunking and "CHUNKING" in caps and "PIPELINING" in caps

    def data(self) -> Deferred[Reply]:
        """
        DATA, or nothing when the body goes as BDAT chunks: then a local
        C{354} at once.
        """
        if self.chunking:
            broken = self._broken
            if broken is not None:
                return fail(broken)
            self._startBody(Chunks())
            return succeed(CHUNKS_READY)

        def started(r: Reply) -> Reply:
            if r.code == 354:
                self._startBody(DotStuffer())
            return r

        return self.command(b"DATA", DATA).addCallback(started)

    def _startBody(self, body: DotStuffer | Chunks) -> None:
        self._body = body
        self.transport.registerProducer(self._backpressure, True)  # type: ignore[union-attr]  # connected: a transport

    def write(self, data: bytes) -> None:
        body = self._body
        if body is None or self._error is not None or self._closed:
            return
        if isinstance(body, DotStuffer):
            # Buffered: the end-of-data's writeNow sends the tail in the
            # same segment as the dot; a long body goes out as the socket
            # drains.
            self.transport.write(body.stuff(data))  # type: ignore[union-attr]  # connected: a transport
            return
        if body.refused is not None:
            return
        chunk = body.add(data)
        if chunk is not None:
            [answer] = self._expect(1)
            # A lost connection fails the end-of-data; nothing to add here.
            body.replies.append(answer.addCallback(body.answered).addErrback(lambda f: None))
            if self._debug:
                self._trace("C", b"BDAT %d" % len(chunk))
            self.transport.write(b"BDAT %d\r\n" % len(chunk) + chunk)  # type: ignore[union-attr]  # connected: a transport

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._backpressure.register(producer)

    def unregisterProducer(self) -> None:
        self._backpressure.unregister()

    def endData(self) -> Deferred[Sequence[Reply]]:
        """
        The dot after DATA; after BDAT chunks, once every chunk was
        accepted, the rest of the body as the C{LAST} chunk (C{BDAT 0
        LAST} when nothing is left).  A refused chunk is the outcome
        without a C{LAST}, and RSET ends the downstream's transaction.
        """
        body, self._body = self._body, None
        if body is None or self._closed or self._error is not None:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "no body in progress"))
        self.transport.unregisterProducer()  # type: ignore[union-attr]  # connected: a transport
        self._backpressure.settle()
        self._timeout = self.policy.submissionTimeout
        if isinstance(body, DotStuffer):
            if self._debug:
                self._trace("C", b"<end of data>")
            return self._final(body.end())

        def chunksAnswered(_: object) -> Sequence[Reply] | Deferred[Sequence[Reply]]:
            if body.refused is None:
                rest = body.take()
                if self._debug:
                    self._trace("C", b"BDAT %d LAST" % len(rest))
                return self._final(b"BDAT %d LAST\r\n" % len(rest) + rest)
            self._timeout = self.policy.commandTimeout
            self.rset().addErrback(lambda f: None)
            return [body.refused]

        return gatherResults(body.replies).addCallback(chunksAnswered)

    def _final(self, end: bytes) -> Deferred[Sequence[Reply]]:
        """
        Send C{end} (the dot, or the C{LAST} chunk); fire with its one reply
        (SMTP) or one per accepted recipient (LMTP).
        """
        broken = self._broken
        if broken is not None:
            return fail(broken)
        count = finalReplies(self.lmtp, self._accepted)
        received: list[Reply] = []

        def arrived(r: Reply) -> Reply:
            received.append(r)
            return r

        waits = [d.addCallback(arrived) for d in self._expect(count)]
        self._armTimer()
        writeNow(self.transport, end)

        def collected(results: list[Reply]) -> list[Reply]:
            self._timeout = self.policy.commandTimeout
            self._inTransaction = False
            return results

        def firstError(f: Failure) -> Failure:
            f.trap(FirstError)
            error = f.value.subFailure.value
            if received and isinstance(error, DownstreamError):
                # Replies come in RCPT order: those before the failure are
                # verdicts the client must get (not to be delivered twice).
                raise DownstreamError(error.reply, error.reason, received)
            return f.value.subFailure

        return gatherResults(waits, consumeErrors=True).addCallbacks(collected, firstError)

    def rset(self) -> Deferred[Reply]:
        self._body = None

        def reset(r: Reply) -> Reply:
            if r.positive:
                self._inTransaction = False
            return r

        return self.command(b"RSET").addCallback(reset)

    def quit(self) -> None:
        if self._closed or self._error is not None:
            return
        transport = self.transport

        def close(_: object) -> None:
            if transport is not None:
                transport.loseConnection()

        self.command(b"QUIT", ANY).addBoth(close)

    def abort(self) -> None:
        if not self._closed:
            self._abortWith(replies.DOWNSTREAM_LOST, "aborted")

    def _aborting(self) -> None:
        self._backpressure.release()

    def _bodyStalled(self) -> None:
        self._abortWith(replies.DOWNSTREAM_LOST, f"body stalled writing to {self.peer}")
