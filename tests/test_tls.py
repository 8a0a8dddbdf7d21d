"""
Tests for L{smtprelay.net.tls} and the TLS paths of the outbound engine: real
TLS over loopback TCP with a C{trustme} CA, against the scripted fake
downstream (STARTTLS and implicit TLS).
"""

from __future__ import annotations

from functools import partial
import datetime
import os
import socket
import subprocess
from typing import Any

import attrs
import trustme
from OpenSSL import SSL
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtprelay.app.tls import clientOptions, serverOptions
from smtprelay.protocol import replies
from smtprelay.outbound.client import SMTPClientProtocol
from smtprelay.config.model import Address, ClientTLS, DownstreamAuth, Secret, ServerTLS, Target
from smtprelay.net.endpoints import clientEndpoint
from smtprelay.app.targets import makeFailover
from smtprelay.relay.failover import Failover
from smtprelay.interfaces import Credentials, DownstreamError
from smtprelay.observe.metrics import Metrics
from smtprelay.testing.downstream import DownstreamFactory, FakeDownstream, Script

reactor: Any = _reactor

STARTTLS_EHLO = b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN EXTERNAL\r\n250 8BITMIME\r\n"


def write(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


class PKI:
    """
    A trustme CA and certificate files in a temporary directory.
    """

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.ca = trustme.CA()
        self.caFile = write(directory, "ca.pem", self.ca.cert_pem.bytes())

    def server(self, *names: str, name: str = "server", **kw: Any) -> ServerTLS:
        leaf = self.ca.issue_cert(*names, **kw)
        cert = write(self.dir, name + ".pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key = write(self.dir, name + ".key", leaf.private_key_pem.bytes())
        return ServerTLS(cert=cert, key=key)

    def clientTLS(self, **kw: Any) -> ClientTLS:
        return ClientTLS(rootCAs=(self.caFile,), **kw)


def selfSigned(directory: str, name: str) -> ServerTLS:
    """
    A self-signed certificate for C{name} and its key, made by openssl.
    """
    cert, key = os.path.join(directory, "self.pem"), os.path.join(directory, "self.key")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )
    return ServerTLS(cert=cert, key=key)


def freeTCPPort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Loopback:
    """
    Fake downstreams listening on 127.0.0.1, and an endpoint factory that
    remembers client connections; everything is closed in cleanup.
    """

    def __init__(self, testCase: TestCase) -> None:
        self.factories: list[DownstreamFactory] = []
        self.clients: list[tuple[SMTPClientProtocol, Deferred[None]]] = []
        testCase.addCleanup(self.close)
        self._ports: list[Any] = []

    def listen(self, script: Script | None = None, lmtp: bool = False,
               implicitTLS: Any = None) -> tuple[Address, DownstreamFactory]:
        factory = DownstreamFactory(script, lmtp)
        self.factories.append(factory)
        wrapped: Any = TLSMemoryBIOFactory(implicitTLS, False, factory) if implicitTLS else factory
        port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self._ports.append(port)
        address = Address("tls" if implicitTLS else "tcp", "127.0.0.1", port.getHost().port)
        return address, factory

    def endpointFactory(self, address: Any, timeout: float, options: Any) -> Any:
        endpoint = clientEndpoint(reactor, address, timeout, options)
        loopback = self

        class Recording:
            def connect(self, factory: Any) -> Deferred[Any]:
                def record(protocol: SMTPClientProtocol) -> SMTPClientProtocol:
                    lost: Deferred[None] = Deferred()
                    original = protocol.connectionLost

                    def connectionLost(reason: Any = None) -> None:
                        original(reason)
                        lost.callback(None)

                    protocol.connectionLost = connectionLost  # type: ignore[method-assign]  # a spy on the method
                    loopback.clients.append((protocol, lost))
                    return protocol

                return endpoint.connect(factory).addCallback(record)

        return Recording()

    def failover(self, target: Target, **kw: Any) -> Failover:
        return makeFailover(target, reactor, endpointFactory=self.endpointFactory, **kw)

    @inlineCallbacks
    def close(self) -> Any:
        waits = []
        for protocol, lost in self.clients:
            if not lost.called:
                protocol.abort()
                waits.append(lost)
        for factory in self.factories:
            for connection in factory.connections:
                if not connection.lost:
                    connection.transport.abortConnection()
                waits.append(connection.whenLost())
        yield DeferredList(waits)
        for port in self._ports:
            yield port.stopListening()


def makeTarget(*endpoints: Address, **kw: Any) -> Target:
    kw.setdefault("protocol", "smtp")
    kw.setdefault("commandTimeout", 20.0)
    kw.setdefault("connectTimeout", 20.0)
    return Target(name="t", endpoints=endpoints, hostname="relay.example", **kw)


class StartTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.net = Loopback(self)

    def starttlsServer(self, tls: ServerTLS | Any) -> tuple[Address, DownstreamFactory]:
        options = serverOptions(tls) if isinstance(tls, ServerTLS) else tls
        return self.net.listen(Script(replies={"EHLO": STARTTLS_EHLO}, tlsOptions=options))

    @inlineCallbacks
    def test_valid(self) -> Any:
        """
        A certificate for the name we verify: STARTTLS, EHLO again, TLS
        info from the real connection.
        """
        address, factory = self.starttlsServer(self.pki.server("mx.example"))
        target = makeTarget(address, requireTLS=True,
                            tlsClient=self.pki.clientTLS(serverName="mx.example"))
        metrics = Metrics()
        session, _ = yield self.net.failover(target, metrics=metrics).open(mail=(b"a@example.org", {}))
        self.assertIn(b'smtprelay_tls_handshakes_total{result="ok",side="outbound",verified="yes"} 1.0',
                      metrics.exposition()[0])
        self.assertIsNotNone(session.tls)
        self.assertIn(session.tls.version, ("TLSv1.2", "TLSv1.3"))
        self.assertTrue(session.tls.cipher)
        self.assertTrue(session.tls.verified)
        self.assertIsNone(session.untrusted)
        self.assertIn(session.tls.bits, ((256, 256), (128, 128)))
        server = factory.connections[0]
        self.assertTrue(server.tls)
        self.assertEqual(
            server.commands,
            [b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example", b"MAIL FROM:<a@example.org>"],
        )

    @inlineCallbacks
    def test_ipIdentity(self) -> Any:
        """
        Without server_name the target's IP literal is verified (IP-ID).
        """
        address, _factory = self.starttlsServer(self.pki.server("127.0.0.1"))
        session, _ = yield self.net.failover(
            makeTarget(address, requireTLS=True, tlsClient=self.pki.clientTLS())
        ).open()
        self.assertIsNotNone(session.tls)

    @inlineCallbacks
    def assertUntrusted(self, tls: ServerTLS, clientTLS: ClientTLS, reason: str) -> Any:
        """
        A peer whose certificate cannot be verified (issue 13 item 2).
        Under C{require_tls} the target is skipped after its handshake
        (C{451 4.7.5}), never retried in plain text.  With only
        C{attempt_starttls} the encrypted connection is kept, marked
        untrusted (Postfix's C{may}), and the message goes over it.  The
        relay's password, or a client's (C{auth forward}), is never sent
        over it: a configuration fault, C{454 4.7.0}.
        """
        address, factory = self.starttlsServer(tls)
        metrics = Metrics()
        error = yield self.assertFailure(
            self.net.failover(makeTarget(address, requireTLS=True, tlsClient=clientTLS),
                              metrics=metrics).open(),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)
        self.assertIn(f"TLS peer not verified: {reason}", error.reason)
        self.assertEqual(len(factory.connections), 1)
        session, _ = yield self.net.failover(
            makeTarget(address, attemptStartTLS=True, tlsClient=clientTLS), metrics=metrics,
        ).open(mail=(b"a@example.org", {}))
        self.assertIn(b'smtprelay_tls_handshakes_total{result="ok",side="outbound",verified="no"} 2.0',
                      metrics.exposition()[0])
        self.assertIsNotNone(session.tls)
        self.assertFalse(session.tls.verified)
        self.assertEqual(session.untrusted, reason)
        self.assertEqual(len(factory.connections), 2)
        self.assertTrue(factory.connections[1].tls)
        self.assertEqual(
            factory.connections[1].commands,
            [b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example", b"MAIL FROM:<a@example.org>"],
        )
        error = yield self.assertFailure(
            self.net.failover(makeTarget(
                address, auth=DownstreamAuth("plain", "relay", Secret("s3cret")), tlsClient=clientTLS,
            )).open(),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_AUTH)
        error = yield self.assertFailure(
            self.net.failover(makeTarget(address, auth=DownstreamAuth("forward"), tlsClient=clientTLS))
            .open(credentials=Credentials("alice", "wonder")),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_AUTH)
        self.assertEqual(len(factory.connections), 4)
        for connection in factory.connections[2:]:
            self.assertFalse(any(c.startswith(b"AUTH") for c in connection.commands))
            self.assertTrue(connection.tls)

    def test_wrongName(self) -> Any:
        return self.assertUntrusted(self.pki.server("other.example"),
                                    self.pki.clientTLS(serverName="mx.example"),
                                    "certificate does not name mx.example")

    def test_expired(self) -> Any:
        past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
        tls = self.pki.server("mx.example", not_before=past - datetime.timedelta(days=10), not_after=past)
        return self.assertUntrusted(tls, self.pki.clientTLS(serverName="mx.example"), "certificate has expired")

    def test_untrustedRoot(self) -> Any:
        other = PKI(self.mktemp())
        return self.assertUntrusted(other.server("mx.example"), self.pki.clientTLS(serverName="mx.example"),
                                    "unable to get local issuer certificate")

    def test_selfSigned(self) -> Any:
        """
        A self-signed certificate (no CA), as a fresh Postfix has.
        """
        return self.assertUntrusted(selfSigned(self.pki.dir, "mx.example"),
                                    self.pki.clientTLS(serverName="mx.example"),
                                    "self-signed certificate")

    @inlineCallbacks
    def test_passwordOverVerifiedTLS(self) -> Any:
        address, factory = self.starttlsServer(self.pki.server("mx.example"))
        session, _ = yield self.net.failover(makeTarget(
            address, auth=DownstreamAuth("plain", "relay", Secret("s3cret")),
            tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )).open()
        self.assertTrue(session.tls.verified)
        self.assertEqual(factory.connections[0].commands[-1], b"AUTH PLAIN AHJlbGF5AHMzY3JldA==")

    @inlineCallbacks
    def test_insecureSkipVerify(self) -> Any:
        """
        insecure_skip_verify encrypts without verification (the peer is
        untrusted), and still counts as TLS for require_tls and AUTH, a
        password included.
        """
        other = PKI(self.mktemp())
        address, factory = self.starttlsServer(other.server("other.example"))
        for auth, command in ((DownstreamAuth("external"), b"AUTH EXTERNAL ="),
                              (DownstreamAuth("plain", "relay", Secret("s3cret")),
                               b"AUTH PLAIN AHJlbGF5AHMzY3JldA==")):
            target = makeTarget(
                address, requireTLS=True, auth=auth, tlsClient=ClientTLS(insecureSkipVerify=True),
            )
            session, _ = yield self.net.failover(target).open()
            self.assertFalse(session.tls.verified)
            self.assertEqual(session.untrusted, "insecure_skip_verify")
            self.assertEqual(factory.connections[-1].commands[-1], command)

    @inlineCallbacks
    def test_clientCertificate(self) -> Any:
        """
        A server that requires a client certificate: without one the
        handshake fails; with tls_client cert+key, AUTH EXTERNAL follows.
        """
        leaf = self.pki.ca.issue_cert("mx.example")
        clientLeaf = self.pki.ca.issue_cert("relay.example")
        options = CertificateOptions(
            privateKey=_key(leaf.private_key_pem.bytes()),
            certificate=Certificate.loadPEM(leaf.cert_chain_pems[0].bytes()).original,
            verify=True,
            requireCertificate=True,
            caCerts=[Certificate.loadPEM(self.pki.ca.cert_pem.bytes()).original],
        )
        address, factory = self.starttlsServer(options)
        cert = write(self.pki.dir, "client.pem", clientLeaf.cert_chain_pems[0].bytes())
        key = write(self.pki.dir, "client.key", clientLeaf.private_key_pem.bytes())
        external = DownstreamAuth("external")
        error = yield self.assertFailure(
            self.net.failover(makeTarget(
                address, auth=external, tlsClient=self.pki.clientTLS(serverName="mx.example"),
            )).open(),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.NO_DOWNSTREAM)
        session, _ = yield self.net.failover(makeTarget(
            address, auth=external,
            tlsClient=self.pki.clientTLS(serverName="mx.example", cert=cert, key=key),
        )).open()
        self.assertIsNotNone(session.tls)
        self.assertEqual(factory.connections[-1].commands[-1], b"AUTH EXTERNAL =")

    @inlineCallbacks
    def test_protocolMismatch(self) -> Any:
        """
        protocols: a client that wants TLS 1.3 only does not talk to a TLS
        1.2-only server.
        """
        tls = self.pki.server("mx.example")
        server = ServerTLS(cert=tls.cert, key=tls.key, protocols=("tls1.2", "tls1.2"))
        address, _factory = self.starttlsServer(server)
        error = yield self.assertFailure(
            self.net.failover(makeTarget(
                address, requireTLS=True,
                tlsClient=self.pki.clientTLS(serverName="mx.example", protocols=("tls1.3", None)),
            )).open(),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)
        session, _ = yield self.net.failover(makeTarget(
            address, requireTLS=True,
            tlsClient=self.pki.clientTLS(serverName="mx.example", protocols=("tls1.2", None)),
        )).open()
        self.assertEqual(session.tls.version, "TLSv1.2")

    @inlineCallbacks
    def test_curves(self) -> Any:
        address, _factory = self.starttlsServer(self.pki.server("mx.example"))
        session, _ = yield self.net.failover(makeTarget(
            address, requireTLS=True,
            tlsClient=self.pki.clientTLS(serverName="mx.example", curves=("P-256",)),
        )).open()
        self.assertIsNotNone(session.tls)

    @inlineCallbacks
    def test_badCertFirstTargetRequireTLS(self) -> Any:
        """
        Failover: a first target with a bad certificate under require_tls,
        the second is reached.
        """
        bad, badFactory = self.starttlsServer(self.pki.server("other.example"))
        good, _goodFactory = self.starttlsServer(self.pki.server("mx.example"))
        session, mailReply = yield self.net.failover(makeTarget(
            bad, good, requireTLS=True, tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )).open(mail=(b"a@example.org", {}))
        self.assertEqual(mailReply.code, 250)
        self.assertEqual(session.peer, f"127.0.0.1[127.0.0.1]:{good.port}")
        self.assertEqual(len(badFactory.connections), 1)

    @inlineCallbacks
    def test_refusedFirstTarget(self) -> Any:
        good, _goodFactory = self.net.listen()
        refused = Address("tcp", "127.0.0.1", freeTCPPort())
        session, _ = yield self.net.failover(makeTarget(refused, good)).open()
        self.assertEqual(session.peer, f"127.0.0.1[127.0.0.1]:{good.port}")


class ImplicitTLSTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())
        self.net = Loopback(self)

    @inlineCallbacks
    def test_implicit(self) -> Any:
        address, factory = self.net.listen(
            Script(replies={"EHLO": STARTTLS_EHLO}), implicitTLS=serverOptions(self.pki.server("mx.example"))
        )
        session, _ = yield self.net.failover(makeTarget(
            address, requireTLS=True, tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )).open()
        self.assertIsNotNone(session.tls)
        self.assertEqual(factory.connections[0].commands, [b"EHLO relay.example"])

    @inlineCallbacks
    def test_implicitUntrusted(self) -> Any:
        """
        Implicit TLS to a peer that cannot be verified, without
        C{require_tls}: the connection is kept, untrusted.
        """
        address, factory = self.net.listen(
            implicitTLS=serverOptions(self.pki.server("other.example"))
        )
        session, _ = yield self.net.failover(makeTarget(
            address, tlsClient=self.pki.clientTLS(serverName="mx.example"),
        )).open()
        self.assertFalse(session.tls.verified)
        self.assertEqual(session.untrusted, "certificate does not name mx.example")
        self.assertEqual(factory.connections[0].commands, [b"EHLO relay.example"])

    @inlineCallbacks
    def test_implicitBadCertificate(self) -> Any:
        address, _factory = self.net.listen(
            implicitTLS=serverOptions(self.pki.server("other.example"))
        )
        error = yield self.assertFailure(
            self.net.failover(makeTarget(
                address, requireTLS=True, tlsClient=self.pki.clientTLS(serverName="mx.example"),
            )).open(),
            DownstreamError,
        )
        self.assertEqual(error.reply, replies.DOWNSTREAM_NO_TLS)


def _key(pem: bytes) -> Any:
    from OpenSSL import crypto

    return crypto.load_privatekey(crypto.FILETYPE_PEM, pem)


class ServerOptionsTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.pki = PKI(self.mktemp())

    @inlineCallbacks
    def peerCertificate(self, options: Any, clientTLS: ClientTLS) -> Any:
        """
        Connect over loopback TLS and return the server's certificate.
        """
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, DownstreamFactory()),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = Address("tls", "127.0.0.1", port.getHost().port)
        protocol = Protocol()
        done: Deferred[None] = Deferred()
        protocol.connectionLost = lambda reason: done.callback(None)  # type: ignore[method-assign, assignment, misc]  # a spy on the method
        endpoint = clientEndpoint(reactor, address, 10, clientOptions(clientTLS, "127.0.0.1"))
        yield connectProtocol(endpoint, protocol)
        received: Deferred[None] = Deferred()
        protocol.dataReceived = lambda data: received.callback(None) if not received.called else None  # type: ignore[method-assign]  # a spy on the method
        yield received  # the greeting: the handshake is done
        peer = Certificate.peerFromTransport(protocol.transport)
        protocol.transport.abortConnection()  # type: ignore[union-attr]  # connected: the transport is set
        yield done
        return peer

    @inlineCallbacks
    def test_chainAndReload(self) -> Any:
        """
        The chain in the cert file is sent (a client trusting only the root
        verifies a leaf from an intermediate); reload() switches to the new
        files for new connections.
        """
        intermediate = self.pki.ca.create_child_ca()
        leaf = intermediate.issue_cert("127.0.0.1")
        cert = write(self.pki.dir, "chain.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        key = write(self.pki.dir, "chain.key", leaf.private_key_pem.bytes())
        options = serverOptions(ServerTLS(cert=cert, key=key))
        first = yield self.peerCertificate(options, self.pki.clientTLS())
        newLeaf = intermediate.issue_cert("127.0.0.1")
        write(self.pki.dir, "chain.pem", b"".join(p.bytes() for p in newLeaf.cert_chain_pems))
        write(self.pki.dir, "chain.key", newLeaf.private_key_pem.bytes())
        options.reload()
        second = yield self.peerCertificate(options, self.pki.clientTLS())
        self.assertNotEqual(first.serialNumber(), second.serialNumber())
        self.assertEqual(
            second.serialNumber(),
            Certificate.loadPEM(newLeaf.cert_chain_pems[0].bytes()).serialNumber(),
        )

    def test_sessionResumption(self) -> None:
        """
        The listener issues session tickets: a client that comes back with
        its session resumes it (an abbreviated handshake), with TLS 1.3
        and with TLS 1.2, and also when client certificates are asked for.
        """
        for protocols, clientCA in (
            (("tls1.3", None), None), (("tls1.2", "tls1.2"), None), (("tls1.3", None), self.pki.caFile)
        ):
            tls = attrs.evolve(self.pki.server("127.0.0.1"), protocols=protocols, clientCA=clientCA)
            options = serverOptions(tls)
            clientContext = SSL.Context(SSL.TLS_CLIENT_METHOD)  # tickets on, as in OpenSSL's clients
            first = _memoryHandshake(options, clientContext, None)
            second = _memoryHandshake(options, clientContext, first.get_session())
            self.assertEqual((_reused(first), _reused(second)), (False, True), protocols)

    def test_reloadErrorKeepsOld(self) -> None:
        tls = self.pki.server("127.0.0.1")
        options = serverOptions(tls)
        before = options.getContext()
        write(self.pki.dir, "server.pem", b"garbage")
        self.assertRaises(ValueError, options.reload)
        self.assertIs(options.getContext(), before)


def _memoryHandshake(server: Any, client: SSL.Context, session: Any) -> Any:
    """
    A TLS handshake between C{server}'s and C{client}'s connections in
    memory, C{session} offered for resumption; the client reads what the
    server sends after it (TLS 1.3 tickets).  Returns the client's
    connection.
    """
    serverSide = server.serverConnectionForTLS(None)
    serverSide.set_accept_state()
    clientSide = SSL.Connection(client, None)
    clientSide.set_connect_state()
    if session is not None:
        clientSide.set_session(session)
    for _ in range(10):
        for side in (clientSide, serverSide):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
        for source, sink in ((clientSide, serverSide), (serverSide, clientSide)):
            try:
                sink.bio_write(source.bio_read(65536))
            except SSL.WantReadError:
                pass
    try:
        clientSide.recv(1)
    except SSL.WantReadError:
        pass
    return clientSide


def _reused(connection: Any) -> bool:
    from OpenSSL._util import lib

    return bool(lib.SSL_session_reused(connection._ssl))


class ClientOptionsTests(SynchronousTestCase):
    def test_unknownCurve(self) -> None:
        self.assertRaises(ValueError, clientOptions, ClientTLS(curves=("no-such-curve",)), "mx.example")

    def test_missingRootFile(self) -> None:
        e = self.assertRaises(
            ValueError, clientOptions, ClientTLS(rootCAs=("/nonexistent/ca.pem",)), "mx.example"
        )
        self.assertEqual(str(e), "/nonexistent/ca.pem: cannot read: No such file or directory")


del FakeDownstream
