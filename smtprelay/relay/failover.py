"""
Choosing a target: ordered failover with back-off.

L{Failover.open} tries the endpoints of one target in their configured order
until one completes the steps before the transaction: connect, greeting
220, EHLO/LHLO, STARTTLS and verification (when configured), AUTH (when
configured) and, if asked, MAIL.  A temporary or connection-level failure at
any step moves on to the next endpoint; a failed TLS handshake is retried on
a new connection without STARTTLS unless C{require_tls}.  A completed one is
kept whether the peer could be verified or not; C{require_tls} and a
password need a verified peer.  Endpoints that
could not be reached rest for C{backoff} seconds so that a message does not
wait for a dead first endpoint each time; the configured order returns as
soon as they recover.  A downstream's permanent verdict (5xx to MAIL, or
to AUTH with the client's own credentials) is final: it is the client's
answer, not a fault.  The relay's own credentials refused, or a mechanism
not offered, is a fault of its configuration: the next endpoint, and a
temporary failure when none is left.

Between client sessions, a connection the relay is done with waits idle
for the next transaction (L{Failover.release}), as Postfix's connection
cache does: a new client session then skips connect, greeting, EHLO,
STARTTLS and AUTH.  Only connections that are between transactions and
carry the relay's own identity are kept (never C{auth forward}); each
waits at most C{reuse_idle_time} and serves for at most
C{reuse_time_limit}.  One that went stale while idle is noticed at MAIL,
before the client has seen any reply, and the transaction starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from smtprelay.protocol import replies
from smtprelay.outbound.client import AttemptFailed, SMTPClientProtocol
from smtprelay.outbound.clientinfo import advertised, xclientCommands
from smtprelay.config.model import Target
from smtprelay.net.address import Address
from smtprelay.net.endpoints import clientEndpoint
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError, IDownstream, Params
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.protocol.replies import Reply
from smtprelay.net.tls import ClientOptions

EndpointFactory = Callable[[Address, float, Any], IStreamClientEndpoint]
"""C{(address, connectTimeout, tlsOptions or None) → endpoint}."""


MAX_IDLE = 16
"""The most idle connections kept per target."""


class _Loop(Exception):
    """
    The target greeted with our own loop token.
    """


class Failover:
    """
    The endpoints of one target, tried in order.  One instance per target is
    shared by all sessions, so that back-off and TLS contexts are shared too.

    @param loopToken: our greeting's loop token; a target that
        greets with it is ourselves.
    @param clock: timeouts and back-off (default: C{reactor}).
    @param endpointFactory: makes the client endpoint of an address
        (default: L{smtprelay.net.endpoints.clientEndpoint} on C{reactor});
        tests connect to fakes with it.
    @param tlsOptions: makes the client TLS options for a host name
        (L{smtprelay.app.tls.clientOptions} with the target's C{tls_client}).
    """

    _log = Logger()

    def __init__(
        self,
        target: Target,
        reactor: Any,
        loopToken: str = "",
        clock: IReactorTime | None = None,
        endpointFactory: EndpointFactory | None = None,
        metrics: IMetrics | None = None,
        *,
        tlsOptions: Callable[[str], ClientOptions],
    ) -> None:
        self.target = target
        self._newTLSOptions = tlsOptions
        self._metrics: IMetrics = metrics if metrics is not None else NullMetrics()
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._loopToken = loopToken
        self._endpointFactory = endpointFactory or (
            lambda address, timeout, options: clientEndpoint(reactor, address, timeout, options)
        )
        self._restingUntil: dict[Address, float] = {}
        self._tlsOptions: dict[str, ClientOptions] = {}
        self._idle: list[tuple[SMTPClientProtocol, IDelayedCall]] = []
        self._closed = False

    def order(self) -> list[Address]:
        """
        The endpoints to try now: those not resting, in configured order;
        if all rest, all of them.
        """
        now = self._clock.seconds()
        awake = [a for a in self.target.endpoints if self._restingUntil.get(a, 0) <= now]
        return awake or list(self.target.endpoints)

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
        return self._open(credentials, mail, sessionId, client)  # type: ignore[return-value]

    def release(self, session: IDownstream) -> None:
        """
        The relay is done with C{session}: keep it idle for another client
        session if it can serve one as it is, QUIT it otherwise.
        """
        target = self.target
        if (
            self._closed
            or not target.reuseConnections
            or target.auth.mechanism == "forward"
            or target.forwardClientInfo == "xclient"
            or not isinstance(session, SMTPClientProtocol)
            or not session.idle
            or self._clock.seconds() - session.connectedAt >= target.reuseTimeLimit
            or len(self._idle) >= MAX_IDLE
        ):
            session.quit()
            return
        expiry = self._clock.callLater(target.reuseIdleTime, self._expire, session)
        self._idle.append((session, expiry))

    def close(self) -> None:
        """
        Shutting down: QUIT the idle connections and keep no more.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for session, expiry in idle:
            expiry.cancel()
            session.quit()

    def _expire(self, session: SMTPClientProtocol) -> None:
        self._idle = [(s, e) for s, e in self._idle if s is not session]
        session.quit()

    def _takeIdle(self) -> SMTPClientProtocol | None:
        """
        The newest idle connection to the endpoint the configured order
        would try first now, if one is still usable.
        """
        first = self.order()[0]
        for i in range(len(self._idle) - 1, -1, -1):
            session, expiry = self._idle[i]
            if session.address != first:
                continue
            del self._idle[i]
            expiry.cancel()
            if session.idle:
                return session
            session.abort()
        return None

    @inlineCallbacks
    def _reuse(
        self, mail: tuple[bytes, Params], client: ClientSession | None
    ) -> Generator[Deferred[Any], Any, tuple[IDownstream, Reply] | None]:
        """
        MAIL on an idle connection, if one is usable: C{(session, reply)}.
        A connection that went stale while idle (closed, or a transient
        reply such as C{421} after the downstream's own idle timeout) is
        dropped, and None says "open a new one".
        """
        while (session := self._takeIdle()) is not None:
            try:
                reply = yield session.mail(*mail, client)
            except DownstreamError as e:
                self._log.debug("idle {peer} went stale: {reason}", peer=session.peer, reason=e.reason)
                continue
            if reply.transient:
                self._log.debug("idle {peer} answered {code}", peer=session.peer, code=reply.code)
                session.quit()
                continue
            self._metrics.attempt(self.target.name, "reused")
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
        target = self.target
        if mail is not None and credentials is None and self._idle:
            reused = yield self._reuse(mail, client)
            if reused is not None:
                return reused
        reasons: list[str] = []
        allDNS = allNoTLS = allAuth = True
        for attempt, address in enumerate(self.order()):
            if attempt:
                self._metrics.failover(target.name)
            starttls = True
            while True:
                started = self._clock.seconds()
                try:
                    session = yield self._attempt(address, starttls, credentials, client)
                except _Loop:
                    self._metrics.attempt(target.name, "loop")
                    self._log.error(
                        "target {target}: {address} greets with our own loop token",
                        target=target.name, address=str(address),
                    )
                    raise DownstreamError(replies.LOOP, f"{address} greets with our own token")
                except AttemptFailed as e:
                    self._metrics.attempt(target.name, _result(e))
                    self._logFailure(sessionId, address, e.stage, e.reason)
                    reasons.append(f"{address}: {e.reason}")
                    allDNS = allDNS and e.dns
                    allNoTLS = allNoTLS and e.noTLS
                    allAuth = allAuth and e.auth
                    if e.backoff:
                        self._rest(address)
                    if starttls and self._retryPlain(address, e):
                        self._log.info(
                            "target {target}: TLS with {address} failed, retrying without STARTTLS",
                            target=target.name, address=str(address),
                        )
                        starttls = False
                        continue
                    break
                self._restingUntil.pop(address, None)
                self._metrics.attempt(target.name, "ok", self._clock.seconds() - started)
                if mail is None:
                    return (session, None)
                try:
                    reply = yield session.mail(*mail, client)
                except DownstreamError as e:
                    self._metrics.attempt(target.name, "mail")
                    self._logFailure(sessionId, address, "mail", e.reason)
                    reasons.append(f"{address}: MAIL: {e.reason}")
                    allDNS = allNoTLS = allAuth = False
                    break
                if reply.transient:
                    self._metrics.attempt(target.name, "mail")
                    self._logFailure(sessionId, address, "mail", reply.summary)
                    reasons.append(f"{address}: MAIL: {reply.code} {reply.text}")
                    allDNS = allNoTLS = allAuth = False
                    session.quit()
                    break
                return (session, reply)
        reason = "; ".join(reasons) or "no endpoints"
        self._log.warn(
            "target {target}: no endpoint available: {reasons}", target=target.name, reasons=reason
        )
        if reasons and allDNS:
            raise DownstreamError(replies.DOWNSTREAM_DNS, reason)
        if reasons and allNoTLS and target.requireTLS:
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
        return self._probe(address)  # type: ignore[return-value]

    @inlineCallbacks
    def _probe(self, address: Address) -> Generator[Deferred[Any], Any, None]:
        starttls = True
        while True:
            try:
                protocol = yield self._attempt(address, starttls, None, None, probe=True)
            except _Loop:
                raise AttemptFailed("greets with our own loop token", stage="greeting")
            except AttemptFailed as e:
                if starttls and self._retryPlain(address, e):
                    starttls = False
                    continue
                raise
            protocol.quit()
            return

    def _retryPlain(self, address: Address, failure: AttemptFailed) -> bool:
        """
        Whether a connection that failed so is tried again without STARTTLS
        (the seed's rule: a failed handshake, when neither C{require_tls}
        nor a password needs TLS).
        """
        return (
            failure.retryPlain
            and not self.target.requireTLS
            and self.target.auth.mechanism == "off"
            and address.scheme == "tcp"
        )

    def _logFailure(self, sessionId: str, address: Address, stage: str, reason: str) -> None:
        """
        One line per failed attempt, as Postfix logs each MX it could not
        use: the target, the endpoint, the step that failed and why.
        """
        self._log.info(
            "{session}: target {target}: {endpoint} failed at {stage}: {reason}",
            attempt=True,
            session=sessionId,
            target=self.target.name,
            endpoint=str(address),
            stage=stage,
            reason=reason,
        )

    def _rest(self, address: Address) -> None:
        if self.target.backoff > 0:
            self._restingUntil[address] = self._clock.seconds() + self.target.backoff

    def _options(self, address: Address) -> ClientOptions:
        """
        The client TLS options for C{address}, built once per host name.
        """
        options = self._tlsOptions.get(address.host)
        if options is None:
            options = self._tlsOptions[address.host] = self._newTLSOptions(address.host)
        return options

    @inlineCallbacks
    def _connect(self, address: Address, protocol: SMTPClientProtocol) -> Generator[Deferred[Any], Any, None]:
        target = self.target
        options = self._options(address) if address.scheme == "tls" else None
        protocol.tlsOptions = options
        endpoint = self._endpointFactory(address, target.connectTimeout, options)
        connecting = endpoint.connect(_OneConnection(protocol))
        timer = self._clock.callLater(target.connectTimeout, connecting.cancel)
        try:
            yield connecting
        except DNSLookupError:
            raise AttemptFailed(f"cannot resolve {address.host}", stage="connect", backoff=True, dns=True)
        except Exception as e:  # noqa: BLE001 - any connect failure means "next target"
            raise AttemptFailed(f"connect failed: {type(e).__name__}: {e}", stage="connect", backoff=True)
        finally:
            if timer.active():
                timer.cancel()
        if address.scheme == "unix":
            protocol.peer = address.path
        else:
            ip = getattr(protocol.transport.getPeer(), "host", "?")  # type: ignore[union-attr]
            host = f"[{address.host}]" if ":" in address.host else address.host
            protocol.peer = f"{host}[{ip}]:{address.port}"

    @inlineCallbacks
    def _attempt(
        self,
        address: Address,
        starttls: bool,
        credentials: Credentials | None,
        client: ClientSession | None,
        probe: bool = False,
    ) -> Generator[Deferred[Any], Any, SMTPClientProtocol]:
        """
        One connection to C{address}, up to (not including) MAIL.

        @param starttls: STARTTLS may be used (false on the seed rule's
            retry after a failed handshake).
        @param client: whose identity XCLIENT gives, under
            C{forward_client_info xclient}.
        @param probe: a readiness probe (L{probe}), not a transaction.
        """
        target = self.target
        protocol = SMTPClientProtocol(target, self._clock, peer=str(address))
        protocol.address = address
        yield self._connect(address, protocol)
        try:
            greeting = yield protocol.greeting
        except DownstreamError as e:
            failedTLS = protocol.tlsFailed
            if failedTLS:
                self._metrics.tlsHandshake("outbound", False)
            raise AttemptFailed(
                f"no greeting: {'TLS handshake failed' if failedTLS else e.reason}",
                stage="tls" if failedTLS else "greeting",
                backoff=not failedTLS,
                noTLS=failedTLS,
            )
        except BaseException:
            protocol.abort()  # cancelled (a probe's deadline): leave no connection behind
            raise
        if self._loopToken and self._loopToken in greeting.text.split():
            protocol.abort()
            raise _Loop()
        if greeting.code != 220:
            protocol.quit()
            raise AttemptFailed(f"greeting {greeting.code} {greeting.text}", stage="greeting", backoff=True)
        try:
            yield self._hello(protocol)
            needTLS = target.requireTLS or target.auth.mechanism != "off"
            wantTLS = target.attemptStartTLS or needTLS
            offered = "STARTTLS" in protocol.capabilities
            if address.scheme == "tcp" and starttls and wantTLS and offered:
                started = yield protocol.startTLS(self._options(address))
                if started.code == 220:
                    yield self._hello(protocol)
                elif needTLS:
                    raise AttemptFailed(
                        f"STARTTLS refused: {started.code} {started.text}", stage="starttls", noTLS=True
                    )
            self._judgeTLS(protocol, probe)
            if client is not None and target.forwardClientInfo == "xclient":
                yield self._xclient(protocol, client)
            yield self._authenticate(protocol, credentials, probe)
        except DownstreamError as e:
            protocol.abort()
            if e.reply.permanent:
                raise  # the downstream's verdict on the client's credentials
            raise AttemptFailed(e.reason, stage=_STAGES.get(protocol.lastVerb, "ehlo"))
        except AttemptFailed as e:
            protocol.abort()
            if e.retryPlain:
                self._metrics.tlsHandshake("outbound", False)
            raise
        except BaseException:
            protocol.abort()
            raise
        return protocol

    def _judgeTLS(self, protocol: SMTPClientProtocol, probe: bool) -> None:
        """
        What the connection's TLS, or its absence, allows.  Any TLS is kept,
        verified or not (Postfix's C{may}); C{require_tls} wants a verified
        peer, and so does a password (C{plain}, C{login}, C{forward}),
        unless C{insecure_skip_verify} waives verification.

        @param probe: a readiness probe's connection, whose TLS line is
            debug (a probe every few seconds would drown the log).
        @raise AttemptFailed: the target cannot be used so.
        """
        target = self.target
        tls = protocol.tls
        if tls is not None:
            self._metrics.tlsHandshake("outbound", True, tls.verified)
            (self._log.debug if probe else self._log.info)(
                "{trust} TLS connection established to {peer}: {tls}{why}",
                trust="Verified" if tls.verified else "Untrusted",
                peer=protocol.peer, tls=tls.description,
                why="" if tls.verified else f" ({protocol.untrusted})",
            )
        trusted = tls is not None and (tls.verified or target.tlsClient.insecureSkipVerify)
        if target.requireTLS and not trusted:
            raise AttemptFailed(
                "no TLS available" if tls is None else f"TLS peer not verified: {protocol.untrusted}",
                stage="starttls",
                noTLS=True,
            )
        mechanism = target.auth.mechanism
        if mechanism == "off":
            return
        if tls is None:
            raise AttemptFailed(f"{mechanism} authentication needs TLS, which was not available", stage="auth", noTLS=True)
        if mechanism != "external" and not trusted:
            raise self._authFault(
                protocol, f"{mechanism} authentication needs a verified TLS peer ({protocol.untrusted})"
            )

    @inlineCallbacks
    def _hello(self, protocol: SMTPClientProtocol, name: str | None = None) -> Generator[Deferred[Any], Any, None]:
        r = yield protocol.hello(name or self.target.hostname)
        if r.code != 250:
            raise AttemptFailed(
                f"{'LHLO' if protocol.lmtp else 'EHLO/HELO'} refused: {r.code} {r.text}", stage="ehlo"
            )

    @inlineCallbacks
    def _xclient(self, protocol: SMTPClientProtocol, client: ClientSession) -> Generator[Deferred[Any], Any, None]:
        """
        XCLIENT with the attributes the downstream advertised, then EHLO
        again with the client's HELO name (an EHLO sets it anew): XCLIENT
        restarts the session as if C{client} had connected (a C{220}
        greeting).  It comes after STARTTLS, which it keeps, and before
        AUTH, which it would forget.  A downstream that does not advertise
        XCLIENT gets nothing.

        @raise AttemptFailed: the downstream refused XCLIENT.
        """
        lines = xclientCommands(client, advertised(protocol.capabilities.get("XCLIENT", "")))
        for line in lines:
            r = yield protocol.command(line)
            if r.code != 220:
                raise AttemptFailed(f"XCLIENT refused: {r.code} {r.text}", stage="xclient")
        if lines:
            helo = client.heloName or ""
            usable = helo.isascii() and helo.isprintable() and " " not in helo
            yield self._hello(protocol, helo if helo and usable else self.target.hostname)

    @inlineCallbacks
    def _authenticate(
        self, protocol: SMTPClientProtocol, credentials: Credentials | None, probe: bool
    ) -> Generator[Deferred[Any], Any, None]:
        auth = self.target.auth
        mechanism = auth.mechanism
        if mechanism == "off":
            return
        offered = protocol.capabilities.get("AUTH", "").upper().split()
        if mechanism == "forward":
            wire = "login" if "PLAIN" not in offered and "LOGIN" in offered else "plain"
        elif mechanism in ("plain", "login"):
            wire = mechanism
        else:
            wire = "external"
        if wire.upper() not in offered:
            raise self._authFault(protocol, f"{wire.upper()} authentication not offered")
        if mechanism == "forward":
            if probe:
                return  # the client's own credentials are not there to try
            if credentials is None:
                raise AttemptFailed("no client credentials to forward", stage="auth")
        elif mechanism in ("plain", "login"):
            assert auth.username is not None and auth.password is not None
            credentials = Credentials(auth.username, auth.password.reveal())
        r = yield protocol.authenticate(wire, credentials)
        if r.code == 235:
            return
        if mechanism == "forward":
            if r.permanent:
                # The client's own credentials: its verdict is the client's answer.
                raise DownstreamError(r, f"{wire.upper()} authentication refused by {protocol.peer}: {r.code}")
            raise AttemptFailed(f"{wire.upper()} authentication failed at {protocol.peer}: {r.code} {r.text}", stage="auth")
        raise self._authFault(protocol, f"{wire.upper()} authentication refused: {r.code} {r.text}")

    def _authFault(self, protocol: SMTPClientProtocol, reason: str) -> AttemptFailed:
        """
        The relay cannot authenticate at C{protocol}'s endpoint with its
        configuration: an error for the postmaster, and for the message a
        temporary failure (Postfix's C{smtp_sasl_auth_soft_bounce}).
        """
        self._log.error(
            "target {target}: cannot authenticate at {peer}: {reason}",
            target=self.target.name, peer=protocol.peer, reason=reason,
        )
        return AttemptFailed(f"{reason} at {protocol.peer}", stage="auth", auth=True)


_STAGES = {b"STARTTLS": "starttls", b"XCLIENT": "xclient", b"AUTH": "auth"}
"""The stage of a connection lost in reply to a command (else C{ehlo})."""


def _result(failure: AttemptFailed) -> str:
    """
    The C{result} label of C{smtprelay_downstream_attempts_total}.
    """
    if failure.dns:
        return "dns"
    if failure.auth:
        return "auth"
    if failure.noTLS:
        return "tls"
    if failure.backoff:
        return "connect_failed"
    return "failed"


class _OneConnection(Factory):
    """
    A client factory for one attempt, quiet: C{connectProtocol}'s factory
    logs two lines per connection, twice per relayed message.
    """

    noisy = False

    def __init__(self, protocol: SMTPClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> SMTPClientProtocol:
        return self._protocol
