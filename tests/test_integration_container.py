"""
The container image (C{contrib/container}) built with podman and run on the
host's network: configured by environment variables only, it relays a
message to Postfix's C{smtp-sink} on loopback (failing over from a dead
target named first in the same variable), serves C{/healthz} to its own
C{HEALTHCHECK}, runs unprivileged, and drains on C{podman stop} (SIGTERM).
The optional parts of its configuration follow their variables, and
half-set ones stop it with one line.

Skipped where podman cannot run containers; C{make test} installs it as
root.
"""

from __future__ import annotations

import functools
import hashlib
import os
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request

import trustme
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .procs import HOST, STARTUP, Processes, freePort, sinkMessages, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = "localhost/smtprelay:test-" + hashlib.sha256(ROOT.encode()).hexdigest()[:8]
"""The image of this checkout: test runs of other checkouts on the machine build their own."""
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


@functools.lru_cache(maxsize=None)
def buildImage() -> None:
    """
    Build L{IMAGE} with the project's script, once per test run.
    """
    build = subprocess.run([os.path.join(ROOT, "contrib", "container", "build.sh"), IMAGE],
                           capture_output=True, text=True, timeout=900)
    if build.returncode:
        raise AssertionError(f"build.sh failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}")


class ContainerCase(SynchronousTestCase):
    """
    Tests that run L{IMAGE}: skipped without podman, the image built first.
    """

    def setUp(self) -> None:
        needPodman()
        buildImage()

    def start(self, name: str, env: dict[str, str]) -> None:
        """
        Start the image as container C{name} on the host's network with
        C{env} and a read-only root file system (as the Kubernetes
        manifest runs it); it is removed in cleanup.
        """
        self.addCleanup(podman, "rm", "--force", "--time", "0", name)
        argv = ["run", "--detach", "--name", name, "--network", "host", "--read-only"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        started = podman(*argv, IMAGE)
        self.assertEqual(started.returncode, 0, started.stderr)

    def once(self, env: dict[str, str], *args: str, volume: str | None = None) -> subprocess.CompletedProcess:
        """
        Run the image once with C{env} and C{args}, with the host directory
        C{volume} at C{/run/secrets}.
        """
        argv = ["run", "--rm", "--network", "none"]
        if volume is not None:
            argv += ["--volume", f"{volume}:/run/secrets:ro"]
        for key, value in env.items():
            argv += ["--env", f"{key}={value}"]
        return podman(*argv, IMAGE, *args)

    def logs(self, name: str) -> str:
        done = podman("logs", name)
        return done.stdout + done.stderr


class ContainerTests(ContainerCase):
    def test_optionalParts(self) -> None:
        """
        Server TLS, the PROXY protocol and downstream AUTH (password from a
        file) are configured when their variables are set.
        """
        secrets = os.path.abspath(self.mktemp())
        os.makedirs(secrets)
        os.chmod(secrets, 0o755)
        ca = trustme.CA()
        cert = ca.issue_cert("relay.test")
        cert.private_key_pem.write_to_path(os.path.join(secrets, "key.pem"))
        cert.cert_chain_pems[0].write_to_path(os.path.join(secrets, "cert.pem"))
        with open(os.path.join(secrets, "password"), "w") as f:
            f.write("s3cret\n")
        for name in os.listdir(secrets):
            os.chmod(os.path.join(secrets, name), 0o644)  # the container's user is not ours
        shown = self.once({
            "SMTPRELAY_TARGETS": "tcp://mx1.test:587 tcp://mx2.test:587",
            "SMTPRELAY_TLS_CERT": "/run/secrets/cert.pem",
            "SMTPRELAY_TLS_KEY": "/run/secrets/key.pem",
            "SMTPRELAY_PROXY_PROTOCOL": "10.0.0.0/8,192.168.1.1",
            "SMTPRELAY_AUTH_USER": "relay-user",
            "SMTPRELAY_AUTH_PASSWORD_FILE": "/run/secrets/password",
            "SMTPRELAY_TARGET_REQUIRE_TLS": "yes",
        }, "--show", volume=secrets)
        self.assertEqual(shown.returncode, 0, shown.stderr)
        lines = [line.strip() for line in shown.stdout.splitlines()]
        for line in ["targets tcp://mx1.test:587 tcp://mx2.test:587", "auth plain relay-user ****",
                     "require_tls yes", "tls /run/secrets/cert.pem /run/secrets/key.pem {",
                     "proxy_protocol 10.0.0.0/8 192.168.1.1/32", "smtp tcp://0.0.0.0:2525 {",
                     "metrics tcp://0.0.0.0:9749",
                     "allow 127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 fc00::/7"]:
            self.assertIn(line, lines, shown.stdout)
        self.assertNotIn("s3cret", shown.stdout + shown.stderr)

        plain = self.once({"SMTPRELAY_TARGETS": "tcp://mx1.test:25"}, "--show")
        self.assertEqual(plain.returncode, 0, plain.stderr)
        for absent in ("auth plain", "proxy_protocol", "tls /"):
            self.assertNotIn(absent, plain.stdout)

    def test_halfSetVariables(self) -> None:
        """
        Variables that need each other, set alone, stop the container with
        status 2 and one line saying what is missing.
        """
        targets = {"SMTPRELAY_TARGETS": "tcp://mx1.test:25"}
        cases = [
            ({}, "smtprelay: set SMTPRELAY_TARGETS to the downstream servers, e.g. tcp://mx.example.net:25"),
            ({**targets, "SMTPRELAY_TLS_CERT": "/c.pem"},
             "smtprelay: SMTPRELAY_TLS_CERT and SMTPRELAY_TLS_KEY go together"),
            ({**targets, "SMTPRELAY_AUTH_USER": "u"},
             "smtprelay: SMTPRELAY_AUTH_USER needs SMTPRELAY_AUTH_PASSWORD or SMTPRELAY_AUTH_PASSWORD_FILE"),
            ({**targets, "SMTPRELAY_AUTH_PASSWORD": "p"}, "smtprelay: a password needs SMTPRELAY_AUTH_USER"),
            ({**targets, "SMTPRELAY_AUTH_USER": "u", "SMTPRELAY_AUTH_PASSWORD": "p",
              "SMTPRELAY_AUTH_PASSWORD_FILE": "/p"},
             "smtprelay: set SMTPRELAY_AUTH_PASSWORD or SMTPRELAY_AUTH_PASSWORD_FILE, not both"),
        ]
        for env, message in cases:
            done = self.once(env)
            self.assertEqual((done.returncode, done.stderr.splitlines()[-1:]), (2, [message]), env)

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


    def test_readyOnlyWhileTheTargetAnswers(self) -> None:
        """
        C{/readyz} of the containerised relay is 503 naming the target while
        nothing answers there, and 200 once a server does; C{/healthz} is
        200 throughout (the process serves either way).
        """
        procs = Processes(self)
        listen, metrics, sinkPort = freePort(), freePort(), freePort()
        name = f"smtprelay-test-{os.getpid()}-{listen}"
        self.start(name, {
            "SMTPRELAY_LISTEN": f"tcp://{HOST}:{listen}",
            "SMTPRELAY_METRICS": f"tcp://{HOST}:{metrics}",
            "SMTPRELAY_TARGETS": f"tcp://{HOST}:{sinkPort}",
            "SMTPRELAY_PROBE_INTERVAL": "1s",
            "SMTPRELAY_HOSTNAME": "relay.test",
        })
        waitForPort(metrics)

        def get(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{metrics}{path}", timeout=30) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        def waitFor(code: int) -> bytes:
            deadline = time.monotonic() + STARTUP
            while True:
                status, body = get("/readyz")
                if status == code:
                    return body
                self.assertLess(time.monotonic(), deadline, f"/readyz stayed {status}: {body!r}")
                time.sleep(0.2)

        body = waitFor(503)
        self.assertIn(f"{HOST}:{sinkPort}".encode(), body)
        self.assertEqual(get("/healthz"), (200, b"serving\n"))
        procs.smtpSink(port=sinkPort)
        waitFor(200)
        self.assertEqual(get("/healthz"), (200, b"serving\n"))


def _partial(dumps: str) -> list[bytes]:
    """
    What smtp-sink has written so far, complete or not.
    """
    out = []
    for name in sorted(os.listdir(dumps)):
        with open(os.path.join(dumps, name), "rb") as f:
            out.append(f.read())
    return out
