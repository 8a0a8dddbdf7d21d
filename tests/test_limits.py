"""
Tests for L{smtprelay.inbound.limits}: sessions at once in all and per
client address, the exceptions, and the address rules.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.limits import ConnectionLimiter, inNetworks, normalizeHost
from smtprelay.inbound.policy import ConnectionLimits

NETS = (ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::/32"))


class ConnectionLimiterTests(SynchronousTestCase):
    def test_maxConnections(self) -> None:
        limiter: ConnectionLimiter[str] = ConnectionLimiter(ConnectionLimits(maxConnections=2))
        self.assertTrue(limiter.admit("a", "192.0.2.1"))
        self.assertTrue(limiter.admit("b", ""))
        self.assertFalse(limiter.admit("c", "192.0.2.2"))
        limiter.release("a", "192.0.2.1")
        self.assertTrue(limiter.admit("c", "192.0.2.2"))
        self.assertEqual(limiter.sessions, {"b", "c"})

    def test_perHost(self) -> None:
        """
        Each address has its share; unix sockets (no address) and the
        exceptions are not counted against it.
        """
        limiter: ConnectionLimiter[int] = ConnectionLimiter(
            ConnectionLimits(maxConnectionsPerIP=1, exceptions=NETS[:1]))
        self.assertTrue(limiter.admit(1, "198.51.100.1"))
        self.assertFalse(limiter.admit(2, "198.51.100.1"))
        self.assertTrue(limiter.admit(3, "198.51.100.2"))
        self.assertTrue(limiter.admit(4, ""))
        self.assertTrue(limiter.admit(5, ""))
        self.assertTrue(limiter.admit(6, "192.0.2.1"))
        self.assertTrue(limiter.admit(7, "192.0.2.1"))
        limiter.release(1, "198.51.100.1")
        limiter.release(1, "198.51.100.1")
        self.assertTrue(limiter.admit(2, "198.51.100.1"))
        self.assertFalse(limiter.admit(8, "198.51.100.1"))

    def test_exempt(self) -> None:
        limiter: ConnectionLimiter[int] = ConnectionLimiter(ConnectionLimits(exceptions=NETS))
        self.assertTrue(limiter.isExempt("2001:db8::1"))
        self.assertFalse(limiter.isExempt("198.51.100.1"))
        self.assertFalse(limiter.isExempt(""))


class AddressTests(SynchronousTestCase):
    def test_inNetworks(self) -> None:
        self.assertTrue(inNetworks("192.0.2.9", NETS))
        self.assertTrue(inNetworks("2001:db8::9", NETS))
        self.assertFalse(inNetworks("198.51.100.1", NETS))
        self.assertFalse(inNetworks("not an address", NETS))
        self.assertFalse(inNetworks("192.0.2.9", ()))

    def test_normalizeHost(self) -> None:
        self.assertEqual(normalizeHost("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(normalizeHost("2001:db8::1"), "2001:db8::1")
        self.assertEqual(normalizeHost("::ffff:zz"), "::ffff:zz")
