"""
Graceful shutdown of a real C{twistd -n smtprelay} process (SIGTERM).
"""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, Processes, sinkMessages


class SIGTERMTests(SynchronousTestCase):
    def test_inFlightTransactionFinishesIdleSessionsAreTold(self) -> None:
        """
        SIGTERM during a slow transaction: the transaction completes with
        the downstream's 250, an idle session gets 421 4.3.2, new
        connections are refused, and the process exits cleanly.
        """
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink(extra=["-W", ".:2"])
        port = procs.relay("--target", f"tcp://{HOST}:{sinkPort}")
        relay = procs._procs[-1]

        idle = socket.create_connection((HOST, port), timeout=30)
        self.addCleanup(idle.close)
        idleReader = idle.makefile("rb")
        self.assertTrue(idleReader.readline().startswith(b"220 "))

        outcome: list[object] = []

        def send() -> None:
            client = smtplib.SMTP(HOST, port, timeout=60)
            try:
                outcome.append(client.sendmail("a@example.org", ["r@example.net"], b"Subject: s\r\n\r\nx\r\n"))
                # After its transaction, a draining session is told to go.
                outcome.append(client.docmd("NOOP"))
            except Exception as e:
                outcome.append(e)
            finally:
                client.close()

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(1.0)  # the message is now waiting for the sink's delayed reply
        relay.send_signal(signal.SIGTERM)
        self.assertRegex(idleReader.readline(), rb"^421 4\.3\.2 Service shutting down \[\w+\]\r\n$")
        time.sleep(0.2)
        with self.assertRaises(OSError):
            socket.create_connection((HOST, port), timeout=5).close()
        sender.join(60)
        self.assertEqual(outcome[0], {})
        noop = outcome[1]
        assert isinstance(noop, tuple), noop  # smtplib's (code, text), not an exception
        self.assertEqual(noop[0], 421)
        self.assertEqual(len(sinkMessages(dumps)), 1)
        # twistd re-raises the signal that stopped it once the reactor has
        # stopped cleanly, as systemd expects.
        self.assertIn(relay.wait(30), (0, -signal.SIGTERM))
        self.assertIn("Main loop terminated.", procs.log("relay"))
