"""
Tests for L{smtprelay.net.endpoints}: ADDRESS → client and server endpoints.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet._resolver import HostResolution
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from smtprelay.app.tls import clientOptions
from smtprelay.config.model import Address, ClientTLS
from smtprelay.net.endpoints import clientEndpoint, serverEndpoint
from tests.test_tls import Loopback, makeTarget

reactor: Any = _reactor


@implementer(IHostnameResolver)
class RecordingResolver:
    """
    Resolves every name to the addresses given, and remembers the names.
    """

    def __init__(self, *addresses: Any) -> None:
        self.names: list[str] = []
        self._addresses = addresses

    def resolveHostName(  # type: ignore[override]  # a fake resolver, typed as loosely as HostnameEndpoint calls it
        self, receiver: Any, hostName: str, portNumber: int = 0, **kw: Any
    ) -> Any:
        self.names.append(hostName)
        receiver.resolutionBegan(HostResolution(hostName))
        for address in self._addresses:
            receiver.addressResolved(type(address)("TCP", address.host, portNumber))
        receiver.resolutionComplete()
        return HostResolution(hostName)


class ClientEndpointTests(SynchronousTestCase):
    def connect(self, address: Address, options: Any = None, *resolved: Any) -> MemoryReactorClock:
        memory = MemoryReactorClock()
        self.resolver = RecordingResolver(*(resolved or (IPv4Address("TCP", "192.0.2.1", 0),)))
        memory.installNameResolver(self.resolver)
        endpoint = clientEndpoint(memory, address, 7.0, options)
        endpoint.connect(Factory.forProtocol(Protocol))
        return memory

    def test_tcp(self) -> None:
        memory = self.connect(Address("tcp", "mx.example", 2525))
        self.assertEqual(self.resolver.names, ["mx.example"])
        host, port, _factory, timeout, _bind = memory.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.1", 2525, 7.0))

    def test_allAddressesTried(self) -> None:
        """
        Every address of a name is tried (happy eyeballs), IPv6 included.
        """
        memory = self.connect(
            Address("tcp", "mx.example", 25), None,
            IPv6Address("TCP", "2001:db8::1", 0), IPv4Address("TCP", "192.0.2.1", 0),
        )
        memory.advance(1)
        self.assertEqual([c[0] for c in memory.tcpClients], ["2001:db8::1", "192.0.2.1"])

    def test_ipLiterals(self) -> None:
        """
        An IP literal, IPv6 included (C{tcp://[2001:db8::1]:25} arrives
        without brackets), is connected to at once: it needs no resolver,
        whose thread would cost every relay memory.
        """
        for host in ("192.0.2.7", "2001:db8::1"):
            memory = self.connect(Address("tcp", host, 25))
            self.assertEqual(self.resolver.names, [])
            connected, port, _factory, timeout, _bind = memory.tcpClients[0]
            self.assertEqual((connected, port, timeout), (host, 25, 7.0))

    def test_tls(self) -> None:
        memory = self.connect(Address("tls", "mx.example", 465), clientOptions(ClientTLS(), "mx.example"))
        factory = memory.tcpClients[0][2]
        built = factory.buildProtocol(None)
        self.assertIsInstance(built._wrappedProtocol, TLSMemoryBIOProtocol)  # type: ignore[union-attr]  # buildProtocol returns a TLSMemoryBIOProtocol here, typed as an optional IProtocol

    def test_unix(self) -> None:
        memory = self.connect(Address("unix", path="/run/dovecot/lmtp"))
        self.assertEqual(memory.unixClients[0][0], "/run/dovecot/lmtp")
        self.assertEqual(memory.unixClients[0][2], 7.0)


class ServerEndpointTests(SynchronousTestCase):
    def test_tcp4(self) -> None:
        memory = MemoryReactorClock()
        serverEndpoint(memory, Address("tcp", "127.0.0.1", 2525)).listen(Factory.forProtocol(Protocol))
        port, _factory, _backlog, interface = memory.tcpServers[0]
        self.assertEqual((port, interface), (2525, "127.0.0.1"))

    def test_tcp6(self) -> None:
        memory = MemoryReactorClock()
        serverEndpoint(memory, Address("tcp", "::", 25)).listen(Factory.forProtocol(Protocol))
        self.assertEqual(memory.tcpServers[0][3], "::")

    def test_tls(self) -> None:
        memory = MemoryReactorClock()
        serverEndpoint(memory, Address("tls", "0.0.0.0", 465), CertificateOptions()).listen(
            Factory.forProtocol(Protocol)
        )
        self.assertIsInstance(memory.tcpServers[0][1], TLSMemoryBIOFactory)

    def test_unix(self) -> None:
        memory = MemoryReactorClock()
        serverEndpoint(memory, Address("unix", path="/tmp/x.sock")).listen(Factory.forProtocol(Protocol))
        self.assertEqual(memory.unixServers[0][0], "/tmp/x.sock")


class RealSocketTests(TestCase):
    timeout = 20

    @inlineCallbacks
    def test_reusePort(self) -> Any:
        """
        With reusePort two listeners share one port (SO_REUSEPORT).
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        address = Address("tcp", "127.0.0.1", port)
        first = yield serverEndpoint(reactor, address, reusePort=True).listen(Factory.forProtocol(Protocol))
        self.addCleanup(first.stopListening)
        second = yield serverEndpoint(reactor, address, reusePort=True).listen(Factory.forProtocol(Protocol))
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, second.getHost().port)
        self.assertEqual(
            second.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT), 1
        )

    @inlineCallbacks
    def test_noDelay(self) -> Any:
        """
        Downstream TCP connections have TCP_NODELAY set.
        """
        net = Loopback(self)
        address, _factory = net.listen()
        session, _ = yield net.failover(makeTarget(address)).open()
        self.assertTrue(session.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_unixClient(self) -> Any:
        path = os.path.abspath(self.mktemp())
        connected: Deferred[None] = Deferred()

        class Greeter(Protocol):
            def connectionMade(self) -> None:
                connected.callback(None)
                self.transport.loseConnection()  # type: ignore[union-attr]  # connected: the transport is set

        port = yield serverEndpoint(reactor, Address("unix", path=path)).listen(Factory.forProtocol(Greeter))
        self.addCleanup(port.stopListening)
        lost: Deferred[None] = Deferred()
        client = Protocol()
        client.connectionLost = lambda reason: lost.callback(None)  # type: ignore[method-assign, assignment, misc]  # a spy on the method
        yield connectProtocol(clientEndpoint(reactor, Address("unix", path=path), 5.0), client)
        yield connected
        yield lost

