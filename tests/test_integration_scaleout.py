"""
Scale-out as C{contrib/compose.yaml} shapes it, with podman: HAProxy (the
host's, configured from C{contrib/haproxy-compose.cfg}) hands sessions with
a PROXY v2 header to two relay containers on the host's network, which
relay to Postfix's C{smtp-sink}.  1,000 messages go through it while one
relay is stopped (SIGTERM: it drains) and started again.

The promises checked, with the load client of L{tests.test_load}: every
message is either acknowledged and at the sink exactly once, or refused
with a 4xx, or its session ended before its end of data was answered and
it is not at the sink (a real client retries both); no 5xx; sessions end
early only while a relay is being stopped (HAProxy redispatches the
connections a stopped relay refuses); both relays delivered, and the
restarted one again once HAProxy saw it healthy.  Nothing is timed: each
phase waits for a condition with a deadline.

Skipped where podman cannot run containers; C{make test} installs it as
root.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import os
import re
import socket
import subprocess
from collections import Counter

from twisted.logger import Logger

from .procs import HOST, Processes, freePort, need, waitFor, waitForPort
from .test_integration_container import ROOT, ContainerCase, podman
from .test_load import END_MARK, Tally, runLoad

SESSIONS = 10
"""Concurrent client sessions in each wave of the load."""
PER_SESSION = 5
"""Messages in each session."""
WAVES = 5
"""Waves in each of the four phases: 4 * 5 * 10 * 5 = 1,000 messages."""

DELIVERED_BY = re.compile(rb"\tby (relay\d)\.test \(smtprelay\)")


def haproxyConfig(port: int, relays: dict[str, tuple[int, int]], stats: str) -> str:
    """
    C{contrib/haproxy-compose.cfg} listening on C{port} of loopback, with
    C{relays} (name: SMTP port, metrics port) on loopback instead of
    container names resolved by the engine's DNS, and a stats socket at
    C{stats}.
    """
    with open(os.path.join(ROOT, "contrib", "haproxy-compose.cfg"), encoding="utf-8") as f:
        config = f.read()
    edits = [
        # The host's limit on open files may be below what 20,000 connections need.
        ("    maxconn 20000\n", f"    maxconn 2000\n    stats socket {stats} level admin\n"),
        ("bind :2525\n", f"bind {HOST}:{port}\n"),
        (" resolvers engine init-addr last,libc,none\n", "\n"),
    ] + [(f"server {name} {name}:2525\n", f"server {name} {HOST}:{listen} port {metrics}\n")
         for name, (listen, metrics) in relays.items()]
    for old, new in edits:
        if config.count(old) != 1:
            raise AssertionError(f"contrib/haproxy-compose.cfg changed: {old!r} is not there once")
        config = config.replace(old, new)
    return config


def haproxyCommand(stats: str, command: str) -> str:
    """
    The answer of HAProxy's stats socket at C{stats} to C{command}.
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(stats)
        s.sendall(command.encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.decode()


def serverStates(stats: str) -> dict[str, str]:
    """
    The state (C{UP}, C{DOWN}, C{UP 1/2}, ...) of each server of the
    C{smtprelays} backend.
    """
    rows = csv.DictReader(haproxyCommand(stats, "show stat").lstrip("# ").splitlines())
    return {row["svname"]: row["status"] for row in rows if row["pxname"] == "smtprelays"}


def delivered(dumps: str) -> Counter[tuple[int, str]]:
    """
    (message id, the relay that delivered it) of each complete message at
    the sink.
    """
    found: Counter[tuple[int, str]] = Counter()
    for name in os.listdir(dumps):
        with open(os.path.join(dumps, name), "rb") as f:
            data = f.read()
        for ident in END_MARK.findall(data):
            [relay] = DELIVERED_BY.findall(data)
            found[int(ident), relay.decode()] += 1
    return found


class ScaleOutTests(ContainerCase):
    def test_relayStoppedAndRestarted(self) -> None:
        """
        Four phases of 250 messages each, in waves of concurrent sessions:
        both relays up; relay1 stopped meanwhile (C{podman stop}: it
        stops accepting and drains); relay1 down; relay1 started again and
        seen healthy by HAProxy.  Through the second and third, HAProxy
        takes relay1 for up.
        """
        need("haproxy", "smtp-sink")
        processes = Processes(self)
        sinkPort, dumps = processes.smtpSink(extra=["-m", "2000"])
        relays = {name: (freePort(), freePort()) for name in ("relay1", "relay2")}
        containers = {name: f"smtprelay-scaleout-{os.getpid()}-{listen}" for name, (listen, _) in relays.items()}
        for name, (listen, metrics) in relays.items():
            self.start(containers[name], {
                "SMTPRELAY_LISTEN": f"tcp://{HOST}:{listen}",
                "SMTPRELAY_METRICS": f"tcp://{HOST}:{metrics}",
                "SMTPRELAY_TARGETS": f"tcp://{HOST}:{sinkPort}",
                "SMTPRELAY_HOSTNAME": f"{name}.test",
                "SMTPRELAY_PROXY_PROTOCOL": HOST,
            })
        port, stats = freePort(), os.path.join(processes.dir, "haproxy.sock")
        config = os.path.join(processes.dir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(haproxyConfig(port, relays, stats))
        waitForPort(port, processes.start("haproxy", ["haproxy", "-f", config, "-db"]))

        def allUp() -> bool:
            return set(serverStates(stats).values()) == {"UP"}

        for listen, _ in relays.values():
            waitForPort(listen)
        waitFor("both relays UP in HAProxy", allUp)

        tally = Tally()

        async def phase(number: int) -> None:
            first = number * WAVES * SESSIONS * PER_SESSION
            for wave in range(WAVES):
                done = await runLoad(port, SESSIONS, PER_SESSION, first + wave * SESSIONS * PER_SESSION)
                for name in ("acknowledged", "refused", "permanent", "unsent"):
                    getattr(tally, name).extend(getattr(done, name))
                tally.hangs += done.hangs

        async def whileStopping() -> subprocess.CompletedProcess:
            stopping = asyncio.get_running_loop().run_in_executor(
                None, functools.partial(podman, "stop", "--time", "60", containers["relay1"]))
            await phase(1)
            return await stopping

        asyncio.run(phase(0))
        # The seconds before HAProxy's health check finds a stopped relay1
        # down, made as long as two phases: with the check paused, HAProxy
        # takes relay1 for up, and every connection it refuses must be
        # redispatched.
        haproxyCommand(stats, "disable health smtprelays/relay1")
        stopped = asyncio.run(whileStopping())
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        exited = podman("inspect", "--format", "{{.State.ExitCode}}", containers["relay1"])
        self.assertEqual(exited.stdout.strip(), "0", "relay1 did not drain and exit cleanly")
        self.assertEqual(serverStates(stats)["relay1"], "no check")  # taken for up
        asyncio.run(phase(2))
        haproxyCommand(stats, "enable health smtprelays/relay1")
        waitFor("relay1 DOWN in HAProxy", lambda: serverStates(stats)["relay1"].startswith("DOWN"))
        started = podman("start", containers["relay1"])
        self.assertEqual(started.returncode, 0, started.stderr)
        waitFor("relay1 UP again in HAProxy", allUp)
        asyncio.run(phase(3))

        sent = 4 * WAVES * SESSIONS * PER_SESSION
        atSink = delivered(dumps)
        ids = Counter(ident for ident, _ in atSink.elements())
        acknowledged = Counter(tally.acknowledged)
        self.assertEqual(tally.hangs, 0, "hangs")
        self.assertEqual(len(tally.acknowledged) + len(tally.refused) + len(tally.unsent), sent)
        self.assertEqual([i for i, n in acknowledged.items() if n > 1], [], "acknowledged twice")
        self.assertEqual([i for i, n in ids.items() if n > 1], [], "at the sink twice")
        self.assertEqual(sorted(set(acknowledged) - set(ids)), [], "acknowledged but lost")
        self.assertEqual(sorted(set(ids) - set(acknowledged)), [], "at the sink but not acknowledged")
        self.assertEqual(tally.permanent, [], "5xx")
        # Only sessions relay1 served when told to stop end early (421
        # after their transaction in flight): HAProxy redispatches the
        # connections it refuses before its health check fails.
        stopping = range(sent // 4, sent // 2)
        self.assertEqual([i for i in tally.unsent if i not in stopping], [],
                         "sessions broke off while no relay was stopping")

        byRelay = Counter(relay for _, relay in atSink)
        afterRestart = Counter(relay for ident, relay in atSink if ident >= 3 * sent // 4)
        split = (f"acknowledged {len(tally.acknowledged)}, 4xx {len(tally.refused)}, "
                 f"not sent {len(tally.unsent)} (in {len({i // PER_SESSION for i in tally.unsent})} sessions "
                 f"ended early); delivered by {dict(byRelay)}, "
                 f"after the restart by {dict(afterRestart)}")
        self.assertGreater(byRelay["relay1"], 0, split)
        self.assertGreater(byRelay["relay2"], 0, split)
        self.assertGreater(afterRestart["relay1"], 0, split)
        for name in containers.values():
            self.assertNotIn("Traceback", self.logs(name))
        Logger().info("scale-out: {sent} messages: {split}", sent=sent, split=split)
