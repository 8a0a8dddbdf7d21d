"""
The shape the owner fixed: the twistd plugins are found, the wheel carries
the plugin without a C{twisted/__init__.py}, every way to install it (wheel,
C{pip install .}, editable in each of setuptools' modes) gives a working
C{twistd smtprelay}, and C{twistd smtprelay}, C{twistd -ny relay.tac} and
C{twistd smtprelay-sink} start as documented.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, TWISTD, Processes, freePort, waitForPort
from .test_tap import EXAMPLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd(*args: str, **kw: Any) -> subprocess.CompletedProcess[Any]:
    return subprocess.run([TWISTD, *args], capture_output=True, timeout=120, cwd=ROOT, **kw)


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        names = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("smtprelay", names)
        self.assertIn("smtprelay-sink", names)
        self.assertEqual(names["smtprelay"].options.__module__, "smtprelay.app.tap")

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


def pip(*args: str) -> None:
    """
    Run this interpreter's pip (with the machine's pip configuration: its
    index and its cache), failing the test with pip's own words.  Without
    PYTHONPATH: a checkout on it would be the installation pip sees.
    """
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    if done.returncode:
        raise AssertionError(f"pip {' '.join(args)}:\n{done.stdout}{done.stderr}")


@functools.lru_cache(maxsize=None)
def scratch() -> str:
    """
    A directory for the whole run of this module (trial has no class
    fixtures), removed when the process ends.
    """
    path = tempfile.mkdtemp(prefix="smtprelay-install-")
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.lru_cache(maxsize=None)
def source() -> str:
    """
    A copy of the project, so that editable installs point away from the
    checkout and leave nothing in it (the strict mode writes below build/).
    """
    copy = os.path.join(scratch(), "src")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "_trial_temp*", "run", "__pycache__",
        ".hypothesis", ".mypy_cache", ".import_linter_cache"))
    return copy


@functools.lru_cache(maxsize=None)
def wheel() -> str:
    """
    The project's wheel, built once.
    """
    out = os.path.join(scratch(), "wheel")
    pip("wheel", "-q", "--no-deps", "-w", out, source())
    [name] = os.listdir(out)
    return os.path.join(out, name)


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
        names = zipfile.ZipFile(wheel()).namelist()
        self.assertIn("twisted/plugins/smtprelay_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("smtprelay/relay/session.py", names)
        self.assertFalse([n for n in names if n.startswith("tests/")])


class InstallTests(SynchronousTestCase):
    """
    A user's install in a plain virtualenv (no system site-packages, no
    PYTHONPATH, an empty working directory) finds both twistd plugins.
    """

    MODES = {
        "wheel": lambda: [wheel()],
        "pip install .": lambda: [source()],
        "editable (default)": lambda: ["-e", source()],
        "editable strict": lambda: ["-e", source(), "--config-settings", "editable_mode=strict"],
        "editable compat": lambda: ["-e", source(), "--config-settings", "editable_mode=compat"],
    }

    def test_everyInstallFindsThePlugins(self) -> None:
        """
        One virtualenv gets the dependencies once; then for each install
        mode the project is removed (and C{twistd} shown not to know the
        plugin: nothing of the last mode is left), installed that way, and
        C{twistd smtprelay --help} and C{twistd smtprelay-sink --help} run.
        """
        venv = os.path.join(scratch(), "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
        python = os.path.join(venv, "bin", "python")
        pip("--python", python, "install", "-q", wheel())
        failures = {}
        for mode, args in self.MODES.items():
            pip("--python", python, "uninstall", "-q", "-y", "smtprelay")
            self.assertIn("Unknown command: smtprelay", self.twistd(venv, "smtprelay", "--help").stdout)
            pip("--python", python, "install", "-q", "--no-deps", *args())
            relay, sink = self.twistd(venv, "smtprelay", "--help"), self.twistd(venv, "smtprelay-sink", "--help")
            if relay.returncode or sink.returncode:
                failures[mode] = (relay if relay.returncode else sink).stdout.splitlines()[-1]
            elif EXAMPLES not in relay.stdout:
                failures[mode] = "the examples are not one a line"
        self.assertEqual(failures, {}, "\n".join(f"{mode}: {why}" for mode, why in failures.items()))

    def twistd(self, venv: str, *args: str) -> subprocess.CompletedProcess:
        """
        The venv's C{twistd} as a user runs it: from an empty directory,
        with nothing of this test run's environment; stderr goes to stdout.
        """
        cwd = tempfile.mkdtemp(dir=scratch())
        env = {"PATH": os.path.join(venv, "bin") + os.pathsep + os.environ["PATH"], "HOME": cwd}
        return subprocess.run(["twistd", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=cwd, env=env, timeout=120)


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
