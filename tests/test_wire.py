"""
Tests for L{smtprelay.net.wire.writeNow}: on a real reactor socket the bytes
leave within the same reactor turn; elsewhere it is a plain write.
"""

from __future__ import annotations

import socket
from typing import Any

import trustme
from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtprelay.net.wire import writeNow


class _Writer(Protocol):
    """
    Writes C{first} with a plain C{write} (None: nothing), then C{data}
    with L{writeNow}, and reports what the peer's socket holds after each
    and whether the reactor watches the socket for writability.
    """

    def __init__(self, peer: socket.socket, first: bytes | None, data: bytes) -> None:
        self.peer = peer
        self.first = first
        self.data = data
        self.seen: Deferred[tuple[bytes, bytes, bool]] = Deferred()

    def connectionMade(self) -> None:
        accepted, _ = self.peer.accept()
        if self.first is not None:
            self.transport.write(self.first)  # type: ignore[union-attr]  # connected: the transport is set
        before = _peek(accepted)
        writeNow(self.transport, self.data)
        watched = self.transport in reactor.getWriters()
        self.seen.callback((before, _peek(accepted), watched))
        accepted.close()


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class RealSocketTests(TestCase):
    def run_(self, first: bytes | None, data: bytes) -> Deferred[tuple[bytes, bytes, bool]]:
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        protocol = _Writer(listening, first, data)
        factory = ClientFactory.forProtocol(lambda: protocol)
        connector = reactor.connectTCP("127.0.0.1", listening.getsockname()[1], factory)  # type: ignore[arg-type]  # forProtocol is typed to return a Factory, not the ClientFactory it makes
        self.addCleanup(connector.disconnect)
        return protocol.seen

    def test_sentDirectly(self) -> Deferred[object]:
        """
        Nothing queued: the peer holds the bytes when L{writeNow} returns,
        and the reactor was never asked to watch the socket.
        """
        return self.run_(None, b"250 ok\r\n").addCallback(
            self.assertEqual, (b"", b"250 ok\r\n", False)
        )

    def test_sentBehindTheQueue(self) -> Deferred[object]:
        """
        Behind bytes a plain C{write} queued (still in Twisted's buffer),
        L{writeNow} sends both, in order, within the turn.
        """
        return self.run_(b"buffered ", b"now\r\n").addCallback(
            self.assertEqual, (b"", b"buffered now\r\n", False)
        )


class _Reactor:
    def addWriter(self, writer: object) -> None:
        pass

    def removeWriter(self, writer: object) -> None:
        pass


class _Socketish(FileDescriptor):
    """
    A reactor socket that records how it is written to and takes
    C{accept} bytes per send.
    """

    TLS = False

    def __init__(self, accept: int = 0) -> None:
        super().__init__(_Reactor())  # type: ignore[arg-type]  # a stand-in with only the two methods FileDescriptor calls
        self.connected = True
        self.accept = accept
        self.calls: list[str] = []
        self.sent = b""

    def writeSomeData(self, data: bytes) -> int:
        self.calls.append("writeSomeData")
        n = min(self.accept, len(data))
        self.sent += bytes(data[:n])
        return n

    def doWrite(self) -> None:
        self.calls.append("doWrite")


