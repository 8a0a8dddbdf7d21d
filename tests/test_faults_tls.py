"""
Downstream TLS faults over real loopback sockets with a C{trustme} CA (the
certificate faults that need real TLS: wrong name, expired and untrusted
roots are in L{tests.test_tls}): no STARTTLS, C{454} to STARTTLS, a reset
in the handshake, a self-signed certificate, and a C{tls://} target that
speaks plain text.  Under C{require_tls} each one skips the target (the
next one is tried; none left: C{451 4.7.5}); with only
C{attempt_starttls} the message still goes, in plain text; AUTH and
message data never travel in plain text to a target that was to give TLS.
"""

from __future__ import annotations

import datetime
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.ssl import CertificateOptions
from twisted.trial.unittest import TestCase

from smtprelay.app.tls import serverOptions
from smtprelay.protocol import replies
from smtprelay.config.model import Address, ClientTLS
from smtprelay.interfaces import DownstreamError, Params
from smtprelay.testing.downstream import DownstreamFactory, FakeDownstream, Script

from .test_tls import PKI, STARTTLS_EHLO, Loopback, makeTarget


class _ResetOnHandshake(FakeDownstream):
    """
    Says 220 to STARTTLS, then resets the connection when the client's
    first handshake bytes arrive.
    """

    def dataReceived(self, data: bytes) -> None:
        if self.tls:
            self.transport.abortConnection()
            return
        super().dataReceived(data)


class _ResetOnHandshakeFactory(DownstreamFactory):
    def buildProtocol(self, addr: Any) -> FakeDownstream:
        p = _ResetOnHandshake(self.script, self.lmtp)
        self.connections.append(p)
        return p


def _issued(pki: PKI, commonName: str) -> CertificateOptions:
    """
    Server TLS options with a certificate from C{pki}'s CA that names
    C{commonName} in its subject only (no subjectAltName).
    """
    caKey = serialization.load_pem_private_key(pki.ca.private_key_pem.bytes(), None)
    caCert = x509.load_pem_x509_certificate(pki.ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)]))
        .issuer_name(caCert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(caKey, hashes.SHA256())  # type: ignore[arg-type]  # trustme's CA key is RSA; the loader's type also lists keys that cannot sign
    )
    return CertificateOptions(privateKey=crypto.PKey.from_cryptography_key(key),
                              certificate=crypto.X509.from_cryptography(cert))


