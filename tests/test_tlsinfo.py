"""
L{smtprelay.net.tlsinfo}: what a real in-memory TLS handshake negotiated,
read from either side's transport.
"""

from __future__ import annotations

from typing import Any

import trustme
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connect, makeFakeClient, makeFakeServer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtprelay.interfaces import TLSInfo
from smtprelay.net.tlsinfo import readTLSInfo, sslConnection

HOST = "mx.example.org"


@implementer(IHandshakeListener)
class _Recorder(Protocol):
    """
    Records whether its TLS handshake completed.
    """

    done = False

    def handshakeCompleted(self) -> None:
        self.done = True


def handshake(**serverOptions: Any) -> tuple[Any, Any]:
    """
    A real TLS handshake in memory between a server made with
    C{serverOptions} and a client trusting its certificate: return the
    server's and the client's TLS protocols (transports of the wrapped
    protocols).
    """
    ca = trustme.CA()
    pem = ca.issue_cert(HOST).private_key_and_cert_chain_pem.bytes()
    key = PrivateCertificate.loadPEM(pem)
    options = CertificateOptions(
        privateKey=key.privateKey.original, certificate=key.original, **serverOptions
    )
    trust = Certificate.loadPEM(ca.cert_pem.bytes())
    clock = Clock()
    serverTLS = TLSMemoryBIOFactory(options, False, ServerFactory.forProtocol(_Recorder),
                                    clock=clock)
    clientTLS = TLSMemoryBIOFactory(
        optionsForClientTLS(HOST, trustRoot=trust), True, ClientFactory.forProtocol(_Recorder),
        clock=clock,
    )
    server: Any = serverTLS.buildProtocol(None)
    client: Any = clientTLS.buildProtocol(None)
    pump = connect(server, makeFakeServer(server), client, makeFakeClient(client), clock=clock)
    pump.flush()
    assert server.wrappedProtocol.done and client.wrappedProtocol.done
    return server, client


PINNED: dict[str, Any] = {
    "raiseMinimumTo": TLSVersion.TLSv1_2,
    "lowerMaximumSecurityTo": TLSVersion.TLSv1_2,
    "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString("ECDHE-ECDSA-AES128-GCM-SHA256"),
}
"""Server options that make L{handshake} negotiate L{PINNED_INFO}."""

PINNED_INFO = TLSInfo("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", (128, 128))


class ReadTLSInfoTests(SynchronousTestCase):
    def test_tls12(self) -> None:
        """
        The version, cipher and its secret/algorithm bits of a TLS 1.2
        handshake pinned to one cipher, read the same on both sides.
        """
        server, client = handshake(**PINNED)
        self.assertEqual(readTLSInfo(server.wrappedProtocol.transport), PINNED_INFO)
        self.assertEqual(readTLSInfo(client.wrappedProtocol.transport), PINNED_INFO)
        self.assertEqual(
            PINNED_INFO.description,
            "TLSv1.2 with cipher ECDHE-ECDSA-AES128-GCM-SHA256 (128/128 bits)",
        )

    def test_tls13(self) -> None:
        """
        A TLS 1.3 handshake: its suite's bits are those of its cipher.
        """
        server, client = handshake(raiseMinimumTo=TLSVersion.TLSv1_3)
        tls = readTLSInfo(server.wrappedProtocol.transport)
        bits = {
            "TLS_AES_256_GCM_SHA384": (256, 256),
            "TLS_CHACHA20_POLY1305_SHA256": (256, 256),
            "TLS_AES_128_GCM_SHA256": (128, 128),
        }
        self.assertEqual(tls, TLSInfo("TLSv1.3", tls.cipher, bits[tls.cipher]))
        self.assertEqual(readTLSInfo(client.wrappedProtocol.transport), tls)

    def test_verified(self) -> None:
        """
        The caller's verdict on the peer is carried along.
        """
        server, _ = handshake()
        self.assertTrue(readTLSInfo(server.wrappedProtocol.transport, verified=True).verified)
        self.assertFalse(readTLSInfo(server.wrappedProtocol.transport).verified)

    def test_insideTransport(self) -> None:
        """
        Under STARTTLS the transport carries the TLS protocol as its
        C{protocol}: its connection is found there.
        """
        server, _ = handshake()

        class Outer:
            protocol = server

        self.assertIs(sslConnection(Outer()), server.getHandle())

    def test_notTLS(self) -> None:
        """
        A transport without TLS reads as C{unknown}, without bits.
        """
        self.assertIsNone(sslConnection(StringTransport()))
        self.assertEqual(readTLSInfo(StringTransport()), TLSInfo("unknown", "unknown"))
