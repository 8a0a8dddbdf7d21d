"""
The server factory of one listener: builds an L{SMTPServerProtocol} per
client connection, holds what its sessions share (policy, greeting, rate
limits, metrics) and admits them under its connection limits.
"""

from __future__ import annotations

import base64
import os
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ServerFactory

from smtprelay.inbound.limits import ConnectionLimiter, inNetworks
from smtprelay.inbound.policy import SessionPolicy
from smtprelay.inbound.ratelimit import ListenerRates
from smtprelay.inbound.session import SMTPServerProtocol
from smtprelay.interfaces import ClientSession, IRelayHandler
from smtprelay.observe.metrics import IMetrics, NullMetrics
from smtprelay.protocol.replies import reply


def randomSessionId() -> str:
    """
    Return a short unique session id: ten base32 characters (50 random bits).
    """
    return base64.b32encode(os.urandom(10)).decode("ascii")[:10]


class SMTPServerFactory(ServerFactory):
    """
    Build L{SMTPServerProtocol}s for one listener and track its sessions.

    @ivar greeting: the wire bytes of our C{220} greeting.
    @ivar newSessionId: makes session ids (replace it in tests).
    @ivar rates: the listener's rate limits, counted on C{reactor}'s clock.
    """

    protocol = SMTPServerProtocol

    def __init__(
        self,
        policy: SessionPolicy,
        handlerFactory: Callable[[ClientSession], IRelayHandler],
        hostname: str,
        reactor: IReactorTime,
        tlsOptions: Any | None = None,
        greetingToken: str = "",
        metrics: IMetrics | None = None,
    ) -> None:
        """
        @param policy: the rules and limits of this listener's sessions.
        @param handlerFactory: makes the handler of each client session.
        @param hostname: our name, in the greeting and EHLO reply.
        @param reactor: the clock for timeouts.
        @param tlsOptions: an C{IOpenSSLServerConnectionCreator} to offer
            STARTTLS with, or L{None}.
        @param greetingToken: the loop token shown in the greeting (loop detection).
        @param metrics: where sessions, TLS handshakes and local refusals
            are counted.
        """
        self.policy = policy
        self.handlerFactory = handlerFactory
        self.hostname = hostname
        self.reactor = reactor
        self.tlsOptions = tlsOptions
        self.greetingToken = greetingToken
        self.metrics: IMetrics = metrics if metrics is not None else NullMetrics()
        self.newSessionId: Callable[[], str] = randomSessionId
        self.limiter: ConnectionLimiter[SMTPServerProtocol] = ConnectionLimiter(policy.limits)
        self.rates = ListenerRates(policy.limits.rates, reactor, self.limiter.isExempt)
        kind = "LMTP" if policy.lmtp else "ESMTP"
        text = f"{hostname} {kind} smtprelay {greetingToken}".rstrip()
        self.greeting = reply(220, None, text).toBytes()

    @property
    def sessions(self) -> set[SMTPServerProtocol]:
        """
        The live sessions (for a graceful shutdown).
        """
        return self.limiter.sessions

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        return SMTPServerProtocol(self)

    def isAllowed(self, host: str) -> bool:
        """
        Whether C{host} (an IP address) is in the listener's C{allow} list.
        """
        return inNetworks(host, self.policy.allow)
