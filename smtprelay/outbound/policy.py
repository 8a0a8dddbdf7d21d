"""
What the outbound engine needs to know about a target, as plain values.

L{smtprelay.app.targets} builds these from the configuration; the client
protocol (L{ClientPolicy}) and the handshake (L{HandshakePolicy}) read
nothing else, so that they never see the configuration tree.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import attrs
from OpenSSL import SSL

from smtprelay.interfaces import Credentials


class ClientTLSOptions(Protocol):
    """
    Client TLS options (an C{IOpenSSLClientConnectionCreator}) that judge
    the peer after the handshake (L{smtprelay.net.tls.ClientOptions}).
    """

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new OpenSSL connection for C{tlsProtocol}.
        """

    def verify(self, connection: SSL.Connection) -> str | None:
        """
        None when the peer of C{connection} is verified, else a log-safe
        reason why not.
        """


@attrs.frozen
class ClientPolicy:
    """
    How one downstream connection talks (L{smtprelay.outbound.client}).

    @ivar name: the target's name.
    @ivar lmtp: the target speaks LMTP (C{LHLO}, one reply per recipient).
    @ivar hostname: our name in EHLO/LHLO.
    @ivar commandTimeout: seconds to wait for a reply.
    @ivar submissionTimeout: seconds to wait for the reply to the
        end-of-data.
    @ivar dataTimeout: seconds the body may stall in our write buffer.
    @ivar chunking: send the body as BDAT chunks when the downstream offers
        CHUNKING and PIPELINING.
    @ivar forwardClientInfo: pass the client's identity on (C{xforward}
        before each MAIL, C{xclient} once per connection), or C{off}.
    @ivar debug: trace the protocol (secrets as C{****}).
    """

    name: str
    lmtp: bool = False
    hostname: str = "localhost"
    commandTimeout: float = 300.0
    submissionTimeout: float = 720.0
    dataTimeout: float = 180.0
    chunking: bool = True
    forwardClientInfo: Literal["off", "xforward", "xclient"] = "off"
    debug: bool = False


@attrs.frozen
class HandshakePolicy:
    """
    The steps before a transaction on a new connection
    (L{smtprelay.outbound.handshake}).

    @ivar connectTimeout: seconds a connection may take.
    @ivar attemptStartTLS: use STARTTLS when offered.
    @ivar requireTLS: only a verified TLS peer will do.
    @ivar insecureSkipVerify: any TLS peer counts as verified.
    @ivar auth: C{off}, C{plain}, C{login}, C{forward} (the client's own
        credentials) or C{external}.
    @ivar credentials: the relay's own, for C{plain} and C{login}.
    """

    connectTimeout: float = 300.0
    attemptStartTLS: bool = True
    requireTLS: bool = False
    insecureSkipVerify: bool = False
    auth: Literal["off", "plain", "login", "forward", "external"] = "off"
    credentials: Credentials | None = None

    @property
    def needsTLS(self) -> bool:
        """
        Whether the target may only be used over TLS: C{require_tls}, or
        any authentication.
        """
        return self.requireTLS or self.auth != "off"
