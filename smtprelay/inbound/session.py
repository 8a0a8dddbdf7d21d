"""
The inbound SMTP/LMTP engine: one L{SMTPServerProtocol} per client
connection, made by an L{SMTPServerFactory} per listener.

The protocol owns the wire: it parses commands, enforces local policy
(syntax, sequence, relay access, TLS/AUTH requirements, limits, pipelining
synchronization) and only then asks its L{IRelayHandler}, one call at a
time; replies leave strictly in command order, batched into one write per
group.  The DATA body goes through L{smtprelay.protocol.body.DataScanner} in whole
chunks and streams to the handler with back-pressure, so that no body line
can ever be read as a command and memory per session stays bounded.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import socket
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.protocol import replies
from smtprelay.protocol.addresses import EnvelopeError, parseMail, parseRcpt
from smtprelay.protocol.body import DataScanner
from smtprelay.config.model import Listener
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.observe.logs import logReject
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.inbound.ratelimit import ListenerRates
from smtprelay.protocol.replies import Refusal, Reply, reply
from smtprelay.net.tlsinfo import readTLSInfo
from smtprelay.net.wire import writeNow

MAX_INPUT_BUFFER = 1024 * 1024
"""Unprocessed input beyond this means the transport ignored a pause: abort."""

_OUTPUT_BATCH = 16 * 1024
"""Flush replies when this much is waiting, so a full transport can pause us."""

_ABORT_AFTER = 30.0
"""Seconds a closing connection may take to flush before it is aborted."""

_AUTH_LINE = 12288
"""RFC 4954 §4: the longest AUTH command or response line we accept."""

# Local replies not shared with other modules.
_MAIL_OK = reply(250, "2.1.0", "Ok")
_GREETING_NOT_YET = reply(503, "5.5.1", "Error: send HELO/EHLO first")
_NEED_EHLO = reply(503, "5.5.1", "Error: send EHLO first")
_NESTED_MAIL = reply(503, "5.5.1", "Error: nested MAIL command")
_NEED_MAIL = reply(503, "5.5.1", "Error: need MAIL command")
_NEED_RCPT = reply(503, "5.5.1", "Error: need RCPT command")
_UNKNOWN = reply(500, "5.5.2", "Error: command not recognized")
_BAD_SYNTAX = reply(500, "5.5.2", "Error: bad syntax")
_BARE_IN_COMMAND = reply(500, "5.5.2", "Error: bare <CR> or <LF> in command")
_LMTP_ONLY = reply(500, "5.5.1", "Error: this is an LMTP service, use LHLO")
_NOT_IMPLEMENTED = reply(502, "5.5.1", "Error: command not implemented")
_VRFY = reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
_HELP = reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP STARTTLS AUTH")
_TLS_READY = reply(220, "2.0.0", "Ready to start TLS")
_TLS_UNAVAILABLE = reply(502, "5.5.1", "Error: command not implemented")
_TLS_ACTIVE = reply(554, "5.5.1", "Error: TLS already active")
_IN_TRANSACTION = reply(503, "5.5.1", "Error: MAIL transaction in progress")
_AUTH_DISABLED = reply(503, "5.5.1", "Error: authentication not enabled")
_AUTH_TWICE = reply(503, "5.5.1", "Error: already authenticated")
_AUTH_NEEDS_TLS = reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
_AUTH_MECHANISM = reply(504, "5.5.4", "Unsupported authentication mechanism")
_AUTH_ABORTED = reply(501, "5.7.0", "Authentication aborted")
_AUTH_BASE64 = reply(501, "5.5.2", "Cannot decode response")
_AUTH_TOO_MANY = reply(421, "4.7.0", "Too many authentication failures")
_TOO_MUCH_INPUT = reply(421, "4.7.0", "Too much unread input")
_BDAT_SYNTAX = reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
_BDAT_IN_PROGRESS = reply(503, "5.5.1", "Error: BDAT transaction in progress")
_BDAT_RESET = reply(554, "5.5.0", "Transaction reset by the client before its last chunk")
_BDAT = re.compile(rb"([0-9]{1,15})(?: +(LAST))?", re.IGNORECASE)
_PREGREET = replies.SYNC_ERROR

_LOGIN_USER = b"334 VXNlcm5hbWU6\r\n"
_LOGIN_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"
_EMPTY_CHALLENGE = b"334 \r\n"

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


def randomSessionId() -> str:
    """
    Return a short unique session id: ten base32 characters (50 random bits).
    """
    return base64.b32encode(os.urandom(10)).decode("ascii")[:10]


@implementer(IPushProducer)
class _Pauser:
    """
    One reason to pause the client socket, as an L{IPushProducer}: the
    transport's write buffer (C{"write"}) or the handler's consumer during a
    body (C{"body"}).
    """

    def __init__(self, protocol: SMTPServerProtocol, reason: str) -> None:
        self._protocol: SMTPServerProtocol | None = protocol
        self._reason = reason

    def pauseProducing(self) -> None:
        if self._protocol is not None:
            self._protocol._pause(self._reason)

    def resumeProducing(self) -> None:
        if self._protocol is not None:
            self._protocol._resume(self._reason)

    def stopProducing(self) -> None:
        # The consumer is gone for good.  Drop its pause, so that the body is
        # still read to its real end and the client gets its reply then.
        self.detach()

    def detach(self) -> None:
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            protocol._resume(self._reason)


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
        self._listener = factory.listener
        self._clock = factory.reactor
        self.session = ClientSession(id="", protocol="lmtp" if factory.listener.lmtp else "smtp",
                                     clientHost="")
        self.handler: IRelayHandler | None = None
        self._buffer = b""
        self._out: list[bytes] = []
        self._outSize = 0
        self._pauses: set[str] = set()
        self._transportPaused = False
        self._busy = False
        self._processing = False
        self._closing = False
        self._closed = False
        self._handlerClosed = False
        self._registered = False
        self._discarding = False
        self._unix = False
        self._tlsActive = False
        self._handshaking = False
        self._greetAfterHandshake = False
        self._errors = 0
        self._authFailures = 0
        self._authState: tuple[str, str | None] | None = None
        self._shutdownPending = False
        self._readTimer: IDelayedCall | None = None
        self._dataTimer: IDelayedCall | None = None
        self._abortTimer: IDelayedCall | None = None
        self._closedWaiters: list[Deferred[None]] = []
        self._scanner: DataScanner | None = None
        self._bodyPauser: _Pauser | None = None
        # The BDAT chunk being read: bytes left, LAST, and the reply it gets
        # instead of being read into the body (a refused BDAT).
        self._chunkLeft = self._chunkSize = 0
        self._chunkLast = False
        self._chunkRefusal: Reply | None = None
        self._resetTransaction()

    # -- connection ---------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        peer = transport.getPeer()
        host = getattr(peer, "host", None)
        if isinstance(host, str):
            self.session.clientHost = _normalizeHost(host)
        else:
            self._unix = True
        self.session.clientPort = getattr(peer, "port", 0) or 0
        self.session.id = self.factory.newSessionId()
        self._tlsActive = ISSLTransport.providedBy(transport)
        # Counted before the concurrency limit, as anvil counts every
        # connection it is asked about.
        tooFast = self.factory.rates.connection(self.session)
        if tooFast is not None or not self.factory._register(self):
            refusal, reason, why = (
                (tooFast, "rate_connections", "connection rate limit") if tooFast is not None
                else (replies.TOO_MANY_CONNECTIONS, "too_many_connections", "too many connections")
            )
            self._log.info(
                "refused {session} from {client}: {why}",
                session=self.session.id, client=self.session.clientHost, why=why,
            )
            self.factory.metrics.rejected(reason)
            transport.write(refusal.withSession(self.session.id).toBytes())
            self._closing = True
            transport.loseConnection()
            return
        self._registered = True
        self.factory.metrics.sessionOpened(self._listener.kind)
        self.handler = self.factory.handlerFactory(self.session)
        transport.registerProducer(_Pauser(self, "write"), True)
        if self._tlsActive:
            # Implicit TLS: the greeting waits for the handshake.  Written
            # now, the TLS layer would buffer it and pause us as its
            # producer, and with us the reading of the ClientHello.  The
            # read timeout bounds the handshake.
            self._handshaking = self._greetAfterHandshake = True
            self._setReadTimer(True)
            self._logConnect()
            return
        pregreet = _hasPendingInput(transport)
        if not pregreet:
            self._sendGreeting()
        # Logged once the greeting is on its way.
        self._logConnect()
        if pregreet:
            # The client talked before it could have seen our greeting.
            self._log.info("pregreet talk in {session}", session=self.session.id)
            self._disconnect(_PREGREET, "sync")

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
        self._tlsActive = True
        self._handshaking = False
        self.session.tls = tls = readTLSInfo(self.transport)
        self.factory.metrics.tlsHandshake("inbound", True, tls.verified)
        self._log.info(
            "TLS in {session}: {version} {cipher}", session=self.session.id,
            version=tls.version, cipher=tls.cipher,
        )
        if self._closing:
            return
        if self._greetAfterHandshake:
            self._greetAfterHandshake = False
            self._sendGreeting()
        else:
            # The next command gets a whole read timeout after the handshake.
            self._setReadTimer(False)
            self._setReadTimer(True)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshaking:
            self._handshaking = False
            self.factory.metrics.tlsHandshake("inbound", False)
            self._log.info(
                "TLS handshake failed in {session} from {client}: {reason}",
                session=self.session.id, client=self.session.clientHost or "unix",
                reason=reason.getErrorMessage(),
            )
        self._closed = self._closing = True
        self._cancelTimers()
        if self._abortTimer is not None and self._abortTimer.active():
            self._abortTimer.cancel()
        self._abortTimer = None
        self._closeHandler()
        self._buffer = b""
        if self._registered:
            self._registered = False
            self.factory._unregister(self)
            self.factory.metrics.sessionClosed(self._listener.kind)
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
        if self._closed:
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

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if len(self._buffer) > MAX_INPUT_BUFFER:
            self._log.warn("input overflow in {session}", session=self.session.id)
            self._disconnect(_TOO_MUCH_INPUT, "too_much_input")
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
            while self._buffer and not self._busy and not self._pauses and not self._closing:
                if self._chunkLeft:
                    self._readChunk()
                elif self._scanner is not None and not self._chunked:
                    data, self._buffer = self._buffer, b""
                    self._feedBody(data)
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
        if self._busy and self._buffer:
            self._pause("busy")
        elif "busy" in self._pauses:
            self._resume("busy")
        # A client that does not read our replies (the "write" pause) keeps
        # its deadline: it must read and send its next line in time.
        self._setReadTimer(not self._busy and not self._pauses - {"write"})

    def _nextLine(self) -> bool:
        """
        Take one command line from the buffer and act on it.

        @return: False when no complete line is buffered.
        """
        buf = self._buffer
        limit = self._lineLimit()
        end = buf.find(b"\r\n")
        if self._discarding:
            if end < 0:
                self._buffer = buf[-1:] if buf.endswith(b"\r") else b""
                return False
            self._buffer = buf[end + 2:]
            self._discarding = False
            self._error(replies.LINE_TOO_LONG, "line_too_long")
            return True
        if end < 0:
            if len(buf) > limit:
                self._discarding = True
                self._buffer = buf[-1:] if buf.endswith(b"\r") else b""
            return False
        line = buf[:end]
        self._buffer = buf[end + 2:]
        if end > limit:
            self._error(replies.LINE_TOO_LONG, "line_too_long")
            return True
        if self._authState is not None:
            self._authResponse(line)
            return True
        if self._errors >= self._listener.maxErrors:
            self._disconnect(replies.TOO_MANY_ERRORS, "too_many_errors")
            return True
        if b"\n" in line or b"\r" in line:
            self._error(_BARE_IN_COMMAND, "syntax")
            return True
        verb, _, argument = line.partition(b" ")
        verb = verb.upper()
        if self._buffer and self._pipeliningViolation(verb):
            self._log.info(
                "improper pipelining after {command} in {session}",
                command=verb.decode("ascii", "replace"), session=self.session.id,
            )
            self._disconnect(replies.SYNC_ERROR, "sync")
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
            self._error(_NOT_IMPLEMENTED, "not_implemented")
        elif not verb:
            self._error(_BAD_SYNTAX, "syntax")
        else:
            self._error(_UNKNOWN, "unknown_command")
        return True

    def _lineLimit(self) -> int:
        if self._authState is not None:
            return max(self._listener.maxCommandLength, _AUTH_LINE)
        return self._listener.maxCommandLength

    def _pipeliningViolation(self, verb: bytes) -> bool:
        if verb == b"DATA":
            return True
        if verb == b"STARTTLS":
            return False  # discarded after the 220 instead
        return not self.session.esmtp and verb in _LAST_IN_GROUP

    # -- replies ------------------------------------------------------------

    def _reply(self, r: Reply) -> None:
        data = r.toBytes()
        self._out.append(data)
        self._outSize += len(data)

    def _error(self, r: Reply, reason: str) -> None:
        """
        A locally decided refusal: with the session id, counted against
        C{max_errors} and as a rejection for C{reason}.
        """
        self._errors += 1
        self.factory.metrics.rejected(reason)
        self._reply(r.withSession(self.session.id))

    def _refuse(
        self, command: str, r: Reply, reason: str, sender: bytes | None = None,
        recipient: bytes | None = None,
    ) -> None:
        """
        A policy or syntax refusal of C{MAIL}, C{RCPT} or C{DATA}: logged as
        the relay logs every refused command (L{logReject}), then answered
        as L{_error}.
        """
        logReject(self._log, self.session, command, r.withSession(self.session.id), sender, recipient)
        self._error(r, reason)

    def _flush(self) -> None:
        if self._out and self.transport is not None and not self._closed:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out = []
            self._outSize = 0
            writeNow(self.transport, data)

    def _disconnect(self, r: Reply, reason: str | None = None) -> None:
        """
        Send C{r} (after anything pending) and close the connection; the
        handler is closed at once.  A refusal counts as a rejection for
        C{reason}.
        """
        if self._closing:
            return
        if reason is not None:
            self.factory.metrics.rejected(reason)
        if not self._handshaking:
            # In a TLS handshake no reply can be sent: the TLS layer drops
            # the connection as soon as nothing of ours is waiting in it.
            self._reply(r.withSession(self.session.id) if r.code >= 400 else r)
            self._flush()
        self._closing = True
        self._cancelTimers()
        self._closeHandler()
        transport: Any = self.transport
        # A TLS layer starts its close only once no producer is registered.
        transport.unregisterProducer()
        transport.loseConnection()
        if not self._closed:
            # A client that never reads would keep the connection forever.
            self._abortTimer = self._clock.callLater(_ABORT_AFTER, self._abort)

    def _abort(self) -> None:
        self._abortTimer = None
        if self.transport is not None and not self._closed:
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()

    def _closeHandler(self) -> None:
        if self.handler is not None and not self._handlerClosed:
            self._handlerClosed = True
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
            if self._closed:
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
        transport: Any = self.transport
        if not self._pauses and not self._transportPaused and transport is not None:
            self._transportPaused = True
            transport.pauseProducing()
        self._pauses.add(reason)
        if reason == "body":
            # The downstream is slow, not the client (data_timeout runs).
            self._setReadTimer(False)

    def _resume(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if self._pauses or self._closed:
            return
        transport: Any = self.transport
        if self._transportPaused and transport is not None:
            self._transportPaused = False
            transport.resumeProducing()
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
            self._readTimer = self._clock.callLater(self._listener.readTimeout, self._timedOut)

    def _cancelTimers(self) -> None:
        for timer in (self._readTimer, self._dataTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._readTimer = self._dataTimer = None

    def _timedOut(self) -> None:
        self._cancelTimers()
        self._log.info("timeout in {session}", session=self.session.id)
        self._disconnect(replies.TIMEOUT, "timeout")

    # -- state --------------------------------------------------------------

    def _resetTransaction(self) -> None:
        # The transaction's body comes in BDAT chunks; the reply to every
        # later chunk once one failed (RFC 3030 §2).
        self._chunked = False
        self._chunksFailed: Reply | None = None
        self._sender: bytes | None = None
        self._localTransaction = False
        self._rcptTried = False
        self._accepted = 0
        self.session.smtputf8 = False

    def _idle(self) -> bool:
        return (
            self._sender is None and not self._busy and self._scanner is None
            and self._authState is None
        )

    def _transactionEnded(self) -> None:
        self._resetTransaction()
        if self._shutdownPending:
            self._disconnect(replies.SHUTTING_DOWN)

    def _relayAllowed(self) -> bool:
        if self._unix or self.session.user is not None:
            return True
        return self.factory.isAllowed(self.session.clientHost)

    def _authOffered(self) -> bool:
        return self._listener.auth.mode != "off" and (self._tlsActive or self._unix)

    # -- commands -----------------------------------------------------------

    def do_EHLO(self, argument: bytes) -> None:
        if self._listener.lmtp:
            self._error(_LMTP_ONLY, "unknown_command")
        else:
            self._greet(argument, b"EHLO", esmtp=True)

    def do_HELO(self, argument: bytes) -> None:
        if self._listener.lmtp:
            self._error(_LMTP_ONLY, "unknown_command")
        else:
            self._greet(argument, b"HELO", esmtp=False)

    def do_LHLO(self, argument: bytes) -> None:
        if not self._listener.lmtp:
            self._error(_UNKNOWN, "unknown_command")
        else:
            self._greet(argument, b"LHLO", esmtp=True)

    def _greet(self, argument: bytes, verb: bytes, esmtp: bool) -> None:
        if not argument:
            self._error(reply(501, "5.5.4", f"Syntax: {verb.decode()} hostname"), "syntax")
            return
        if self._sender is not None:
            # RFC 5321 §4.1.4: a new greeting ends the transaction.
            self._resetHandler()
            self._resetTransaction()
        self.session.heloName = argument.decode("utf-8", "replace")
        self.session.esmtp = esmtp
        if not esmtp:
            self._reply(reply(250, None, self.factory.hostname))
            return
        lines = [self.factory.hostname, "PIPELINING", f"SIZE {self._listener.maxMessageSize}"]
        if self.factory.tlsOptions is not None and not self._tlsActive:
            lines.append("STARTTLS")
        if self._authOffered():
            lines.append("AUTH PLAIN LOGIN")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        self._reply(reply(250, None, *lines))

    def do_MAIL(self, argument: bytes) -> None:
        if self.session.heloName is None:
            self._error(_GREETING_NOT_YET, "bad_sequence")
            return
        if self._sender is not None:
            self._error(_NESTED_MAIL, "bad_sequence")
            return
        if self._listener.requireTLS and not self._tlsActive and not self._unix:
            self._refuse("MAIL", replies.STARTTLS_FIRST, "tls_required")
            return
        if self._listener.kind == "submission" and not self._relayAllowed():
            self._refuse("MAIL", replies.AUTH_REQUIRED, "auth_required")
            return
        try:
            sender, params = parseMail(argument)
        except EnvelopeError as e:
            self._refuse("MAIL", e.reply, "syntax")
            return
        size = params.get("SIZE")
        if size is not None and int(size) > self._listener.maxMessageSize:
            self._refuse("MAIL", replies.MESSAGE_TOO_BIG, "too_big", sender)
            return
        tooMuch = self.factory.rates.message(self.session)
        if tooMuch is not None:
            self._refuse("MAIL", tooMuch, "rate_messages", sender)
            return
        smtputf8 = "SMTPUTF8" in params
        if not self._relayAllowed():
            # No recipient of this client can be accepted (relay access): keep
            # the transaction local, so that no downstream is ever opened.
            self._sender = sender
            self._localTransaction = True
            self.session.smtputf8 = smtputf8
            self._reply(_MAIL_OK)
            return
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.positive:
                self._sender = sender
                self.session.smtputf8 = smtputf8
            self._reply(r)

        self.session.smtputf8 = smtputf8
        self._await(self.handler.mail, sender, params, then=done)

    def do_RCPT(self, argument: bytes) -> None:
        if self._sender is None:
            self._error(_NEED_MAIL, "bad_sequence")
            return
        try:
            recipient, params = parseRcpt(argument, self.session.smtputf8)
        except EnvelopeError as e:
            self._refuse("RCPT", e.reply, "syntax", self._sender)
            return
        self._rcptTried = True
        if not self._relayAllowed():
            self._refuse("RCPT", replies.RELAY_DENIED, "relay_denied", self._sender, recipient)
            return
        if self._accepted >= self._listener.maxRecipients:
            self._refuse("RCPT", replies.TOO_MANY_RECIPIENTS, "too_many_recipients", self._sender, recipient)
            return
        tooMany = self.factory.rates.recipient(self.session)
        if tooMany is not None:
            self._refuse("RCPT", tooMany, "rate_recipients", self._sender, recipient)
            return
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.positive:
                self._accepted += 1
            self._reply(r)

        self._await(self.handler.rcpt, recipient, params, then=done)

    def do_DATA(self, argument: bytes) -> None:
        if argument:
            self._error(reply(501, "5.5.4", "Syntax: DATA"), "syntax")
            return
        if self._sender is None:
            self._error(_NEED_MAIL, "bad_sequence")
            return
        if self._chunked:
            self._error(_BDAT_IN_PROGRESS, "bad_sequence")
            return
        if not self._accepted and self._rcptTried:
            self._refuse("DATA", replies.NO_VALID_RECIPIENTS, "bad_sequence", self._sender)
            return
        if not self._accepted:
            self._error(_NEED_RCPT, "bad_sequence")
            return
        assert self.handler is not None
        pauser = _Pauser(self, "body")

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.code != 354:
                pauser.detach()
                self._reply(r)
                return
            if self._buffer:
                # The body came before our 354: out of step.
                pauser.detach()
                self._disconnect(replies.SYNC_ERROR, "sync")
                return
            self._openBody(pauser, stuffed=True)
            self._reply(r)

        self._await(self.handler.data, pauser, then=done)

    def _openBody(self, pauser: _Pauser, stuffed: bool) -> None:
        """
        The handler takes the body (its C{354}): scan what comes, under the
        listener's rules and C{data_timeout}.
        """
        self._bodyPauser = pauser
        self._scanner = DataScanner(
            self._dataChunk,
            self._listener.maxMessageSize,
            self._listener.maxHops,
            normalize=self._listener.bareLF == "normalize",
            maxLineLength=self._listener.maxLineLength,
            stuffed=stuffed,
        )
        self._dataTimer = self._clock.callLater(self._listener.dataTimeout, self._timedOut)

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
        match = _BDAT.fullmatch(argument)
        if match is None:
            self._disconnect(_BDAT_SYNTAX, "syntax")
            return
        self._chunkLeft = self._chunkSize = int(match[1])
        self._chunkLast = match[2] is not None
        refusal = self._chunkRefused()
        if refusal is not None:
            self._chunkRefusal = refusal
        elif not self._chunked:
            self._chunked = True
            assert self.handler is not None
            pauser = _Pauser(self, "body")

            def opened(result: Reply | None) -> None:
                r = self._handlerReply(result)
                if r.code == 354:
                    self._openBody(pauser, stuffed=False)
                else:
                    pauser.detach()
                    self._chunksFailed = self._chunkRefusal = r
                if not self._chunkLeft:
                    self._chunkRead()

            self._await(self.handler.data, pauser, then=opened)
            return
        if not self._chunkLeft:
            self._chunkRead()

    def _chunkRefused(self) -> Reply | None:
        """
        The reply of a BDAT whose chunk is read only to be discarded, or
        None.
        """
        if self._chunksFailed is not None:
            return self._chunksFailed
        if not self.session.esmtp:
            problem, reason = _NEED_EHLO, "bad_sequence"
        elif self._sender is None:
            problem, reason = _NEED_MAIL, "bad_sequence"
        elif not self._accepted:
            problem, reason = (replies.NO_VALID_RECIPIENTS if self._rcptTried else _NEED_RCPT), "bad_sequence"
        else:
            return None
        self._errors += 1
        self.factory.metrics.rejected(reason)
        return problem.withSession(self.session.id)

    def _readChunk(self) -> None:
        data = self._buffer[: self._chunkLeft]
        self._buffer = self._buffer[len(data):]
        self._chunkLeft -= len(data)
        if self._chunkRefusal is None and self._scanner is not None:
            self._scanner.feed(data)
        if not self._chunkLeft:
            self._chunkRead()

    def _chunkRead(self) -> None:
        """
        A chunk is in: its reply, or the end of the body after C{LAST}.
        """
        refusal, self._chunkRefusal = self._chunkRefusal, None
        last = self._chunkLast and self._chunked
        if refusal is not None:
            for _ in range(self._accepted if last and self._listener.lmtp else 1):
                self._reply(refusal)
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
            self._reply(reply(250, "2.0.0", f"Ok: {self._chunkSize} octets"))
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

    def _dataChunk(self, chunk: bytes) -> None:
        assert self.handler is not None
        self.handler.dataChunk(chunk)

    def _feedBody(self, data: bytes) -> None:
        scanner = self._scanner
        assert scanner is not None
        rest = scanner.feed(data)
        if rest is None:
            return
        self._buffer = rest + self._buffer
        self._endBody(scanner)

    def _endBody(self, scanner: DataScanner) -> None:
        """
        The whole body is in (the dot, or the C{LAST} chunk): refuse it
        under a local rule, or end it at the handler; either way one reply
        per recipient for LMTP.
        """
        self._closeBody()
        count = self._accepted if self._listener.lmtp else 1
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
        if self._chunked and self._scanner is not None:
            # Between chunks the body is open at the handler: abandon it,
            # the downstream never gets its last chunk.
            self._closeBody()
            assert self.handler is not None
            self.handler.abortData(_BDAT_RESET.withSession(self.session.id))
        elif self.handler is not None and not self._localTransaction:
            self.handler.reset()

    def do_NOOP(self, argument: bytes) -> None:
        self._reply(replies.OK)

    def do_HELP(self, argument: bytes) -> None:
        self._reply(_HELP)

    def do_VRFY(self, argument: bytes) -> None:
        self._reply(_VRFY)

    def do_QUIT(self, argument: bytes) -> None:
        self._disconnect(replies.BYE)

    def do_STARTTLS(self, argument: bytes) -> None:
        options = self.factory.tlsOptions
        if options is None:
            self._error(_TLS_UNAVAILABLE, "not_implemented")
            return
        if self._tlsActive:
            self._error(_TLS_ACTIVE, "bad_sequence")
            return
        if argument:
            self._error(reply(501, "5.5.4", "Syntax: STARTTLS"), "syntax")
            return
        if self._sender is not None:
            self._error(_IN_TRANSACTION, "bad_sequence")
            return
        self._reply(_TLS_READY)
        self._flush()
        # Anything the client sent after STARTTLS was plaintext written
        # before the handshake: an injection attempt (CVE-2011-0411 class).
        self._buffer = b""
        self.session.heloName = None
        self.session.esmtp = False
        self.session.user = None
        self._tlsActive = self._handshaking = True
        transport: Any = self.transport
        transport.startTLS(options)

    def do_AUTH(self, argument: bytes) -> None:
        if self._listener.auth.mode == "off":
            self._error(_AUTH_DISABLED, "not_implemented")
            return
        if not self.session.esmtp:
            self._error(_NEED_EHLO, "bad_sequence")
            return
        if not (self._tlsActive or self._unix):
            self._error(_AUTH_NEEDS_TLS, "tls_required")
            return
        if self.session.user is not None:
            self._error(_AUTH_TWICE, "bad_sequence")
            return
        if self._sender is not None:
            self._error(_IN_TRANSACTION, "bad_sequence")
            return
        mechanism, _, initial = argument.partition(b" ")
        mechanism = mechanism.upper()
        initial = initial.strip(b" ")
        if not mechanism:
            self._error(reply(501, "5.5.4", "Syntax: AUTH mechanism"), "syntax")
            return
        if mechanism == b"PLAIN":
            if initial:
                self._authPlain(initial)
            else:
                self._authState = ("PLAIN", None)
                self._out.append(_EMPTY_CHALLENGE)
        elif mechanism == b"LOGIN":
            if initial:
                username = self._decode(initial)
                if username is None:
                    return
                self._authState = ("LOGIN", username)
                self._out.append(_LOGIN_PASSWORD)
            else:
                self._authState = ("LOGIN", None)
                self._out.append(_LOGIN_USER)
        else:
            self._error(_AUTH_MECHANISM, "not_implemented")

    def _authResponse(self, line: bytes) -> None:
        state = self._authState
        assert state is not None
        self._authState = None
        if line == b"*":
            self._error(_AUTH_ABORTED, "auth_aborted")
            return
        mechanism, username = state
        if mechanism == "PLAIN":
            self._authPlain(line)
        elif username is None:
            decoded = self._decode(line)
            if decoded is not None:
                self._authState = ("LOGIN", decoded)
                self._out.append(_LOGIN_PASSWORD)
        else:
            password = self._decode(line)
            if password is not None:
                self._authenticate("LOGIN", username, password)

    def _authPlain(self, data: bytes) -> None:
        decoded = self._decode(data)
        if decoded is None:
            return
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            self._error(_AUTH_BASE64, "syntax")
            return
        authzid, username, password = parts
        if authzid and authzid != username:
            self._authFailed(replies.AUTH_FAILED.withSession(self.session.id))
            return
        self._authenticate("PLAIN", username, password)

    def _decode(self, data: bytes) -> str | None:
        """
        Decode one base64 SASL response (C{=} is empty), or reply C{501}.
        """
        if data == b"=":
            return ""
        try:
            return base64.b64decode(data, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            self._error(_AUTH_BASE64, "syntax")
            return None

    def _authenticate(self, mechanism: str, username: str, password: str) -> None:
        assert self.handler is not None

        def done(result: Reply | None) -> None:
            r = self._handlerReply(result)
            if r.code == 235:
                self.session.user = username
                self._log.info(
                    "authenticated {session} as {user}", session=self.session.id, user=username
                )
                self._reply(r)
            else:
                self._authFailed(r)

        self._await(self.handler.authenticate, mechanism, username, password, then=done)

    def _authFailed(self, r: Reply) -> None:
        self._authFailures += 1
        self.factory.metrics.rejected("auth_failed")
        self._log.info(
            "authentication failed in {session} from {client}",
            session=self.session.id, client=self.session.clientHost or "unix",
        )
        self._reply(r)
        if self._authFailures >= self._listener.maxAuthFailures:
            self._disconnect(_AUTH_TOO_MANY, "too_many_auth_failures")


class SMTPServerFactory(ServerFactory):
    """
    Build L{SMTPServerProtocol}s for one listener and track its sessions.

    @ivar sessions: the live sessions (for a graceful shutdown).
    @ivar greeting: the wire bytes of our C{220} greeting.
    @ivar newSessionId: makes session ids (replace it in tests).
    @ivar rates: the listener's rate limits, counted on C{reactor}'s clock.
    """

    protocol = SMTPServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        listener: Listener,
        handlerFactory: Callable[[ClientSession], IRelayHandler],
        hostname: str,
        reactor: IReactorTime,
        tlsOptions: Any | None = None,
        greetingToken: str = "",
        metrics: IMetrics | None = None,
    ) -> None:
        """
        @param listener: limits and options of this listener.
        @param handlerFactory: makes the handler of each client session.
        @param hostname: our name, in the greeting and EHLO reply.
        @param reactor: the clock for timeouts.
        @param tlsOptions: an C{IOpenSSLServerConnectionCreator} to offer
            STARTTLS with, or L{None}.
        @param greetingToken: the loop token shown in the greeting (loop detection).
        @param metrics: where sessions, TLS handshakes and local refusals
            are counted.
        """
        self.listener = listener
        self.handlerFactory = handlerFactory
        self.hostname = hostname
        self.reactor = reactor
        self.tlsOptions = tlsOptions
        self.greetingToken = greetingToken
        self.metrics: IMetrics = metrics if metrics is not None else NullMetrics()
        self.sessions: set[SMTPServerProtocol] = set()
        self.newSessionId: Callable[[], str] = randomSessionId
        self._perHost: dict[str, int] = {}
        self.rates = ListenerRates(listener, reactor, self.isExempt)
        kind = "LMTP" if listener.lmtp else "ESMTP"
        text = f"{hostname} {kind} smtprelay {greetingToken}".rstrip()
        self.greeting = reply(220, None, text).toBytes()

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def isAllowed(self, host: str) -> bool:
        """
        Whether C{host} (an IP address) is in the listener's C{allow} list.
        """
        return _inNetworks(host, self.listener.allow)

    def isExempt(self, host: str) -> bool:
        """
        Whether C{host} (an IP address) is exempt from the per-address
        connection limit and the rate limits (C{limit_exceptions}).
        """
        return _inNetworks(host, self.listener.limitExceptions)

    def _register(self, protocol: SMTPServerProtocol) -> bool:
        host = protocol.session.clientHost
        if len(self.sessions) >= self.listener.maxConnections:
            return False
        if (host and self._perHost.get(host, 0) >= self.listener.maxConnectionsPerIP
                and not self.isExempt(host)):
            return False
        self.sessions.add(protocol)
        if host:
            self._perHost[host] = self._perHost.get(host, 0) + 1
        return True

    def _unregister(self, protocol: SMTPServerProtocol) -> None:
        self.sessions.discard(protocol)
        host = protocol.session.clientHost
        if host and host in self._perHost:
            self._perHost[host] -= 1
            if not self._perHost[host]:
                del self._perHost[host]


def _inNetworks(host: str, networks: Sequence[Any]) -> bool:
    """
    Whether C{host} (an IP address) is in one of C{networks}.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in networks)


def _normalizeHost(host: str) -> str:
    """
    An IPv4-mapped IPv6 address is its IPv4 address (for C{allow} and limits).
    """
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


def _hasPendingInput(transport: Any) -> bool:
    """
    Whether the client's socket already holds data (it talked before our
    greeting).  Only plain sockets can tell; anything else says no.  Behind
    the PROXY protocol, the bytes after the header count too.
    """
    check = getattr(transport, "hasPendingInput", None)
    if check is not None and check():
        return True
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return False
    try:
        handle = getHandle()
    except Exception:
        return False
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return False
    try:
        return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False

