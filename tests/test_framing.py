"""
Tests for L{smtprelay.inbound.framing}: command lines, overlong lines,
body bytes, BDAT byte counts, the input limit and the pause reasons,
without a session.
"""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.framing import (
    Chunk,
    InputBuffer,
    LineTooLong,
    Pauser,
    Pauses,
    hasPendingInput,
)


class InputBufferTests(SynchronousTestCase):
    def test_lines(self) -> None:
        """
        Lines come without their CRLF, one at a time; a partial line waits.
        """
        buffer = InputBuffer()
        buffer.feed(b"NOOP\r\nRSET\r\nQU")
        self.assertEqual(buffer.nextLine(100), b"NOOP")
        self.assertEqual(buffer.nextLine(100), b"RSET")
        self.assertIsNone(buffer.nextLine(100))
        buffer.feed(b"IT\r\n")
        self.assertEqual(buffer.nextLine(100), b"QUIT")
        self.assertFalse(buffer.data)

    def test_bareLFStaysInTheLine(self) -> None:
        """
        Only CRLF ends a line: a bare LF is the line's (the session refuses it).
        """
        buffer = InputBuffer()
        buffer.feed(b"NO\nOP\r\n")
        self.assertEqual(buffer.nextLine(100), b"NO\nOP")

    def test_overlongComplete(self) -> None:
        """
        A whole line longer than allowed raises L{LineTooLong} once; the
        next line is read normally.  A line of exactly the limit is fine.
        """
        buffer = InputBuffer()
        buffer.feed(b"x" * 11 + b"\r\n" + b"y" * 10 + b"\r\n")
        self.assertRaises(LineTooLong, buffer.nextLine, 10)
        self.assertEqual(buffer.nextLine(10), b"y" * 10)

    def test_overlongTrickling(self) -> None:
        """
        An overlong line is dropped as it comes, so the buffer never holds
        more than the limit; its end raises L{LineTooLong}, even when the
        CRLF is split across reads.
        """
        buffer = InputBuffer()
        buffer.feed(b"x" * 11)
        self.assertIsNone(buffer.nextLine(10))
        self.assertEqual(len(buffer.data), 0)
        buffer.feed(b"x" * 50 + b"\r")
        self.assertIsNone(buffer.nextLine(10))
        self.assertEqual(len(buffer.data), 1)
        buffer.feed(b"\nNOOP\r\n")
        self.assertRaises(LineTooLong, buffer.nextLine, 10)
        self.assertEqual(buffer.nextLine(10), b"NOOP")

    def test_limit(self) -> None:
        """
        L{InputBuffer.feed} says False once more than the limit is held.
        """
        buffer = InputBuffer(limit=8)
        self.assertTrue(buffer.feed(b"12345678"))
        self.assertFalse(buffer.feed(b"9"))

    def test_takeAndUnread(self) -> None:
        """
        Exact byte counts for BDAT; everything for the body scanner; what
        follows a body goes back in front.
        """
        buffer = InputBuffer()
        buffer.feed(b"abcdef")
        self.assertEqual(buffer.take(4), b"abcd")
        self.assertEqual(buffer.take(4), b"ef")
        buffer.feed(b"body\r\n.\r\nQUIT\r\n")
        self.assertEqual(buffer.takeAll(), b"body\r\n.\r\nQUIT\r\n")
        buffer.unread(b"QUIT\r\n")
        buffer.feed(b"NOOP\r\n")
        self.assertEqual(buffer.nextLine(100), b"QUIT")
        self.assertEqual(buffer.nextLine(100), b"NOOP")
        buffer.feed(b"rest")
        buffer.clear()
        self.assertFalse(buffer.data)


def _frames(pieces: list[bytes], maxLength: int) -> list[bytes | None]:
    """
    Feed C{pieces} one by one, taking every line as it completes: the
    lines, with L{None} for each overlong one.
    """
    buffer = InputBuffer()
    frames: list[bytes | None] = []
    for piece in pieces:
        buffer.feed(piece)
        while True:
            try:
                line = buffer.nextLine(maxLength)
            except LineTooLong:
                frames.append(None)
                continue
            if line is None:
                break
            frames.append(line)
    return frames


class FramingPropertyTests(SynchronousTestCase):
    @given(st.binary(max_size=300).map(lambda b: b.replace(b"x", b"\r\n")),
           st.lists(st.integers(0, 300), max_size=20), st.integers(1, 20))
    def test_anySplit(self, data: bytes, cuts: list[int], maxLength: int) -> None:
        """
        However the input is split into reads, the same lines (and
        overlong lines) come out as from one read.
        """
        points = sorted({min(c, len(data)) for c in cuts})
        pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
        self.assertEqual(_frames(pieces, maxLength), _frames([data], maxLength))


class ChunkTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(Chunk.parse(b"11"), Chunk(11, False, 11))
        self.assertEqual(Chunk.parse(b"0 last"), Chunk(0, True, 0))
        self.assertEqual(Chunk.parse(b"999999999999999 LAST"), Chunk(999999999999999, True, 999999999999999))

    def test_malformed(self) -> None:
        for argument in (b"", b"-1", b"1 LASTX", b"x", b"1000000000000000", b"1 LAST x"):
            with self.subTest(argument):
                self.assertIsNone(Chunk.parse(argument))


class PausesTests(SynchronousTestCase):
    def test_lastReasonResumes(self) -> None:
        """
        The transport is paused once for any number of reasons, and may be
        resumed only when the last one goes.
        """
        transport = StringTransport()
        pauses = Pauses()
        pauses.pause("busy", transport)
        pauses.pause("write", transport)
        self.assertEqual(transport.producerState, "paused")
        self.assertTrue(pauses.besides("busy"))
        self.assertFalse(pauses.release("busy"))
        self.assertFalse(pauses.release("busy"))
        self.assertFalse(pauses.besides("write"))
        self.assertIn("write", pauses.reasons)
        self.assertTrue(pauses.release("write"))
        self.assertFalse(pauses.reasons)
        self.assertEqual(transport.producerState, "paused")
        pauses.resumeTransport()
        self.assertEqual(transport.producerState, "producing")

    def test_pauser(self) -> None:
        """
        A L{Pauser} pauses and resumes for its reason; once detached (or
        stopped) it resumes one last time and is deaf.
        """
        calls: list[tuple[str, str]] = []
        pauser = Pauser(lambda r: calls.append(("pause", r)), lambda r: calls.append(("resume", r)), "body")
        pauser.pauseProducing()
        pauser.resumeProducing()
        pauser.pauseProducing()
        pauser.stopProducing()
        pauser.pauseProducing()
        pauser.detach()
        self.assertEqual(calls, [("pause", "body"), ("resume", "body"), ("pause", "body"),
                                 ("resume", "body")])


class PendingInputTests(SynchronousTestCase):
    def test_socket(self) -> None:
        """
        A stream socket with unread bytes says yes; without, no.
        """
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)

        class Transport:
            def getHandle(self) -> socket.socket:
                return ours

        self.assertFalse(hasPendingInput(Transport()))
        theirs.sendall(b"EHLO early\r\n")
        self.assertTrue(hasPendingInput(Transport()))
        # Peeked, not read.
        self.assertEqual(ours.recv(100), b"EHLO early\r\n")

    def test_proxied(self) -> None:
        """
        A transport that knows (the PROXY reader) is asked first; one that
        has no socket says no.
        """

        class Proxied:
            def hasPendingInput(self) -> bool:
                return True

        self.assertTrue(hasPendingInput(Proxied()))
        self.assertFalse(hasPendingInput(StringTransport()))