def _selfSigned(name: str, altName: bool = True) -> CertificateOptions:
    """
    Server TLS options with a self-signed certificate for C{name}, with
    its subjectAltName (so that only the issuer is wrong) or without.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
    )
    if altName:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    return CertificateOptions(privateKey=crypto.PKey.from_cryptography_key(key),
                              certificate=crypto.X509.from_cryptography(cert))

PLAIN_EHLO = STARTTLS_EHLO.replace(b"250-STARTTLS\r\n", b"")
MAIL: tuple[bytes, Params] = (b"a@example.org", {})


class TLSFaultTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.net = Loopback(self)
        self.clientTLS = self.pki.clientTLS(serverName="mx.example")

    def listenWith(self, factory: DownstreamFactory) -> tuple[Address, DownstreamFactory]:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.net.factories.append(factory)
        self.net._ports.append(port)
        return Address("tcp", "127.0.0.1", cast(IPv4Address, port.getHost()).port), factory

    def goodServer(self) -> Any:
        return self.net.listen(Script(replies={"EHLO": STARTTLS_EHLO},
                                      tlsOptions=serverOptions(self.pki.server("mx.example"))))

    @inlineCallbacks
    def assertSkipped(self, script: Script | None = None, factory: Any = None) -> Any:
        """
        Under C{require_tls}: alone, C{451 4.7.5}; first of a pair, the
        second is used; no MAIL ever reaches the faulty target.
        """
        if factory is not None:
            bad, badFactory = self.listenWith(factory(Script(replies={"EHLO": STARTTLS_EHLO})))
        else:
            bad, badFactory = self.net.listen(script)
        error = yield self.assertFailure(
            self.net.failover(makeTarget(bad, requireTLS=True, tlsClient=self.clientTLS)).open(mail=MAIL),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)
        good, _ = self.goodServer()
        session, mailReply = yield self.net.failover(
            makeTarget(bad, good, requireTLS=True, tlsClient=self.clientTLS)
        ).open(mail=MAIL)
        self.assertEqual(mailReply.code, 250)
        self.assertEqual(session.peer, f"127.0.0.1[127.0.0.1]:{good.port}")
        for connection in badFactory.connections:
            self.assertFalse([c for c in connection.commands if c.startswith((b"MAIL", b"AUTH"))])

    def test_noStartTLS(self) -> Any:
        return self.assertSkipped(Script(replies={"EHLO": PLAIN_EHLO}))

    def test_startTLS454(self) -> Any:
        return self.assertSkipped(
            Script(replies={"EHLO": STARTTLS_EHLO, "STARTTLS": b"454 4.7.0 TLS not available\r\n"})
        )

    def test_resetInHandshake(self) -> Any:
        return self.assertSkipped(factory=_ResetOnHandshakeFactory)

    def test_selfSigned(self) -> Any:
        return self.assertSkipped(Script(replies={"EHLO": STARTTLS_EHLO}, tlsOptions=_selfSigned("mx.example")))

    def test_selfSignedWithoutSubjectAltName(self) -> Any:
        """
        The certificate many internal servers have: self-signed, a CN and no
        subjectAltName.  Skipped like any unverifiable one, and nothing is
        logged as an unhandled error.
        """
        return self.assertSkipped(
            Script(replies={"EHLO": STARTTLS_EHLO}, tlsOptions=_selfSigned("mx.example", altName=False))
        )

    def test_trustedWithoutSubjectAltName(self) -> Any:
        """
        A certificate from the trusted CA without subjectAltName (for
        another name in its CN) does not verify for our target.  Twisted
        26.10's own client options log the missing subjectAltName and go by
        the chain alone: any such certificate of the CA passed for any name.
        """
        return self.assertSkipped(Script(replies={"EHLO": STARTTLS_EHLO},
                                         tlsOptions=_issued(self.pki, "other.example")))

    @inlineCallbacks
    def test_implicitTLSTargetSpeaksPlainText(self) -> Any:
        """
        A C{tls://} target that greets in plain text: the handshake fails;
        nothing is ever sent to it in plain text, and there is no plain
        text retry (C{tls://} is TLS or nothing).
        """
        plain, factory = self.net.listen(Script())
        implicit = plain.__class__("tls", plain.host, plain.port)
        for requireTLS in (True, False):
            error = yield self.assertFailure(
                self.net.failover(makeTarget(implicit, requireTLS=requireTLS, tlsClient=self.clientTLS)).open(
                    mail=MAIL
                ),
                DownstreamError,
            )
            self.assertEqual(error.reply.code, 451)
        self.assertEqual(len(factory.connections), 2)
        # Only the handshake's bytes arrived (which may hold a CRLF by chance).
        sent = [c for connection in factory.connections for c in connection.commands]
        self.assertFalse([c for c in sent if c[:4].upper() in (b"EHLO", b"HELO", b"MAIL", b"AUTH", b"RCPT")])

    @inlineCallbacks
    def test_opportunisticGoesOnInPlainText(self) -> Any:
        """
        Without C{require_tls}, a refused STARTTLS or a reset handshake
        still delivers (in plain text, as Postfix's C{may}).
        """
        for script in (Script(replies={"EHLO": PLAIN_EHLO}),
                       Script(replies={"EHLO": STARTTLS_EHLO, "STARTTLS": b"454 4.7.0 No\r\n"}),
                       None):
            if script is None:
                address, _ = self.listenWith(_ResetOnHandshakeFactory(Script(replies={"EHLO": STARTTLS_EHLO})))
            else:
                address, _ = self.net.listen(script)
            session, mailReply = yield self.net.failover(
                makeTarget(address, attemptStartTLS=True, tlsClient=ClientTLS())
            ).open(mail=MAIL)
            self.assertEqual(mailReply.code, 250)
            self.assertIsNone(session.tls)
            session.abort()
