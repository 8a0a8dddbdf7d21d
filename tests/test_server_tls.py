"""
STARTTLS over a real loopback socket with a real handshake (a C{trustme}
CA): plaintext injected after STARTTLS is never executed, and the session
learns what TLS negotiated.
"""

from __future__ import annotations

import socket
import ssl

import trustme
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from smtprelay.config.model import ListenerAuth
from smtprelay.server import SMTPServerFactory
from smtprelay.testing.handler import RecordingHandlerFactory

from .server_helpers import makeListener


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
    def test_injectionDiscarded(self) -> Deferred[None]:
        ca = trustme.CA()
        cert = ca.issue_cert("mx.example.org")
        pem = cert.private_key_and_cert_chain_pem.bytes()
        options = PrivateCertificate.loadPEM(pem).options()
        handlers = RecordingHandlerFactory()
        factory = SMTPServerFactory(
            makeListener(auth=ListenerAuth("forward")), handlers, "mx.example.org", reactor,
            tlsOptions=options,
        )
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        portNumber = port.getHost().port
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
