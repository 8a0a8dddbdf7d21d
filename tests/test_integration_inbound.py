"""
The inbound side of a real C{twistd -n smtprelay} against real clients.

TLS listeners: C{openssl s_client} and Python's C{ssl}/C{smtplib} on a
C{tls://} listener (handshake first, greeting after it) and C{openssl
s_client -starttls smtp} on a C{tcp://} one; clients that never complete a
handshake are closed and leave no socket behind, nor a place in
C{max_connections}.  Connection limits: many concurrent sessions from an
allowed network are all served.  Clients trickling a command are cut off at
the read timeout; the default hostname is the host's FQDN.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import subprocess
import threading
import time

import trustme
from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, STARTUP, Processes, freePort, need, sinkMessages

CLIENT_TIMEOUT = 60.0
"""Seconds a client waits for the relay: a hang limit, not a speed assertion."""


def closedByPeer(sock: socket.socket) -> bool:
    """
    Read until the relay closes the connection; whether it did so before
    L{CLIENT_TIMEOUT}, sending nothing.
    """
    sock.settimeout(CLIENT_TIMEOUT)
    try:
        data = sock.recv(4096)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return data == b""


def closeWaitSockets(port: int) -> list[str]:
    """
    The relay's sockets on C{port} in CLOSE-WAIT (the client closed, the
    relay has not), as C{ss} lists them.
    """
    out = subprocess.run(
        ["ss", "-Htn", "state", "close-wait", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


class ImplicitTLSListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        need("openssl", "ss")
        self.procs = Processes(self)
        self.sinkPort, self.dumps = self.procs.smtpSink()
        ca = trustme.CA()
        cert = ca.issue_cert("relay.test", HOST)
        self.certFile = os.path.join(self.procs.dir, "cert.pem")
        self.keyFile = os.path.join(self.procs.dir, "key.pem")
        self.caFile = os.path.join(self.procs.dir, "ca.pem")
        cert.cert_chain_pems[0].write_to_path(self.certFile)
        cert.private_key_pem.write_to_path(self.keyFile)
        os.chmod(self.keyFile, 0o600)
        ca.cert_pem.write_to_path(self.caFile)
        self.context = ssl.create_default_context(cafile=self.caFile)
        self.tlsPort, self.startTLSPort, self.proxiedPort = freePort(), freePort(), freePort()
        config = os.path.join(self.procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
tls {self.certFile} {self.keyFile}
smtp tls://{HOST}:{self.tlsPort} {{
    allow 127.0.0.0/8
    max_connections 2
    read_timeout 2s
    deliver_to smtp tcp://{HOST}:{self.sinkPort}
}}
smtp tcp://{HOST}:{self.startTLSPort} {{
    deliver_to smtp tcp://{HOST}:{self.sinkPort}
}}
smtp tls://{HOST}:{self.proxiedPort} {{
    proxy_protocol 127.0.0.0/8
    deliver_to smtp tcp://{HOST}:{self.sinkPort}
}}
""")
        self.procs.relay("--config", config, port=self.tlsPort)

    def converse(self, *args: str) -> tuple[list[str], str]:
        """
        Run C{openssl s_client ARGS} as a user would: read each reply, then
        send the next command (EHLO, QUIT), until the relay closes.

        @return: the reply lines and what openssl said on stderr.
        """
        process = subprocess.Popen(
            ["openssl", "s_client", "-brief", "-CAfile", self.caFile, "-verify_return_error",
             "-crlf", "-ign_eof", "-servername", "relay.test", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        killer = threading.Timer(CLIENT_TIMEOUT, process.kill)
        killer.start()
        self.addCleanup(killer.cancel)
        assert process.stdin is not None and process.stdout is not None
        lines = []
        commands = [b"EHLO client.test\n", b"QUIT\n"]
        if "-starttls" in args:
            # openssl read the greeting and its own EHLO's reply before TLS.
            process.stdin.write(commands.pop(0))
            process.stdin.flush()
        for raw in process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] == " " and commands:
                process.stdin.write(commands.pop(0))
                process.stdin.flush()
        process.stdin.close()
        process.wait()
        assert process.stderr is not None
        with process.stderr:
            return lines, process.stderr.read().decode("utf-8", "replace")

    def test_opensslImplicitTLS(self) -> None:
        """
        C{openssl s_client -connect} completes its handshake, then reads the
        greeting and talks SMTP inside TLS until the relay closes.
        """
        lines, info = self.converse("-connect", f"{HOST}:{self.tlsPort}")
        self.assertIn("Verification: OK", info)
        self.assertTrue(lines[0].startswith("220 relay.test ESMTP smtprelay"), lines)
        self.assertIn("250 CHUNKING", lines)
        self.assertNotIn("250-STARTTLS", lines)
        self.assertEqual(lines[-1], "221 2.0.0 Bye")

    def test_opensslStartTLS(self) -> None:
        """
        C{openssl s_client -starttls smtp} on a C{tcp://} listener: EHLO,
        STARTTLS, then SMTP inside TLS.
        """
        lines, info = self.converse("-connect", f"{HOST}:{self.startTLSPort}", "-starttls", "smtp")
        self.assertIn("Verification: OK", info)
        self.assertIn("250 CHUNKING", lines)
        self.assertNotIn("250-STARTTLS", lines)
        self.assertEqual(lines[-1], "221 2.0.0 Bye")

    def test_smtplibDelivers(self) -> None:
        """
        Python's C{smtplib.SMTP_SSL} (port 465 habits) sends a message
        through the C{tls://} listener to the sink.
        """
        with smtplib.SMTP_SSL(HOST, self.tlsPort, context=self.context,
                              timeout=CLIENT_TIMEOUT) as client:
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: tls\r\n\r\nbody\r\n")
        [message] = sinkMessages(self.dumps)
        self.assertIn(b"Subject: tls", message)
        self.assertIn(b"(using TLSv1.3", message)

    def test_proxiedImplicitTLS(self) -> None:
        """
        Behind the PROXY protocol, a C{tls://} listener reads the header,
        then the handshake, then greets; the session is the proxied
        client's.
        """
        with socket.create_connection((HOST, self.proxiedPort), timeout=CLIENT_TIMEOUT) as raw:
            raw.sendall(b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 465\r\n")
            with self.context.wrap_socket(raw, server_hostname="relay.test") as tls:
                self.assertTrue(tls.recv(4096).startswith(b"220 relay.test ESMTP"))
                tls.sendall(b"QUIT\r\n")
                self.assertEqual(tls.recv(4096), b"221 2.0.0 Bye\r\n")
        self.assertIn("from 192.0.2.9", self.procs.log("relay"))

    def test_failedHandshakesClosed(self) -> None:
        """
        Plain text and garbage are closed at once, a silent client when the
        handshake deadline (the listener's read timeout) expires; none of
        them stays in CLOSE-WAIT or holds one of the two places of
        C{max_connections}, and a real TLS client is served after them.
        """
        for opening in (b"EHLO client.test\r\n", b"\x16\x03\x01\x00\x02\xff\xff", b""):
            with socket.create_connection((HOST, self.tlsPort), timeout=CLIENT_TIMEOUT) as sock:
                if opening:
                    sock.sendall(opening)
                self.assertTrue(closedByPeer(sock), opening)
        for _ in range(3):
            # Clients that give up in the middle of the handshake.
            sock = socket.create_connection((HOST, self.tlsPort), timeout=CLIENT_TIMEOUT)
            sock.sendall(b"\x16\x03\x01")
            sock.close()
        deadline = time.monotonic() + STARTUP
        while closeWaitSockets(self.tlsPort) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(closeWaitSockets(self.tlsPort), [])
        for _ in range(3):
            with socket.create_connection((HOST, self.tlsPort), timeout=CLIENT_TIMEOUT) as raw:
                with self.context.wrap_socket(raw, server_hostname="relay.test") as tls:
                    self.assertTrue(tls.recv(4096).startswith(b"220 relay.test ESMTP"))
                    tls.sendall(b"QUIT\r\n")
                    self.assertEqual(tls.recv(4096), b"221 2.0.0 Bye\r\n")
        log = self.procs.log("relay")
        self.assertIn("TLS handshake failed in", log)
        self.assertNotIn("Traceback", log)


class PerIPLimitTests(SynchronousTestCase):
    def test_allowedClientsExempt(self) -> None:
        """
        110 concurrent sessions from 127.0.0.1 are all greeted on a listener
        that allows 127.0.0.0/8 with C{max_connections_per_ip 5}; with
        C{limit_exceptions none} the sixth gets C{421 4.7.0}.
        """
        procs = Processes(self)
        sinkPort, _ = procs.smtpSink()
        exempt, limited = freePort(), freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
smtp tcp://{HOST}:{exempt} {{
    allow 127.0.0.0/8
    max_connections_per_ip 5
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
smtp tcp://{HOST}:{limited} {{
    allow 127.0.0.0/8
    max_connections_per_ip 5
    limit_exceptions none
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
""")
        procs.relay("--config", config, port=exempt)
        for port, count, expected in ((exempt, 110, [b"220"] * 110),
                                      (limited, 6, [b"220"] * 5 + [b"421"])):
            sockets: list[socket.socket] = []
            try:
                replies = []
                for _ in range(count):
                    sockets.append(socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT))
                    # Each is greeted (or refused) before the next connects.
                    replies.append(sockets[-1].recv(4096)[:3])
                self.assertEqual(replies, expected)
            finally:
                for sock in sockets:
                    sock.close()


class DefaultHostnameTests(SynchronousTestCase):
    def test_hostnameFQDN(self) -> None:
        """
        Without C{hostname}, the relay names itself as C{hostname -f} does
        (never C{localhost} because /etc/hosts aliases the host name to
        127.0.0.1): in its EHLO reply and its C{Received:} header.
        """
        need("hostname")
        fqdn = subprocess.run(["hostname", "-f"], capture_output=True, text=True,
                              check=True).stdout.strip()
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink()
        port = procs.relay("--target", f"tcp://{HOST}:{sinkPort}")
        with smtplib.SMTP(HOST, port, timeout=CLIENT_TIMEOUT) as client:
            code, banner = client.ehlo("client.test")
            self.assertEqual(banner.split(b"\n")[0], fqdn.encode())
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: h\r\n\r\nbody\r\n")
        [message] = sinkMessages(dumps)
        self.assertIn(f"by {fqdn} (smtprelay)".encode(), message)


class SlowClientTests(SynchronousTestCase):
    def test_tricklingClientsCutOff(self) -> None:
        """
        Clients that trickle a command one byte every half second are cut
        off by C{read_timeout 2s} with C{421 4.4.2} long before their line
        is complete (the timer used to restart on every byte).
        """
        procs = Processes(self)
        sinkPort, _ = procs.smtpSink()
        port = freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
smtp tcp://{HOST}:{port} {{
    read_timeout 2s
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
""")
        procs.relay("--config", config, port=port)
        command = b"MAIL FROM:<a@example.org>\r\n"
        clients = []
        for _ in range(20):
            sock = socket.create_connection((HOST, port), timeout=CLIENT_TIMEOUT)
            self.addCleanup(sock.close)
            self.assertTrue(sock.recv(4096).startswith(b"220 "))
            sock.sendall(b"EHLO client.test\r\n")
            self.assertTrue(sock.recv(4096).startswith(b"250-relay.test"))
            sock.setblocking(False)
            clients.append(sock)
        received = {sock: b"" for sock in clients}
        closed: set[socket.socket] = set()
        for byte in command[:-2]:
            for sock in clients:
                if sock in closed:
                    continue
                try:
                    chunk = sock.recv(4096)
                except BlockingIOError:
                    chunk = None
                except ConnectionResetError:
                    chunk = b""
                if chunk == b"":
                    closed.add(sock)
                    continue
                if chunk:
                    received[sock] += chunk  # the relay's reply: stop talking
                    continue
                try:
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed.add(sock)
            if len(closed) == len(clients):
                break
            time.sleep(0.5)
        self.assertEqual(len(closed), len(clients), "a trickling client outlived its deadline")
        for sock in clients:
            self.assertTrue(received[sock].startswith(b"421 4.4.2 Timeout exceeded"), received[sock])
