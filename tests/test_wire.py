"""
Tests for L{smtprelay.wire.writeNow}: on a real reactor socket the bytes
leave within the same reactor turn; elsewhere it is a plain write.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtprelay.wire import writeNow


class _Writer(Protocol):
    def __init__(self, peer: socket.socket, data: bytes) -> None:
        self.peer = peer
        self.data = data
        self.seen: Deferred[tuple[bytes, bytes]] = Deferred()

    def connectionMade(self) -> None:
        accepted, _ = self.peer.accept()
        self.transport.write(b"buffered ")  # type: ignore[union-attr]
        first = _peek(accepted)
        writeNow(self.transport, self.data)
        self.seen.callback((first, _peek(accepted)))
        accepted.close()


def _peek(sock: socket.socket) -> bytes:
    try:
        return sock.recv(100, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


class RealSocketTests(TestCase):
    def test_sentWithinTheTurn(self) -> None:
        """
        A plain C{write} is still in Twisted's buffer when the callback
        returns; after L{writeNow} the peer's socket already holds it all.
        """
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(1)
        protocol = _Writer(listening, b"now\r\n")
        factory = ClientFactory.forProtocol(lambda: protocol)
        connector = reactor.connectTCP("127.0.0.1", listening.getsockname()[1], factory)  # type: ignore[attr-defined]
        self.addCleanup(connector.disconnect)
        return protocol.seen.addCallback(
            self.assertEqual, (b"", b"buffered now\r\n")
        )


class OtherTransportTests(SynchronousTestCase):
    def test_plainWrite(self) -> None:
        transport = StringTransport()
        writeNow(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")

    def test_closingSocketWaitsForTheReactor(self) -> None:
        """
        A socket that is closing is left to the reactor, which ends the
        connection once its buffer is sent.
        """

        class Closing(StringTransport):
            connected = True
            disconnecting = True
            wrote = False

            def doWrite(self) -> None:
                self.wrote = True

        transport = Closing()
        writeNow(transport, b"221 bye\r\n")
        self.assertEqual((transport.value(), transport.wrote), (b"221 bye\r\n", False))
