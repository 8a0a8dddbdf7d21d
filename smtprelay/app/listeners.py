"""
A configured listener as the inbound engine sees it: the one place where a
C{config.model.Listener} becomes the plain policy values of
L{smtprelay.inbound.policy}.
"""

from __future__ import annotations

from smtprelay.config.model import Listener
from smtprelay.inbound.policy import ConnectionLimits, RateLimits, SessionPolicy


def sessionPolicy(listener: Listener) -> SessionPolicy:
    """
    The rules and limits of C{listener}'s sessions.
    """
    return SessionPolicy(
        kind=listener.kind,
        allow=listener.allow,
        auth=listener.auth.mode != "off",
        requireTLS=listener.requireTLS,
        maxMessageSize=listener.maxMessageSize,
        maxRecipients=listener.maxRecipients,
        maxLineLength=listener.maxLineLength,
        maxCommandLength=listener.maxCommandLength,
        maxErrors=listener.maxErrors,
        maxAuthFailures=listener.maxAuthFailures,
        readTimeout=listener.readTimeout,
        dataTimeout=listener.dataTimeout,
        maxHops=listener.maxHops,
        bareLF=listener.bareLF,
        limits=ConnectionLimits(
            maxConnections=listener.maxConnections,
            maxConnectionsPerIP=listener.maxConnectionsPerIP,
            exceptions=listener.limitExceptions,
            rates=RateLimits(
                window=listener.rateLimitWindow,
                connections=listener.maxConnectionRate,
                messages=listener.maxMessageRate,
                recipients=listener.maxRecipientRate,
            ),
        ),
    )
