"""
Tests for L{smtprelay.inbound.proxyproto}: exact bytes through L{StringTransport}
with a L{Clock}, and the real SMTP server factory behind the wrapper.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtprelay.config.model import IPNetwork
from smtprelay.inbound.proxyproto import (
    V2_SIGNATURE,
    HeaderReader,
    InvalidProxyHeader,
    ProxyHeader,
    ProxyProtocol,
    ProxyProtocolFactory,
    parseV1,
    parseV2,
)

from .server_helpers import GREETING, Session

HAPROXY = IPv4Address("TCP", "10.0.0.5", 50000)
STRANGER = IPv4Address("TCP", "192.0.2.7", 40000)
LOCAL = IPv4Address("TCP", "10.0.0.2", 2525)
TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/24"),
    ipaddress.ip_network("2001:db8::/32"),
)

V1_TCP4 = b"PROXY TCP4 198.51.100.7 10.0.0.1 51234 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 25\r\n"


def v2(command: int, family: int, block: bytes) -> bytes:
    """
    A v2 header built by hand from the protocol document's layout.
    """
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(block)) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


V2_TCP4 = v2(
    0x21,
    0x11,
    socket.inet_pton(socket.AF_INET, "198.51.100.7")
    + socket.inet_pton(socket.AF_INET, "10.0.0.1")
    + struct.pack("!HH", 51234, 25)
    + tlv(0x04, b"\x00")  # PP2_TYPE_NOOP
    + tlv(0x01, b"smtp"),  # PP2_TYPE_ALPN
)
V2_TCP6 = v2(
    0x21,
    0x21,
    socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    + struct.pack("!HH", 51234, 25)
    + tlv(0x05, b"unique-id"),
)
V2_LOCAL = v2(0x20, 0x00, b"")


class Recorder(Protocol):
    """
    Greets on connect, as an SMTP server does, and records what it sees.
    """

    def __init__(self) -> None:
        self.received = b""
        self.peers: list[Any] = []
        self.hosts: list[Any] = []
        self.lost: list[Failure] = []
        self.handshakes = 0

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.peers.append(self.transport.getPeer())
        self.hosts.append(self.transport.getHost())
        self.transport.write(b"220 hello\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.lost.append(reason)


@implementer(IHandshakeListener)
class TLSRecorder(Recorder):
    def handshakeCompleted(self) -> None:
        self.handshakes += 1


class RecorderFactory(Factory):
    def __init__(self, protocolClass: type[Recorder] = Recorder) -> None:
        self.built: list[Recorder] = []
        self.addresses: list[Any] = []
        self.protocolClass = protocolClass
        self.refuse = False

    def buildProtocol(self, addr: Any) -> Recorder | None:  # type: ignore[override]  # None refuses, as Twisted allows
        self.addresses.append(addr)
        if self.refuse:
            return None
        protocol = self.protocolClass()
        self.built.append(protocol)
        return protocol


class Connection:
    """
    A wrapped connection from C{peer}, built as a listening port would.
    """

    def __init__(self, peer: Any = HAPROXY, **kwargs: Any) -> None:
        self.clock = Clock()
        self.wrapped = RecorderFactory(kwargs.pop("protocolClass", Recorder))
        self.factory = ProxyProtocolFactory(self.wrapped, TRUSTED, self.clock, **kwargs)
        self.protocol = self.factory.buildProtocol(peer)
        self.transport = StringTransportWithDisconnection(hostAddress=LOCAL, peerAddress=peer)
        if self.protocol is not None:
            self.transport.protocol = self.protocol
            self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def sendBytewise(self, data: bytes) -> None:
        for i in range(len(data)):
            self.send(data[i : i + 1])

    @property
    def app(self) -> Recorder:
        [protocol] = self.wrapped.built
        return protocol


class ParserTests(SynchronousTestCase):
    """
    L{parseV1}, L{parseV2} and L{HeaderReader} on their own.
    """

    def test_v1TCP4(self) -> None:
        self.assertEqual(
            parseV1(V1_TCP4[:-2]),
            ProxyHeader(
                1,
                IPv4Address("TCP", "198.51.100.7", 51234),
                IPv4Address("TCP", "10.0.0.1", 25),
            ),
        )

    def test_v1TCP6(self) -> None:
        self.assertEqual(
            parseV1(V1_TCP6[:-2]),
            ProxyHeader(
                1,
                IPv6Address("TCP", "2001:db8::7", 51234),
                IPv6Address("TCP", "2001:db8::1", 25),
            ),
        )

    def test_v1Unknown(self) -> None:
        self.assertEqual(parseV1(b"PROXY UNKNOWN"), ProxyHeader(1))
        self.assertEqual(parseV1(b"PROXY UNKNOWN ffff::1 ffff::2 1 2"), ProxyHeader(1))

    def test_v1Malformed(self) -> None:
        for line in [
            b"PROXY",
            b"PROXY ",
            b"proxy TCP4 1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3",
            b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2",
            b"PROXY TCP4 1.2.3 5.6.7.8 1 2",
            b"PROXY TCP4 host 5.6.7.8 1 2",
            b"PROXY TCP4 ::1 ::2 1 2",
            b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2",
            b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2",
            b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        ]:
            self.assertRaises(InvalidProxyHeader, parseV1, line)

    def test_v2TCP4WithTLVs(self) -> None:
        self.assertEqual(
            parseV2(V2_TCP4),
            ProxyHeader(
                2,
                IPv4Address("TCP", "198.51.100.7", 51234),
                IPv4Address("TCP", "10.0.0.1", 25),
            ),
        )

    def test_v2TCP6WithTLVs(self) -> None:
        self.assertEqual(
            parseV2(V2_TCP6),
            ProxyHeader(
                2,
                IPv6Address("TCP", "2001:db8::7", 51234),
                IPv6Address("TCP", "2001:db8::1", 25),
            ),
        )

    def test_v2Local(self) -> None:
        """
        LOCAL carries no address, and any address block it has is skipped.
        """
        self.assertEqual(parseV2(V2_LOCAL), ProxyHeader(2))
        self.assertEqual(parseV2(v2(0x20, 0x11, b"\x01" * 12)), ProxyHeader(2))

    def test_v2Unspec(self) -> None:
        self.assertEqual(parseV2(v2(0x21, 0x00, b"")), ProxyHeader(2))

    def test_v2Refused(self) -> None:
        address4 = b"\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02"
        for header in [
            v2(0x22, 0x11, address4),  # command 2
            v2(0x11, 0x11, address4),  # version 1
            v2(0x21, 0x12, address4),  # UDP
            v2(0x21, 0x31, b"\x00" * 216),  # unix
            v2(0x21, 0x10, address4),  # INET, protocol UNSPEC
            v2(0x21, 0x11, address4[:-1]),  # short
            v2(0x21, 0x21, address4 * 2),  # short for IPv6
            V2_TCP4[:-1],  # length mismatch
            b"\r\n\r\n\x00\r\nQUIT\r" + V2_TCP4[12:],  # signature
        ]:
            self.assertRaises(InvalidProxyHeader, parseV2, header)

    def test_readerBytewise(self) -> None:
        """
        Any header arrives one byte at a time; the reader says nothing
        until it is complete, then returns what followed.
        """
        for header in [V1_TCP4, V1_TCP6, b"PROXY UNKNOWN\r\n", V2_TCP4, V2_TCP6, V2_LOCAL]:
            reader = HeaderReader()
            for byte in header[:-1]:
                self.assertIsNone(reader.feed(bytes([byte])))
            result = reader.feed(header[-1:] + b"EHLO x\r\n")
            assert result is not None
            self.assertEqual(result[1], b"EHLO x\r\n")

    def test_readerRefusesEarly(self) -> None:
        """
        Bytes that cannot start a header are refused at once, not after
        the timeout.
        """
        for data in [b"E", b"EHLO x\r\n", b"PROXX", b"\r\n\r\n\x01", b"\n"]:
            self.assertRaises(InvalidProxyHeader, HeaderReader().feed, data)
        reader = HeaderReader()
        reader.feed(V2_SIGNATURE)
        self.assertRaises(InvalidProxyHeader, reader.feed, b"\x11")

    def test_readerV1Limit(self) -> None:
        """
        A v1 line may be 107 bytes including CRLF, never more.
        """
        prefix = b"PROXY UNKNOWN "
        longest = prefix + b"x" * (107 - len(prefix) - 2) + b"\r\n"
        self.assertEqual(len(longest), 107)
        self.assertEqual(HeaderReader().feed(longest), (ProxyHeader(1), b""))
        tooLong = prefix + b"x" * (108 - len(prefix) - 2) + b"\r\n"
        self.assertRaises(InvalidProxyHeader, HeaderReader().feed, tooLong)
        reader = HeaderReader()
        self.assertIsNone(reader.feed(tooLong[:106]))
        self.assertRaises(InvalidProxyHeader, reader.feed, tooLong[106:107])


class ProxyProtocolFactoryTests(SynchronousTestCase):
    """
    L{ProxyProtocolFactory} in front of a greeting protocol.
    """

    def assertClosedSilently(self, connection: Connection) -> None:
        self.assertFalse(connection.transport.connected)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(connection.wrapped.built, [])

    def test_greetingHeldUntilHeader(self) -> None:
        """
        Nothing is built or written until the header is complete; then the
        wrapped protocol greets and sees the client's address.
        """
        connection = Connection()
        self.assertIsInstance(connection.protocol, ProxyProtocol)
        connection.send(V1_TCP4[:20])
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(connection.wrapped.built, [])
        connection.send(V1_TCP4[20:])
        self.assertEqual(connection.transport.value(), b"220 hello\r\n")
        client = IPv4Address("TCP", "198.51.100.7", 51234)
        self.assertEqual(connection.app.peers, [client])
        self.assertEqual(connection.app.hosts, [IPv4Address("TCP", "10.0.0.1", 25)])
        self.assertEqual(connection.wrapped.addresses, [client])
        self.assertEqual(connection.clock.getDelayedCalls(), [])

    def test_everyHeaderBytewise(self) -> None:
        """
        Each header form, split into 1-byte segments, gives the right peer.
        """
        cases = [
            (V1_TCP4, IPv4Address("TCP", "198.51.100.7", 51234)),
            (V1_TCP6, IPv6Address("TCP", "2001:db8::7", 51234)),
            (V2_TCP4, IPv4Address("TCP", "198.51.100.7", 51234)),
            (V2_TCP6, IPv6Address("TCP", "2001:db8::7", 51234)),
            (b"PROXY UNKNOWN\r\n", HAPROXY),
            (V2_LOCAL, HAPROXY),
        ]
        for header, peer in cases:
            connection = Connection()
            connection.sendBytewise(header[:-1])
            self.assertEqual(connection.transport.value(), b"", header)
            connection.send(header[-1:])
            self.assertEqual(connection.transport.value(), b"220 hello\r\n")
            self.assertEqual(connection.app.peers, [peer])
            self.assertEqual(connection.app.received, b"")

    def test_commandInSameSegment(self) -> None:
        """
        Bytes after the header in the same segment reach the wrapped
        protocol after its greeting, and later bytes follow unchanged.
        """
        for header in [V1_TCP4, V2_TCP6]:
            connection = Connection()
            connection.send(header + b"EHLO client\r\nMAIL")
            self.assertEqual(connection.transport.value(), b"220 hello\r\n")
            self.assertEqual(connection.app.received, b"EHLO client\r\nMAIL")
            connection.send(b" FROM:<a@b>\r\n")
            self.assertEqual(connection.app.received, b"EHLO client\r\nMAIL FROM:<a@b>\r\n")

    def test_pendingInput(self) -> None:
        """
        During the wrapped protocol's C{connectionMade}, the wrapper tells
        whether the client already sent more than the header (it talked
        before the greeting).
        """
        seen: list[bool] = []

        class Checker(Recorder):
            def connectionMade(self) -> None:
                seen.append(self.transport.hasPendingInput())  # type: ignore[union-attr]  # the PROXY reader's transport

        for data, expected in [(V1_TCP4, False), (V1_TCP4 + b"EHLO x\r\n", True)]:
            connection = Connection(protocolClass=Checker)
            connection.send(data)
            self.assertEqual(seen.pop(), expected)
            assert isinstance(connection.protocol, ProxyProtocol)
            self.assertFalse(connection.protocol.hasPendingInput())

    def test_writesGoThrough(self) -> None:
        connection = Connection()
        connection.send(V1_TCP4)
        transport = connection.app.transport
        assert transport is not None
        transport.writeSequence([b"a", b"b"])
        transport.write(b"c")
        self.assertEqual(connection.transport.value(), b"220 hello\r\nabc")
        transport.loseConnection()
        self.assertFalse(connection.transport.connected)

    def test_timeout(self) -> None:
        """
        No complete header within the timeout: closed without a greeting.
        """
        connection = Connection(timeout=5.0)
        connection.send(b"PROXY TCP4 ")
        connection.clock.advance(4.9)
        self.assertTrue(connection.transport.connected)
        connection.clock.advance(0.1)
        self.assertClosedSilently(connection)

    def test_timeoutCancelledOnClose(self) -> None:
        connection = Connection()
        assert connection.protocol is not None
        connection.protocol.connectionLost(Failure(Exception("gone")))
        self.assertEqual(connection.clock.getDelayedCalls(), [])
        self.assertEqual(connection.wrapped.built, [])

    def test_malformed(self) -> None:
        """
        A malformed header closes the connection at once, silently; later
        bytes are ignored.
        """
        for data in [
            b"EHLO client\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            v2(0x21, 0x12, b"\x00" * 12),
            b"GET / HTTP/1.0\r\n",
        ]:
            connection = Connection()
            connection.send(data)
            self.assertClosedSilently(connection)
            connection.send(V1_TCP4)
            self.assertEqual(connection.wrapped.built, [])
            self.assertEqual(connection.clock.getDelayedCalls(), [])

    def test_oversize(self) -> None:
        connection = Connection()
        connection.send(b"PROXY UNKNOWN " + b"x" * 200)
        self.assertClosedSilently(connection)

    def test_untrustedServedAtOnce(self) -> None:
        """
        A source outside C{trusted} is the wrapped factory's own: greeted
        at once, its PROXY line passed on unchanged, its real address kept.
        """
        connection = Connection(peer=STRANGER)
        self.assertNotIsInstance(connection.protocol, ProxyProtocol)
        self.assertEqual(connection.transport.value(), b"220 hello\r\n")
        connection.send(V1_TCP4)
        self.assertEqual(connection.app.received, V1_TCP4)
        self.assertEqual(connection.app.peers, [STRANGER])
        self.assertEqual(connection.clock.getDelayedCalls(), [])

    def test_untrustedDropped(self) -> None:
        connection = Connection(peer=STRANGER, untrusted="drop")
        self.assertIsNone(connection.protocol)
        self.assertEqual(connection.wrapped.built, [])

    def test_trust(self) -> None:
        factory = ProxyProtocolFactory(RecorderFactory(), TRUSTED, Clock())
        self.assertTrue(factory.isTrusted(IPv4Address("TCP", "10.0.0.255", 1)))
        self.assertFalse(factory.isTrusted(IPv4Address("TCP", "10.0.1.0", 1)))
        self.assertTrue(factory.isTrusted(IPv6Address("TCP", "::ffff:10.0.0.9", 1)))
        self.assertTrue(factory.isTrusted(IPv6Address("TCP", "2001:db8::1", 1)))
        self.assertFalse(factory.isTrusted(IPv6Address("TCP", "2001:db9::1", 1)))
        self.assertFalse(factory.isTrusted(UNIXAddress(b"/run/x")))
        self.assertFalse(factory.isTrusted(UNIXAddress(None)))
        self.assertFalse(ProxyProtocolFactory(RecorderFactory(), (), Clock()).isTrusted(HAPROXY))

    def test_wrappedFactoryRefuses(self) -> None:
        connection = Connection()
        connection.wrapped.refuse = True
        connection.send(V1_TCP4)
        self.assertFalse(connection.transport.connected)
        self.assertEqual(connection.transport.value(), b"")

    def test_connectionLostReachesWrapped(self) -> None:
        connection = Connection()
        connection.send(V1_TCP4)
        assert connection.protocol is not None
        reason = Failure(Exception("gone"))
        connection.protocol.connectionLost(reason)
        self.assertEqual(connection.app.lost, [reason])

    def test_handshakeForwarded(self) -> None:
        """
        STARTTLS over the wrapper: the TLS layer tells the wrapper, which
        tells the wrapped protocol.
        """
        connection = Connection(protocolClass=TLSRecorder)
        connection.send(V1_TCP4)
        protocol = connection.protocol
        self.assertTrue(IHandshakeListener.providedBy(protocol))
        assert isinstance(protocol, ProxyProtocol)
        protocol.handshakeCompleted()
        self.assertEqual(connection.app.handshakes, 1)

    def test_transportAttributesForwarded(self) -> None:
        """
        What the wrapper lacks (producer control, startTLS…) is the real
        transport's, and it provides the same interfaces.
        """
        connection = Connection()
        connection.send(V1_TCP4)
        transport: Any = connection.app.transport
        self.assertIs(transport.pauseProducing.__self__, connection.transport)
        self.assertEqual(transport.getHost(), IPv4Address("TCP", "10.0.0.1", 25))
        connection = Connection()
        connection.send(b"PROXY UNKNOWN\r\n")
        self.assertEqual(connection.app.hosts, [LOCAL])
        self.assertTrue(IPushProducer.providedBy(transport))
        self.assertTrue(IConsumer.providedBy(transport))
        self.assertRaises(AttributeError, getattr, transport, "noSuchAttribute")

    def test_factoryStartStop(self) -> None:
        wrapped = RecorderFactory()
        factory = ProxyProtocolFactory(wrapped, TRUSTED, Clock())
        factory.doStart()
        self.assertEqual((factory.numPorts, wrapped.numPorts), (1, 1))
        factory.doStop()
        self.assertEqual((factory.numPorts, wrapped.numPorts), (0, 0))
        self.assertEqual(factory.logPrefix(), "RecorderFactory (PROXY)")


class SMTPServerBehindProxyTests(SynchronousTestCase):
    """
    The real inbound engine behind the wrapper: the greeting waits for the
    header and the session knows the real client.
    """

    def test_talkWithTheHeaderIsPregreet(self) -> None:
        """
        A command in the header's segment was sent before the client could
        see our greeting: the pregreet check sees it through the wrapper.
        """
        clock = Clock()
        holder = Session(peer=STRANGER, clock=clock)
        factory = ProxyProtocolFactory(holder.factory, TRUSTED, clock)
        protocol = factory.buildProtocol(HAPROXY)
        assert protocol is not None
        transport = StringTransportWithDisconnection(peerAddress=HAPROXY)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.dataReceived(V1_TCP4 + b"NOOP\r\n")
        self.assertRegex(transport.value(), rb"^554 5\.5\.0 Error: SMTP protocol synchronization \[\w+\]\r\n$")

    def test_sessionSeesClient(self) -> None:
        clock = Clock()
        holder = Session(peer=STRANGER, clock=clock)  # only for its factory
        factory = ProxyProtocolFactory(holder.factory, TRUSTED, clock)
        protocol = factory.buildProtocol(HAPROXY)
        assert protocol is not None
        transport = StringTransportWithDisconnection(peerAddress=HAPROXY)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(V1_TCP4)
        self.assertEqual(transport.value(), GREETING)
        protocol.dataReceived(b"NOOP\r\n")
        self.assertEqual(transport.value(), GREETING + b"250 2.0.0 OK\r\n")
        [session] = [p for p in holder.factory.sessions if p.session.clientHost != "192.0.2.7"]
        self.assertEqual(session.session.clientHost, "198.51.100.7")
        self.assertEqual(session.session.clientPort, 51234)
