"""
Deployment against real processes: several processes on one port
(C{reuse_port}), systemd socket activation (C{LISTEN_FDS}), binding a
privileged port as root and then running unprivileged, and SIGHUP reloading
the server certificate without a restart.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import smtplib
import socket
import ssl
import time

import trustme
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .procs import HOST, TWISTD, Processes, freePort, waitForPort


def greeting(port: int) -> bytes:
    with socket.create_connection((HOST, port), timeout=30) as s:
        return s.makefile("rb").readline()


def writeConfig(procs: Processes, text: str) -> str:
    path = os.path.join(procs.dir, "relay.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


class ReusePortTests(SynchronousTestCase):
    def test_twoProcessesShareOnePort(self) -> None:
        """
        With C{reuse_port yes} a second process binds the same port and the
        kernel spreads connections over both.
        """
        procs = Processes(self)
        port = freePort()
        config = writeConfig(procs, f"hostname relay.test\nsmtp tcp://{HOST}:{port} {{\n"
                                    f"    reuse_port yes\n    deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n")
        first = procs.start("first", [TWISTD, "-n", "--pidfile=", "smtprelay", "--config", config])
        waitForPort(port, first)
        second = procs.start("second", [TWISTD, "-n", "--pidfile=", "smtprelay", "--config", config])
        deadline = time.monotonic() + 30
        while "Starting factory" not in procs.log("second") and time.monotonic() < deadline:
            self.assertIsNone(second.poll(), procs.log("second"))
            time.sleep(0.05)
        for _ in range(40):
            self.assertTrue(greeting(port).startswith(b"220 relay.test ESMTP smtprelay "))
        time.sleep(0.3)
        served = [len(re.findall(r"\] connect \w+ from", procs.log(name))) for name in ("first", "second")]
        self.assertEqual(sum(served), 41)  # and the readiness probe of the first
        self.assertTrue(all(served), f"connections per process: {served}")


class SocketActivationTests(SynchronousTestCase):
    def test_listenFDs(self) -> None:
        """
        A listener with C{endpoint "systemd:domain=INET:index=0"} serves the
        socket handed over in C{LISTEN_FDS} (systemd's protocol).
        """
        procs = Processes(self)
        listening = socket.socket()
        listening.bind((HOST, 0))
        listening.listen(16)
        self.addCleanup(listening.close)
        port = listening.getsockname()[1]
        config = writeConfig(procs, 'hostname relay.test\nsmtp {\n    endpoint "systemd:domain=INET:index=0"\n'
                                    f"    deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n")
        fd = listening.fileno()
        # systemd hands the socket over as fd 3, to the process LISTEN_PID names; Twisted
        # also wants LISTEN_FDNAMES (systemd 227 and newer always set it).
        command = (f"exec 3<&{fd}; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=smtp; exec {TWISTD} -n --pidfile= "
                   f"smtprelay --config {config}")
        import subprocess
        log = os.path.join(procs.dir, "activated.log")
        with open(log, "wb") as out:
            process = subprocess.Popen(["sh", "-c", command], stdout=out, stderr=subprocess.STDOUT,
                                       pass_fds=(fd,), start_new_session=True)
        procs._procs.append(process)
        listening.close()  # only the relay holds the socket now
        procs.logs["activated"] = log
        deadline = time.monotonic() + 30
        while "Starting factory" not in procs.log("activated") and time.monotonic() < deadline:
            self.assertIsNone(process.poll(), procs.log("activated"))
            time.sleep(0.05)
        self.assertTrue(greeting(port).startswith(b"220 relay.test ESMTP smtprelay "))


class PrivilegeDropTests(SynchronousTestCase):
    def test_bindPort26AsRootThenRunAsNobody(self) -> None:
        if os.getuid() != 0:
            raise SkipTest("needs root to bind a privileged port")
        nobody = pwd.getpwnam("nobody")
        procs = Processes(self)
        process = procs.start("relay", [TWISTD, "-n", "--pidfile=", f"--uid={nobody.pw_uid}",
                                        f"--gid={nobody.pw_gid}", "smtprelay", "--listen", f"tcp://{HOST}:26",
                                        "--target", f"tcp://{HOST}:{freePort()}"])
        waitForPort(26, process)
        # The port is bound before twistd drops root; a greeting means the
        # reactor runs, which twistd starts only after the switch.
        self.assertTrue(greeting(26).startswith(b"220 "))
        with open(f"/proc/{process.pid}/status") as f:
            status = dict(line.split(":", 1) for line in f)
        self.assertEqual(status["Uid"].split()[:2], [str(nobody.pw_uid)] * 2)
        self.assertEqual(status["Gid"].split()[:2], [str(nobody.pw_gid)] * 2)


class SIGHUPTests(SynchronousTestCase):
    def test_reloadsServerCertificate(self) -> None:
        """
        SIGHUP re-reads the certificate: the next STARTTLS shows the new one,
        and a session opened before the reload keeps working.
        """
        procs = Processes(self)
        ca = trustme.CA()
        cert, key = os.path.join(procs.dir, "cert.pem"), os.path.join(procs.dir, "key.pem")

        def issue(name: str) -> None:
            leaf = ca.issue_cert(name, "relay.test", HOST)
            leaf.private_key_pem.write_to_path(key)
            with open(cert, "wb") as f:
                for blob in leaf.cert_chain_pems:
                    f.write(blob.bytes())

        issue("first.relay.test")
        port = freePort()
        config = writeConfig(procs, f"hostname relay.test\ntls {cert} {key}\nsmtp tcp://{HOST}:{port} {{\n"
                                    f"    deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n")
        relay = procs.start("relay", [TWISTD, "-n", "--pidfile=", "smtprelay", "--config", config])
        waitForPort(port, relay)
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def names() -> list[str]:
            with smtplib.SMTP(HOST, port, timeout=30) as client:
                client.starttls(context=context)
                peer = client.sock.getpeercert()  # type: ignore[union-attr]  # after starttls the socket is set and is an SSLSocket
                return [v for k, v in peer["subjectAltName"]]

        self.assertIn("first.relay.test", names())
        before = smtplib.SMTP(HOST, port, timeout=30)
        self.addCleanup(before.close)
        before.starttls(context=context)
        issue("second.relay.test")
        relay.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "TLS certificates reloaded" not in procs.log("relay") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("second.relay.test", names())
        self.assertEqual(before.noop()[0], 250)
