"""
The steps before a transaction on one downstream connection: the greeting,
EHLO/LHLO (learning the capabilities), STARTTLS and the judgement of the
peer after its handshake, AUTH.

L{smtprelay.outbound.handshake.Handshake} drives them in order; each
fires with the downstream's reply and leaves the decision to it.
"""

from __future__ import annotations

import base64

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from smtprelay.net.address import Address
from smtprelay.interfaces import Credentials, TLSInfo
from smtprelay.net.tlsinfo import readTLSInfo, sslConnection
from smtprelay.outbound.pipeline import AUTH, CommandPipeline, classes
from smtprelay.outbound.policy import ClientPolicy, ClientTLSOptions
from smtprelay.protocol import replies
from smtprelay.protocol.replies import Reply


class TLSFailed(Exception):
    """
    STARTTLS did not give a usable TLS connection; the connection is
    closed.

    @ivar reason: log-safe description.
    @ivar retryPlain: the handshake failed or timed out (the peer may be
        tried again without STARTTLS), rather than data being injected
        after the C{220}.
    """

    def __init__(self, reason: str, retryPlain: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryPlain = retryPlain


def parseCapabilities(ehlo: Reply) -> dict[str, str]:
    """
    EHLO/LHLO reply → upper-cased keyword → its arguments (the first line is
    the server's name, not a capability).
    """
    caps: dict[str, str] = {}
    for line in ehlo.lines[1:]:
        keyword, _, args = line.strip().partition(" ")
        if keyword:
            caps[keyword.upper()] = args.strip()
    return caps


@implementer(IHandshakeListener)
class Preamble(CommandPipeline):
    """
    A downstream connection up to its first transaction.

    @param address: the endpoint connected to; once connected, L{peer}
        names it with the peer's IP address (C{host[ip]:port}).
    @param tlsOptions: the options of implicit TLS (C{tls://}), which
        judge the peer after the handshake.

    @ivar policy: how the connection talks.
    @ivar lmtp: it speaks LMTP.
    @ivar greeting: fires with the greeting reply.
    @ivar tls: the TLS of this connection once its handshake is complete.
    @ivar untrusted: why the TLS peer is not verified, or None.
    @ivar tlsFailed: the connection was lost to a TLS error.
    @ivar connectedAt: when the connection was opened (C{clock} seconds).
    """

    def __init__(
        self,
        policy: ClientPolicy,
        clock: IReactorTime,
        peer: str = "",
        address: Address | None = None,
        tlsOptions: ClientTLSOptions | None = None,
    ) -> None:
        super().__init__(clock, policy.commandTimeout, peer or str(address or ""), policy.debug)
        self.policy = policy
        self.lmtp = policy.lmtp
        self.tls: TLSInfo | None = None
        self._tlsOptions = tlsOptions
        self.untrusted: str | None = None
        self.tlsFailed = False
        self.greeting: Deferred[Reply] = Deferred()
        self.address = address
        self.connectedAt = clock.seconds()
        self._handshake: Deferred[None] | None = None
        self._waiting.append((self.greeting, classes(2, 4, 5)))

    def connectionMade(self) -> None:
        address = self.address
        if address is not None:
            if address.scheme == "unix":
                self.peer = address.path
            else:
                ip = getattr(self.transport.getPeer(), "host", "?")  # type: ignore[union-attr]  # connected: a transport
                host = f"[{address.host}]" if ":" in address.host else address.host
                self.peer = f"{host}[{ip}]:{address.port}"
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(TLSFailed(f"TLS handshake with {self.peer} failed", retryPlain=True))

    def _lost(self, reason: Failure | None) -> None:
        if reason is not None and reason.check(SSL.Error):
            self.tlsFailed = True

    def hello(self, name: str) -> Deferred[Reply]:
        """
        EHLO (falling back to HELO on 500/502) or LHLO; learn the
        capabilities.  Fires with the final reply, whatever its code.
        """
        verb = b"LHLO " if self.lmtp else b"EHLO "
        encoded = name.encode("ascii")

        def learned(r: Reply) -> Reply | Deferred[Reply]:
            if r.code == 250:
                self.capabilities = parseCapabilities(r)
            elif not self.lmtp and r.code in (500, 502):
                return self.command(b"HELO " + encoded)
            return r

        self.capabilities = {}
        return self.command(verb + encoded).addCallback(learned)

    def startTLS(self, options: ClientTLSOptions) -> Deferred[Reply]:
        """
        STARTTLS, then the handshake.  Fires with the STARTTLS reply: C{220}
        once the handshake succeeded, whether the peer could be verified or
        not (see L{tls}; the capabilities are then forgotten: say EHLO
        again), anything else when the server refused (the connection stays
        usable in plain text).

        Bytes that arrive after the 220 and before the handshake are an
        injection attempt (or a confused server): abort.

        @raise TLSFailed: the handshake failed or timed out
            (C{retryPlain}), or data was injected.
        """

        def ready(r: Reply) -> Reply | Deferred[Reply]:
            if r.code != 220:
                return r
            if self._lines or self.clearLineBuffer():
                self._abortWith(replies.DOWNSTREAM_LOST, f"data injected after STARTTLS by {self.peer}")
                raise TLSFailed(f"data injected after STARTTLS by {self.peer}", retryPlain=False)
            handshake: Deferred[None] = Deferred()
            self._handshake = handshake
            self.capabilities = {}
            self._tlsOptions = options
            self._armTimer()
            self.transport.startTLS(options)  # type: ignore[union-attr]  # connected: an ITLSTransport
            return handshake.addCallback(lambda _: r)

        return self.command(b"STARTTLS").addCallback(ready)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake (STARTTLS or implicit TLS) succeeded: judge the
        peer (L{tls}, L{untrusted}).
        """
        connection = sslConnection(self.transport)
        if connection is None or self._tlsOptions is None:
            self.untrusted = "no certificate to check"
            self.tls = TLSInfo("unknown", "unknown")
        else:
            self.untrusted = self._tlsOptions.verify(connection)
            self.tls = readTLSInfo(self.transport, verified=self.untrusted is None)
        if self._handshake is not None:
            if not self._waiting:
                self._cancelTimer()
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def authenticate(self, mechanism: str, credentials: Credentials | None) -> Deferred[Reply]:
        """
        AUTH PLAIN (with an initial response), LOGIN (C{credentials}) or
        EXTERNAL.  Fires with the final reply, whatever its code.
        """
        if mechanism == "external":
            return self.command(b"AUTH EXTERNAL =", AUTH)
        assert credentials is not None
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if mechanism == "plain":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            return self.command(b"AUTH PLAIN " + token, AUTH, secret=True)

        def step(r: Reply, answer: bytes) -> Reply | Deferred[Reply]:
            if r.code != 334:
                return r
            return self.command(base64.b64encode(answer), AUTH, secret=True)

        d = self.command(b"AUTH LOGIN", AUTH)
        d.addCallback(step, user)
        d.addCallback(step, password)
        return d
