"""
Tests for the project's typing rule: every C{type: ignore} names the errors
it silences and says why on its own line, as in
C{# type: ignore[override]  # a fake resolver, typed loosely}.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import SynchronousTestCase

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IGNORE = re.compile(r"#\s*type:\s*ignore\b(.*)$")
_EXPLAINED = re.compile(r"\[[\w, -]+\]  # \S")


def unexplained(root: str) -> list[str]:
    """
    The C{FILE:LINE} of every C{type: ignore} under C{root}'s C{smtprelay}
    and C{tests} that lacks an error code or a reason.
    """
    found = []
    for top in ("smtprelay", "tests"):
        for directory, _, names in os.walk(os.path.join(root, top)):
            for name in sorted(names):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        match = _IGNORE.search(line)
                        if match and not _EXPLAINED.match(match.group(1)):
                            found.append(f"{relative}:{number}")
    return found


class IgnoreReasonTests(SynchronousTestCase):
    def test_everyIgnoreSaysWhy(self) -> None:
        self.assertEqual(unexplained(_ROOT), [])

    def test_bareIgnoreFound(self) -> None:
        """
        An ignore without a code, or with a code and no reason, is found;
        one with both is not.
        """
        root = self.mktemp()
        os.makedirs(os.path.join(root, "smtprelay"))
        os.makedirs(os.path.join(root, "tests"))
        ignore = "# type: " + "ignore"  # not one of this file's own
        with open(os.path.join(root, "smtprelay", "m.py"), "w") as f:
            f.write(f"a = 1  {ignore}\nb = 2  {ignore}[misc]\nc = 3  {ignore}[misc]  # why\n")
        self.assertEqual(unexplained(root), ["smtprelay/m.py:1", "smtprelay/m.py:2"])
