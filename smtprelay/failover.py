"""
Choosing a target (SPEC §4.4): ordered failover with back-off.

L{Failover.open} tries the endpoints of one target in their configured order
until one completes the steps before the transaction: connect, greeting
220, EHLO/LHLO, STARTTLS and verification (when configured), AUTH (when
configured) and, if asked, MAIL.  A temporary or connection-level failure at
any step moves on to the next endpoint; a failed TLS handshake is retried
on a new connection without STARTTLS unless C{require_tls}.  Endpoints that
could not be reached rest for C{backoff} seconds so that a message does not
wait for a dead first endpoint each time; the configured order returns as
soon as they recover.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import DNSLookupError
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import replies
from .client import AttemptFailed, SMTPClientProtocol
from .config.model import Address, Target
from .endpoints import clientEndpoint
from .interfaces import Credentials, DownstreamError, Params
from .tls import clientOptions

_PLAINTEXT_AUTH = ("plain", "login", "forward")


class _NoTLS(AttemptFailed):
    """
    The target could not give TLS (not offered, refused or failed).
    """


class _Loop(Exception):
    pass


class Failover:
    """
    The endpoints of one target, tried in order.  One instance per target is
    shared by all sessions, so that back-off is shared too.

    @param loopToken: our greeting's token (SPEC §4.4); a target that
        greets with it is ourselves.
    """

    _log = Logger()

    def __init__(self, target: Target, reactor: Any, loopToken: str = "", clock: Any = None) -> None:
        self.target = target
        self._reactor = reactor
        self._clock = clock or reactor
        self._loopToken = loopToken
        self._restingUntil: dict[Address, float] = {}
        self._tlsOptions: dict[str, Any] = {}

    def order(self) -> list[Address]:
        """
        The endpoints to try now: those not resting, in configured order;
        if all rest, all of them.
        """
        now = self._clock.seconds()
        awake = [a for a in self.target.endpoints if self._restingUntil.get(a, 0) <= now]
        return awake or list(self.target.endpoints)

    @inlineCallbacks
    def open(self, credentials: Credentials | None = None,
             mail: tuple[bytes, Params] | None = None) -> Any:
        """
        Fire with C{(session, MAIL reply or None)} from the first endpoint
        that completes the steps; fail with L{DownstreamError}.
        """
        reasons: list[str] = []
        failures: list[Failure] = []
        noTLS = True
        for address in self.order():
            for starttls in (True, False):
                try:
                    session = yield self._attempt(address, starttls, credentials)
                except _Loop:
                    raise DownstreamError(replies.LOOP, f"{address} greets with our own token")
                except DownstreamError as e:
                    if e.reply.permanent:
                        raise  # AUTH refused: the downstream's verdict, not a fault
                    reasons.append(f"{address}: {e.reason}")
                    noTLS = False
                    break
                except AttemptFailed as e:
                    reasons.append(f"{address}: {e.reason}")
                    failures.append(Failure())
                    noTLS = noTLS and isinstance(e, _NoTLS)
                    if e.tls and starttls and not self.target.requireTLS and address.scheme == "tcp":
                        continue  # seed rule: retry this target without STARTTLS
                    break
                except Exception as e:
                    reasons.append(f"{address}: {_describe(e)}")
                    failures.append(Failure())
                    noTLS = False
                    self._rest(address)
                    break
                if mail is None:
                    self._restingUntil.pop(address, None)
                    return (session, None)
                try:
                    reply = yield session.mail(*mail)
                except DownstreamError as e:
                    reasons.append(f"{address}: MAIL: {e.reason}")
                    noTLS = False
                    break
                if reply.transient:
                    reasons.append(f"{address}: MAIL: {reply.code} {reply.text}")
                    session.quit()
                    noTLS = False
                    break
                self._restingUntil.pop(address, None)
                return (session, reply)
        self._log.warn(
            "target {target}: no endpoint available: {reasons}",
            target=self.target.name, reasons="; ".join(reasons),
        )
        if failures and all(f.check(DNSLookupError) for f in failures):
            raise DownstreamError(replies.DOWNSTREAM_DNS, "; ".join(reasons))
        if self.target.requireTLS and noTLS and reasons:
            raise DownstreamError(replies.DOWNSTREAM_NO_TLS, "; ".join(reasons))
        raise DownstreamError(replies.NO_DOWNSTREAM, "; ".join(reasons) or "no endpoints")

    def _rest(self, address: Address) -> None:
        if self.target.backoff > 0:
            self._restingUntil[address] = self._clock.seconds() + self.target.backoff

    def _options(self, host: str) -> Any:
        if host not in self._tlsOptions:
            self._tlsOptions[host] = clientOptions(self.target.tlsClient, host)
        return self._tlsOptions[host]

    @inlineCallbacks
    def _attempt(self, address: Address, starttls: bool, credentials: Credentials | None) -> Any:
        """
        One connection to C{address} up to (not including) MAIL.
        """
        target = self.target
        implicit = address.scheme == "tls"
        endpoint = clientEndpoint(
            self._reactor, address, target.connectTimeout,
            self._options(address.host) if implicit else None,
        )
        protocol = SMTPClientProtocol(target, self._clock, peer=str(address))
        yield connectProtocol(endpoint, protocol)
        peer = protocol.transport.getPeer()  # type: ignore[union-attr]
        if address.scheme != "unix":
            protocol.peer = f"{address.host}[{getattr(peer, 'host', '?')}]:{address.port}"
        try:
            greeting = yield protocol.greeting
        except DownstreamError as e:
            self._rest(address)
            raise AttemptFailed(f"no greeting: {e.reason}", tls=implicit)
        if self._loopToken and self._loopToken in greeting.text.split():
            protocol.abort()
            raise _Loop()
        if greeting.code != 220:
            protocol.quit()
            self._rest(address)
            raise AttemptFailed(f"greeting {greeting.code} {greeting.text}")
        handshaking = False
        try:
            yield protocol.hello(target.hostname)
            if not implicit:
                wantTLS = starttls and (target.attemptStartTLS or target.requireTLS)
                if wantTLS and "STARTTLS" in protocol.capabilities:
                    handshaking = True
                    try:
                        yield protocol.startTLS(self._options(address.host))
                    except AttemptFailed as e:
                        if target.requireTLS or e.tls:
                            raise _NoTLS(e.reason, tls=e.tls)
                    else:
                        yield protocol.hello(target.hostname)
                    handshaking = False
                if target.requireTLS and protocol.tls is None:
                    raise _NoTLS("STARTTLS not available")
            yield self._authenticate(protocol, credentials)
        except DownstreamError as e:
            protocol.abort()
            if e.reply.permanent and e.reply not in _LOCAL:
                raise
            raise AttemptFailed(e.reason, tls=handshaking)
        except AttemptFailed:
            protocol.abort()
            raise
        return protocol

    @inlineCallbacks
    def _authenticate(self, protocol: SMTPClientProtocol, credentials: Credentials | None) -> Any:
        mechanism = self.target.auth.mechanism
        if mechanism == "off":
            return None
        if protocol.tls is None:
            raise _NoTLS(f"AUTH {mechanism} needs TLS, which {protocol.peer} did not give")
        if mechanism == "forward":
            if credentials is None:
                raise AttemptFailed("auth forward without client credentials")
        elif mechanism in ("plain", "login"):
            auth = self.target.auth
            assert auth.username is not None and auth.password is not None
            credentials = Credentials(auth.username, auth.password.reveal())
        wire = "plain" if mechanism == "forward" else mechanism
        if wire != "external" and wire.upper() not in protocol.capabilities.get("AUTH", "").upper().split():
            if mechanism == "forward" and "LOGIN" in protocol.capabilities.get("AUTH", "").upper().split():
                wire = "login"
        reply = yield protocol.authenticate(wire, credentials)
        if reply.code == 235:
            return reply
        if reply.permanent:
            raise DownstreamError(reply, f"AUTH refused by {protocol.peer}: {reply.code}")
        raise AttemptFailed(f"AUTH failed at {protocol.peer}: {reply.code} {reply.text}")


_LOCAL = frozenset({replies.DOWNSTREAM_LOST, replies.DOWNSTREAM_CONFUSED})


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"

