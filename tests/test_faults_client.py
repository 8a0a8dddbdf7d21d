"""
Client faults through the whole relay in memory: a client that goes away
(FIN or reset) in the middle of a command, of the body, or right after its
dot; a client that sends slowly before and during DATA.  The promises
kept: the downstream never sees a dot the client did not
send, a transaction whose dot was sent is finished anyway, a command line
and the DATA phase each have a deadline that trickling bytes do not
restart, and nothing is leaked.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import struct

import trustme
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.testing.downstream import Script

from .procs import HOST, Processes, freePort, need, sinkAborted
from .relay_stack import FIRST, Client, RelayStack

ENVELOPE = b"MAIL FROM:<s@example.org>\r\nRCPT TO:<r@example.net>\r\n"
BODY = b"Subject: client faults\r\n\r\n" + b"body line\r\n" * 20
ENDINGS = {"FIN": ConnectionDone("client closed"), "RST": ConnectionLost("client reset")}


def startBody(stack: RelayStack) -> Client:
    client = stack.connect()
    client.exchange(b"MAIL FROM:<s@example.org>\r\n")
    client.exchange(b"RCPT TO:<r@example.net>\r\n")
    assert client.exchange(b"DATA\r\n")[0][:3] == b"354"
    return client


class ClientGoneTests(SynchronousTestCase):
    """
    The client's connection ends at every awkward moment, by FIN and by
    reset.
    """

    def assertNoDot(self, stack: RelayStack) -> None:
        for downstream in stack.allDownstreams():
            self.assertEqual(downstream.messages, [])
            self.assertTrue(downstream.lost)

    def midCommand(self, ending: str) -> None:
        stack = RelayStack(self, {FIRST: Script()})
        client = stack.connect()
        client.protocol.dataReceived(b"MAIL FROM:<s@exa")
        client.disconnect(Failure(ENDINGS[ending]))
        self.assertEqual(stack.network.attempts, [])
        stack.assertQuiet()

    def test_finMidCommand(self) -> None:
        self.midCommand("FIN")

    def test_rstMidCommand(self) -> None:
        self.midCommand("RST")

    def whileMailInFlight(self, ending: str) -> None:
        """
        The client leaves while its MAIL is at the downstream: the
        downstream session is closed when its reply comes (QUIT: a MAIL
        is open on it), not leaked.
        """
        stack = RelayStack(self, {FIRST: Script()})
        client = stack.connect()
        client.protocol.dataReceived(b"MAIL FROM:<s@example.org>\r\n")
        client.disconnect(Failure(ENDINGS[ending]))
        self.assertEqual(stack.network.attempts, [str(FIRST)])
        [downstream] = stack.allDownstreams()
        self.assertEqual(downstream.commands, [b"EHLO relay.test", b"MAIL FROM:<s@example.org>", b"QUIT"])
        self.assertTrue(downstream.lost)
        stack.assertQuiet()

    def test_finWhileMailInFlight(self) -> None:
        self.whileMailInFlight("FIN")

    def test_rstWhileMailInFlight(self) -> None:
        self.whileMailInFlight("RST")

    def midBody(self, ending: str, body: bytes) -> None:
        """
        Gone before the real end-of-data: the downstream
        connection is closed without the dot (a dot-line-like text inside
        the body is no end).
        """
        stack = RelayStack(self, {FIRST: Script()})
        client = startBody(stack)
        client.exchange(body, count=0)
        client.disconnect(Failure(ENDINGS[ending]))
        self.assertNoDot(stack)
        stack.assertQuiet()

    def test_finMidBody(self) -> None:
        self.midBody("FIN", BODY)

    def test_rstMidBody(self) -> None:
        self.midBody("RST", BODY)

    def test_finMidBodyAfterDotLikeLines(self) -> None:
        self.midBody("FIN", BODY + b"\n.\n" + b".\r" + b"\r\n.")

    def test_finMidLongBody(self) -> None:
        """
        Gone while the downstream holds the body back (back-pressure).
        """
        stack = RelayStack(self, {FIRST: Script(readRate=1000)})
        client = startBody(stack)
        client.exchange(b"x" * 998 + b"\r\n" * 300, count=0)
        client.disconnect(Failure(ConnectionDone()))
        self.assertNoDot(stack)
        stack.assertQuiet()

    def rightAfterDot(self, ending: str) -> None:
        """
        Gone right after its dot: the downstream transaction is
        finished anyway (exactly one message), then closed.
        """
        stack = RelayStack(self, {FIRST: Script()})
        client = startBody(stack)
        client.protocol.dataReceived(BODY + b".\r\n")
        client.disconnect(Failure(ENDINGS[ending]))
        [downstream] = stack.allDownstreams()
        self.assertEqual(len(downstream.messages), 1)
        self.assertTrue(downstream.messages[0].endswith(BODY + b".\r\n"))
        stack.assertQuiet()

    def test_finRightAfterDot(self) -> None:
        self.rightAfterDot("FIN")

    def test_rstRightAfterDot(self) -> None:
        self.rightAfterDot("RST")

    def test_tlsCloseMidBody(self) -> None:
        """
        A TLS client's close (close_notify, then FIN) in the body ends the
        session like a FIN: no dot downstream.
        """
        stack = RelayStack(self, {FIRST: Script()})
        client = startBody(stack)
        client.protocol.session.tls = object()  # type: ignore[assignment]  # only whether TLS is on matters on this path
        client.exchange(BODY, count=0)
        client.disconnect(Failure(ConnectionDone("TLS close_notify")))
        self.assertNoDot(stack)
        stack.assertQuiet()


class SlowSenderTests(SynchronousTestCase):
    """
    Clients that trickle bytes: a command line has a deadline of
    C{read_timeout} from its first byte, and the DATA phase one of
    C{data_timeout}; neither restarts per byte.
    """

    def trickle(self, stack: RelayStack, clients: list[Client], data: bytes, every: float) -> float:
        """
        Send C{data} one byte every C{every} seconds on each client until
        all are closed or the data is sent; return the time all were
        closed (or the end).
        """
        start = stack.clock.seconds()
        for byte in data:
            open_ = [c for c in clients if not c.closed]
            if not open_:
                break
            for client in open_:
                client.protocol.dataReceived(bytes([byte]))
            stack.clock.advance(every)
            stack.flush()
        return stack.clock.seconds() - start

    def test_slowBeforeData(self) -> None:
        """
        Issue 14 E: 200 clients sending one byte every 3 s with
        C{read_timeout 10s} are cut off with C{421 4.4.2} within 10 s
        (plus one step), whatever the bytes.
        """
        stack = RelayStack(self, {FIRST: Script()}, listenerOptions={"readTimeout": 10.0,
                                                                     "maxConnectionsPerIP": 500})
        clients = [stack.connect() for _ in range(200)]
        took = self.trickle(stack, clients, b"MAIL FROM:<slow-sender@example.org>\r\n", 3.0)
        self.assertLessEqual(took, 12.0)
        for client in clients:
            client.exchange(b"", count=0)
            self.assertTrue(client.closed)
            self.assertRegex(client.output, rb"\r\n421 4\.4\.2 [^\r]*\r\n\Z")
        self.assertEqual(stack.network.attempts, [])
        stack.assertQuiet()

    def test_slowDuringData(self) -> None:
        """
        A body trickling one byte every 3 s is cut off at the listener's
        C{data_timeout} (60 s here): 421, and the downstream never sees a
        dot.
        """
        stack = RelayStack(self, {FIRST: Script()}, listenerOptions={"dataTimeout": 60.0})
        client = startBody(stack)
        took = self.trickle(stack, [client], BODY + b".\r\n", 3.0)
        self.assertLessEqual(took, 63.0)
        client.exchange(b"", count=0)
        self.assertTrue(client.closed)
        self.assertRegex(client.output, rb"\r\n421 4\.4\.2 [^\r]*\r\n\Z")
        [downstream] = stack.allDownstreams()
        self.assertEqual(downstream.messages, [])
        stack.assertQuiet()


class RealClientGoneTests(SynchronousTestCase):
    """
    The same over real sockets: a C{twistd} relay, Postfix's C{smtp-sink}
    downstream, a Python client that leaves in the middle of the body by a
    TLS close (close_notify, then FIN) or by a TCP reset.  The sink must
    drop the transaction: no complete message, ever.
    """

    def setUp(self) -> None:
        need("smtp-sink")
        self.processes = Processes(self)
        ca = trustme.CA()
        leaf = ca.issue_cert("relay.test", HOST)
        cert, key = os.path.join(self.processes.dir, "cert.pem"), os.path.join(self.processes.dir, "key.pem")
        leaf.private_key_pem.write_to_path(key)
        leaf.cert_chain_pems[0].write_to_path(cert)
        self.context = ssl.create_default_context()
        ca.configure_trust(self.context)
        sinkPort, self.dumps = self.processes.smtpSink()
        self.port = freePort()
        config = os.path.join(self.processes.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"hostname relay.test\ntls {cert} {key}\nsmtp tcp://{HOST}:{self.port} {{\n"
                    f"    deliver_to smtp tcp://{HOST}:{sinkPort}\n}}\n")
        self.processes.relay("--config", config, port=self.port)

    def startBody(self, tls: bool) -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=30)
        if tls:
            client.starttls(context=self.context)
        client.ehlo("client.test")
        self.assertEqual(client.mail("s@example.org")[0], 250)
        self.assertEqual(client.rcpt("r@example.net")[0], 250)
        self.assertEqual(client.docmd("DATA")[0], 354)
        assert client.sock is not None
        client.sock.sendall(BODY * 50 + b"\r\n.\n")
        return client

    def test_tlsCloseMidBody(self) -> None:
        client = self.startBody(tls=True)
        sock = client.sock
        assert isinstance(sock, ssl.SSLSocket)
        plain = sock.unwrap()  # close_notify
        client.close()
        plain.close()
        sinkAborted(self.dumps)

    def test_resetMidBody(self) -> None:
        client = self.startBody(tls=False)
        assert client.sock is not None
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # the socket and smtplib's file on it: the RST goes now
        sinkAborted(self.dumps)
