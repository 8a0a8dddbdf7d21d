"""
Choosing a target: ordered failover with back-off.

L{Failover.open} tries the endpoints of one target in their configured order
until one completes the steps before the transaction
(L{smtprelay.outbound.handshake}) and, if asked, MAIL.  A temporary or
connection-level failure at any step moves on to the next endpoint; a
failed TLS handshake is retried on a new connection without STARTTLS unless
TLS is needed.  Endpoints that could not be reached rest for C{backoff}
seconds so that a message does not wait for a dead first endpoint each
time; the configured order returns as soon as they recover.  A
downstream's permanent verdict (5xx to MAIL, or to AUTH with the client's
own credentials) is final: it is the client's answer, not a fault.  The
relay's own credentials refused, or a mechanism not offered, is a fault of
its configuration: the next endpoint, and a temporary failure when none is
left.

Between client sessions, a connection the relay is done with waits in the
target's L{Pool}; one that carries a client's identity (C{auth forward},
C{forward_client_info xclient}) never does.  One that went stale while
idle is noticed at MAIL, before the client has seen any reply, and the
transaction starts afresh.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import attrs
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtprelay.net.address import Address
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError, IDownstream, Params
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.outbound.handshake import AttemptFailed, Handshake, LoopDetected
from smtprelay.protocol import replies
from smtprelay.protocol.replies import Reply
from smtprelay.relay.pool import Pool, ReusePolicy


@attrs.frozen
class FailoverPolicy:
    """
    A target's endpoints and how they are tried.

    @ivar name: the target's name, for logs and metrics.
    @ivar endpoints: in the order they are tried.
    @ivar backoff: seconds an unreachable endpoint rests (0: never).
    @ivar reuse: how idle connections are kept.
    """

    name: str
    endpoints: tuple[Address, ...]
    backoff: float = 30.0
    reuse: ReusePolicy = ReusePolicy()


class Failover:
    """
    The endpoints of one target, tried in order.  One instance per target is
    shared by all sessions, so that back-off and idle connections are
    shared too.

    @param handshake: takes a new connection to an endpoint up to MAIL.
    @param clock: back-off and idle times.
    """

    _log = Logger()

    def __init__(
        self,
        policy: FailoverPolicy,
        handshake: Handshake,
        clock: IReactorTime,
        metrics: IMetrics | None = None,
    ) -> None:
        self.policy = policy
        self._handshake = handshake
        self._metrics: IMetrics = metrics if metrics is not None else NullMetrics()
        self._clock = clock
        self._restingUntil: dict[Address, float] = {}
        # A connection that carries a client's identity serves that client only.
        personal = handshake.policy.auth == "forward" or handshake.client.forwardClientInfo == "xclient"
        self._pool = Pool(None if personal else policy.reuse, clock)

    def order(self) -> list[Address]:
        """
        The endpoints to try now: those not resting, in configured order;
        if all rest, all of them.
        """
        now = self._clock.seconds()
        awake = [a for a in self.policy.endpoints if self._restingUntil.get(a, 0) <= now]
        return awake or list(self.policy.endpoints)

    def open(
        self,
        credentials: Credentials | None = None,
        mail: tuple[bytes, Params] | None = None,
        sessionId: str = "-",
        client: ClientSession | None = None,
    ) -> Deferred[tuple[IDownstream, Reply | None]]:
        """
        Fire with C{(session, MAIL reply or None)} from the first endpoint
        that completes the steps; a permanent MAIL reply is returned too.
        Each failed attempt is logged, even when a later one succeeds.

        @param credentials: the client's own, for C{auth forward}.
        @param mail: C{(sender, params)} to send MAIL as the last step.
        @param sessionId: the client session's id, for the logs.
        @param client: the client session whose identity a target with
            C{forward_client_info} passes on (XCLIENT on a new connection,
            XFORWARD before MAIL).
        @raise DownstreamError: C{451 4.4.1} when every endpoint failed
            (C{4.7.5} when C{require_tls} eliminated them, C{4.4.4} when
            all were DNS failures, C{454 4.7.0} when the relay could
            authenticate at none of them); the downstream's own reply to
            the client's credentials refused (C{auth forward});
            C{554 5.4.6} when a target is ourselves.
        """
        return self._open(credentials, mail, sessionId, client)

    def release(self, session: IDownstream) -> None:
        """
        The relay is done with C{session}: keep it idle for another client
        session if it can serve one as it is, QUIT it otherwise.
        """
        self._pool.release(session)

    def close(self) -> None:
        """
        Shutting down: QUIT the idle connections and keep no more.
        """
        self._pool.close()

    @inlineCallbacks
    def _reuse(
        self, mail: tuple[bytes, Params], client: ClientSession | None
    ) -> Generator[Deferred[Any], Any, tuple[IDownstream, Reply] | None]:
        """
        MAIL on an idle connection to the endpoint the configured order
        would try first now, if one is usable: C{(session, reply)}.  A
        connection that went stale while idle (closed, or a transient reply
        such as C{421} after the downstream's own idle timeout) is dropped,
        and None says "open a new one".
        """
        while (session := self._pool.take(self.order()[0])) is not None:
            try:
                reply = yield session.mail(*mail, client)
            except DownstreamError as e:
                self._log.debug("idle {peer} went stale: {reason}", peer=session.peer, reason=e.reason)
                continue
            if reply.transient:
                self._log.debug("idle {peer} answered {code}", peer=session.peer, code=reply.code)
                session.quit()
                continue
            self._metrics.attempt(self.policy.name, "reused")
            return (session, reply)
        return None

    @inlineCallbacks
    def _open(
        self,
        credentials: Credentials | None,
        mail: tuple[bytes, Params] | None,
        sessionId: str,
        client: ClientSession | None,
    ) -> Generator[Deferred[Any], Any, tuple[IDownstream, Reply | None]]:
        name = self.policy.name
        if mail is not None and credentials is None and self._pool:
            reused = yield self._reuse(mail, client)
            if reused is not None:
                return reused
        reasons: list[str] = []
        allDNS = allNoTLS = allAuth = True
        for attempt, address in enumerate(self.order()):
            if attempt:
                self._metrics.failover(name)
            starttls = True
            while True:
                started = self._clock.seconds()
                try:
                    session = yield self._handshake.open(address, starttls, credentials, client)
                except LoopDetected:
                    self._metrics.attempt(name, "loop")
                    self._log.error(
                        "target {target}: {address} greets with our own loop token",
                        target=name, address=str(address),
                    )
                    raise DownstreamError(replies.LOOP, f"{address} greets with our own token")
                except AttemptFailed as e:
                    self._metrics.attempt(name, e.result)
                    self._logFailure(sessionId, address, e.stage, e.reason)
                    reasons.append(f"{address}: {e.reason}")
                    allDNS = allDNS and e.dns
                    allNoTLS = allNoTLS and e.noTLS
                    allAuth = allAuth and e.auth
                    if e.backoff:
                        self._rest(address)
                    if starttls and self._handshake.retriesPlain(address, e):
                        self._log.info(
                            "target {target}: TLS with {address} failed, retrying without STARTTLS",
                            target=name, address=str(address),
                        )
                        starttls = False
                        continue
                    break
                self._restingUntil.pop(address, None)
                self._metrics.attempt(name, "ok", self._clock.seconds() - started)
                if mail is None:
                    return (session, None)
                try:
                    reply = yield session.mail(*mail, client)
                except DownstreamError as e:
                    self._metrics.attempt(name, "mail")
                    self._logFailure(sessionId, address, "mail", e.reason)
                    reasons.append(f"{address}: MAIL: {e.reason}")
                    allDNS = allNoTLS = allAuth = False
                    break
                if reply.transient:
                    self._metrics.attempt(name, "mail")
                    self._logFailure(sessionId, address, "mail", reply.summary)
                    reasons.append(f"{address}: MAIL: {reply.code} {reply.text}")
                    allDNS = allNoTLS = allAuth = False
                    session.quit()
                    break
                return (session, reply)
        reason = "; ".join(reasons) or "no endpoints"
        self._log.warn(
            "target {target}: no endpoint available: {reasons}", target=name, reasons=reason
        )
        if reasons and allDNS:
            raise DownstreamError(replies.DOWNSTREAM_DNS, reason)
        if reasons and allNoTLS and self._handshake.policy.requireTLS:
            raise DownstreamError(replies.DOWNSTREAM_NO_TLS, reason)
        if reasons and allAuth:
            raise DownstreamError(replies.DOWNSTREAM_AUTH, reason)
        raise DownstreamError(replies.NO_DOWNSTREAM, reason)

    def probe(self, address: Address) -> Deferred[None]:
        """
        Check that C{address} would take a transaction now: the steps a
        transaction takes before MAIL (connect, greeting, EHLO/LHLO,
        STARTTLS and the judgement of the peer, AUTH), with the same retry
        without STARTTLS, then QUIT.  Nothing is counted as a downstream
        attempt and no back-off changes.  With C{auth forward} there are no
        credentials to try: the probe stops after TLS, once PLAIN or LOGIN
        is offered.

        @raise AttemptFailed: the step that failed (a target that greets
            with our own loop token fails at C{greeting}).
        """
        return self._probe(address)

    @inlineCallbacks
    def _probe(self, address: Address) -> Generator[Deferred[Any], Any, None]:
        starttls = True
        while True:
            try:
                protocol = yield self._handshake.open(address, starttls, probe=True)
            except LoopDetected:
                raise AttemptFailed("greets with our own loop token", stage="greeting")
            except AttemptFailed as e:
                if starttls and self._handshake.retriesPlain(address, e):
                    starttls = False
                    continue
                raise
            protocol.quit()
            return

    def _logFailure(self, sessionId: str, address: Address, stage: str, reason: str) -> None:
        """
        One line per failed attempt, as Postfix logs each MX it could not
        use: the target, the endpoint, the step that failed and why.
        """
        self._log.info(
            "{session}: target {target}: {endpoint} failed at {stage}: {reason}",
            attempt=True,
            session=sessionId,
            target=self.policy.name,
            endpoint=str(address),
            stage=stage,
            reason=reason,
        )

    def _rest(self, address: Address) -> None:
        if self.policy.backoff > 0:
            self._restingUntil[address] = self._clock.seconds() + self.policy.backoff
