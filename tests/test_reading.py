"""
Tests for L{smtprelay.reading}: the one C{PATH: cannot read: REASON} of
every file the configuration names.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.reading import CannotRead, readBytes, readText


class ReadingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def write(self, data: bytes) -> str:
        path = os.path.join(self.dir, "file")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_contents(self) -> None:
        path = self.write(b"one\r\ntwo\rthree\n\xc3\xa9")
        self.assertEqual(readBytes(path), b"one\r\ntwo\rthree\n\xc3\xa9")
        self.assertEqual(readText(path), "one\ntwo\nthree\n\u00e9")

    def test_missing(self) -> None:
        path = os.path.join(self.dir, "missing")
        for read in (readBytes, readText):
            error = self.assertRaises(CannotRead, read, path)
            self.assertEqual(str(error), f"{path}: cannot read: No such file or directory")
            self.assertEqual((error.path, error.reason), (path, "No such file or directory"))

    def test_directory(self) -> None:
        for read in (readBytes, readText):
            error = self.assertRaises(CannotRead, read, self.dir)
            self.assertEqual(str(error), f"{self.dir}: cannot read: Is a directory")

    def test_notUTF8(self) -> None:
        """
        Text must be UTF-8; the bytes are read all the same.
        """
        path = self.write(b"caf\xe9\n")
        error = self.assertRaises(CannotRead, readText, path)
        self.assertEqual(str(error), f"{path}: cannot read: not UTF-8 text")
        self.assertEqual(readBytes(path), b"caf\xe9\n")

    def test_isValueError(self) -> None:
        """
        Callers that report a bad setting's C{ValueError} report this too.
        """
        self.assertTrue(issubclass(CannotRead, ValueError))
