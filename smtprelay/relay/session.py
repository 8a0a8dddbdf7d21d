"""
The relay session: one client session joined to one downstream session.

This module is where the transparency rules live, so that a
reader can check them line by line:

  - the downstream session opens at MAIL (after the server's local checks),
    trying targets in order, and the client's MAIL reply is the downstream's;
    under recipient routing MAIL gets a local 250 and the session
    opens at the first routed RCPT, whose target is then the transaction's:
    a RCPT routed elsewhere is told to come back in another transaction;
  - every RCPT reply, the 354 and the final reply are the downstream's own,
    sanitized; the client gets 2xx to end-of-data only after the
    downstream's 2xx on this transaction;
  - the body streams with back-pressure, after one C{Received:} header;
  - an abort before the client's real end-of-data closes the downstream
    without the dot; a client that leaves after its dot does not stop the
    downstream transaction, whose outcome is still logged;
  - LMTP replies map per recipient (C{lmtp_split}); C{auth forward} binds an authenticated
    downstream to this client session only.

One L{RelaySession} serves one client connection (L{IRelayHandler}).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.protocol import replies
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.observe.logs import logReject
from smtprelay.interfaces import (
    ClientSession,
    Credentials,
    DownstreamError,
    IDownstream,
    IRelayHandler,
    Params,
)
from smtprelay.protocol.replies import Reply
from smtprelay.relay.record import CLIENT_GONE, Transaction, TransactionLog, outcome, receivedHeader
from smtprelay.relay.routing import ByRecipient, Route, Router
from smtprelay.relay.verdicts import authVerdict, clientFinal, failureReply, perRecipient

PasswordChecker = Callable[[str, str], "Deferred[bool]"]
"""Checks a user name and password against local C{users FILE} entries."""

@implementer(IRelayHandler)
class RelaySession:
    """
    Relay one client session's transactions to their targets
    (L{IRelayHandler}).

    @param session: the client's session, kept current by the server.
    @param auth: the listener's C{auth}: C{users} (checked with
        C{checkPassword}), C{forward} (to the one route's downstream) or
        C{off}.
    @param router: the listener's routing: the target of each transaction,
        with the L{smtprelay.relay.failover.Failover} that opens sessions to it
        and may keep those this relay is done with for another client.
    @param hostname: this relay's name, for the C{Received:} header.
    @param clock: the time source for delays and the C{Received:} date.
    @param checkPassword: the local C{users FILE} checker, when the listener
        uses one.
    @param metrics: where transactions are counted.
    """

    _log = Logger()

    # The current transaction, set by _resetTransaction.  _route is its
    # target once known; _destinations routes its recipients when MAIL could
    # not choose; _mailRefused is the route's answer to a MAIL sent at RCPT.
    _sender: bytes | None
    _mailParams: Params
    _route: Route | None
    _destinations: ByRecipient | None
    _mailRefused: Reply | None
    _accepted: list[bytes]
    _size: int
    _started: float
    _dotSent: float
    _inBody: bool
    _ending: bool
    _header: bytes  # our Received: header, until the body's first write

    def __init__(
        self,
        session: ClientSession,
        auth: Literal["off", "forward", "users"],
        router: Router,
        hostname: str,
        clock: IReactorTime,
        checkPassword: PasswordChecker | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self.session = session
        self._transactions = TransactionLog(clock, metrics if metrics is not None else NullMetrics())
        self._auth = auth
        self._router = router
        self._hostname = hostname
        self._clock = clock
        self._checkPassword = checkPassword
        self._credentials: Credentials | None = None
        self._downstream: IDownstream | None = None
        self._downstreamRoute: Route | None = None
        self._idle: Deferred[None] = succeed(None)
        self._closed = False
        self._resetTransaction()

    # -- IRelayHandler ----------------------------------------------------

    def authenticate(self, mechanism: str, username: str, password: str) -> Deferred[Reply]:
        """
        C{users FILE}: check locally.  C{forward}: authenticate to the
        chosen downstream now (at AUTH time) and pass its verdict on; a
        downstream that gives no verdict is a temporary failure, never 535.
        """
        if self._auth == "users" and self._checkPassword is not None:
            return self._checkPassword(username, password).addCallback(
                lambda ok: replies.AUTH_OK if ok else replies.AUTH_FAILED
            )
        route = self._router.only
        if self._auth != "forward" or route is None:
            return succeed(replies.AUTH_TEMPFAIL)
        credentials = Credentials(username, password)
        self._dropDownstream(abort=True)

        def bound(result: tuple[IDownstream, Reply | None]) -> Reply:
            if self._adopt(result[0], route):
                self._credentials = credentials
            return replies.AUTH_OK

        def refused(failure: Failure) -> Reply:
            failure.trap(DownstreamError)
            error: DownstreamError = failure.value
            self._log.info(
                "auth forward for {session} failed: {reason}",
                session=self.session.id,
                reason=error.reason,
            )
            return authVerdict(error.reply, self.session)

        return route.open(
            credentials=credentials, sessionId=self.session.id, client=self.session
        ).addCallbacks(bound, refused)

    def mail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        """
        Route the transaction by its sender.  Open (or reuse) the
        downstream session and send MAIL, and the client gets the
        downstream's reply; or, when the target depends on the recipients,
        a local 250.  A refusal is logged.
        """
        return self._mail(sender, params).addCallback(self._logRefusal, "MAIL", sender)

    def _mail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        self._resetTransaction()
        choice = self._router.bySender(sender)
        if isinstance(choice, Reply):
            return succeed(choice)
        self._sender = sender
        self._started = self._clock.seconds()
        self._mailParams = params
        if isinstance(choice, ByRecipient):
            self._destinations = choice
            return succeed(replies.SENDER_OK)
        self._route = choice
        return self._mailWhenIdle()

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        """
        Route the recipient when the sender did not choose the target: the
        first routed recipient chooses it and opens the downstream session
        (the MAIL reply, if not positive, is this RCPT's and every later
        one's); one routed elsewhere gets C{451 4.5.3}.  Then relay RCPT.
        A refusal is logged.
        """
        return self._routeRcpt(recipient, params).addCallback(
            self._logRefusal, "RCPT", recipient
        )

    def _routeRcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        if self._destinations is not None:
            choice = self._router.byRecipient(self._destinations, recipient)
            if isinstance(choice, Reply):
                return succeed(choice)
            if self._route is None:
                self._route = choice
                return self._mailWhenIdle().addCallback(self._rcptAfterMail, recipient, params)
            if choice is not self._route:
                return succeed(self._local(replies.ROUTED_ELSEWHERE))
            if self._mailRefused is not None:
                return succeed(self._mailRefused)
        return self._rcpt(recipient, params)

    def _rcptAfterMail(self, mail: Reply, recipient: bytes, params: Params) -> Deferred[Reply]:
        if not mail.positive:
            self._mailRefused = mail
            return succeed(mail)
        return self._rcpt(recipient, params)

    def _rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        """
        Send RCPT downstream; its reply is the client's.  An SMTP client
        relaying to an LMTP target under C{lmtp_split one_rcpt} gets one
        recipient per transaction (C{452 4.5.3} to the others).
        """
        downstream = self._downstream
        if downstream is None:
            return succeed(self._local(replies.DOWNSTREAM_LOST))
        if self._splitOneRecipient and self._accepted:
            return succeed(replies.LMTP_SPLIT)

        def accepted(reply: Reply) -> Reply:
            if reply.positive:
                self._accepted.append(recipient)
            return self._relayed(replies.forRcpt(reply))

        return downstream.rcpt(recipient, params).addCallbacks(accepted, self._failed)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        """
        Send DATA downstream; only its 354 opens the body, which starts
        with our C{Received:} header.  A refusal is logged.
        """
        return self._data(producer).addCallback(self._logRefusal, "DATA", None)

    def _data(self, producer: IPushProducer) -> Deferred[Reply]:
        downstream = self._downstream
        if not self._accepted:
            return succeed(self._local(replies.NO_VALID_RECIPIENTS))
        if downstream is None:
            return succeed(self._local(replies.DOWNSTREAM_LOST))

        def started(reply: Reply) -> Reply:
            if reply.code == 354:
                self._inBody = True
                downstream.registerProducer(producer, True)
                # Sent with the first piece of the body: one write (and
                # one send()) fewer per message.
                self._header = receivedHeader(
                    self.session, self._hostname, downstream, self._accepted, self._clock.seconds()
                )
            return self._relayed(reply)

        return downstream.data().addCallbacks(started, self._failed)

    def dataChunk(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._downstream is not None:
            self._downstream.write(self._header + chunk)
            self._header = b""

    def endData(self) -> Deferred[Sequence[Reply]]:
        """
        The client's real end-of-data: send ours, wait for the downstream's
        final reply(ies) and map them to what this client expects.
        """
        downstream = self._downstream
        self._inBody = False
        if downstream is None:
            reply = self._local(replies.DOWNSTREAM_LOST)
            self._logTransaction("deferred", reply)
            return succeed(self._perRecipient(reply))
        if self._header:
            self.dataChunk(b"")
        downstream.unregisterProducer()
        self._ending = True
        self._dotSent = self._clock.seconds()

        def finished(results: Sequence[Reply]) -> Sequence[Reply]:
            self._ending = False
            relayed = [self._relayed(r) for r in results]
            final = self._mapFinal(relayed)
            # An LMTP target's one reply per recipient is each one's status.
            perRecipient = downstream.lmtp and len(relayed) == len(self._accepted)
            self._logTransaction(
                *outcome(final), downstream, self._clock.seconds() - self._dotSent,
                list(zip(self._accepted, relayed)) if perRecipient else (),
            )
            if self._closed:
                self._dropDownstream(abort=False)
            return final

        def failed(failure: Failure) -> Sequence[Reply]:
            self._ending = False
            reply = self._failed(failure)
            received = [self._relayed(r) for r in failure.value.received]
            if not received:
                self._logTransaction("deferred", reply, downstream)
                return self._perRecipient(reply)
            # The recipients the downstream answered keep their verdict;
            # only the missing ones are temporary failures.
            final = self._mapFinal(received + [reply] * (len(self._accepted) - len(received)))
            self._logTransaction(outcome(final)[0], reply, downstream)
            return final

        return downstream.endData().addCallbacks(finished, failed)

    def abortData(self, reply: Reply) -> None:
        """
        The server refused the body: the downstream must never see the dot.
        """
        self._inBody = False
        self._logTransaction("aborted", reply, self._downstream)
        self._dropDownstream(abort=True)

    def reset(self) -> None:
        """
        RSET: reset the downstream transaction too, unless none is open.
        """
        downstream = self._downstream
        if downstream is not None and self._sender is not None:
            self._idle = downstream.rset().addCallbacks(
                lambda reply: None if reply.positive else self._dropDownstream(abort=False),
                lambda failure: self._dropDownstream(abort=True),
            )
        self._resetTransaction()

    def close(self) -> None:
        """
        The client is gone: abort a body in progress (no dot), let a
        transaction whose end-of-data was sent finish, QUIT otherwise.
        """
        self._closed = True
        if self._inBody:
            self._inBody = False
            self._logTransaction("aborted", CLIENT_GONE, self._downstream)
            self._dropDownstream(abort=True)
        elif not self._ending:
            self._dropDownstream(abort=False)
        self._credentials = None

    # -- internals --------------------------------------------------------

    @property
    def _splitOneRecipient(self) -> bool:
        route = self._route
        return (
            route is not None
            and route.lmtp
            and self.session.protocol == "smtp"
            and route.lmtpSplit == "one_rcpt"
        )

    def _resetTransaction(self) -> None:
        self._sender = None
        self._mailParams = {}
        self._route = None
        self._destinations = None
        self._mailRefused = None
        self._accepted = []
        self._size = 0
        self._started = 0.0
        self._dotSent = 0.0
        self._inBody = False
        self._ending = False
        self._header = b""

    def _mailWhenIdle(self) -> Deferred[Reply]:
        """
        MAIL for this transaction's route, once an RSET in flight is done.
        """
        sender, params = self._sender, self._mailParams
        assert sender is not None
        d = self._idle.addCallback(lambda _: self._mailOn(sender, params))
        self._idle = succeed(None)
        return d

    def _mailOn(self, sender: bytes, params: Params) -> Deferred[Reply]:
        """
        MAIL on the session we hold (if it still works and goes to this
        transaction's route), else on a new one from the route's targets.
        """
        if self._downstreamRoute is not self._route:
            self._dropDownstream(abort=False)
        downstream = self._downstream
        if downstream is None:
            return self._openWithMail(sender, params)

        def broken(failure: Failure) -> Deferred[Reply]:
            failure.trap(DownstreamError)
            self._downstream = None
            return self._openWithMail(sender, params)

        return downstream.mail(sender, params, self.session).addCallbacks(self._relayed, broken)

    def _openWithMail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        """
        MAIL on a new session from the route's targets; none for a client
        that left before (while an RSET or a stale session's MAIL was in
        flight).
        """
        if self._closed:
            return succeed(self._local(replies.DOWNSTREAM_LOST))
        route = self._route
        assert route is not None

        def opened(result: tuple[IDownstream, Reply | None]) -> Reply:
            downstream, reply = result
            self._adopt(downstream, route)
            assert reply is not None
            return self._relayed(reply)

        return route.open(
            credentials=self._credentials,
            mail=(sender, params),
            sessionId=self.session.id,
            client=self.session,
        ).addCallbacks(opened, self._failed)

    def _adopt(self, downstream: IDownstream, route: Route) -> bool:
        """
        Hold C{downstream}, which C{route} just opened for this session.  A
        client that left while it was being opened cannot use it, and no
        timer would ever close it: it goes back to the route at once, under
        the usual rules (a MAIL on it makes it QUIT, not kept).

        @return: whether the session holds it.
        """
        self._downstream, self._downstreamRoute = downstream, route
        if self._closed:
            self._dropDownstream(abort=False)
        return not self._closed

    def _relayed(self, reply: Reply) -> Reply:
        """
        A downstream's reply as the client may see it: sanitized, with an
        enhanced code.
        """
        return reply.sanitized(utf8=self.session.smtputf8)

    def _local(self, reply: Reply) -> Reply:
        return reply.withSession(self.session.id)

    def _logRefusal(self, reply: Reply, command: str, address: bytes | None) -> Reply:
        """
        Log C{reply} if it refuses the client's C{command} (a routing
        rule's C{reject}, the downstream's verdict or the relay's own
        temporary failure), as Postfix logs its rejections.

        @param address: the sender of C{MAIL}, the recipient of C{RCPT}.
        """
        if reply.code >= 400:
            sender = address if command == "MAIL" else self._sender
            logReject(
                self._log,
                self.session,
                command,
                reply,
                sender,
                address if command == "RCPT" else None,
                self._downstream.peer if self._downstream is not None else "none",
            )
        return reply

    def _failed(self, failure: Failure) -> Reply:
        """
        A downstream failure during the transaction: close that session and
        tell the client what L{DownstreamError} says.
        """
        failure.trap(DownstreamError)
        error: DownstreamError = failure.value
        self._log.info(
            "downstream failed in {session}: {reason}",
            session=self.session.id,
            reason=error.reason,
        )
        self._dropDownstream(abort=True)
        return failureReply(error.reply, self.session)

    def _dropDownstream(self, abort: bool) -> None:
        downstream, self._downstream = self._downstream, None
        route, self._downstreamRoute = self._downstreamRoute, None
        if downstream is None:
            return
        if abort or route is None:
            downstream.abort()
        else:
            route.release(downstream)

    def _perRecipient(self, reply: Reply) -> list[Reply]:
        return perRecipient(reply, self.session.protocol == "lmtp", len(self._accepted))

    def _mapFinal(self, results: Sequence[Reply]) -> list[Reply]:
        return clientFinal(results, self.session.protocol == "lmtp", len(self._accepted), self.session.id)

    def _logTransaction(
        self,
        status: str,
        reply: Reply | str,
        downstream: IDownstream | None = None,
        endOfDataSeconds: float | None = None,
        recipients: Sequence[tuple[bytes, Reply]] = (),
    ) -> None:
        """
        Log and count the current transaction (L{TransactionLog.record}).
        """
        self._transactions.record(
            Transaction(
                self.session,
                self._sender,
                len(self._accepted),
                self._size,
                self._route.name if self._route else "none",
                self._started,
            ),
            status, reply, downstream, endOfDataSeconds, recipients,
        )
