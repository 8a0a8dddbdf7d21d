"""
The DATA body path: the inbound scanner and the outbound dot-stuffer.

L{DataScanner} reads what a client sends after C{354}: it finds the only
real end-of-data (C{CRLF . CRLF}), removes stuffed dots, counts the size and
the C{Received:} headers and notices bare CR/LF, streaming the unstuffed
bytes as they arrive.  Made with C{stuffed=False} it reads the chunks of a
C{BDAT} body under the same rules, as they are, until L{DataScanner.finish}.  L{DotStuffer} does the reverse for a downstream.  Both
work on whole chunks with C{bytes} methods, never one Python call per line,
and both are correct at every chunk boundary (they hold back at most four
bytes that could start an end-of-data or a stuffed dot).
"""

from __future__ import annotations

import re
from typing import Callable

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal

_MARK = b"\r\n.\r\n"
_PREFIXES = (_MARK[:4], _MARK[:3], _MARK[:2], _MARK[:1])
_BARE = re.compile(rb"\r\n|\r|\n")
_RECEIVED = re.compile(rb"\r\nreceived:", re.IGNORECASE)
_HEADER_CARRY = len(b"\r\nreceived:") - 1


class DotStuffer:
    """
    Dot-stuff a message for the wire (RFC 5321 §4.5.2), one chunk at a time.

    Feed unstuffed message bytes whose lines end in CRLF to L{stuff}, in
    order, in chunks of any size; send what it returns; finish with
    L{end}.  A dot at the start of any line (the first line, or one whose
    CRLF ended the previous chunk) is doubled.  As a defence in depth a dot
    after a bare LF is doubled too, so that a lenient downstream never sees
    C{LF . LF} either.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        # The message starts at the beginning of a line.
        self._tail = b"\r\n"

    def stuff(self, chunk: bytes) -> bytes:
        """
        Return C{chunk} dot-stuffed, given everything passed before.
        """
        if not chunk:
            return chunk
        out = chunk.replace(b"\n.", b"\n..")
        if chunk[0] == 0x2E and self._tail[-1] == 0x0A:
            out = b"." + out
        self._tail = (self._tail + chunk)[-2:] if len(chunk) < 2 else chunk[-2:]
        return out

    def end(self) -> bytes:
        """
        Return the end-of-data bytes: C{.CRLF} when the message so far ends
        a line, C{CRLF.CRLF} otherwise (the message then gets a final CRLF).
        """
        return b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n"


def _held(buf: bytes) -> int:
    """
    The length of the longest suffix of C{buf} that could start C{CRLF . CRLF}.
    """
    for prefix in _PREFIXES:
        if buf.endswith(prefix):
            return len(prefix)
    return 0


class DataScanner:
    """
    Read one DATA body from the client's byte stream.

    Call L{feed} with every chunk after the C{354}; it returns L{None} while
    the body goes on, and the bytes after the end-of-data line (the next
    pipelined commands) once the real end has been seen.  Only C{CRLF . CRLF}
    ends the body: C{LF . LF}, C{CR . CR}, C{LF . CRLF} and the like are body
    text.

    The unstuffed message goes to C{emit} as it arrives, lines ending in
    CRLF, until a local verdict is reached: after that nothing more is
    emitted and the caller must refuse the message with L{verdict} once
    L{feed} reports the end.

    @ivar size: unstuffed message bytes so far.
    @ivar hops: C{Received:} headers counted in the header section.
    @ivar done: the end-of-data has been seen.
    """

    __slots__ = (
        "_emit", "_maxSize", "_maxHops", "_normalize", "_held", "_virtual",
        "_lineStart", "_inHeaders", "_headerCarry", "_bare", "_refused", "size",
        "hops", "done", "_maxText", "_longRun", "_partial", "_longLine", "_stuffed",
    )

    def __init__(
        self,
        emit: Callable[[bytes], None],
        maxSize: int,
        maxHops: int,
        normalize: bool = False,
        maxLineLength: int | None = None,
        stuffed: bool = True,
    ) -> None:
        """
        @param emit: called with each piece of the unstuffed message.
        @param maxSize: the largest message accepted, in (unstuffed) bytes.
        @param maxHops: the most C{Received:} headers accepted.
        @param normalize: turn bare CR and bare LF into CRLF instead of
            refusing the message.
        @param maxLineLength: the longest line accepted, CRLF included and
            a stuffed dot not (RFC 5321 §4.5.3.1.6), or L{None} for lines
            of any length.
        @param stuffed: the body is dot-stuffed and ends with C{CRLF . CRLF}
            (DATA); C{False}: BDAT chunks, taken as they are, the end given
            by L{finish}.
        """
        self._stuffed = stuffed
        self._emit = emit
        self._maxSize = maxSize
        self._maxHops = maxHops
        self._normalize = normalize
        self._maxText = None if maxLineLength is None else maxLineLength - 2
        self._longRun = (
            None if self._maxText is None else re.compile(rb"[^\r\n]{%d}" % (self._maxText + 1))
        )
        # Bytes of the line that the last segment left unfinished.
        self._partial = 0
        self._longLine = False
        # A virtual CRLF before the body makes the first line an ordinary
        # line start: ".CRLF" at once is the end, a leading dot is stuffed.
        self._held = b"\r\n"
        self._virtual = 2
        self._lineStart = False
        self._inHeaders = True
        self._headerCarry = b""
        self._bare = False
        self._refused = False
        self.size = 0
        self.hops = 0
        self.done = False

    @property
    def verdict(self) -> Refusal | None:
        """
        L{None}, or the refusal of the message: bare CR/LF (when not
        normalizing), too big, too many hops, in that order of precedence so
        that the verdict does not depend on how the body was chunked.
        """
        if self._bare:
            return replies.BARE_LF_IN_BODY
        if self.size > self._maxSize:
            return replies.TOO_BIG
        if self.hops > self._maxHops:
            return replies.HOPS_EXCEEDED
        if self._longLine:
            return replies.BODY_LINE_TOO_LONG
        return None

    def feed(self, data: bytes) -> bytes | None:
        """
        Scan C{data}.

        @return: L{None} while the body goes on; once the end-of-data line
            is seen, the bytes that followed it.
        """
        if self.done:
            return data
        buf = self._held + data if self._held else data
        end = buf.find(_MARK) if self._stuffed else -1
        if end >= 0:
            self._segment(buf[: end + 2])
            self._held = b""
            self.done = True
            return buf[end + 5:]
        cut = len(buf) - _held(buf)
        if cut:
            self._segment(buf[:cut])
            self._held = buf[cut:]
        else:
            self._held = buf
        return None

    def finish(self) -> None:
        """
        The last BDAT chunk was fed: scan what was held back.
        """
        held, self._held = self._held, b""
        if held:
            self._segment(held)
        self.done = True

    def _segment(self, seg: bytes) -> None:
        """
        Process a piece of the raw (stuffed) body that is known not to
        contain the end-of-data and not to end inside a CRLF.
        """
        crlf = seg.count(b"\r\n")
        if seg.count(b"\r") != crlf or seg.count(b"\n") != crlf:
            if self._normalize:
                seg = _BARE.sub(b"\r\n", seg)
            else:
                self._bare = self._refused = True
        if not self._stuffed:
            out = seg
        else:
            if self._lineStart and seg[:1] == b".":
                seg = seg[1:]
            self._lineStart = seg.endswith(b"\r\n")
            out = seg.replace(b"\r\n.", b"\r\n")
        if self._inHeaders:
            self._headers(out)
        if self._virtual:
            out = out[self._virtual:]
            self._virtual = 0
        self.size += len(out)
        if self.size > self._maxSize:
            self._refused = True
        if self._longRun is not None and not self._longLine:
            self._lines(out)
        if out and not self._refused:
            self._emit(out)

    def _lines(self, out: bytes) -> None:
        """
        Notice a line longer than the limit, across chunk boundaries.
        """
        assert self._longRun is not None and self._maxText is not None
        first = out.find(b"\r\n")
        if first < 0:
            self._partial += len(out)
            long = self._partial > self._maxText
        else:
            long = self._partial + first > self._maxText or bool(self._longRun.search(out, first))
            self._partial = len(out) - out.rfind(b"\r\n") - 2
        if long:
            self._longLine = self._refused = True

    def _headers(self, out: bytes) -> None:
        """
        Count C{Received:} lines until the empty line that ends the header
        section, across chunk boundaries.
        """
        text = self._headerCarry + out
        end = text.find(b"\r\n\r\n")
        if end >= 0:
            self.hops += len(_RECEIVED.findall(text, 0, end + 2))
            self._inHeaders = False
            self._headerCarry = b""
        else:
            self.hops += len(_RECEIVED.findall(text))
            self._headerCarry = text[-_HEADER_CARRY:]
        if self.hops > self._maxHops:
            self._refused = True
