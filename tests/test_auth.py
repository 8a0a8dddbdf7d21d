"""
Tests for L{smtprelay.inbound.users}: the C{users FILE} checker.
"""

from __future__ import annotations

import bcrypt
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.users import UsersFile, UsersFileError


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


class UsersFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_check(self) -> None:
        path = self.write(
            f"# users\n\nalice:{hashed('wonderland')}\n"
            f"bob:{hashed('builder').replace('$2b$', '$2y$', 1)}\n"
        )
        users = UsersFile(path)
        self.assertTrue(users.check("alice", "wonderland"))
        self.assertFalse(users.check("alice", "Wonderland"))
        self.assertTrue(users.check("bob", "builder"))
        self.assertFalse(users.check("carol", "wonderland"))
        self.assertIn("alice", users)
        self.assertNotIn("carol", users)

    def test_malformed(self) -> None:
        path = self.write(f"alice:{hashed('x')}\nbob:plaintext\n")
        e = self.assertRaises(UsersFileError, UsersFile, path)
        self.assertEqual(str(e), f"{path}:2: expected user:$2b$... (a bcrypt hash)")

    def test_missing(self) -> None:
        path = self.mktemp()
        e = self.assertRaises(UsersFileError, UsersFile, path)
        self.assertEqual(str(e), f"{path}: cannot read: No such file or directory")

    def test_reload(self) -> None:
        path = self.write(f"alice:{hashed('one')}\n")
        users = UsersFile(path)
        with open(path, "w") as f:
            f.write(f"alice:{hashed('two')}\n")
        users.reload()
        self.assertTrue(users.check("alice", "two"))
        self.assertFalse(users.check("alice", "one"))
