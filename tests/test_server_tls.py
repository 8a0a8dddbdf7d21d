"""
STARTTLS over a real loopback socket with a real handshake (a C{trustme}
CA): plaintext injected after STARTTLS is never executed, and the session
learns what TLS negotiated.
"""

from __future__ import annotations

import base64
import socket
import ssl
from typing import Any, Generator, Mapping, cast

import trustme
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtprelay.config.model import ListenerAuth
from smtprelay.inbound.policy import SessionPolicy
from smtprelay.net.tlsinfo import readTLSInfo
from smtprelay.observe.metrics import Metrics
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.inbound.session import SMTPServerProtocol
from smtprelay.protocol import replies
from smtprelay.testing.handler import RecordingHandlerFactory, ScriptEntry

from .server_helpers import GREETING, HOST, LOOPBACK, TOKEN, makePolicy


def readReply(stream: socket.socket) -> bytes:
    """
    Read one whole (possibly multi-line) reply.
    """
    data = b""
    while True:
        chunk = stream.recv(4096)
        if not chunk:
            return data
        data += chunk
        lines = data.split(b"\r\n")
        if data.endswith(b"\r\n") and len(lines[-2]) >= 4 and lines[-2][3:4] == b" ":
            return data


class StartTLSLoopbackTests(TestCase):
    @inlineCallbacks
    def test_injectionDiscarded(self) -> Generator[Deferred[Any], Any, None]:
        ca = trustme.CA()
        cert = ca.issue_cert("mx.example.org")
        pem = cert.private_key_and_cert_chain_pem.bytes()
        options = PrivateCertificate.loadPEM(pem).options()
        handlers = RecordingHandlerFactory()
        factory = SMTPServerFactory(
            makePolicy(auth=ListenerAuth("forward")), handlers, "mx.example.org", reactor,
            tlsOptions=options,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        portNumber = cast(IPv4Address, port.getHost()).port
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def client() -> list[bytes]:
            transcript = []
            with socket.create_connection(("127.0.0.1", portNumber), timeout=10) as raw:
                transcript.append(readReply(raw))
                raw.sendall(b"EHLO client.test\r\n")
                transcript.append(readReply(raw))
                raw.sendall(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n")
                transcript.append(readReply(raw))
                with context.wrap_socket(raw, server_hostname="mx.example.org") as tls:
                    tls.sendall(b"EHLO client.test\r\n")
                    transcript.append(readReply(tls))
                    tls.sendall(b"QUIT\r\n")
                    transcript.append(readReply(tls))
            return transcript

        transcript = yield deferToThread(client)
        self.assertEqual(transcript[2], b"220 2.0.0 Ready to start TLS\r\n")
        # The first reply inside TLS answers our EHLO: the injected MAIL was
        # dropped, not executed (its 250/503 would come first).
        self.assertTrue(transcript[3].startswith(b"250-mx.example.org\r\n"), transcript[3])
        self.assertIn(b"250-AUTH PLAIN LOGIN\r\n", transcript[3])
        self.assertNotIn(b"STARTTLS", transcript[3])
        self.assertEqual(transcript[4], b"221 2.0.0 Bye\r\n")
        handler = handlers.last
        self.assertNotIn("mail", handler.methods)
        tls = handler.session.tls
        assert tls is not None
        self.assertTrue(tls.version.startswith("TLSv1."), tls.version)
        self.assertTrue(tls.cipher)


class _Wire(StringTransport):
    """
    One direction of an in-memory TCP connection that honours
    C{pauseProducing} as a socket does: a paused side reads nothing.
    """

    def __init__(self, peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)

    def abortConnection(self) -> None:
        self.loseConnection()


class _TLSPair:
    """
    A real TLS server (the SMTP factory under C{TLSMemoryBIOFactory}, as a
    C{tls://} listener builds it) and a real TLS client, connected by two
    L{_Wire}s and moved by L{pump} on a fake clock.
    """

    def __init__(self, policy: SessionPolicy | None = None, clientTLS: bool = True,
                 script: Mapping[str, ScriptEntry] | None = None) -> None:
        ca = trustme.CA()
        pem = ca.issue_cert(HOST).private_key_and_cert_chain_pem.bytes()
        self.clock = MemoryReactorClock()
        self.handlers = RecordingHandlerFactory(script)
        self.metrics = Metrics()
        tlsOptions = PrivateCertificate.loadPEM(pem).options()
        self.factory = SMTPServerFactory(
            policy or makePolicy(), self.handlers, HOST, self.clock,
            tlsOptions=tlsOptions, greetingToken=TOKEN, metrics=self.metrics,
        )
        self.factory.newSessionId = lambda: "S1"
        serverTLS = TLSMemoryBIOFactory(tlsOptions, False, self.factory,
                                        clock=self.clock)
        self.server = serverTLS.buildProtocol(LOOPBACK)
        self.serverWire = _Wire(LOOPBACK)
        self.received = b""
        received = self

        class Client(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.received += data

        self.clientWire = _Wire(LOOPBACK)
        if clientTLS:
            trust = Certificate.loadPEM(ca.cert_pem.bytes())
            clientFactory = TLSMemoryBIOFactory(
                optionsForClientTLS(HOST, trustRoot=trust), True,
                ClientFactory.forProtocol(Client), clock=self.clock,
            )
            self.client: Any = clientFactory.buildProtocol(LOOPBACK)
        else:
            self.client = Client()
        self.server.makeConnection(self.serverWire)
        self.client.makeConnection(self.clientWire)
        self.pump()

    @property
    def smtp(self) -> SMTPServerProtocol:
        protocol = self.server.wrappedProtocol
        assert isinstance(protocol, SMTPServerProtocol)
        return protocol

    def pump(self) -> None:
        """
        Move bytes both ways until nothing moves; a side whose socket is
        paused reads nothing, as the kernel would.
        """
        for _ in range(100):
            self.clock.advance(0)
            moved = False
            for source, sink, wire in (
                (self.clientWire, self.server, self.serverWire),
                (self.serverWire, self.client, self.clientWire),
            ):
                data = source.value()
                if data and wire.producerState != "paused" and not wire.disconnecting:
                    source.clear()
                    sink.dataReceived(data)
                    moved = True
            if not moved:
                break
        for wire, side in ((self.serverWire, self.server), (self.clientWire, self.client)):
            if wire.disconnecting and wire.connected:
                wire.connected = False
                side.connectionLost(Failure(ConnectionDone()))

    def send(self, data: bytes) -> bytes:
        """
        The client sends C{data}; return what it received meanwhile.
        """
        self.received = b""
        # A TLS client writes through its TLS layer, a plain one directly.
        tls = isinstance(self.client, TLSMemoryBIOProtocol)
        (self.client if tls else self.clientWire).write(data)
        self.pump()
        return self.received


class ImplicitTLSTests(SynchronousTestCase):
    """
    A C{tls://} listener: TLS handshake first, greeting after it; a client
    that does not complete the handshake is closed, and its place freed.
    """

    def test_greetingAfterHandshake(self) -> None:
        """
        The ClientHello is read (the greeting written too early used to
        pause the socket for good), the greeting comes inside TLS, and the
        session goes on.
        """
        pair = _TLSPair()
        self.assertEqual(pair.received, GREETING)
        tls = pair.smtp.session.tls
        assert tls is not None
        self.assertTrue(tls.version.startswith("TLSv1."), tls.version)
        # With its cipher's bits, for the Received: line.
        self.assertEqual(tls, readTLSInfo(pair.server))
        self.assertIsNotNone(tls.bits)
        self.assertEqual(_sample(pair.metrics, "smtprelay_tls_handshakes_total",
                                 side="inbound", result="ok", verified="no"), 1.0)
        self.assertEqual(pair.send(b"NOOP\r\n"), b"250 2.0.0 OK\r\n")
        self.assertEqual(pair.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.factory.sessions, set())

    def test_plaintextClosed(self) -> None:
        """
        An SMTP client speaking plain text to the TLS port is closed at once,
        without a reply, and no longer counts as a session.
        """
        pair = _TLSPair(makePolicy(maxConnections=1), clientTLS=False)
        self.assertEqual(pair.send(b"EHLO client.example\r\n"), b"")
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.factory.sessions, set())
        self.assertEqual(pair.handlers.last.closed, 1)
        self.assertEqual(_sample(pair.metrics, "smtprelay_tls_handshakes_total",
                                 side="inbound", result="failed", verified="no"), 1.0)

    def test_garbageClosed(self) -> None:
        pair = _TLSPair(clientTLS=False)
        pair.send(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff")
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.factory.sessions, set())

    def test_handshakeDeadline(self) -> None:
        """
        A client that never finishes its handshake is dropped when the
        listener's read timeout expires, without any plaintext reply.
        """
        pair = _TLSPair(makePolicy(readTimeout=30), clientTLS=False)
        pair.send(b"\x16\x03")
        pair.clock.advance(29)
        pair.pump()
        self.assertTrue(pair.serverWire.connected)
        pair.clock.advance(1)
        pair.pump()
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.received, b"")
        self.assertEqual(pair.factory.sessions, set())
        self.assertEqual(pair.clock.getDelayedCalls(), [])

    def test_shutdownDuringHandshake(self) -> None:
        """
        A graceful stop closes a session still in its handshake at once.
        """
        pair = _TLSPair(clientTLS=False)
        pair.smtp.shutdown()
        pair.pump()
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.received, b"")


class AuthOverTLSTests(SynchronousTestCase):
    def test_tooManyFailuresClose(self) -> None:
        """
        After C{max_auth_failures} failed AUTH attempts over TLS, the
        C{421} is followed by the close of the connection (the TLS layer
        used to wait for our producer, keeping it open until the abort).
        """
        pair = _TLSPair(makePolicy(auth=ListenerAuth("users", "/dev/null"), maxAuthFailures=2),
                        script={"authenticate": replies.AUTH_FAILED})
        pair.send(b"EHLO client.example\r\n")
        bad = b"AUTH PLAIN " + base64.b64encode(b"\0user\0wrong") + b"\r\n"
        self.assertEqual(pair.send(bad), b"535 5.7.8 Authentication credentials invalid\r\n")
        self.assertTrue(pair.serverWire.connected)
        self.assertEqual(
            pair.send(bad),
            b"535 5.7.8 Authentication credentials invalid\r\n"
            b"421 4.7.0 Too many authentication failures [S1]\r\n",
        )
        self.assertFalse(pair.serverWire.connected)
        self.assertEqual(pair.factory.sessions, set())
        self.assertEqual(pair.clock.getDelayedCalls(), [])


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)
