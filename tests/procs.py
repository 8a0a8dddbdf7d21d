"""
Helpers for integration tests: start real processes on 127.0.0.1 with
ephemeral ports, wait until they listen, and stop every one in cleanup.

Tests using these are blocking (C{SynchronousTestCase}); the relay under test
runs in its own C{twistd} process, the peers are the real programs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from twisted.trial.unittest import SkipTest, SynchronousTestCase

HOST = "127.0.0.1"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
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
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
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
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{path} never appeared")


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
        return process

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

    def smtpSink(self, lmtp: bool = False, extra: Sequence[str] = ()) -> tuple[int, str]:
        """
        Postfix's C{smtp-sink} dumping each transaction into a directory;
        returns (port, dump directory).
        """
        need("smtp-sink")
        port = freePort()
        dumps = os.path.join(self.dir, f"sink-{port}")
        os.makedirs(dumps)
        os.chmod(dumps, 0o777)
        argv = ["smtp-sink", "-u", "nobody" if os.getuid() == 0 else os.environ.get("USER", "nobody"),
                "-d", os.path.join(dumps, "%Y%m%d%H%M%S.")]
        if lmtp:
            argv.append("-L")
        argv += list(extra) + [f"{HOST}:{port}", "64"]
        waitForPort(port, self.start(f"smtp-sink-{port}", argv))
        return port, dumps

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