class _Wrapper:
    """
    Like C{TLSMemoryBIOProtocol}: a transport that forwards unknown
    attributes to the socket beneath it.
    """

    def __init__(self, inner: _Socketish) -> None:
        self.inner = inner
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class OtherTransportTests(SynchronousTestCase):
    def test_plainWrite(self) -> None:
        transport = StringTransport()
        writeNow(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")

    def test_partialSend(self) -> None:
        """
        What the socket does not take now is queued and flushed in the
        turn (C{doWrite}).
        """
        transport = _Socketish(accept=3)
        writeNow(transport, b"250 ok\r\n")
        self.assertEqual(transport.sent, b"250")
        self.assertEqual(transport.calls, ["writeSomeData", "doWrite"])
        self.assertEqual(transport._tempDataBuffer, [b" ok\r\n"])

    def test_closingOrTLSLeftToTheReactor(self) -> None:
        """
        A socket that is closing, or speaks TLS through no TLS layer that
        L{writeNow} knows, is written to as usual and flushed by the
        reactor: the end of the connection follows its buffer.
        """
        for attribute, value in (("disconnecting", True), ("TLS", True)):
            transport = _Socketish(accept=100)
            setattr(transport, attribute, value)
            writeNow(transport, b"221 bye\r\n")
            self.assertEqual((transport.sent, transport.calls), (b"", []), attribute)
            self.assertEqual(transport._tempDataBuffer, [b"221 bye\r\n"], attribute)

    def test_wrapperIsNotBypassed(self) -> None:
        """
        Through a TLS-like wrapper the bytes go to the wrapper's C{write}
        (to be encrypted), never to the socket beneath it.
        """
        inner = _Socketish(accept=100)
        wrapper = _Wrapper(inner)
        writeNow(wrapper, b"MAIL FROM:<a@b>\r\n")
        self.assertEqual((wrapper.written, inner.sent, inner.calls), (b"MAIL FROM:<a@b>\r\n", b"", []))


class _TLSServer(Protocol):
    """
    Greets (so that the client knows the handshake is done) and collects
    what it is sent until C{expected} arrived.
    """

    def __init__(self, expected: bytes, startTLS: Any = None) -> None:
        self.expected = expected
        self.startTLS = startTLS
        self.received = b""
        self.done: Deferred[bytes] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def connectionMade(self) -> None:
        if self.startTLS is not None:
            self.transport.startTLS(self.startTLS)  # type: ignore[union-attr]  # the transport is set once connected (TLS-capable TCP)
        self.transport.write(b"220 hi\r\n")  # type: ignore[union-attr]  # the transport is set once connected

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.expected) and not self.done.called:
            self.done.callback(self.received)


class _TLSWriter(Protocol):
    """
    Once the server's greeting arrived over TLS: a plain C{write} (gathered
    by Twisted's TLS transport for the next turn), then L{writeNow}; then
    whether anything is left for a later turn.
    """

    def __init__(self, startTLS: Any = None) -> None:
        self.startTLS = startTLS
        self.left: Deferred[dict[str, object]] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)

    def connectionMade(self) -> None:
        if self.startTLS is not None:
            self.transport.startTLS(self.startTLS)  # type: ignore[union-attr]  # the transport is set once connected (TLS-capable TCP)

    def dataReceived(self, data: bytes) -> None:
        if self.left.called:
            return
        transport: Any = self.transport
        transport.write(b"queued ")
        writeNow(transport, b"now\r\n")
        tls: Any = transport if isinstance(transport, TLSMemoryBIOProtocol) else transport.protocol
        socket_: Any = transport.transport if isinstance(transport, TLSMemoryBIOProtocol) else transport
        self.left.callback({
            "gathered": list(tls._aggregator._buffer),
            "queued": bytes(socket_.dataBuffer) + b"".join(socket_._tempDataBuffer),
            "watched": socket_ in reactor.getWriters(),
        })


class RealTLSTests(TestCase):
    """
    Over TLS, L{writeNow} encrypts and sends in the turn: nothing is left
    gathered in Twisted's TLS transport or queued on the socket beneath,
    and the peer gets the bytes in order.
    """

    def setUp(self) -> None:
        ca = trustme.CA()
        leaf = ca.issue_cert("127.0.0.1")
        self.serverOptions = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes()).options()
        self.clientOptions = CertificateOptions()

    @inlineCallbacks
    def run_(self, implicit: bool) -> Any:
        server = _TLSServer(b"queued now\r\n", None if implicit else self.serverOptions)
        client = _TLSWriter(None if implicit else self.clientOptions)
        serverFactory: Any = Factory.forProtocol(lambda: server)
        clientFactory: Any = ClientFactory.forProtocol(lambda: client)
        if implicit:
            serverFactory = TLSMemoryBIOFactory(self.serverOptions, False, serverFactory)
            clientFactory = TLSMemoryBIOFactory(self.clientOptions, True, clientFactory)
        port = reactor.listenTCP(0, serverFactory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        reactor.connectTCP("127.0.0.1", port.getHost().port, clientFactory)  # type: ignore[attr-defined]  # the global reactor provides IReactorTCP; its stub does not say so
        left = yield client.left
        received = yield server.done
        client.transport.abortConnection()  # type: ignore[union-attr]  # the transport is set once connected
        yield client.lost
        yield server.lost
        self.assertEqual((left, received), ({"gathered": [], "queued": b"", "watched": False}, b"queued now\r\n"))

    def test_implicitTLS(self) -> Deferred[object]:
        """
        The TLS wrapper is the transport (C{tls://}).
        """
        return self.run_(implicit=True)

    def test_startTLS(self) -> Deferred[object]:
        """
        The socket is the transport, its protocol the TLS layer (STARTTLS).
        """
        return self.run_(implicit=False)
