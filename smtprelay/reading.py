"""
Reading the files that the configuration names (TLS certificates and keys,
users files, password files, imports), with one error text for a file that
cannot be read: C{PATH: cannot read: REASON}.

Plain Python, so that every room may use it.
"""

from __future__ import annotations


class CannotRead(ValueError):
    """
    A file could not be read: C{str()} is C{PATH: cannot read: REASON}.

    @ivar path: the file.
    @ivar reason: why, as the system says it (C{No such file or
        directory}) or C{not UTF-8 text}.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: cannot read: {reason}")
        self.path = path
        self.reason = reason


def readBytes(path: str) -> bytes:
    """
    The contents of the file at C{path}.

    @raise CannotRead: it cannot be opened or read.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CannotRead(path, e.strerror or str(e)) from None


def readText(path: str) -> str:
    """
    The contents of the UTF-8 text file at C{path}, with its line ends
    read as C{\\n} (universal newlines).

    @raise CannotRead: it cannot be opened or read, or is not UTF-8.
    """
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise CannotRead(path, "not UTF-8 text") from None
    except OSError as e:
        raise CannotRead(path, e.strerror or str(e)) from None
