"""
Helpers for integration tests: start real processes on 127.0.0.1 with
ephemeral ports, wait until they listen, and stop every one in cleanup.

Tests using these are blocking (C{SynchronousTestCase}); the relay under test
runs in its own C{twistd} process, the peers are the real programs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import trustme
from twisted.trial.unittest import SkipTest, SynchronousTestCase

HOST = "127.0.0.1"
TESTS = os.path.dirname(os.path.abspath(__file__))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
T = TypeVar("T")
STARTUP = 30.0
"""Seconds a process may take to listen: a readiness limit, not a timing assertion."""


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def need(*programs: str) -> None:
    """
    Skip the test with a clear reason when a peer program is missing.
    """
    for program in programs:
        if shutil.which(program) is None and not os.path.exists(program):
            raise SkipTest(f"{program} is not installed (make test installs it as root)")


def waitForPort(port: int, process: subprocess.Popen | None = None, host: str = HOST) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def waitForPath(path: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


class Certificates(NamedTuple):
    """
    PEM files: a server certificate, its key, and the CA that verifies it.
    """

    cert: str
    key: str
    ca: str


class Processes:
    """
    The processes of one test, stopped (SIGTERM, then SIGKILL) in cleanup.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="smtprelay-test-")
        os.chmod(self.dir, 0o755)  # peers that drop privileges (smtp-sink -u) write below it
        self.logs: dict[str, str] = {}
        case.addCleanup(shutil.rmtree, self.dir, True)
        case.addCleanup(self.stopAll)
        self._procs: list[subprocess.Popen] = []
        self._byName: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None,
              stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen:
        log = os.path.join(self.dir, f"{name}.log")
        self.logs[name] = log
        with open(log, "wb") as out:
            process = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=stdin,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        self._procs.append(process)
        self._byName[name] = process
        return process

    def stop(self, name: str) -> None:
        """
        Stop the process started as C{name} now and wait until it is gone.
        """
        process = self._byName.pop(name)
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(STARTUP)

    def log(self, name: str) -> str:
        with open(self.logs[name], encoding="utf-8", errors="replace") as f:
            return f.read()

    def relay(self, *args: str, port: int | None = None, env: dict[str, str] | None = None,
              name: str = "relay") -> int:
        """
        C{twistd -n smtprelay --listen tcp://127.0.0.1:PORT ARGS...}; returns PORT.
        """
        port = port or freePort()
        argv = [TWISTD, "-n", "--pidfile=", "smtprelay"]
        if "--config" not in args:
            argv += ["--listen", f"tcp://{HOST}:{port}"]
        process = self.start(name, argv + list(args), env=env)
        waitForPort(port, process)
        return port

    def smtpSink(self, lmtp: bool = False, extra: Sequence[str] = (), port: int | None = None) -> tuple[int, str]:
        """
        Postfix's C{smtp-sink} dumping each transaction into a directory
        (a new one for each sink, even on the C{port} of a stopped one);
        returns (port, dump directory).
        """
        need("smtp-sink")
        port = port or freePort()
        dumps = tempfile.mkdtemp(prefix=f"sink-{port}-", dir=self.dir)
        os.chmod(dumps, 0o777)
        argv = ["smtp-sink", "-u", "nobody" if os.getuid() == 0 else os.environ.get("USER", "nobody"),
                "-d", os.path.join(dumps, "%Y%m%d%H%M%S.")]
        if lmtp:
            argv.append("-L")
        argv += list(extra) + [f"{HOST}:{port}", "64"]
        waitForPort(port, self.start(f"smtp-sink-{port}", argv))
        return port, dumps

    def postfix(self, role: str, *args: str, main: str = "", master: str = "") -> Postfix:
        """
        A private Postfix instance from C{tests/postfix-instance.sh} (read
        its header): C{role} is C{client} (C{args}: the relay's port) or
        C{downstream} (C{args}: optional certificate and key files);
        C{main} and C{master} hold extra C{main.cf} and C{master.cf} lines.
        Stopped in cleanup.
        """
        need("postfix", "postqueue", "sendmail")
        port = freePort()
        postfix = Postfix(os.path.join(self.dir, f"postfix-{role}-{port}"), port)
        self.case.addCleanup(subprocess.run, ["postfix", "-c", postfix.dir, "stop"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        argv = ["sh", os.path.join(TESTS, "postfix-instance.sh"), postfix.dir, role, str(port), *args]
        with open(os.path.join(self.dir, f"postfix-{role}-{port}.log"), "wb") as out:
            # Postfix daemonizes and keeps its inherited descriptors: a file, not a pipe.
            started = subprocess.run(argv, env={**os.environ, "POSTFIX_MAIN": main, "POSTFIX_MASTER": master},
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=120)
        if started.returncode:
            with open(out.name, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"postfix-instance.sh {role} failed: {f.read()}")
        return postfix

    def dovecot(self) -> str:
        """
        A private Dovecot from C{tests/dovecot-lmtp.sh} (read its header):
        LMTP on the unix socket C{DIR/lmtp}, SASL for Postfix on C{DIR/auth};
        returns DIR.  Stopped in cleanup.
        """
        need("dovecot", "doveadm")
        directory = tempfile.mkdtemp(prefix="dovecot-", dir=self.dir)
        self.case.addCleanup(subprocess.run, ["doveadm", "-c", os.path.join(directory, "dovecot.conf"), "stop"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        # Dovecot daemonizes and keeps its inherited stdout: no pipes here.
        subprocess.run(["sh", os.path.join(TESTS, "dovecot-lmtp.sh"), directory], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        waitForPath(os.path.join(directory, "lmtp"))
        return directory

    def aiosmtpd(self, password: bytes) -> tuple[int, trustme.CA, str]:
        """
        An aiosmtpd downstream on a free port: STARTTLS required, with a
        certificate for C{mx.example} from a new trustme CA; AUTH (after
        STARTTLS) succeeds for any user with C{password}; every message is
        accepted.  Stopped in cleanup.

        @return: its port, the CA, and the CA's certificate file.
        @raise SkipTest: aiosmtpd is not installed.
        """
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError:
            raise SkipTest("aiosmtpd is not installed (pip install .[test])")
        ca = trustme.CA()
        caFile = os.path.join(self.dir, "ca.pem")
        ca.cert_pem.write_to_path(caFile)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("mx.example").configure_cert(context)

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                return "250 2.0.0 accepted"

        def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
            ok = isinstance(data, LoginPassword) and data.password == password
            return AuthResult(success=ok, handled=ok)

        port = freePort()
        controller = Controller(Handler(), hostname=HOST, port=port, tls_context=context,
                                require_starttls=True, authenticator=authenticator, auth_require_tls=True)
        controller.start()
        self.case.addCleanup(controller.stop)
        return port, ca, caFile

    def relayConfig(self, config: str) -> int:
        """
        C{twistd -n smtprelay --config FILE} with C{config} in FILE, after
        replacing C{{port}} in it by a free port; returns that port.
        """
        port = freePort()
        path = os.path.join(self.dir, f"relay-{port}.conf")
        with open(path, "w") as f:
            f.write(config.replace("{port}", str(port)))
        return self.relay("--config", path, port=port, name=f"relay-{port}")

    def certificates(self, *names: str) -> Certificates:
        """
        A new trustme CA and a certificate it issued for C{names}, as PEM files.
        """
        import trustme

        directory = tempfile.mkdtemp(prefix="pki-", dir=self.dir)
        ca = trustme.CA()
        leaf = ca.issue_cert(*names)
        out = Certificates(*(os.path.join(directory, n) for n in ("cert.pem", "key.pem", "ca.pem")))
        leaf.cert_chain_pems[0].write_to_path(out.cert)
        leaf.private_key_pem.write_to_path(out.key)
        ca.cert_pem.write_to_path(out.ca)
        return out

    def selfSigned(self, name: str) -> Certificates:
        """
        A self-signed certificate for C{name} and C{127.0.0.1}, as a fresh
        server install makes one (Debian's "snakeoil"); its own CA file.
        """
        need("openssl")
        directory = tempfile.mkdtemp(prefix="self-signed-", dir=self.dir)
        cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2",
                        "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name},IP:{HOST}",
                        "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
        return Certificates(cert, key, cert)

    def stopAll(self) -> None:
        for process in self._procs:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.monotonic() + 10
        for process in self._procs:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def sinkMessages(dumps: str, count: int = 1) -> list[bytes]:
    """
    The files smtp-sink dumped, oldest first, once C{count} are complete.
    """
    deadline = time.monotonic() + STARTUP
    while time.monotonic() < deadline:
        names = sorted(os.listdir(dumps))
        if len(names) >= count:
            time.sleep(0.1)  # the sink writes the file before it replies; let it close
            out = []
            for name in names:
                with open(os.path.join(dumps, name), "rb") as f:
                    out.append(f.read())
            return out
        time.sleep(0.05)
    raise AssertionError(f"smtp-sink got {len(os.listdir(dumps))} messages, expected {count}")


def sinkAborted(dumps: str) -> None:
    """
    Wait until smtp-sink holds no message file.  The sink creates a
    transaction's file at MAIL and removes it when the transaction ends
    without DATA (RSET, QUIT, disconnect), which may happen just after the
    client has its reply.
    """
    deadline = time.monotonic() + STARTUP
    while os.listdir(dumps):
        if time.monotonic() > deadline:
            raise AssertionError(f"smtp-sink kept {os.listdir(dumps)}")
        time.sleep(0.05)


def waitFor(what: str, check: Callable[[], T | None]) -> T:
    """
    Poll C{check} until it returns something true and return that, or fail
    the test after L{STARTUP} seconds saying that C{what} never happened.
    """
    deadline = time.monotonic() + STARTUP
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {STARTUP:.0f}s")
        time.sleep(0.1)


class Postfix:
    """
    A private Postfix instance in C{dir} with its C{smtpd} on C{port}; see
    L{Processes.postfix}.
    """

    def __init__(self, directory: str, port: int) -> None:
        self.dir = directory
        self.port = port

    def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """
        Inject C{message} with Postfix's C{sendmail -C DIR}.
        """
        subprocess.run(["sendmail", "-C", self.dir, "-f", sender, "--", *recipients],
                       input=message, check=True, timeout=60)

    def flush(self) -> None:
        """
        C{postqueue -f}: try every deferred message now.
        """
        subprocess.run(["postqueue", "-c", self.dir, "-f"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def queue(self) -> list[dict]:
        """
        The queue as C{postqueue -j} gives it: one dict per message.
        """
        out = subprocess.run(["postqueue", "-c", self.dir, "-j"], check=True, timeout=60,
                             capture_output=True).stdout
        return [json.loads(line) for line in out.splitlines()]

    def log(self) -> str:
        """
        Postfix's log so far (C{maillog_file}).
        """
        with open(os.path.join(self.dir, "maillog"), encoding="utf-8", errors="replace") as f:
            return f.read()

    def waitForLog(self, pattern: str, count: int = 1) -> list[re.Match]:
        """
        Wait until C{maillog} has C{count} lines matching C{pattern} (a
        regular expression searched in each line); return their matches.
        """
        def matches() -> list[re.Match] | None:
            found = [m for m in map(re.compile(pattern).search, self.log().splitlines()) if m]
            return found if len(found) >= count else None
        return waitFor(f"{count} lines matching {pattern!r} in {self.dir}/maillog", matches)

    def stored(self, count: int = 1) -> list[bytes]:
        """
        The messages a C{downstream} instance stored, oldest first, once
        there are C{count}.
        """
        # Postfix logs the delivery once the pipe to the store script has ended.
        self.waitForLog(r"status=sent \(delivered via store service", count)
        mail = os.path.join(self.dir, "mail")
        out = []
        for name in sorted(os.listdir(mail)):
            with open(os.path.join(mail, name), "rb") as f:
                out.append(f.read())
        return out
