"""
Tests for L{smtprelay.app.check}, C{smtprelay-check} and C{python -m smtprelay
check}.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from smtprelay import __main__ as entry
from smtprelay.app import check

VALID = """\
hostname relay.test
smtp tcp://127.0.0.1:2525 {
    deliver_to smtp tcp://127.0.0.1:2526 {
        auth plain user {env:SMTPRELAY_CHECK_PASSWORD}
    }
}
"""

INVALID = """\
hostname relay.test
smtp tcp://127.0.0.1:2525 {
    alow 10.0.0.0/8
    max_recipients 10
    deliver_to &nowhere
}
"""


class CheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        self.patch(sys, "stdout", self.stdout)
        self.patch(sys, "stderr", self.stderr)
        os.environ["SMTPRELAY_CHECK_PASSWORD"] = "hunter2"
        self.addCleanup(os.environ.pop, "SMTPRELAY_CHECK_PASSWORD")

    def write(self, text: str, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, "relay.conf")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_valid(self) -> None:
        path = self.write(VALID)
        self.assertEqual(check.main([path]), 0)
        self.assertEqual(self.stdout.getvalue(), f"{path}: OK\n")
        self.assertEqual(self.stderr.getvalue(), "")

    def test_invalid(self) -> None:
        """
        Every error is printed, one per line, on standard error; the status
        is 2.
        """
        path = self.write(INVALID)
        self.assertEqual(check.main([path]), 2)
        self.assertEqual(self.stdout.getvalue(), "")
        self.assertEqual(
            self.stderr.getvalue(),
            f'{path}:3: unknown directive "alow" (did you mean "allow"?)\n'
            f"{path}:4: max_recipients: must be at least 100 (RFC 5321)\n"
            f'{path}:5: deliver_to: unknown target "&nowhere"\n',
        )

    def test_missing(self) -> None:
        path = os.path.join(self.dir, "nope.conf")
        self.assertEqual(check.main([path]), 2)
        self.assertEqual(
            self.stderr.getvalue(), f"{path}: cannot read: No such file or directory\n"
        )

    def test_defaultPath(self) -> None:
        """
        Without an argument the default path is checked.
        """
        self.patch(check, "DEFAULT_CONFIG", os.path.join(self.dir, "default.conf"))
        self.assertEqual(check.main([]), 2)
        self.assertIn("default.conf: cannot read", self.stderr.getvalue())

    def test_show(self) -> None:
        """
        C{--show} prints the effective configuration, password masked.
        """
        path = self.write(VALID)
        self.assertEqual(check.main(["--show", path]), 0)
        shown = self.stdout.getvalue()
        self.assertIn("        auth plain user ****\n", shown)
        self.assertIn("    max_recipients 1000\n", shown)
        self.assertNotIn("hunter2", shown)

    def test_warning(self) -> None:
        """
        A password in a world-readable file is a warning, not an error.
        """
        path = self.write(VALID.replace("{env:SMTPRELAY_CHECK_PASSWORD}", "hunter2"), 0o644)
        self.assertEqual(check.main([path]), 0)
        self.assertEqual(
            self.stderr.getvalue(),
            f"warning: {path} holds secrets and is world-readable (0644); chmod 600 it\n",
        )
        self.assertEqual(self.stdout.getvalue(), f"{path}: OK\n")

    def test_files(self) -> None:
        """
        The files the configuration names are loaded: a missing one is an
        error line and status 2, unless C{--no-files}.
        """
        users = os.path.join(self.dir, "users")
        path = self.write(VALID.replace("    deliver_to", f"    auth users {users}\n    deliver_to", 1))
        self.assertEqual(check.main([path]), 2)
        self.assertEqual(self.stdout.getvalue(), "")
        self.assertEqual(
            self.stderr.getvalue(),
            f"{path}:3: auth: {users}: cannot read: No such file or directory\n",
        )
        self.assertEqual(check.main(["--no-files", path]), 0)
        self.assertEqual(self.stdout.getvalue(), f"{path}: OK\n")

    def test_usage(self) -> None:
        self.assertEqual(check.main(["--bogus"]), 2)
        self.assertIn("usage: smtprelay-check", self.stderr.getvalue())

    def test_module(self) -> None:
        """
        C{python -m smtprelay check} runs the same check; anything else is
        a usage error.
        """
        path = self.write(VALID)
        self.assertEqual(entry.main(["check", path]), 0)
        self.assertEqual(self.stdout.getvalue(), f"{path}: OK\n")
        self.assertEqual(entry.main(["frobnicate"]), 2)
        self.assertIn("usage: python -m smtprelay check", self.stderr.getvalue())


class SubprocessTests(SynchronousTestCase):
    """
    C{python -m smtprelay check} as a process.
    """

    def smtprelay(self, *args: str) -> subprocess.CompletedProcess[str]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        env.pop("SMTPRELAY_CHECK_PASSWORD", None)
        return subprocess.run(
            [sys.executable, "-m", "smtprelay", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    def test_exitCodes(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        good = os.path.join(directory, "good.conf")
        bad = os.path.join(directory, "bad.conf")
        with open(good, "w") as f:
            f.write(VALID.replace("{env:SMTPRELAY_CHECK_PASSWORD}", "hunter2"))
        os.chmod(good, 0o600)
        with open(bad, "w") as f:
            f.write(INVALID)

        ok = self.smtprelay("check", good)
        self.assertEqual((ok.returncode, ok.stdout, ok.stderr), (0, f"{good}: OK\n", ""))

        failed = self.smtprelay("check", bad)
        self.assertEqual(failed.returncode, 2)
        self.assertEqual(failed.stdout, "")
        self.assertEqual(
            failed.stderr.splitlines(),
            [
                f'{bad}:3: unknown directive "alow" (did you mean "allow"?)',
                f"{bad}:4: max_recipients: must be at least 100 (RFC 5321)",
                f'{bad}:5: deliver_to: unknown target "&nowhere"',
            ],
        )
