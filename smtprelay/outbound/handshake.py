"""
The steps before a transaction on a new downstream connection.

L{Handshake.open} connects to one endpoint of a target and takes the
connection through the greeting C{220}, EHLO/LHLO, STARTTLS and the
judgement of the peer (when configured or offered), XCLIENT (under
C{forward_client_info xclient}) and AUTH (when configured).  A step that
fails raises L{AttemptFailed}, which tells the failover to try the next
endpoint, and how the step failed; a target that greets with our own loop
token raises L{LoopDetected}; the downstream's permanent verdict on the
client's own credentials (C{auth forward}) is a L{DownstreamError}, the
client's answer.  A completed connection is kept whether its TLS peer could
be verified or not; C{require_tls} and a password need a verified peer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from smtprelay.net.address import Address
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.outbound.client import SMTPClientProtocol
from smtprelay.outbound.clientinfo import advertised, xclientCommands
from smtprelay.outbound.policy import ClientPolicy, ClientTLSOptions, HandshakePolicy
from smtprelay.outbound.preamble import TLSFailed

EndpointFactory = Callable[[Address, float, Any], IStreamClientEndpoint]
"""C{(endpoint, connectTimeout, tlsOptions or None) → client endpoint}."""

TLSOptionsFactory = Callable[[str], ClientTLSOptions]
"""C{host name → client TLS options} for that host."""


class AttemptFailed(Exception):
    """
    A step before the transaction failed: the failover tries the next
    endpoint.

    @ivar reason: log-safe description.
    @ivar backoff: the endpoint is unreachable (connect or greeting failed);
        let it rest.
    @ivar noTLS: the endpoint could not give TLS (for C{require_tls}).
    @ivar retryPlain: a TLS handshake failed; with C{attempt_starttls} and
        without C{require_tls} the same endpoint is retried on a new
        connection without STARTTLS.
    @ivar dns: the endpoint's name did not resolve.
    @ivar auth: the relay could not authenticate there with its own
        configuration: its credentials were refused, the mechanism is not
        offered, or no verified TLS carries the password.  A fault of the
        relay's configuration, never the message's: a temporary failure.
    @ivar stage: the step that failed, for logs: C{connect}, C{greeting},
        C{tls} (implicit TLS), C{ehlo}, C{starttls}, C{xclient} or C{auth}.
    """

    def __init__(
        self,
        reason: str,
        *,
        stage: str = "",
        backoff: bool = False,
        noTLS: bool = False,
        retryPlain: bool = False,
        dns: bool = False,
        auth: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.backoff = backoff
        self.noTLS = noTLS
        self.retryPlain = retryPlain
        self.dns = dns
        self.auth = auth

    @property
    def result(self) -> str:
        """
        The C{result} label of C{smtprelay_downstream_attempts_total}.
        """
        if self.dns:
            return "dns"
        if self.auth:
            return "auth"
        if self.noTLS:
            return "tls"
        if self.backoff:
            return "connect_failed"
        return "failed"


class LoopDetected(Exception):
    """
    The endpoint greeted with our own loop token: it is ourselves.
    """


class Handshake:
    """
    The steps before a transaction, for the endpoints of one target.  One
    instance per target is shared by all sessions, so that the TLS
    contexts are shared too.

    @param name: the target's name, for logs.
    @param client: how the connections talk.
    @param policy: TLS and authentication.
    @param clock: timeouts.
    @param endpointFactory: makes the client endpoint of an address.
    @param tlsOptions: makes the client TLS options for a host name
        (called once per host).
    @param loopToken: our greeting's loop token; a target that greets with
        it is ourselves.
    """

    _log = Logger()

    def __init__(
        self,
        name: str,
        client: ClientPolicy,
        policy: HandshakePolicy,
        clock: IReactorTime,
        endpointFactory: EndpointFactory,
        tlsOptions: TLSOptionsFactory,
        loopToken: str = "",
        metrics: IMetrics | None = None,
    ) -> None:
        self.name = name
        self.client = client
        self.policy = policy
        self._clock = clock
        self._endpointFactory = endpointFactory
        self._tlsOptionsFor = tlsOptions
        self._tlsOptions: dict[str, ClientTLSOptions] = {}
        self._loopToken = loopToken
        self._metrics: IMetrics = metrics if metrics is not None else NullMetrics()

    def retriesPlain(self, address: Address, failure: AttemptFailed) -> bool:
        """
        Whether a connection that failed so is tried again without STARTTLS
        (the seed's rule: a failed handshake, when neither C{require_tls}
        nor a password needs TLS).
        """
        return failure.retryPlain and not self.policy.needsTLS and address.scheme == "tcp"

    def open(
        self,
        address: Address,
        starttls: bool = True,
        credentials: Credentials | None = None,
        client: ClientSession | None = None,
        probe: bool = False,
    ) -> Deferred[SMTPClientProtocol]:
        """
        One connection to C{address}, up to (not including) MAIL.

        @param starttls: STARTTLS may be used (false on the seed rule's
            retry after a failed handshake).
        @param credentials: the client's own, for C{auth forward}.
        @param client: whose identity XCLIENT gives, under
            C{forward_client_info xclient}.
        @param probe: a readiness probe, not a transaction: its TLS line is
            debug, and C{auth forward} stops before AUTH.
        @raise AttemptFailed: a step failed; try the next endpoint.
        @raise LoopDetected: the endpoint is ourselves.
        @raise DownstreamError: the downstream refused the client's own
            credentials for good.
        """
        return self._open(address, starttls, credentials, client, probe)

    def _options(self, address: Address) -> ClientTLSOptions:
        """
        The client TLS options for C{address}, built once per host name.
        """
        options = self._tlsOptions.get(address.host)
        if options is None:
            options = self._tlsOptions[address.host] = self._tlsOptionsFor(address.host)
        return options

    @inlineCallbacks
    def _connect(self, address: Address, protocol: SMTPClientProtocol, options: Any) -> Generator[Deferred[Any], Any, None]:
        timeout = self.policy.connectTimeout
        endpoint = self._endpointFactory(address, timeout, options)
        connecting = endpoint.connect(_OneConnection(protocol))
        timer = self._clock.callLater(timeout, connecting.cancel)
        try:
            yield connecting
        except DNSLookupError:
            raise AttemptFailed(f"cannot resolve {address.host}", stage="connect", backoff=True, dns=True)
        except Exception as e:  # noqa: BLE001 - any connect failure means "next target"
            raise AttemptFailed(f"connect failed: {type(e).__name__}: {e}", stage="connect", backoff=True)
        finally:
            if timer.active():
                timer.cancel()

    @inlineCallbacks
    def _open(
        self,
        address: Address,
        starttls: bool,
        credentials: Credentials | None,
        client: ClientSession | None,
        probe: bool,
    ) -> Generator[Deferred[Any], Any, SMTPClientProtocol]:
        policy = self.policy
        options = self._options(address) if address.scheme == "tls" else None
        protocol = SMTPClientProtocol(self.client, self._clock, address=address, tlsOptions=options)
        yield self._connect(address, protocol, options)
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
            raise LoopDetected()
        if greeting.code != 220:
            protocol.quit()
            raise AttemptFailed(f"greeting {greeting.code} {greeting.text}", stage="greeting", backoff=True)
        try:
            yield self._hello(protocol)
            wantTLS = policy.attemptStartTLS or policy.needsTLS
            offered = "STARTTLS" in protocol.capabilities
            if address.scheme == "tcp" and starttls and wantTLS and offered:
                try:
                    started = yield protocol.startTLS(self._options(address))
                except TLSFailed as e:
                    raise AttemptFailed(e.reason, stage="starttls", noTLS=True, retryPlain=e.retryPlain)
                if started.code == 220:
                    yield self._hello(protocol)
                elif policy.needsTLS:
                    raise AttemptFailed(
                        f"STARTTLS refused: {started.code} {started.text}", stage="starttls", noTLS=True
                    )
            self._judgeTLS(protocol, probe)
            if client is not None and self.client.forwardClientInfo == "xclient":
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
        policy = self.policy
        tls = protocol.tls
        if tls is not None:
            self._metrics.tlsHandshake("outbound", True, tls.verified)
            (self._log.debug if probe else self._log.info)(
                "{trust} TLS connection established to {peer}: {tls}{why}",
                trust="Verified" if tls.verified else "Untrusted",
                peer=protocol.peer, tls=tls.description,
                why="" if tls.verified else f" ({protocol.untrusted})",
            )
        trusted = tls is not None and (tls.verified or policy.insecureSkipVerify)
        if policy.requireTLS and not trusted:
            raise AttemptFailed(
                "no TLS available" if tls is None else f"TLS peer not verified: {protocol.untrusted}",
                stage="starttls",
                noTLS=True,
            )
        mechanism = policy.auth
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
        r = yield protocol.hello(name or self.client.hostname)
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
            yield self._hello(protocol, helo if helo and usable else self.client.hostname)

    @inlineCallbacks
    def _authenticate(
        self, protocol: SMTPClientProtocol, credentials: Credentials | None, probe: bool
    ) -> Generator[Deferred[Any], Any, None]:
        mechanism = self.policy.auth
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
            credentials = self.policy.credentials
            assert credentials is not None
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
            target=self.name, peer=protocol.peer, reason=reason,
        )
        return AttemptFailed(f"{reason} at {protocol.peer}", stage="auth", auth=True)


_STAGES = {b"STARTTLS": "starttls", b"XCLIENT": "xclient", b"AUTH": "auth"}
"""The stage of a connection lost in reply to a command (else C{ehlo})."""


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
