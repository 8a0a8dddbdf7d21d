"""
Operations against a real C{twistd -n smtprelay}: Prometheus metrics that
move with real transactions, read with prometheus_client's own parser, and
C{/healthz} beside them.
"""

from __future__ import annotations

import os
import smtplib
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, Processes, freePort, sinkMessages, waitForPort


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


class MetricsTests(SynchronousTestCase):
    def test_countersMoveWithTransactions(self) -> None:
        procs = Processes(self)
        sinkPort, _ = procs.smtpSink(extra=["-f", "RCPT", "-B", "550 5.1.1 no such user"])
        okPort, _ = procs.smtpSink()
        listen, metrics = freePort(), freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
smtp tcp://{HOST}:{listen} {{
    deliver_to smtp tcp://{HOST}:{okPort}
}}
smtp tcp://{HOST}:{freePort()} {{
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
metrics tcp://{HOST}:{metrics}
""")
        procs.relay("--config", config, port=listen)
        waitForPort(metrics)
        with urllib.request.urlopen(f"http://{HOST}:{metrics}/healthz", timeout=30) as response:
            self.assertEqual((response.status, response.read()), (200, b"serving\n"))
        before = scrape(metrics)
        with smtplib.SMTP(HOST, listen, timeout=60) as client:
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: m\r\n\r\nbody\r\n")
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: m\r\n\r\nbody\r\n")
        after = scrape(metrics)
        sent = ("smtprelay_transactions_total", (("status", "sent"),))
        sessions = ("smtprelay_sessions_total", (("listener", "smtp"),))
        self.assertEqual(after[sent] - before.get(sent, 0.0), 2.0)
        self.assertEqual(after[sessions] - before.get(sessions, 0.0), 1.0)
        self.assertEqual(after[("smtprelay_bytes_relayed_total", ())], 2 * len(b"Subject: m\r\n\r\nbody\r\n"))
        self.assertEqual(after[("smtprelay_sessions_open", (("listener", "smtp"),))], 0.0)
        ok = ("smtprelay_downstream_attempts_total", (("result", "ok"), ("target", "smtp-listener-1")))
        self.assertEqual(after[ok] - before.get(ok, 0.0), 1.0, "one downstream session for both transactions")


class ConnectionReuseTests(SynchronousTestCase):
    def test_nextClientReusesDownstream(self) -> None:
        """
        Client sessions one after another through a real relay to
        smtp-sink: the first opens the downstream connection, the next
        ones reuse it (counted as C{result="reused"}), every message
        arrives, and with C{reuse_connections no} each session connects.
        """
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink()
        for reuse, connects, reused in (("yes", 1.0, 2.0), ("no", 3.0, 0.0)):
            listen, metrics = freePort(), freePort()
            config = os.path.join(procs.dir, f"relay-{reuse}.conf")
            with open(config, "w") as f:
                f.write(f"""
smtp tcp://{HOST}:{listen} {{
    deliver_to smtp tcp://{HOST}:{sinkPort} {{
        reuse_connections {reuse}
    }}
}}
metrics tcp://{HOST}:{metrics}
""")
            procs.relay("--config", config, port=listen, name=f"relay-{reuse}")
            waitForPort(metrics)
            for n in range(3):
                with smtplib.SMTP(HOST, listen, timeout=60) as client:
                    client.sendmail("a@example.org", ["r@example.net"], f"Subject: {n}\r\n\r\nbody\r\n")
            after = scrape(metrics)
            attempts = "smtprelay_downstream_attempts_total"
            target = ("target", "smtp-listener-1")
            self.assertEqual(after.get((attempts, (("result", "ok"), target)), 0.0), connects, reuse)
            self.assertEqual(after.get((attempts, (("result", "reused"), target)), 0.0), reused, reuse)
        subjects = [m.split(b"Subject: ")[1][:1] for m in sinkMessages(dumps, 6)]
        self.assertEqual(sorted(subjects), [b"0", b"0", b"1", b"1", b"2", b"2"])


class CommandLineMetricsTests(SynchronousTestCase):
    def test_metricsOption(self) -> None:
        """
        C{--metrics ADDRESS} serves /metrics for a command-line relay.
        """
        procs = Processes(self)
        metrics = freePort()
        procs.relay("--target", f"tcp://{HOST}:{freePort()}", "--metrics", f"tcp://{HOST}:{metrics}")
        waitForPort(metrics)
        self.assertIn(("smtprelay_sessions_open", (("listener", "smtp"),)), scrape(metrics))


class ProxyProtocolTests(SynchronousTestCase):
    def test_proxiedClientAddressReachesReceived(self) -> None:
        """
        A listener with C{proxy_protocol}: the greeting waits for the PROXY
        header, and the client address it names is the one in Received:.
        """
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink()
        listen = freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"hostname relay.test\nsmtp tcp://{HOST}:{listen} {{\n    proxy_protocol 127.0.0.0/8\n"
                    f"    allow 198.51.100.0/24\n    deliver_to smtp tcp://{HOST}:{sinkPort}\n}}\n")
        procs.relay("--config", config, port=listen)
        import socket
        with socket.create_connection((HOST, listen), timeout=30) as s:
            s.settimeout(0.5)
            with self.assertRaises(socket.timeout):
                s.recv(100)  # no greeting before the header
            s.settimeout(30)
            s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 25\r\n")
            reader = s.makefile("rb")
            self.assertTrue(reader.readline().startswith(b"220 relay.test "))
            s.sendall(b"HELO proxied.test\r\n")
            reader.readline()
            for command in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.net>", b"DATA"):
                s.sendall(command + b"\r\n")
                self.assertIn(reader.readline()[:1], (b"2", b"3"))
            s.sendall(b"Subject: p\r\n\r\nx\r\n.\r\n")
            self.assertTrue(reader.readline().startswith(b"250 "))
        [dump] = sinkMessages(dumps)
        self.assertIn(b"Received: from proxied.test ([198.51.100.7])", dump)
