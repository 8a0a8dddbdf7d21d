"""
Tests for L{smtprelay.app.tap}: what a relay started from the command line
loads.
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app import tap

_QUICK_START = """
import sys
from smtprelay.app import tap
options = tap.Options()
options.parseOptions(["--listen", "tcp://127.0.0.1:2525", "--target", "tcp://127.0.0.1:2526"])
tap.makeService(options)
print(" ".join(sorted(set(sys.argv[1:]) & set(sys.modules))))
"""


EXAMPLES = """
Examples:
  twistd -n smtprelay --config /etc/smtprelay/relay.conf
  twistd -n smtprelay --check --config relay.conf
  twistd -n smtprelay --listen tcp://127.0.0.1:2525 --target tcp://mx.example.net:25
  twistd -n smtprelay --listen unix:///run/smtprelay/lmtp.sock \\
         --target unix:///run/dovecot/lmtp --lmtp

"""
"""What C{twistd smtprelay --help} shows in its description, line for line."""


class UsageTests(SynchronousTestCase):
    def test_examplesOneALine(self) -> None:
        """
        The usage text keeps the description's lines: C{usage.Options}
        alone re-wraps a C{longdesc} into one paragraph.
        """
        self.assertIn(EXAMPLES, tap.Options().getUsage(width=80))


class QuickStartImportTests(SynchronousTestCase):
    """
    Modules only some configurations need stay unloaded by a quick-start
    relay: each costs memory in every relay process.
    """

    def loaded(self, *modules: str) -> list[str]:
        """
        Which of C{modules} a fresh interpreter has loaded once it has built
        a quick-start relay service.
        """
        result = subprocess.run(
            [sys.executable, "-c", _QUICK_START, *modules],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.split()

    def test_noMetricsListener(self) -> None:
        """
        Without a metrics listener neither the web server nor the
        Prometheus client is loaded.
        """
        self.assertEqual(self.loaded("twisted.web.server", "prometheus_client"), [])

    def test_noConfigurationFile(self) -> None:
        """
        Without a configuration file, the exact arithmetic of durations
        (C{fractions}, which brings C{decimal}) is not loaded.
        """
        self.assertEqual(self.loaded("fractions", "decimal"), [])
