"""
What the inbound engine needs to know of its listener, as plain frozen
values: L{SessionPolicy} for each session's rules, L{ConnectionLimits} and
L{RateLimits} for the factory.  The engine never reads the configuration
tree; C{smtprelay.app.listeners} builds these from a configured listener,
and the capture sink builds its own.

The defaults are the configuration's (docs/configuration.md), except
C{allow}, which is empty: an engine built without one relays for nobody.
"""

from __future__ import annotations

from typing import Literal

import attrs

from smtprelay.interfaces import ListenerKind
from smtprelay.net.address import IPNetwork


@attrs.frozen
class RateLimits:
    """
    Postfix anvil's limits per client address (or user, once it
    authenticated) in a window; 0 is no limit.

    @ivar window: the length of a window, in seconds.
    @ivar connections: new connections per client address.
    @ivar messages: C{MAIL} commands.
    @ivar recipients: C{RCPT} commands.
    """

    window: float = 60.0
    connections: int = 0
    messages: int = 0
    recipients: int = 0


@attrs.frozen
class ConnectionLimits:
    """
    How many sessions a listener holds, and whom its limits spare.

    @ivar maxConnections: sessions at once.
    @ivar maxConnectionsPerIP: sessions at once per client address.
    @ivar exceptions: clients exempt from C{maxConnectionsPerIP} and the
        rate limits.
    @ivar rates: the rate limits.
    """

    maxConnections: int = 500
    maxConnectionsPerIP: int = 50
    exceptions: tuple[IPNetwork, ...] = ()
    rates: RateLimits = RateLimits()


@attrs.frozen
class SessionPolicy:
    """
    The rules of every session of one listener.

    @ivar kind: C{smtp}, C{submission} (C{MAIL} needs AUTH or an C{allow}
        address) or C{lmtp} (LHLO, one reply per recipient); also the
        C{kind} label of the session metrics.
    @ivar allow: client networks that may relay without AUTH.
    @ivar auth: AUTH is offered (over TLS or a unix socket).
    @ivar requireTLS: C{MAIL} needs TLS (or a unix socket).
    @ivar maxLineLength: the longest body line accepted, CRLF included, or
        L{None} for lines of any length.
    @ivar bareLF: what a bare CR or LF in the body gets: C{reject} or
        C{normalize} (to CRLF).
    @ivar limits: the factory's connection and rate limits.
    """

    kind: ListenerKind
    allow: tuple[IPNetwork, ...] = ()
    auth: bool = False
    requireTLS: bool = False
    maxMessageSize: int = 32 * 1024 * 1024
    maxRecipients: int = 1000
    maxLineLength: int | None = None
    maxCommandLength: int = 2048
    maxErrors: int = 20
    maxAuthFailures: int = 3
    readTimeout: float = 300.0
    dataTimeout: float = 600.0
    maxHops: int = 50
    bareLF: Literal["reject", "normalize"] = "reject"
    limits: ConnectionLimits = ConnectionLimits()

    @property
    def lmtp(self) -> bool:
        return self.kind == "lmtp"
