"""
The inbound SMTP/LMTP engine: one L{SMTPServerProtocol} per client
connection, made by an L{smtprelay.inbound.factory.SMTPServerFactory} per
listener.

The protocol owns the wire: it parses commands, enforces local policy
(syntax, sequence, relay access, TLS/AUTH requirements, limits, pipelining
synchronization) and only then asks its L{IRelayHandler}, one call at a
time; replies leave strictly in command order, batched into one write per
group.  The DATA body goes through L{smtprelay.protocol.body.DataScanner} in whole
chunks and streams to the handler with back-pressure, so that no body line
can ever be read as a command and memory per session stays bounded.

Its states are explicit (L{smtprelay.inbound.states}); input framing and
back-pressure (L{smtprelay.inbound.framing}) and the SASL exchange
(L{smtprelay.inbound.sasl}) are units of their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.inbound.framing import (
    Chunk,
    InputBuffer,
    LineTooLong,
    Pauser,
    Pauses,
    hasPendingInput,
)
from smtprelay.inbound.limits import normalizeHost
from smtprelay.inbound.sasl import MAX_RESPONSE_LINE, Challenge, Credentials, Denied, Outcome, SASLExchange
from smtprelay.inbound.states import TLS, TRANSACTION, Facts, Phase, Stage, commandRefusal
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.net.tlsinfo import readTLSInfo
from smtprelay.net.wire import writeNow
from smtprelay.observe.logs import logReject
from smtprelay.protocol import replies
from smtprelay.protocol.addresses import EnvelopeError, parseMail, parseRcpt
from smtprelay.protocol.body import DataScanner
from smtprelay.protocol.replies import Refusal, Reply, reply

if TYPE_CHECKING:
    from smtprelay.inbound.factory import SMTPServerFactory

_OUTPUT_BATCH = 16 * 1024
"""Flush replies when this much is waiting, so a full transport can pause us."""

_ABORT_AFTER = 30.0
"""Seconds a closing connection may take to flush before it is aborted."""

# Commands answered without the handler: never forwarded.
_REFUSED = frozenset({b"EXPN", b"ETRN", b"TURN", b"XCLIENT", b"XFORWARD"})

# RFC 2920 §3.1 commands that end a pipelined group.  A client that did not
# greet with EHLO (so never saw PIPELINING) must not send anything after one
# of them without waiting for its reply (as Postfix/Exim enforce).
_LAST_IN_GROUP = frozenset(
    {b"EHLO", b"HELO", b"LHLO", b"DATA", b"VRFY", b"EXPN", b"TURN", b"NOOP"}
)

# Why a connection was refused, for its log line.
_WHY = {"rate_connections": "connection rate limit", "too_many_connections": "too many connections"}

_COMMANDS = {
    verb: "do_" + verb.decode("ascii")
    for verb in (
        b"EHLO", b"HELO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP",
        b"QUIT", b"HELP", b"VRFY", b"STARTTLS", b"AUTH", b"BDAT",
    )
}


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol):
    """
    One inbound SMTP or LMTP session.

    @ivar session: the L{ClientSession} the handler reads.
    @ivar handler: this session's L{IRelayHandler} (None until connected,
        and for connections refused by a connection limit).
    """

    _log = Logger()

    def __init__(self, factory: SMTPServerFactory) -> None:
        self.factory = factory
        self._policy = factory.policy
        self._clock = factory.reactor
        self.session = ClientSession(id="", protocol="lmtp" if self._policy.lmtp else "smtp",
                                     clientHost="")
        self.handler: IRelayHandler | None = None
        self._phase = Phase.OPEN
        self._tls = TLS.PLAIN
        self._stage = Stage.HELLO
        self._input = InputBuffer()
        self._pauses = Pauses()
        self._sasl = SASLExchange(self._policy.maxAuthFailures)
        self._out: list[bytes] = []
        self._outSize = 0
        # Waiting for the handler: nothing more is read meanwhile.
        self._busy = False
        # In _process: it is not re-entered.
        self._processing = False
        self._unix = False
        self._errors = 0
        self._shutdownPending = False
        self._readTimer: IDelayedCall | None = None
        self._dataTimer: IDelayedCall | None = None
        self._abortTimer: IDelayedCall | None = None
        self._closedWaiters: list[Deferred[None]] = []
        self._scanner: DataScanner | None = None
        self._bodyPauser: Pauser | None = None
        self._chunk: Chunk | None = None
        self._resetTransaction()

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        if isinstance(host, str):
            self.session.clientHost = normalizeHost(host)
        else:
            self._unix = True
        self.session.clientPort = getattr(peer, "port", 0) or 0
        self.session.id = self.factory.newSessionId()
        implicitTLS = ISSLTransport.providedBy(transport)
        # Counted before the concurrency limit, as anvil counts every
        # connection it is asked about.
        refusal = self.factory.rates.connection(self.session)
        if refusal is None and not self.factory.limiter.admit(self, self.session.clientHost):
            refusal = replies.TOO_MANY_CONNECTIONS
        if refusal is not None:
            self._log.info(
                "refused {session} from {client}: {why}",
                session=self.session.id, client=self.session.clientHost, why=_WHY[refusal.reason],
            )
            self.factory.metrics.rejected(refusal.reason)
            transport.write(refusal.reply.withSession(self.session.id).toBytes())
            self._phase = Phase.CLOSING
            transport.loseConnection()
            return
        self.factory.metrics.sessionOpened(self._policy.kind)
        self.handler = self.factory.handlerFactory(self.session)
        transport.registerProducer(Pauser(self._pause, self._resume, "write"), True)
        if implicitTLS:
            # Implicit TLS: the greeting waits for the handshake.  Written
            # now, the TLS layer would buffer it and pause us as its
            # producer, and with us the reading of the ClientHello.  The
            # read timeout bounds the handshake.
            self._phase = Phase.CONNECTING
            self._tls = TLS.HANDSHAKE
            self._setReadTimer(True)
            self._logConnect()
            return
        pregreet = hasPendingInput(transport)
        if not pregreet:
            self._sendGreeting()
        # Logged once the greeting is on its way.
        self._logConnect()
        if pregreet:
            # The client talked before it could have seen our greeting.
            self._log.info("pregreet talk in {session}", session=self.session.id)
            self._disconnect(replies.SYNC_ERROR)

    def _sendGreeting(self) -> None:
        self._out.append(self.factory.greeting)
        self._flush()
        self._setReadTimer(True)

    def _logConnect(self) -> None:
        self._log.info(
            "connect {session} from {client}", session=self.session.id,
            client=self.session.clientHost or "unix", port=self.session.clientPort,
        )

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake (STARTTLS or implicit TLS) is done: note what it
        negotiated for the handler, and greet an implicit-TLS client.
        """
        self._tls = TLS.ACTIVE
        self.session.tls = tls = readTLSInfo(self.transport)
        self.factory.metrics.tlsHandshake("inbound", True, tls.verified)
        self._log.info(
            "TLS in {session}: {version} {cipher}", session=self.session.id,
            version=tls.version, cipher=tls.cipher,
        )
        if self._phase is Phase.CONNECTING:
            self._phase = Phase.OPEN
            self._sendGreeting()
        elif self._phase is Phase.OPEN:
            # The next command gets a whole read timeout after the handshake.
            self._setReadTimer(False)
            self._setReadTimer(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._phase is Phase.CLOSED:
            return
        if self._tls is TLS.HANDSHAKE:
            self._tls = TLS.PLAIN
            self.factory.metrics.tlsHandshake("inbound", False)
            self._log.info(
                "TLS handshake failed in {session} from {client}: {reason}",
                session=self.session.id, client=self.session.clientHost or "unix",
                reason=reason.getErrorMessage(),
            )
        # A session that closes itself closed its handler on the way.
        handlerOpen = self._phase is not Phase.CLOSING
        self._phase = Phase.CLOSED
        self._cancelTimers()
        if self._abortTimer is not None and self._abortTimer.active():
            self._abortTimer.cancel()
        self._abortTimer = None
        if handlerOpen:
            self._closeHandler()
        self._input.clear()
        if self.handler is not None:
            self.factory.limiter.release(self, self.session.clientHost)
            self.factory.metrics.sessionClosed(self._policy.kind)
            self._log.info(
                "disconnect {session} from {client}", session=self.session.id,
                client=self.session.clientHost or "unix",
            )
        waiters, self._closedWaiters = self._closedWaiters, []
        for d in waiters:
            d.callback(None)

    def whenClosed(self) -> Deferred[None]:
        """
        Return a Deferred that fires once the connection is closed.
        """
        if self._phase is Phase.CLOSED:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._closedWaiters.append(d)
        return d

    def shutdown(self) -> None:
        """
        Graceful stop: say C{421 4.3.2} and close now if the session is idle,
        or right after the transaction in progress.
        """
        if self._closing:
            return
        if self._idle():
            self._disconnect(replies.SHUTTING_DOWN)
        else:
            self._shutdownPending = True

    @property
    def _closing(self) -> bool:
        return self._phase is Phase.CLOSING or self._phase is Phase.CLOSED

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._input.feed(data):
            self._log.warn("input overflow in {session}", session=self.session.id)
            self._disconnect(replies.TOO_MUCH_INPUT)
            return
        self._process()

    def _process(self) -> None:
        """
        Work through buffered input until it runs out, a reply is pending, or
        we are paused; then send the replies gathered on the way.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while self._input and not self._busy and not self._pauses and not self._closing:
                if self._chunk is not None and self._chunk.left:
                    self._readChunk(self._chunk)
                elif self._scanner is not None and self._stage is Stage.DATA:
                    self._feedBody(self._scanner, self._input.takeAll())
                elif not self._nextLine():
                    break
                # Input was consumed (a whole line, or body bytes): the next
                # read gets a fresh timeout.  Bytes of an unfinished line do
                # not extend it (Postfix's smtpd_per_record_deadline).
                self._setReadTimer(False)
                if self._outSize >= _OUTPUT_BATCH:
                    self._flush()
        finally:
            self._processing = False
        self._afterInput()

    def _afterInput(self) -> None:
        self._flush()
        if self._closing:
            return
        # Back-pressure: while a reply is pending, what the client sends
        # ahead waits in our buffer, and the socket is not read meanwhile.
        if self._busy and self._input:
            self._pause("busy")
        elif "busy" in self._pauses:
            self._resume("busy")
        # A client that does not read our replies (the "write" pause) keeps
        # its deadline: it must read and send its next line in time.
        self._setReadTimer(not self._busy and not self._pauses.besides("write"))

    def _nextLine(self) -> bool:
        """
        Take one command line from the buffer and act on it.

        @return: False when no complete line is buffered.
        """
        maxLength = self._policy.maxCommandLength
        if self._sasl.waiting:
            maxLength = max(maxLength, MAX_RESPONSE_LINE)
        try:
            line = self._input.nextLine(maxLength)
        except LineTooLong:
            self._error(replies.LINE_TOO_LONG)
            return True
        if line is None:
            return False
        if self._sasl.waiting:
            self._saslStep(self._sasl.respond(line))
            return True
        if self._errors >= self._policy.maxErrors:
            self._disconnect(replies.TOO_MANY_ERRORS)
            return True
        if b"\n" in line or b"\r" in line:
            self._error(replies.BARE_IN_COMMAND)
            return True
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if self._input and self._pipeliningViolation(verb):
            self._log.info(
                "improper pipelining after {command} in {session}",
                command=verb.decode("ascii", "replace"), session=self.session.id,
            )
            self._disconnect(replies.SYNC_ERROR)
            return True
        method = _COMMANDS.get(verb)
        if method is not None:
            try:
                getattr(self, method)(argument.strip(b" "))
            except Exception:
                # A defect of ours must still leave one reply per command.
                self._log.failure("{command} failed in {session}", command=verb.decode(),
                                  session=self.session.id)
                self._reply(replies.LOCAL_ERROR.withSession(self.session.id))
        elif verb in _REFUSED:
            self._error(replies.NOT_IMPLEMENTED)
        elif not verb:
            self._error(replies.BAD_SYNTAX)
        else:
            self._error(replies.UNKNOWN_COMMAND)
        return True

    def _pipeliningViolation(self, verb: bytes) -> bool:
        if verb == b"DATA":
            return True
        if verb == b"STARTTLS":
            return False  # discarded after the 220 instead
        return not self.session.esmtp and verb in _LAST_IN_GROUP

    def _refusal(self, verb: bytes, argument: bytes = b"") -> Refusal | None:
        """
        Whether C{verb} may run in this state (L{commandRefusal}).
        """
        return commandRefusal(verb, argument, Facts(
            stage=self._stage, tls=self._tls, esmtp=self.session.esmtp,
            secure=self._tls is not TLS.PLAIN or self._unix,
            authenticated=self.session.user is not None, rcptTried=self._rcptTried,
            tlsOffered=self.factory.tlsOptions is not None, authOffered=self._policy.auth,
        ))

    # -- replies ------------------------------------------------------------

    def _reply(self, r: Reply) -> None:
        data = r.toBytes()
        self._out.append(data)
        self._outSize += len(data)

    def _error(self, refusal: Refusal) -> None:
        """
        A locally decided refusal: with the session id, counted against
        C{max_errors} and as a rejection for its reason.
        """
        self._reply(self._counted(refusal))

    def _counted(self, refusal: Refusal) -> Reply:
        """
        Count C{refusal} (against C{max_errors}, and as a rejection for its
        reason) and return its reply with the session id.
        """
        self._errors += 1
        self.factory.metrics.rejected(refusal.reason)
        return refusal.reply.withSession(self.session.id)

    def _refuse(
        self, command: str, refusal: Refusal, sender: bytes | None = None,
        recipient: bytes | None = None,
    ) -> None:
        """
        A policy or syntax refusal of C{MAIL}, C{RCPT} or C{DATA}: logged as
        the relay logs every refused command (L{logReject}), then answered
        as L{_error}.
        """
        logReject(self._log, self.session, command, refusal.reply.withSession(self.session.id),
                  sender, recipient)
        self._error(refusal)

    def _flush(self) -> None:
        if self._out and self.transport is not None and self._phase is not Phase.CLOSED:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._outSize = 0
            writeNow(self.transport, data)

    def _disconnect(self, r: Reply | Refusal) -> None:
        """
        Send C{r} (after anything pending) and close the connection; the
        handler is closed at once.  A refusal counts as a rejection for its
        reason.
        """
        if self._closing:
            return
        if isinstance(r, Refusal):
            self.factory.metrics.rejected(r.reason)
            r = r.reply
        if self._tls is not TLS.HANDSHAKE:
            # In a TLS handshake no reply can be sent: the TLS layer drops
            # the connection as soon as nothing of ours is waiting in it.
            self._reply(r.withSession(self.session.id) if r.code >= 400 else r)
            self._flush()
        self._phase = Phase.CLOSING
        self._cancelTimers()
        self._closeHandler()
        transport: Any = self.transport
        # A TLS layer starts its close only once no producer is registered.
        transport.unregisterProducer()
        transport.loseConnection()
        # (connectionLost may have run within loseConnection.)
        if self._phase is not Phase.CLOSED:
            # A client that never reads would keep the connection forever.
            self._abortTimer = self._clock.callLater(_ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abortTimer = None
        if self.transport is not None and self._phase is not Phase.CLOSED:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    def _closeHandler(self) -> None:
        if self.handler is not None:
            try:
                self.handler.close()
            except Exception:
                self._log.failure("handler.close failed in {session}", session=self.session.id)

    # -- waiting for the handler ------------------------------------------

    def _await(self, call: Callable[..., Any], *args: Any, then: Callable[[Any], None]) -> None:
        """
        Call the handler's C{call(*args)} and wait for its Deferred before
        anything else is read; C{then} gets its result (L{None} if it
        failed, which the caller turns into a local error reply).
        """
        d = maybeDeferred(call, *args)
        self._busy = True
        self._setReadTimer(False)

        def fired(result: Any) -> None:
            self._busy = False
            if self._phase is Phase.CLOSED:
                return
            if isinstance(result, Failure):
                self._log.failure(
                    "handler failed in {session}", result, session=self.session.id
                )
                result = None
            then(result)
            self._resume("busy")
            if not self._processing:
                self._process()

        d.addBoth(fired)

    def _handlerReply(self, result: Reply | None) -> Reply:
        if result is None:
            return replies.LOCAL_ERROR.withSession(self.session.id)
        return result

    # -- back-pressure and timers -------------------------------------------

    def _pause(self, reason: str) -> None:
        self._pauses.pause(reason, self.transport)
        if reason == "body":
            # The downstream is slow, not the client (data_timeout runs).
            self._setReadTimer(False)

    def _resume(self, reason: str) -> None:
        if not self._pauses.release(reason) or self._phase is Phase.CLOSED:
            return
        self._pauses.resumeTransport()
        if reason != "busy" and not self._processing:
            self._process()

    def _setReadTimer(self, on: bool) -> None:
        """
        Stop the read timeout, or start it unless it runs already: it runs
        from the moment we wait for a command line until the whole line is
        in, however its bytes trickle.
        """
        timer = self._readTimer
        if not on or self._closing:
            if timer is not None:
                if timer.active():
                    timer.cancel()
                self._readTimer = None
        elif timer is None or not timer.active():
            self._readTimer = self._clock.callLater(self._policy.readTimeout, self._timedOut)

    def _cancelTimers(self) -> None:
        for timer in (self._readTimer, self._dataTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._readTimer = self._dataTimer = None

    def _timedOut(self) -> None:
        self._cancelTimers()
        self._log.info("timeout in {session}", session=self.session.id)
        self._disconnect(replies.TIMEOUT)

    # -- transaction --------------------------------------------------------

    def _resetTransaction(self) -> None:
        self._stage = Stage.HELLO if self.session.heloName is None else Stage.READY
        # The reply to every later BDAT chunk once one failed (RFC 3030 §2).
        self._chunksFailed: Reply | None = None
        self._sender: bytes | None = None
        # A transaction of a client that may not relay: answered here,
        # never opened downstream.
        self._localTransaction = False
        self._rcptTried = False
        self._accepted = 0
        self.session.smtputf8 = False

    def _idle(self) -> bool:
        return self._stage not in TRANSACTION and not self._busy and not self._sasl.waiting

    def _transactionEnded(self) -> None:
        self._resetTransaction()
        if self._shutdownPending:
            self._disconnect(replies.SHUTTING_DOWN)

    def _relayAllowed(self) -> bool:
        if self._unix or self.session.user is not None:
            return True
        return self.factory.isAllowed(self.session.clientHost)

    # -- commands -----------------------------------------------------------

    def do_EHLO(self, argument: bytes) -> None:
        if self._policy.lmtp:
            self._error(replies.LMTP_ONLY)
        else:
            self._greet(argument, "EHLO", esmtp=True)

    def do_HELO(self, argument: bytes) -> None:
        if self._policy.lmtp:
            self._error(replies.LMTP_ONLY)
        else:
            self._greet(argument, "HELO", esmtp=False)

    def do_LHLO(self, argument: bytes) -> None:
        if not self._policy.lmtp:
            self._error(replies.UNKNOWN_COMMAND)
        else:
            self._greet(argument, "LHLO", esmtp=True)

    def _greet(self, argument: bytes, verb: str, esmtp: bool) -> None:
        if not argument:
            self._error(replies.helloSyntax(verb))
            return
        self.session.heloName = argument.decode("utf-8", "replace")
        self.session.esmtp = esmtp
        if self._stage in TRANSACTION:
            # RFC 5321 §4.1.4: a new greeting ends the transaction.
            self._resetHandler()
            self._resetTransaction()
        else:
            self._stage = Stage.READY
        if not esmtp:
            self._reply(reply(250, None, self.factory.hostname))
            return
        lines = [self.factory.hostname, "PIPELINING", f"SIZE {self._policy.maxMessageSize}"]
        if self.factory.tlsOptions is not None and self._tls is TLS.PLAIN:
            lines.append("STARTTLS")
        if self._policy.auth and (self._tls is not TLS.PLAIN or self._unix):
            lines.append("AUTH PLAIN LOGIN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        self._reply(reply(250, None, *lines))

    def do_MAIL(self, argument: bytes) -> None:
        refusal = self._refusal(b"MAIL")
        if refusal is not None:
            self._error(refusal)
            return
        if self._policy.requireTLS and self._tls is TLS.PLAIN and not self._unix:
            self._refuse("MAIL", replies.STARTTLS_FIRST)
            return
        if self._policy.kind == "submission" and not self._relayAllowed():
            self._refuse("MAIL", replies.AUTH_REQUIRED)
            return
        try:
            sender, params = parseMail(argument)
        except EnvelopeError as e:
            self._refuse("MAIL", Refusal(e.reply, "syntax"))
            return
        size = params.get("SIZE")
        if size is not None and int(size) > self._policy.maxMessageSize:
            self._refuse("MAIL", replies.TOO_BIG, sender)
            return
        tooMuch = self.factory.rates.message(self.session)
        if tooMuch is not None:
            self._refuse("MAIL", tooMuch, sender)
            return
        smtputf8 = "SMTPUTF8" in params
        if not self._relayAllowed():
            # No recipient of this client can be accepted (relay access): keep
            # the transaction local, so that no downstream is ever opened.
            self._mailAccepted(sender, smtputf8)
            self._localTransaction = True
            self._reply(replies.MAIL_OK)
            return
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.positive:
                self._mailAccepted(sender, smtputf8)
            self._reply(r)

        self.session.smtputf8 = smtputf8
        self._await(self.handler.mail, sender, params, then=done)

    def _mailAccepted(self, sender: bytes, smtputf8: bool) -> None:
        self._stage = Stage.MAIL
        self._sender = sender
        self.session.smtputf8 = smtputf8

    def do_RCPT(self, argument: bytes) -> None:
        refusal = self._refusal(b"RCPT")
        if refusal is not None:
            self._error(refusal)
            return
        try:
            recipient, params = parseRcpt(argument, self.session.smtputf8)
        except EnvelopeError as e:
            self._refuse("RCPT", Refusal(e.reply, "syntax"), self._sender)
            return
        self._rcptTried = True
        if not self._relayAllowed():
            self._refuse("RCPT", replies.RELAY_DENIED, self._sender, recipient)
            return
        if self._accepted >= self._policy.maxRecipients:
            self._refuse("RCPT", replies.TOO_MANY_RECIPIENTS, self._sender, recipient)
            return
        tooMany = self.factory.rates.recipient(self.session)
        if tooMany is not None:
            self._refuse("RCPT", tooMany, self._sender, recipient)
            return
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.positive:
                self._accepted += 1
                if self._stage is Stage.MAIL:
                    self._stage = Stage.RCPT
            self._reply(r)

        self._await(self.handler.rcpt, recipient, params, then=done)

    def do_DATA(self, argument: bytes) -> None:
        refusal = self._refusal(b"DATA", argument)
        if refusal is replies.NO_RECIPIENT_ACCEPTED:
            self._refuse("DATA", refusal, self._sender)
            return
        if refusal is not None:
            self._error(refusal)
            return
        assert self.handler is not None
        pauser = Pauser(self._pause, self._resume, "body")

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.code != 354:
                pauser.detach()
                self._reply(r)
                return
            if self._input:
                # The body came before our 354: out of step.
                pauser.detach()
                self._disconnect(replies.SYNC_ERROR)
                return
            self._stage = Stage.DATA
            self._openBody(pauser, stuffed=True)
            self._reply(r)

        self._await(self.handler.data, pauser, then=done)

    def _openBody(self, pauser: Pauser, stuffed: bool) -> None:
        """
        The handler takes the body (its C{354}): scan what comes, under the
        listener's rules and C{data_timeout}.
        """
        self._bodyPauser = pauser
        assert self.handler is not None
        self._scanner = DataScanner(
            self.handler.dataChunk,
            self._policy.maxMessageSize,
            self._policy.maxHops,
            normalize=self._policy.bareLF == "normalize",
            maxLineLength=self._policy.maxLineLength,
            stuffed=stuffed,
        )
        self._dataTimer = self._clock.callLater(self._policy.dataTimeout, self._timedOut)

    def _closeBody(self) -> None:
        """
        The body is complete or abandoned: stop scanning and timing it.
        """
        self._scanner = None
        if self._dataTimer is not None and self._dataTimer.active():
            self._dataTimer.cancel()
        self._dataTimer = None
        if self._bodyPauser is not None:
            self._bodyPauser.detach()
            self._bodyPauser = None

    def do_BDAT(self, argument: bytes) -> None:
        """
        RFC 3030: a chunk of C{count} bytes follows, read exactly whatever
        the reply; the first chunk of a transaction opens the body at the
        handler as DATA does.  A malformed count cannot be skipped: the
        session is closed.
        """
        chunk = self._chunk = Chunk.parse(argument)
        if chunk is None:
            self._disconnect(replies.BDAT_SYNTAX)
            return
        if self._chunksFailed is not None:
            chunk.refusal = self._chunksFailed
        elif (refusal := self._refusal(b"BDAT")) is not None:
            chunk.refusal = self._counted(refusal)
        elif self._stage is not Stage.BDAT:
            self._stage = Stage.BDAT
            assert self.handler is not None
            pauser = Pauser(self._pause, self._resume, "body")

            def opened(result: Reply | None) -> None:
                r = self._handlerReply(result)
                if r.code == 354:
                    self._openBody(pauser, stuffed=False)
                else:
                    pauser.detach()
                    self._chunksFailed = chunk.refusal = r
                if not chunk.left:
                    self._chunkRead(chunk)

            self._await(self.handler.data, pauser, then=opened)
            return
        if not chunk.left:
            self._chunkRead(chunk)

    def _readChunk(self, chunk: Chunk) -> None:
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
        self._chunk = None
        last = chunk.last and self._stage is Stage.BDAT
        if chunk.refusal is not None:
            for _ in range(self._accepted if last and self._policy.lmtp else 1):
                self._reply(chunk.refusal)
            if last:
                # The failed transaction ends here, at the handler too.
                self._resetHandler()
                self._transactionEnded()
            return
        scanner = self._scanner
        assert scanner is not None
        if last:
            scanner.finish()
            self._endBody(scanner)
            return
        verdict = scanner.verdict
        if verdict is None:
            self._reply(replies.chunkReceived(chunk.size))
            return
        # A refused chunk fails the transaction: the rest is read and
        # discarded, each chunk gets this reply.
        self._closeBody()
        self._chunksFailed = self._refuseBody(verdict)
        self._reply(self._chunksFailed)

    def _refuseBody(self, verdict: Refusal) -> Reply:
        """
        The body broke a local rule: the downstream never gets its end, and
        the client gets the returned reply.
        """
        self._log.info(
            "body refused in {session}: {reply}", session=self.session.id,
            reply=verdict.reply.text,
        )
        self.factory.metrics.rejected(verdict.reason)
        local = verdict.reply.withSession(self.session.id)
        assert self.handler is not None
        self.handler.abortData(local)
        return local

    def _feedBody(self, scanner: DataScanner, data: bytes) -> None:
        rest = scanner.feed(data)
        if rest is None:
            return
        self._input.unread(rest)
        self._endBody(scanner)

    def _endBody(self, scanner: DataScanner) -> None:
        """
        The whole body is in (the dot, or the C{LAST} chunk): refuse it
        under a local rule, or end it at the handler; either way one reply
        per recipient for LMTP.
        """
        self._closeBody()
        count = self._accepted if self._policy.lmtp else 1
        handler = self.handler
        assert handler is not None
        verdict = scanner.verdict
        if verdict is not None:
            local = self._refuseBody(verdict)
            for _ in range(count):
                self._reply(local)
            self._transactionEnded()
            return

        def done(result: Sequence[Reply] | None) -> None:
            final = list(result or ())
            if not final:
                final = [replies.LOCAL_ERROR.withSession(self.session.id)]
            # Exactly one reply per accepted recipient keeps an LMTP client
            # in step, whatever the handler returned.
            final = (final + [final[-1]] * count)[:count]
            for r in final:
                self._reply(r)
            self._transactionEnded()

        self._await(handler.endData, then=done)

    def do_RSET(self, argument: bytes) -> None:
        self._resetHandler()
        self._resetTransaction()
        self._reply(replies.OK)
        if self._shutdownPending:
            self._disconnect(replies.SHUTTING_DOWN)

    def _resetHandler(self) -> None:
        if self._stage is Stage.BDAT and self._scanner is not None:
            # Between chunks the body is open at the handler: abandon it,
            # the downstream never gets its last chunk.
            self._closeBody()
            assert self.handler is not None
            self.handler.abortData(replies.BDAT_RESET.withSession(self.session.id))
        elif self.handler is not None and not self._localTransaction:
            self.handler.reset()

    def do_NOOP(self, argument: bytes) -> None:
        self._reply(replies.OK)

    def do_HELP(self, argument: bytes) -> None:
        self._reply(replies.HELP)

    def do_VRFY(self, argument: bytes) -> None:
        self._reply(replies.CANNOT_VRFY)

    def do_QUIT(self, argument: bytes) -> None:
        self._disconnect(replies.BYE)

    def do_STARTTLS(self, argument: bytes) -> None:
        refusal = self._refusal(b"STARTTLS", argument)
        if refusal is not None:
            self._error(refusal)
            return
        self._reply(replies.TLS_READY)
        self._flush()
        # Anything the client sent after STARTTLS was plaintext written
        # before the handshake: an injection attempt (CVE-2011-0411 class).
        self._input.clear()
        self.session.heloName = None
        self.session.esmtp = False
        self.session.user = None
        self._stage = Stage.HELLO
        self._tls = TLS.HANDSHAKE
        transport: Any = self.transport
        transport.startTLS(self.factory.tlsOptions)

    # -- AUTH ---------------------------------------------------------------

    def do_AUTH(self, argument: bytes) -> None:
        refusal = self._refusal(b"AUTH")
        if refusal is not None:
            self._error(refusal)
            return
        self._saslStep(self._sasl.start(argument))

    def _saslStep(self, outcome: Outcome) -> None:
        """
        Act on one step of the SASL exchange.
        """
        if isinstance(outcome, Challenge):
            self._out.append(outcome.line)
        elif isinstance(outcome, Refusal):
            self._error(outcome)
        elif isinstance(outcome, Denied):
            self._authFailed(replies.AUTH_FAILED.withSession(self.session.id))
        else:
            self._authenticate(outcome)

    def _authenticate(self, credentials: Credentials) -> None:
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.code == 235:
                self.session.user = credentials.username
                self._log.info(
                    "authenticated {session} as {user}", session=self.session.id,
                    user=credentials.username,
                )
                self._reply(r)
            else:
                self._authFailed(r)

        self._await(self.handler.authenticate, credentials.mechanism, credentials.username,
                    credentials.password, then=done)

    def _authFailed(self, r: Reply) -> None:
        self.factory.metrics.rejected("auth_failed")
        self._log.info(
            "authentication failed in {session} from {client}",
            session=self.session.id, client=self.session.clientHost or "unix",
        )
        self._reply(r)
        if self._sasl.failed():
            self._disconnect(replies.TOO_MANY_AUTH_FAILURES)
