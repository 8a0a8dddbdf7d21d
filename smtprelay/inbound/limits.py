"""
Connection limits of a listener: how many sessions it holds at once, in
all and per client address, and whom the per-address and rate limits
spare (C{limit_exceptions}); with the address rules they share
(L{inNetworks}, L{normalizeHost}).
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Sequence, TypeVar

from smtprelay.inbound.policy import ConnectionLimits, IPNetwork

_Session = TypeVar("_Session")


class ConnectionLimiter(Generic[_Session]):
    """
    The live sessions of one listener, admitted under its
    L{ConnectionLimits}.

    @ivar sessions: the sessions admitted and not yet released.
    """

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limits = limits
        self.sessions: set[_Session] = set()
        self._perHost: dict[str, int] = {}

    def isExempt(self, host: str) -> bool:
        """
        Whether C{host} (an IP address) is exempt from the per-address
        connection limit and the rate limits (C{limit_exceptions}).
        """
        return inNetworks(host, self._limits.exceptions)

    def admit(self, session: _Session, host: str) -> bool:
        """
        Count C{session} from C{host} (empty for a unix socket), unless the
        listener is full or C{host} has its share.

        @return: whether it was admitted.
        """
        if len(self.sessions) >= self._limits.maxConnections:
            return False
        if (host and self._perHost.get(host, 0) >= self._limits.maxConnectionsPerIP
                and not self.isExempt(host)):
            return False
        self.sessions.add(session)
        if host:
            self._perHost[host] = self._perHost.get(host, 0) + 1
        return True

    def release(self, session: _Session, host: str) -> None:
        """
        C{session}, admitted from C{host}, ended.
        """
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        if host and host in self._perHost:
            self._perHost[host] -= 1
            if not self._perHost[host]:
                del self._perHost[host]


def inNetworks(host: str, networks: Sequence[IPNetwork]) -> bool:
    """
    Whether C{host} (an IP address) is in one of C{networks}.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address.version == net.version and address in net for net in networks)


def normalizeHost(host: str) -> str:
    """
    An IPv4-mapped IPv6 address is its IPv4 address (for C{allow} and limits).
    """
    if host.startswith("::ffff:"):
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host
