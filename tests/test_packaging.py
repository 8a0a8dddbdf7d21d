"""
The shape the owner fixed: the twistd plugins are found, the wheel carries
the plugin without a C{twisted/__init__.py}, and C{twistd smtprelay},
C{twistd -ny relay.tac} and C{twistd smtprelay-sink} start as documented.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import tempfile
import zipfile

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, TWISTD, Processes, freePort, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd(*args: str, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, *args], capture_output=True, timeout=120, cwd=ROOT, **kw)  # type: ignore[call-overload]


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        names = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("smtprelay", names)
        self.assertIn("smtprelay-sink", names)
        self.assertEqual(names["smtprelay"].options.__module__, "smtprelay.tap")

    def test_help(self) -> None:
        done = twistd("smtprelay", "--help")
        self.assertEqual(done.returncode, 0, done.stderr)
        for text in (b"--config", b"--listen", b"--target", b"--lmtp", b"--hostname", b"--check", b"Examples:"):
            self.assertIn(text, done.stdout)

    def test_configErrorsOneLineEachExit2(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
            f.write("hostname x\nsmtp tcp://127.0.0.1:2600 {\n  alow 1.2.3.4\n  deliver_to &nope\n}\n")
        self.addCleanup(os.unlink, f.name)
        done = twistd("-n", "--pidfile=", "smtprelay", "--config", f.name)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(
            done.stderr.decode().splitlines(),
            [f'{f.name}:3: unknown directive "alow" (did you mean "allow"?)',
             f'{f.name}:4: deliver_to: unknown target "&nope"'],
        )
        self.assertNotIn(b"Usage:", done.stdout + done.stderr)

    def test_busyPortStopsWithOneLine(self) -> None:
        import socket

        with socket.socket() as busy:
            busy.bind((HOST, 0))
            busy.listen(1)
            port = busy.getsockname()[1]
            done = twistd("-n", "--pidfile=", "smtprelay", "--listen", f"tcp://{HOST}:{port}",
                          "--target", f"tcp://{HOST}:{freePort()}")
        self.assertEqual(done.returncode, 1)
        output = (done.stdout + done.stderr).decode()
        self.assertIn(f"smtprelay: cannot listen on {HOST}:{port}: [Errno 98] Address already in use", output)
        self.assertNotIn("Traceback", output)

    def test_checkOption(self) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False) as f:
            f.write("hostname x\nsmtp tcp://127.0.0.1:2600 {\n  deliver_to smtp tcp://127.0.0.1:2601\n}\n")
        self.addCleanup(os.unlink, f.name)
        done = twistd("-n", "--pidfile=", "smtprelay", "--check", "--config", f.name)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"{f.name}: OK".encode(), done.stdout)


class FileErrorTests(SynchronousTestCase):
    """
    A certificate, key or users file the relay cannot use stops
    C{twistd smtprelay}, C{twistd -ny relay.tac} and C{smtprelay-check}
    with one line naming it and status 2, never a traceback.
    """

    def setUp(self) -> None:
        import trustme

        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = trustme.CA()
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        ca.issue_cert("relay.test").private_key_and_cert_chain_pem.write_to_path(self.cert)
        ca.issue_cert("other.test").private_key_pem.write_to_path(self.key)
        # Secret files readable by others add a warning line.
        os.chmod(self.dir, 0o700)
        os.chmod(self.key, 0o600)

    def config(self, top: str, inner: str = "") -> str:
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(f"hostname relay.test\n{top}smtp tcp://{HOST}:{freePort()} {{\n{inner}"
                    f"    deliver_to smtp tcp://{HOST}:{freePort()}\n}}\n")
        return path

    def assertOneLine(self, done: subprocess.CompletedProcess, line: str) -> None:
        output = (done.stdout + done.stderr).decode()
        self.assertEqual((done.returncode, output.splitlines()), (2, [line]))

    def test_missingCertificate(self) -> None:
        missing = os.path.join(self.dir, "missing.pem")
        config = self.config(f"tls {missing} {self.key}\n")
        line = f"{config}:2: tls: {missing}: cannot read: No such file or directory"
        self.assertOneLine(twistd("-n", "--pidfile=", "smtprelay", "--config", config), line)
        self.assertOneLine(
            twistd("-ny", os.path.join(ROOT, "relay.tac"), "--pidfile=",
                   env={**os.environ, "SMTPRELAY_CONFIG": config}),
            line,
        )
        check = os.path.join(os.path.dirname(TWISTD), "smtprelay-check")
        self.assertOneLine(subprocess.run([check, config], capture_output=True, timeout=120), line)
        skipped = subprocess.run([check, "--no-files", config], capture_output=True, timeout=120)
        self.assertEqual((skipped.returncode, skipped.stdout), (0, f"{config}: OK\n".encode()))

    def test_keyMismatch(self) -> None:
        """
        A key that is not the certificate's (here: another certificate's).
        """
        config = self.config(f"tls {self.cert} {self.key}\n")
        self.assertOneLine(
            twistd("-n", "--pidfile=", "smtprelay", "--config", config),
            f"{config}:2: tls: {self.key}: does not match the certificate in {self.cert}",
        )

    def test_passwordFile(self) -> None:
        """
        A C{file:} password is read with the configuration: the same form
        of line.
        """
        missing = os.path.join(self.dir, "password")
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(f"hostname relay.test\nsmtp tcp://{HOST}:{freePort()} {{\n"
                    f"    deliver_to smtp tcp://{HOST}:{freePort()} {{\n"
                    f"        auth plain relay file:{missing}\n    }}\n}}\n")
        self.assertOneLine(
            twistd("-n", "--pidfile=", "smtprelay", "--config", path),
            f"{path}:4: auth: {missing}: cannot read: No such file or directory",
        )

    def test_usersFile(self) -> None:
        config = self.config("", inner=f"    auth users {self.dir}\n")
        self.assertOneLine(
            twistd("-n", "--pidfile=", "smtprelay", "--config", config),
            f"{config}:3: auth: {self.dir}: cannot read: Is a directory",
        )


class WheelTests(SynchronousTestCase):
    def test_wheelHasPluginButNoTwistedInit(self) -> None:
        out = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ["rm", "-rf", out])
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "-w", out, ROOT], check=True, capture_output=True, timeout=300)
        [wheel] = [n for n in os.listdir(out) if n.endswith(".whl")]
        names = zipfile.ZipFile(os.path.join(out, wheel)).namelist()
        self.assertIn("twisted/plugins/smtprelay_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("smtprelay/relay.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])


class TacAndSinkTests(SynchronousTestCase):
    def test_tacRelaysToTheSinkPlugin(self) -> None:
        """
        C{twistd -ny relay.tac} with C{SMTPRELAY_CONFIG} relays to a
        C{twistd smtprelay-sink}, which writes the message and its envelope.
        """
        procs = Processes(self)
        sinkPort, listen = freePort(), freePort()
        mail = os.path.join(procs.dir, "mail")
        sink = procs.start("sink", [TWISTD, "-n", "--pidfile=", "smtprelay-sink",
                                    "--listen", f"tcp://{HOST}:{sinkPort}", "--dir", mail])
        waitForPort(sinkPort, sink)
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"hostname relay.test\nsmtp tcp://{HOST}:{listen} {{\n"
                    f"    deliver_to smtp tcp://{HOST}:{sinkPort}\n}}\n")
        relay = procs.start("relay", [TWISTD, "-ny", os.path.join(ROOT, "relay.tac"), "--pidfile="],
                            env={"SMTPRELAY_CONFIG": config})
        waitForPort(listen, relay)
        with smtplib.SMTP(HOST, listen, timeout=60) as client:
            client.sendmail("a@example.org", ["b@example.net"], b"Subject: tac\r\n\r\nhello\r\n")
        names = sorted(os.listdir(mail))
        self.assertEqual([n.rsplit(".", 1)[1] for n in names], ["eml", "json"])
        with open(os.path.join(mail, names[0]), "rb") as f:
            message = f.read()
        self.assertTrue(message.startswith(b"Received: from "), message[:80])
        self.assertTrue(message.endswith(b"Subject: tac\r\n\r\nhello\r\n"), message)
