"""
The inbound SMTP/LMTP engine: one L{SMTPServerProtocol} per client
connection, made by an L{smtprelay.inbound.factory.SMTPServerFactory} per
listener.

Over its connection (L{smtprelay.inbound.connection}), the protocol parses commands, enforces local policy
(syntax, sequence, relay access, TLS/AUTH requirements, limits, pipelining
synchronization) and only then asks its L{IRelayHandler}, one call at a
time; replies leave strictly in command order, batched into one write per
group.

Its states are explicit (L{smtprelay.inbound.states}, where one table says
which command may run when); input framing and back-pressure
(L{smtprelay.inbound.framing}), the message body of C{DATA} and C{BDAT}
(L{smtprelay.inbound.transfer}, so that no body line can ever be read as a
command) and the SASL exchange (L{smtprelay.inbound.sasl}) are units of
their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smtprelay.inbound.connection import ServerConnection
from smtprelay.inbound.framing import Chunk, LineTooLong
from smtprelay.inbound.sasl import MAX_RESPONSE_LINE, Challenge, Credentials, Denied, Outcome, SASLExchange
from smtprelay.inbound.states import TLS, Stage, commandRefusal
from smtprelay.inbound.transfer import BodyTransfer
from smtprelay.interfaces import IRelayHandler
from smtprelay.observe.logs import logReject
from smtprelay.protocol import replies
from smtprelay.protocol.addresses import EnvelopeError, parseMail, parseRcpt
from smtprelay.protocol.replies import Refusal, Reply, reply

if TYPE_CHECKING:
    from smtprelay.inbound.factory import SMTPServerFactory

# Commands answered without the handler: never forwarded.
_REFUSED = frozenset({b"EXPN", b"ETRN", b"TURN", b"XCLIENT", b"XFORWARD"})

# RFC 2920 §3.1 commands that end a pipelined group.  A client that did not
# greet with EHLO (so never saw PIPELINING) must not send anything after one
# of them without waiting for its reply (as Postfix/Exim enforce).
_LAST_IN_GROUP = frozenset(
    {b"EHLO", b"HELO", b"LHLO", b"DATA", b"VRFY", b"EXPN", b"TURN", b"NOOP"}
)

_COMMANDS = {
    verb: "do_" + verb.decode("ascii")
    for verb in (
        b"EHLO", b"HELO", b"LHLO", b"MAIL", b"RCPT", b"DATA", b"RSET", b"NOOP",
        b"QUIT", b"HELP", b"VRFY", b"STARTTLS", b"AUTH", b"BDAT",
    )
}


class SMTPServerProtocol(ServerConnection):
    """
    One inbound SMTP or LMTP session: the dialogue over its
    L{ServerConnection}.
    """

    def __init__(self, factory: SMTPServerFactory) -> None:
        super().__init__(factory)
        self._stage = Stage.HELLO
        self._sasl = SASLExchange(self._policy.maxAuthFailures)
        self._errors = 0
        # Whether the client's address may relay: decided at its first
        # MAIL or RCPT, as the address is fixed for the session.
        self._hostAllowed: bool | None = None
        self._body = BodyTransfer(self._policy, self.session, self._input, _Dialogue(self),
                                  factory.metrics, self._log)
        self._facts = _Facts(self)
        self._resetTransaction()

    # -- input --------------------------------------------------------------

    def _consume(self) -> bool:
        read = self._body.read
        if read is None:
            return self._nextLine()
        read()
        return True

    def _nextLine(self) -> bool:
        """
        Take one command line from the buffer and act on it.

        @return: False when no complete line is buffered.
        """
        maxLength = self._policy.maxCommandLength
        response = self._sasl.waiting
        if response:
            maxLength = max(maxLength, MAX_RESPONSE_LINE)
        try:
            line = self._input.nextLine(maxLength)
        except LineTooLong:
            self._error(replies.LINE_TOO_LONG)
            return True
        if line is None:
            return False
        if response:
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
        if self._input.data and self._pipeliningViolation(verb):
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

    # -- transaction --------------------------------------------------------

    def _resetTransaction(self) -> None:
        self._stage = Stage.HELLO if self.session.heloName is None else Stage.READY
        self._sender: bytes | None = None
        # A transaction of a client that may not relay: answered here,
        # never opened downstream.
        self._localTransaction = False
        self._rcptTried = False
        self._accepted = 0
        self.session.smtputf8 = False

    def _idle(self) -> bool:
        return not self._stage.transaction and not self._busy and not self._sasl.waiting

    def _transactionEnded(self) -> None:
        self._resetTransaction()
        if self._shutdownPending:
            self._disconnect(replies.SHUTTING_DOWN)

    def _relayAllowed(self) -> bool:
        if self._unix or self.session.user is not None:
            return True
        if self._hostAllowed is None:
            self._hostAllowed = self.factory.isAllowed(self.session.clientHost)
        return self._hostAllowed

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
        if self._stage.transaction:
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
        refusal = commandRefusal(b"MAIL", b"", self._facts)
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
            self._refuse("MAIL", e.refusal)
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
        refusal = commandRefusal(b"RCPT", b"", self._facts)
        if refusal is not None:
            self._error(refusal)
            return
        try:
            recipient, params = parseRcpt(argument, self.session.smtputf8)
        except EnvelopeError as e:
            self._refuse("RCPT", e.refusal, self._sender)
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
        refusal = commandRefusal(b"DATA", argument, self._facts)
        if refusal is replies.NO_RECIPIENT_ACCEPTED:
            self._refuse("DATA", refusal, self._sender)
            return
        if refusal is not None:
            self._error(refusal)
            return
        self._body.data()

    def do_BDAT(self, argument: bytes) -> None:
        """
        RFC 3030: a chunk of C{count} bytes follows (L{BodyTransfer.bdat}).
        A malformed count cannot be skipped: the session is closed.
        """
        chunk = Chunk.parse(argument)
        if chunk is None:
            self._disconnect(replies.BDAT_SYNTAX)
            return
        refusal = commandRefusal(b"BDAT", b"", self._facts)
        if refusal is not None:
            chunk.refusal = self._counted(refusal)
        self._body.bdat(chunk)

    def do_RSET(self, argument: bytes) -> None:
        self._resetHandler()
        self._resetTransaction()
        self._reply(replies.OK)
        if self._shutdownPending:
            self._disconnect(replies.SHUTTING_DOWN)

    def _resetHandler(self) -> None:
        if self._body.abandon():
            return
        if self.handler is not None and not self._localTransaction:
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
        refusal = commandRefusal(b"STARTTLS", argument, self._facts)
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
        refusal = commandRefusal(b"AUTH", b"", self._facts)
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


class _Dialogue:
    """
    The session as its body sees it (L{smtprelay.inbound.transfer.Dialogue}):
    the protocol's own methods, bound once.
    """

    __slots__ = (
        "_protocol", "reply", "wait", "answer", "pause", "resume", "timeBody", "disconnect", "ended",
    )

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol
        self.reply = protocol._reply
        self.wait = protocol._await
        self.answer = protocol._handlerReply
        self.pause = protocol._pause
        self.resume = protocol._resume
        self.timeBody = protocol._setDataTimer
        self.disconnect = protocol._disconnect
        self.ended = protocol._transactionEnded

    @property
    def handler(self) -> IRelayHandler:
        handler = self._protocol.handler
        assert handler is not None
        return handler

    @property
    def stage(self) -> Stage:
        return self._protocol._stage

    @stage.setter
    def stage(self, stage: Stage) -> None:
        self._protocol._stage = stage

    @property
    def recipients(self) -> int:
        return self._protocol._accepted


class _Facts:
    """
    A session's state as L{commandRefusal} reads it: a live view, so that
    no record is built per command.
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: SMTPServerProtocol) -> None:
        self._protocol = protocol

    @property
    def stage(self) -> Stage:
        return self._protocol._stage

    @property
    def tls(self) -> TLS:
        return self._protocol._tls

    @property
    def esmtp(self) -> bool:
        return self._protocol.session.esmtp

    @property
    def secure(self) -> bool:
        return self._protocol._tls is not TLS.PLAIN or self._protocol._unix

    @property
    def authenticated(self) -> bool:
        return self._protocol.session.user is not None

    @property
    def rcptTried(self) -> bool:
        return self._protocol._rcptTried

    @property
    def tlsOffered(self) -> bool:
        return self._protocol.factory.tlsOptions is not None

    @property
    def authOffered(self) -> bool:
        return self._protocol._policy.auth
