"""
The container image (C{contrib/container}) built with podman and run on the
host's network: configured by environment variables only, it relays a
message to Postfix's C{smtp-sink} on loopback (failing over from a dead
target named first in the same variable), serves C{/healthz} to its own
C{HEALTHCHECK}, runs unprivileged, and drains on C{podman stop} (SIGTERM).

Skipped where podman cannot run containers; C{make test} installs it as
root.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import threading
import time
import urllib.request

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .procs import HOST, STARTUP, Processes, freePort, sinkMessages, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "localhost/smtprelay:test"
UID = "10025"
"""The image's user (a number, so that Kubernetes can check runAsNonRoot)."""


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def needPodman() -> None:
    """
    Skip unless podman is installed and can run a container here.
    """
    try:
        info = podman("info")
    except FileNotFoundError:
        raise SkipTest("podman is not installed (make test installs it as root)")
    if info.returncode:
        raise SkipTest(f"podman cannot work here: {info.stderr.strip()[-200:]}")


class ContainerTests(SynchronousTestCase):
    def setUp(self) -> None:
        needPodman()
        build = subprocess.run([os.path.join(ROOT, "contrib", "container", "build.sh"), IMAGE],
                               capture_output=True, text=True, timeout=900)
        self.assertEqual(build.returncode, 0, build.stdout[-2000:] + build.stderr[-2000:])

    def start(self, name: str, env: dict[str, str]) -> None:
        """
        Start the image as container C{name} on the host's network with
        C{env}; it is removed in cleanup.
        """
        self.addCleanup(podman, "rm", "--force", "--time", "0", name)
        argv = ["run", "--detach", "--name", name, "--network", "host"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        started = podman(*argv, IMAGE)
        self.assertEqual(started.returncode, 0, started.stderr)

    def logs(self, name: str) -> str:
        done = podman("logs", name)
        return done.stdout + done.stderr

    def test_relayHealthAndDrain(self) -> None:
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink(extra=["-W", ".:5"])
        listen, metrics = freePort(), freePort()
        name = f"smtprelay-test-{os.getpid()}-{listen}"
        self.start(name, {
            "SMTPRELAY_LISTEN": f"tcp://{HOST}:{listen}",
            "SMTPRELAY_METRICS": f"tcp://{HOST}:{metrics}",
            "SMTPRELAY_TARGETS": f"tcp://{HOST}:{freePort()}, tcp://{HOST}:{sinkPort}",
            "SMTPRELAY_HOSTNAME": "relay.test",
        })
        waitForPort(listen)
        self.assertEqual(podman("exec", name, "id", "-u").stdout.strip(), UID)

        with urllib.request.urlopen(f"http://{HOST}:{metrics}/healthz", timeout=30) as response:
            self.assertEqual((response.status, response.read()), (200, b"serving\n"))
        health = podman("healthcheck", "run", name)
        self.assertEqual(health.returncode, 0, health.stdout + health.stderr)

        with smtplib.SMTP(HOST, listen, timeout=60) as client:
            self.assertEqual(client.ehlo()[1].split(b"\n")[0], b"relay.test")
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: one\r\n\r\nfirst\r\n")
        [message] = sinkMessages(dumps)
        self.assertIn(b"Subject: one", message)

        # A transaction in flight when the container is stopped: the
        # sink holds its end-of-data reply for 5 seconds.
        outcome: list[object] = []

        def send() -> None:
            client = smtplib.SMTP(HOST, listen, timeout=60)
            try:
                outcome.append(client.sendmail("a@example.org", ["r@example.net"],
                                               b"Subject: two\r\n\r\nsecond\r\n"))
                # After its transaction, a draining session is told to go.
                outcome.append(client.docmd("NOOP")[0])
            except Exception as e:
                outcome.append(e)
            finally:
                client.close()

        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + STARTUP
        while "Subject: two" not in "".join(m.decode(errors="replace") for m in _partial(dumps)):
            self.assertLess(time.monotonic(), deadline, "the second message never reached the sink")
            time.sleep(0.05)
        stopped = podman("stop", "--time", "60", name)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        sender.join(60)
        self.assertEqual(outcome, [{}, 421])
        self.assertEqual(len(sinkMessages(dumps, 2)), 2)
        state = podman("inspect", "--format", "{{.State.ExitCode}}", name)
        self.assertEqual(state.stdout.strip(), "0")
        logs = self.logs(name)
        self.assertIn("Received SIGTERM, shutting down.", logs)
        self.assertIn("Main loop terminated.", logs)
        self.assertEqual(logs.count("status=sent"), 2, logs)


def _partial(dumps: str) -> list[bytes]:
    """
    What smtp-sink has written so far, complete or not.
    """
    out = []
    for name in sorted(os.listdir(dumps)):
        with open(os.path.join(dumps, name), "rb") as f:
            out.append(f.read())
    return out
