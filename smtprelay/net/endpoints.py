"""
ADDRESS (C{tcp://}, C{tls://}, C{unix://}) → Twisted endpoints.

Client endpoints resolve host names without blocking the reactor and try
every address of a name (C{HostnameEndpoint}); an IP literal is connected to
directly, so that no resolver thread is started for it; C{tls://} wraps the
connection in TLS before the greeting (TCP_NODELAY is set by the client
protocol as soon as it is connected).  Server endpoints may share their
port between processes (C{SO_REUSEPORT}) for scale-out on one host.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import endpoints
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint, IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from smtprelay.net.address import Address


def clientEndpoint(reactor: Any, address: Address, timeout: float, tlsOptions: Any = None) -> Any:
    """
    A client endpoint for C{address}; C{tlsOptions} is used for C{tls://}.
    """
    if address.scheme == "unix":
        return endpoints.UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    endpoint: IStreamClientEndpoint
    if isIPAddress(address.host):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    elif isIPv6Address(address.host):
        endpoint = endpoints.TCP6ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    else:
        endpoint = endpoints.HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if address.scheme == "tls":
        return endpoints.wrapClientTLS(tlsOptions, endpoint)
    return endpoint


def serverEndpoint(reactor: Any, address: Address, tlsOptions: Any = None, reusePort: bool = False) -> IStreamServerEndpoint:
    """
    A server endpoint for a listener address; C{tls://} needs C{tlsOptions}.
    """
    if address.scheme == "unix":
        return endpoints.UNIXServerEndpoint(reactor, address.path)
    if reusePort:
        endpoint: IStreamServerEndpoint = _ReusePortEndpoint(reactor, address.host, address.port)
    elif _isIPv6(address.host):
        endpoint = endpoints.TCP6ServerEndpoint(reactor, address.port, interface=address.host)
    else:
        endpoint = endpoints.TCP4ServerEndpoint(reactor, address.port, backlog=511, interface=address.host)
    if address.scheme == "tls":
        return _TLSServerEndpoint(endpoint, tlsOptions)
    return endpoint


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    def __init__(self, wrapped: IStreamServerEndpoint, options: Any) -> None:
        self._wrapped = wrapped
        self._options = options

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        return self._wrapped.listen(TLSMemoryBIOFactory(self._options, False, factory))


@implementer(IStreamServerEndpoint)
class _ReusePortEndpoint:
    """
    Listen with C{SO_REUSEPORT} so that several processes share one port.
    """

    def __init__(self, reactor: Any, host: str, port: int) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        family = socket.AF_INET6 if _isIPv6(self._host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self._host, self._port))
            sock.listen(511)
            sock.setblocking(False)
            port = self._reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError:
            sock.close()
            return fail()
        sock.close()  # the reactor holds its own duplicate
        return succeed(port)


def _isIPv6(host: str) -> bool:
    return ":" in host
