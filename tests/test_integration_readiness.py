"""
Readiness against real peers: a C{twistd -n smtprelay} whose C{/readyz}
follows the probes of its targets, Postfix's C{smtp-sink} that is down and
then up, and an aiosmtpd downstream (STARTTLS, a trustme CA) that refuses
the relay's credentials.
"""

from __future__ import annotations

import os
import smtplib
import urllib.error
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, Processes, freePort, sinkMessages, waitFor, waitForPort
from .test_integration_ops import scrape


def readyz(port: int) -> tuple[int, str]:
    """
    C{GET /readyz}: the status and the body.
    """
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/readyz", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class ReadinessTests(SynchronousTestCase):
    def test_targetDownThenUp(self) -> None:
        """
        C{/readyz} is 503 and names the target while nothing listens on its
        port, and 200 once smtp-sink does; the probes never sent MAIL (the
        sink keeps a file per transaction from MAIL on), a message then goes
        through.
        """
        procs = Processes(self)
        listen, metrics, sinkPort = freePort(), freePort(), freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
probe_interval 300ms
metrics tcp://{HOST}:{metrics}
smtp tcp://{HOST}:{listen} {{
    deliver_to smtp tcp://{HOST}:{sinkPort}
}}
""")
        procs.relay("--config", config, port=listen)
        waitForPort(metrics)

        def failed() -> tuple[int, str] | None:
            answer = readyz(metrics)
            return answer if "failed" in answer[1] else None

        status, body = waitFor("a failed probe", failed)
        self.assertEqual(status, 503)
        self.assertEqual(
            body.splitlines()[:2],
            ["not ready", f"listener smtp tcp://{HOST}:{listen} has no target that answered its latest probe (smtp-listener-1)"],
        )
        self.assertIn(f"target smtp-listener-1: tcp://{HOST}:{sinkPort} failed at connect: connect failed:", body)
        self.assertEqual(scrape(metrics)[("smtprelay_ready", ())], 0.0)

        _, dumps = procs.smtpSink(port=sinkPort)

        def ready() -> tuple[int, str] | None:
            answer = readyz(metrics)
            return answer if answer[0] == 200 else None

        status, body = waitFor("/readyz 200", ready)
        self.assertEqual(body, f"ready\ntarget smtp-listener-1: tcp://{HOST}:{sinkPort} ok\n")
        samples = scrape(metrics)
        self.assertEqual(samples[("smtprelay_ready", ())], 1.0)
        self.assertEqual(samples[("smtprelay_target_ready", (("target", "smtp-listener-1"),))], 1.0)
        self.assertGreaterEqual(
            samples[("smtprelay_probe_results_total", (("result", "ok"), ("target", "smtp-listener-1")))], 1.0
        )
        self.assertEqual(os.listdir(dumps), [], "a probe began a transaction")
        with smtplib.SMTP(HOST, listen, timeout=60) as client:
            client.sendmail("a@example.org", ["r@example.net"], b"Subject: m\r\n\r\nbody\r\n")
        self.assertEqual(len(sinkMessages(dumps)), 1)

    def test_wrongCredentials(self) -> None:
        """
        A downstream that refuses the relay's credentials: the relay is not
        ready and C{/readyz} names that target and the refusal, while the
        same downstream with the right password is ready.
        """
        procs = Processes(self)
        downstream, _, caFile = procs.aiosmtpd(password=b"right")
        metrics, good, bad = freePort(), freePort(), freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
probe_interval 300ms
metrics tcp://{HOST}:{metrics}
tls_client {{
    root_ca {caFile}
    server_name mx.example
}}
target.smtp good {{
    targets tcp://{HOST}:{downstream}
    auth plain relay right
}}
target.smtp bad {{
    targets tcp://{HOST}:{downstream}
    auth plain relay wrong
}}
smtp tcp://{HOST}:{good} {{
    deliver_to &good
}}
smtp tcp://{HOST}:{bad} {{
    deliver_to &bad
}}
""")
        os.chmod(config, 0o600)
        procs.relay("--config", config, port=good)
        waitForPort(metrics)

        def probed() -> tuple[int, str] | None:
            status, body = readyz(metrics)
            return (status, body) if "not probed yet" not in body and status else None

        status, body = waitFor("both targets probed", probed)
        self.assertEqual(status, 503)
        lines = body.splitlines()
        self.assertEqual(
            lines[:2],
            ["not ready", f"listener smtp tcp://{HOST}:{bad} has no target that answered its latest probe (bad)"],
        )
        self.assertIn(f"target good: tcp://{HOST}:{downstream} ok", lines)
        self.assertIn(
            f"target bad: tcp://{HOST}:{downstream} failed at auth: PLAIN authentication refused: "
            f"535 Authentication credentials invalid at {HOST}[{HOST}]:{downstream}",
            lines,
        )
        self.assertNotIn("wrong", body)
        samples = scrape(metrics)
        self.assertEqual(samples[("smtprelay_target_ready", (("target", "bad"),))], 0.0)
        self.assertEqual(samples[("smtprelay_target_ready", (("target", "good"),))], 1.0)
        self.assertGreaterEqual(samples[("smtprelay_probe_results_total", (("result", "auth"), ("target", "bad")))], 1.0)
