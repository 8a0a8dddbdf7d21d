"""
The wire side of an inbound session: L{ServerConnection} admits the
connection under the listener's limits, greets (after an implicit TLS
handshake), reads input into its L{InputBuffer} with back-pressure, batches
replies into one write per pipelined group, waits for the handler one call
at a time, runs the read and body deadlines, and closes.  What the input
means is its subclass's, L{smtprelay.inbound.session.SMTPServerProtocol}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, ISSLTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.inbound.framing import InputBuffer, Pauser, Pauses, hasPendingInput
from smtprelay.inbound.limits import normalizeHost
from smtprelay.inbound.states import TLS, Phase
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.net.tlsinfo import readTLSInfo
from smtprelay.net.wire import writeNow
from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal, Reply

if TYPE_CHECKING:
    from smtprelay.inbound.factory import SMTPServerFactory

_OUTPUT_BATCH = 16 * 1024
"""Flush replies when this much is waiting, so a full transport can pause us."""

_ABORT_AFTER = 30.0
"""Seconds a closing connection may take to flush before it is aborted."""

# Why a connection was refused, for its log line.
_WHY = {"rate_connections": "connection rate limit", "too_many_connections": "too many connections"}


@implementer(IHandshakeListener)
class ServerConnection(Protocol):
    """
    The connection of one inbound session.

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
        self._unix = False
        self._input = InputBuffer()
        self._pauses = Pauses()
        self._out: list[bytes] = []
        self._outSize = 0
        # Waiting for the handler: nothing more is read meanwhile.
        self._busy = False
        # In _process: it is not re-entered.
        self._processing = False
        self._shutdownPending = False
        self._readTimer: IDelayedCall | None = None
        self._dataTimer: IDelayedCall | None = None
        self._abortTimer: IDelayedCall | None = None
        self._closedWaiters: list[Deferred[None]] = []

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
        if self._phase.closing:
            return
        if self._idle():
            self._disconnect(replies.SHUTTING_DOWN)
        else:
            self._shutdownPending = True

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._phase.closing:
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
            while self._input.data and not self._busy and not self._pauses.reasons and not self._phase.closing:
                if not self._consume():
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
        if self._phase.closing:
            return
        # Back-pressure: while a reply is pending, what the client sends
        # ahead waits in our buffer, and the socket is not read meanwhile.
        if self._busy and self._input.data:
            self._pause("busy")
        elif "busy" in self._pauses.reasons:
            self._resume("busy")
        # A client that does not read our replies (the "write" pause) keeps
        # its deadline: it must read and send its next line in time.
        self._setReadTimer(not self._busy and not self._pauses.besides("write"))

    # -- replies ------------------------------------------------------------

    def _reply(self, r: Reply) -> None:
        data = r.toBytes()
        self._out.append(data)
        self._outSize += len(data)

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
        if self._phase.closing:
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
        if not on or self._phase.closing:
            if timer is not None:
                if timer.active():
                    timer.cancel()
                self._readTimer = None
        elif timer is None or not timer.active():
            self._readTimer = self._clock.callLater(self._policy.readTimeout, self._timedOut)

    def _setDataTimer(self, on: bool) -> None:
        """
        Start the deadline of a whole body (C{data_timeout}), or stop it.
        """
        if self._dataTimer is not None and self._dataTimer.active():
            self._dataTimer.cancel()
        self._dataTimer = self._clock.callLater(self._policy.dataTimeout, self._timedOut) if on else None

    def _cancelTimers(self) -> None:
        for timer in (self._readTimer, self._dataTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._readTimer = self._dataTimer = None

    def _timedOut(self) -> None:
        self._cancelTimers()
        self._log.info("timeout in {session}", session=self.session.id)
        self._disconnect(replies.TIMEOUT)

    # -- what the dialogue decides ------------------------------------------

    def _consume(self) -> bool:
        """
        Use some of the buffered input (a command line, body bytes).

        @return: False when none can be used until more comes.
        """
        raise NotImplementedError()

    def _idle(self) -> bool:
        """
        Whether the session may close now (no transaction, no exchange).
        """
        raise NotImplementedError()
