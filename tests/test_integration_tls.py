"""
TLS listeners of a real C{twistd -n smtprelay} against real TLS clients on
127.0.0.1: C{openssl s_client} (implicit TLS, and C{-starttls smtp}) and
Python's C{ssl} through C{smtplib}.  Every client verifies the relay's
certificate (a trustme CA) and its name; the relay forwards to Postfix's
C{smtp-sink}.
"""

from __future__ import annotations

import os
import select
import smtplib
import socket
import ssl
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, STARTUP, Certificates, Processes, need, sinkMessages
from .test_integration_relay import splitSinkDump

MESSAGE = b"From: s@example.org\r\nSubject: over TLS\r\n\r\n.a line that starts with a dot\r\nlast line\r\n"


class OpenSSLClient:
    """
    An interactive C{openssl s_client -quiet -crlf} session: it verifies
    the relay's certificate and the name C{relay.test} (a failure ends the
    handshake), then relays lines between us and the server.
    """

    def __init__(self, case: SynchronousTestCase, port: int, ca: str, *extra: str) -> None:
        need("openssl")
        self.process = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-CAfile", ca, "-verify_return_error",
             "-verify_hostname", "relay.test", "-crlf", "-quiet", *extra],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        case.addCleanup(self.close)
        self._buffer = b""

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=STARTUP)

    def readReply(self) -> list[bytes]:
        """
        The lines of the next complete reply (up to a line C{NNN SP});
        fails the test if none comes within L{STARTUP} seconds.
        """
        lines = []
        while not lines or lines[-1][3:4] != b" ":
            lines.append(self._readLine())
        return lines

    def _readLine(self) -> bytes:
        deadline = time.monotonic() + STARTUP
        stdout = self.process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stdout], [], [], left)[0]:
                raise AssertionError(f"no line from openssl s_client within {STARTUP:.0f}s: {self._buffer!r}")
            chunk = os.read(stdout.fileno(), 4096)
            if not chunk:
                stderr = self.process.stderr.read() if self.process.stderr else b""
                raise AssertionError(f"openssl s_client ended: {self._buffer!r} {stderr!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def command(self, line: bytes) -> list[bytes]:
        """
        Send one line (s_client turns its LF into CRLF) and read the reply.
        """
        assert self.process.stdin is not None
        self.process.stdin.write(line + b"\n")
        self.process.stdin.flush()
        return self.readReply()

    def transaction(self, body: bytes) -> list[bytes]:
        """
        MAIL, RCPT, DATA and C{body} (LF lines, no dot-stuffing needed for
        it), answered one by one; returns the reply to the dot.
        """
        assert self.command(b"MAIL FROM:<s@example.org>")[0].startswith(b"250 ")
        assert self.command(b"RCPT TO:<r@example.net>")[0].startswith(b"250 ")
        assert self.command(b"DATA")[0].startswith(b"354 ")
        return self.command(body + b".")


class TLSListenerTests(SynchronousTestCase):
    """
    A relay with a C{tcp://} listener (STARTTLS) and a C{tls://} listener
    (implicit TLS, port 465 habits), both to smtp-sink.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)
        self.sinkPort, self.dumps = self.procs.smtpSink()
        self.pki: Certificates = self.procs.certificates("relay.test", HOST)
        self.implicit = self.procs.relayConfig(
            f"hostname relay.test\ntls {self.pki.cert} {self.pki.key}\n"
            f"smtp tls://{HOST}:{{port}} {{\n    deliver_to smtp tcp://{HOST}:{self.sinkPort}\n}}\n"
        )
        self.starttls = self.procs.relayConfig(
            f"hostname relay.test\ntls {self.pki.cert} {self.pki.key}\n"
            f"smtp tcp://{HOST}:{{port}} {{\n    deliver_to smtp tcp://{HOST}:{self.sinkPort}\n}}\n"
        )

    def assertDeliveredOverTLS(self) -> None:
        [dump] = sinkMessages(self.dumps)
        _, received, body = splitSinkDump(dump)
        self.assertIn(b"(using TLSv1.3 with cipher ", received)
        self.assertIn(b" with ESMTPS id ", received)
        self.assertTrue(body.startswith(MESSAGE.replace(b"\r\n", b"\n")), body)

    def test_opensslImplicitTLS(self) -> None:
        """
        C{openssl s_client} to the C{tls://} listener: the handshake
        completes first (the certificate verifies for relay.test), then the
        C{220} greeting; EHLO offers no STARTTLS (TLS is on already); a
        message goes through; QUIT gets C{221}.
        """
        client = OpenSSLClient(self, self.implicit, self.pki.ca)
        [greeting] = client.readReply()
        self.assertTrue(greeting.startswith(b"220 relay.test "), greeting)
        ehlo = client.command(b"EHLO client.test")
        self.assertEqual(ehlo[0], b"250-relay.test")
        self.assertNotIn(b"250-STARTTLS", ehlo)
        [done] = client.transaction(MESSAGE.replace(b"\r\n", b"\n").replace(b"\n.a", b"\n..a"))
        self.assertTrue(done.startswith(b"250 "), done)
        self.assertEqual(client.command(b"QUIT"), [b"221 2.0.0 Bye"])
        self.assertDeliveredOverTLS()

    def test_pythonSSLImplicitTLS(self) -> None:
        """
        Python's C{ssl} (C{smtplib.SMTP_SSL}, certificate and name checked
        by the default context) delivers a message through the C{tls://}
        listener.
        """
        context = ssl.create_default_context(cafile=self.pki.ca)
        with smtplib.SMTP_SSL(HOST, self.implicit, local_hostname="client.test", context=context,
                              timeout=STARTUP) as client:
            client.ehlo()
            self.assertFalse(client.has_extn("starttls"))
            self.assertEqual(client.sendmail("s@example.org", ["r@example.net"], MESSAGE), {})
            self.assertEqual(client.sock.version(), "TLSv1.3")
        self.assertDeliveredOverTLS()

    def test_plainTextToImplicitTLSListenerIsClosed(self) -> None:
        """
        A client that speaks SMTP in clear to the C{tls://} listener gets
        no greeting and the connection is closed, not kept waiting.
        """
        with socket.create_connection((HOST, self.implicit), timeout=STARTUP) as client:
            client.sendall(b"EHLO client.test\r\n")
            received = b""
            while True:
                chunk = client.recv(4096)
                if not chunk:
                    break
                received += chunk
        self.assertNotIn(b"220", received)

    def test_opensslStartTLS(self) -> None:
        """
        C{openssl s_client -starttls smtp} to the C{tcp://} listener: the
        upgrade verifies, EHLO after it offers no STARTTLS, and a message
        goes through.
        """
        client = OpenSSLClient(self, self.starttls, self.pki.ca, "-starttls", "smtp")
        ehlo = client.command(b"EHLO client.test")
        self.assertEqual(ehlo[0], b"250-relay.test")
        self.assertNotIn(b"250-STARTTLS", ehlo)
        [done] = client.transaction(MESSAGE.replace(b"\r\n", b"\n").replace(b"\n.a", b"\n..a"))
        self.assertTrue(done.startswith(b"250 "), done)
        self.assertEqual(client.command(b"QUIT"), [b"221 2.0.0 Bye"])
        self.assertDeliveredOverTLS()
