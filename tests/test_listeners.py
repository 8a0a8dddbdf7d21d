"""
Tests for L{smtprelay.app.listeners}: a configured listener becomes the
inbound engine's plain policy values, field for field.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app.listeners import sessionPolicy
from smtprelay.config.model import Address, Listener, ListenerAuth, Target
from smtprelay.inbound.policy import ConnectionLimits, RateLimits, SessionPolicy

ADDRESSES = (Address("tcp", "127.0.0.1", 2525),)
TARGET = Target("t", "smtp", (Address("tcp", "127.0.0.1", 2526),))
NET = (ipaddress.ip_network("192.0.2.0/24"),)
OTHER = (ipaddress.ip_network("198.51.100.0/24"),)


class SessionPolicyTests(SynchronousTestCase):
    def test_everyField(self) -> None:
        """
        Each directive the engine obeys reaches its policy value.
        """
        listener = Listener(
            kind="submission", addresses=ADDRESSES, deliverTo=TARGET, allow=NET,
            auth=ListenerAuth("users", "/etc/users"), requireTLS=True, maxMessageSize=1000,
            maxRecipients=7, maxLineLength=998, maxCommandLength=512, maxConnections=9,
            maxConnectionsPerIP=3, maxErrors=4, maxAuthFailures=2, readTimeout=11.0,
            dataTimeout=12.0, maxHops=13, bareLF="normalize", limitExceptions=OTHER,
            rateLimitWindow=14.0, maxConnectionRate=15, maxMessageRate=16, maxRecipientRate=17,
        )
        self.assertEqual(sessionPolicy(listener), SessionPolicy(
            kind="submission", allow=NET, auth=True, requireTLS=True, maxMessageSize=1000,
            maxRecipients=7, maxLineLength=998, maxCommandLength=512, maxErrors=4,
            maxAuthFailures=2, readTimeout=11.0, dataTimeout=12.0, maxHops=13, bareLF="normalize",
            limits=ConnectionLimits(
                maxConnections=9, maxConnectionsPerIP=3, exceptions=OTHER,
                rates=RateLimits(window=14.0, connections=15, messages=16, recipients=17),
            ),
        ))

    def test_authModes(self) -> None:
        for mode, offered in (("off", False), ("forward", True), ("users", True)):
            with self.subTest(mode):
                listener = Listener(kind="smtp", addresses=ADDRESSES, deliverTo=TARGET,
                                    auth=ListenerAuth(mode))  # type: ignore[arg-type]  # mode is one of the Literal's values
                self.assertEqual(sessionPolicy(listener).auth, offered)

    def test_defaultsAgree(self) -> None:
        """
        The policy's defaults are the directives' defaults (but C{allow},
        empty unless given), so that an engine built without configuration
        (the sink) behaves as a default listener.
        """
        listener = Listener(kind="lmtp", addresses=ADDRESSES, deliverTo=TARGET, allow=())
        self.assertEqual(sessionPolicy(listener), SessionPolicy(kind="lmtp"))
        self.assertTrue(SessionPolicy(kind="lmtp").lmtp)
