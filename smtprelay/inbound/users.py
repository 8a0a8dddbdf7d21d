"""
Inbound C{auth users FILE}: local credentials checked against bcrypt hashes.

The file is htpasswd-style, one C{user:$2b$...} line per user (C{#}
comments and blank lines ignored), as C{htpasswd -B} writes it.  A check
costs one bcrypt verification whether or not the user exists, so that
timing does not tell which user names are valid.  Passwords are never
stored or logged.
"""

from __future__ import annotations

import bcrypt

from smtprelay.reading import CannotRead, readBytes

_DUMMY = bcrypt.hashpw(b"smtprelay dummy password", bcrypt.gensalt(rounds=10))


class UsersFileError(ValueError):
    """
    A users file could not be read or has a malformed line (C{FILE:LINE:
    message}).
    """


class UsersFile:
    """
    The users of an C{auth users FILE} listener.

    @ivar path: the file read.
    """

    def __init__(self, path: str) -> None:
        """
        Read C{path}.

        @raise UsersFileError: unreadable file or malformed line.
        """
        self.path = path
        self._hashes: dict[str, bytes] = {}
        self.reload()

    def reload(self) -> None:
        """
        Read the file again (on SIGHUP); on error the old users stay.
        """
        try:
            lines = readBytes(self.path).splitlines()
        except CannotRead as e:
            raise UsersFileError(str(e)) from None
        hashes: dict[str, bytes] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith(b"#"):
                continue
            user, colon, hashed = line.partition(b":")
            if not colon or not user or not hashed.startswith((b"$2a$", b"$2b$", b"$2y$")):
                raise UsersFileError(f"{self.path}:{number}: expected user:$2b$... (a bcrypt hash)")
            try:
                name = user.decode("utf-8")
            except UnicodeDecodeError:
                raise UsersFileError(f"{self.path}:{number}: user name is not UTF-8") from None
            # htpasswd writes $2y$, which the bcrypt library knows as $2b$.
            hashes[name] = b"$2b$" + hashed[4:] if hashed.startswith(b"$2y$") else hashed
        self._hashes = hashes

    def __contains__(self, user: str) -> bool:
        return user in self._hashes

    def check(self, user: str, password: str) -> bool:
        """
        Whether C{password} is C{user}'s.
        """
        hashed = self._hashes.get(user)
        try:
            ok = bcrypt.checkpw(password.encode("utf-8"), hashed or _DUMMY)
        except ValueError:
            return False
        return ok and hashed is not None
