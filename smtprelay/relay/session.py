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

import email.utils
import functools
from typing import Any, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.protocol import replies
from smtprelay.config.model import Destinations, Listener
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.observe.logs import logFormatted, logReject
from smtprelay.interfaces import (
    ClientSession,
    Credentials,
    DownstreamError,
    IDownstream,
    IRelayHandler,
    Params,
)
from smtprelay.protocol.replies import Reply
from smtprelay.relay.routing import Route, Router

PasswordChecker = Callable[[str, str], "Deferred[bool]"]
"""Checks a user name and password against local C{users FILE} entries."""

_RELAY_REPLIES = frozenset(
    {
        replies.NO_DOWNSTREAM,
        replies.DOWNSTREAM_LOST,
        replies.DOWNSTREAM_DNS,
        replies.DOWNSTREAM_NO_TLS,
        replies.DOWNSTREAM_CONFUSED,
        replies.DOWNSTREAM_AUTH,
        replies.LOOP,
        replies.CONVERSION_REQUIRED,
        replies.UTF8_SENDER,
        replies.UTF8_RECIPIENT,
    }
)


@implementer(IRelayHandler)
class RelaySession:
    """
    Relay one client session's transactions to their targets
    (L{IRelayHandler}).

    @param session: the client's session, kept current by the server.
    @param listener: the listener the client came in on.
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
    _destinations: Destinations | None
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
        listener: Listener,
        router: Router,
        hostname: str,
        clock: IReactorTime,
        checkPassword: PasswordChecker | None = None,
        metrics: IMetrics | None = None,
    ) -> None:
        self.session = session
        self._metrics: IMetrics = metrics if metrics is not None else NullMetrics()
        self._listener = listener
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
        if self._listener.auth.mode == "users" and self._checkPassword is not None:
            return self._checkPassword(username, password).addCallback(
                lambda ok: replies.AUTH_OK if ok else replies.AUTH_FAILED
            )
        route = self._router.only
        if self._listener.auth.mode != "forward" or route is None:
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
            if error.reply.permanent and error.reply not in _RELAY_REPLIES:
                return error.reply.sanitized()
            return self._local(replies.AUTH_TEMPFAIL)

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
        if self.session.user is None:
            params = {k: v for k, v in params.items() if k != "AUTH"}
        self._mailParams = params
        if isinstance(choice, Destinations):
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
                self._header = self._receivedHeader(downstream)
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
                *_outcome(final), downstream, self._clock.seconds() - self._dotSent,
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
            self._logTransaction(_outcome(final)[0], reply, downstream)
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
        target = self._route.target if self._route is not None else None
        return (
            target is not None
            and target.protocol == "lmtp"
            and self.session.protocol == "smtp"
            and target.lmtpSplit == "one_rcpt"
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
        reply = error.reply
        if reply in _RELAY_REPLIES:
            return self._local(reply)
        return self._relayed(reply)

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
        if self.session.protocol == "lmtp":
            return [reply] * max(1, len(self._accepted))
        return [reply]

    def _mapFinal(self, results: Sequence[Reply]) -> list[Reply]:
        """
        The downstream's final reply(ies) → this client's, per recipient for LMTP.
        """
        if self.session.protocol == "lmtp":
            if len(results) == len(self._accepted):
                return list(results)
            return self._perRecipient(results[0])
        # lmtp_split tempfail: the recipients agree when their outcomes
        # have one class (texts differ: "<a@x> Saved", "delivered"); the
        # first recipient's reply then speaks for all.
        first = results[0]
        if all(r.code // 100 == first.code // 100 for r in results):
            return [first]
        return [self._local(replies.LMTP_MIXED)]

    def _receivedHeader(self, downstream: IDownstream) -> bytes:
        """
        The C{Received:} header we prepend (RFC 5321 §4.4), Postfix-like,
        with a comment on the TLS the message leaves by, if any.
        """
        session = self.session
        helo = session.heloName or "unknown"
        address = f"[{session.clientHost}]" if session.clientHost else "unix socket"
        lines = [f"Received: from {helo} ({address})"]
        if session.tls is not None:
            lines.append(f"\t(using {session.tls.description})")
        lines.append(
            f"\tby {self._hostname} (smtprelay) with {session.withProtocol} id {session.id}"
        )
        if downstream.tls is not None:
            lines.append(f"\t(relayed using {downstream.tls.description}, {_trust(downstream)})")
        date = _headerDate(int(self._clock.seconds()))
        if len(self._accepted) == 1:
            forward = self._accepted[0].decode("utf-8", "replace")
            lines.append(f"\tfor <{forward}>; {date}")
        else:
            lines[-1] += ";"
            lines.append(f"\t{date}")
        return ("\r\n".join(lines) + "\r\n").encode("utf-8")

    def _logTransaction(
        self,
        status: str,
        reply: Reply | str,
        downstream: IDownstream | None = None,
        endOfDataSeconds: float | None = None,
        recipients: Sequence[tuple[bytes, Reply]] = (),
    ) -> None:
        """
        The one log event per transaction (docs/operations.md), then one per recipient
        in C{recipients}, and the metrics.  The events are taken now and
        emitted on the next reactor turn, after the client's reply has been
        sent: formatting them is not the client's wait.

        @param reply: the reply that shows C{status}, or the cause of an
            abort that no reply tells.
        @param recipients: each recipient with its own final reply, when
            the downstream gave one per recipient (LMTP).
        """
        session = self.session
        self._metrics.transaction(
            status, self._size, self._route.target.name if self._route else "none", endOfDataSeconds
        )
        fields = dict(
            session=session.id,
            client=session.clientHost,
            helo=session.heloName,
            sender=(self._sender or b"").decode("utf-8", "replace"),
            to=len(self._accepted),
            size=self._size,
            relay=downstream.peer if downstream is not None else "none",
            tls=_trust(downstream),
            delay=self._clock.seconds() - self._started,
            status=status,
            reply=reply if isinstance(reply, str) else reply.summary,
            transaction=True,
        )
        self._clock.callLater(0, self._emitTransaction, fields, recipients)

    def _emitTransaction(self, fields: dict[str, Any], recipients: Sequence[tuple[bytes, Reply]]) -> None:
        f = fields
        logFormatted(
            self._log,
            f"{f['session']}: from=<{f['sender']}> to={f['to']} size={f['size']} relay={f['relay']} "
            f"tls={f['tls']} delay={f['delay']:.3f} status={f['status']} reply={f['reply']}",
            **fields,
        )
        for recipient, reply in recipients:
            to = recipient.decode("utf-8", "replace")
            status = _outcome([reply])[0]
            logFormatted(
                self._log,
                f"{f['session']}: to=<{to}> relay={f['relay']} status={status} reply={reply.summary}",
                delivery=True,
                session=f["session"],
                recipient=to,
                relay=f["relay"],
                status=status,
                reply=reply.summary,
            )


CLIENT_GONE = "client connection closed during DATA"
"""The cause logged for a body the client did not finish."""


@functools.lru_cache(maxsize=4)
def _headerDate(second: int) -> str:
    """
    The C{Received:} header's date (RFC 5322, local time), made once per
    second: C{formatdate} costs more than the rest of the header.
    """
    return email.utils.formatdate(second, localtime=True)


def _trust(downstream: IDownstream | None) -> str:
    """
    The downstream connection's TLS in one word: C{verified} (a
    certificate chain to a trusted root, for the target's name),
    C{untrusted} (encrypted, the peer not verified) or C{no}.
    """
    if downstream is None or downstream.tls is None:
        return "no"
    return "verified" if downstream.tls.verified else "untrusted"


def _outcome(final: Sequence[Reply]) -> tuple[str, Reply]:
    """
    Postfix's word for the outcome of replies to one transaction (deferred
    if any is temporary, else bounced if any is permanent, else sent) and
    the first reply that shows it.
    """
    for reply in final:
        if reply.transient:
            return "deferred", reply
    for reply in final:
        if reply.permanent:
            return "bounced", reply
    return "sent", final[0]
