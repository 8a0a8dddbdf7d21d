"""
Tests for L{smtprelay.protocol.body}: the DATA scanner and the dot-stuffer.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.protocol import replies
from smtprelay.protocol.body import DataScanner, DotStuffer
from smtprelay.protocol.replies import Refusal


def scan(
    chunks: list[bytes], maxSize: int = 10**9, maxHops: int = 50, normalize: bool = False,
    maxLineLength: int | None = None,
) -> tuple[bytes, bytes | None, DataScanner]:
    """
    Feed C{chunks} to a fresh scanner; return (emitted message, bytes after
    the end or None, scanner).
    """
    out: list[bytes] = []
    scanner = DataScanner(out.append, maxSize, maxHops, normalize, maxLineLength)
    rest: bytes | None = None
    for chunk in chunks:
        if rest is not None:
            rest += chunk
        else:
            rest = scanner.feed(chunk)
    return b"".join(out), rest, scanner


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    Split C{data} at the given offsets (taken modulo its length).
    """
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def stuffAll(message: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.stuff(c) for c in split(message, cuts)) + stuffer.end()


_bodyBytes = st.lists(
    st.sampled_from([b"\r\n", b".", b"\r", b"\n", b"a", b"Received: x", b"\x00", b"..", b"\r\n.\r\n"]),
    max_size=40,
).map(b"".join)

_crlfMessage = st.lists(
    st.sampled_from([b".", b"..", b"a", b"Received: x", b"", b" ", b".\r", b"x.\r"]).map(
        lambda line: line.replace(b"\r", b"")
    ),
    max_size=20,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))


class DotStufferTests(SynchronousTestCase):
    """
    L{DotStuffer} doubles every line-initial dot at every chunk boundary.
    """

    def test_firstLine(self) -> None:
        stuffer = DotStuffer()
        self.assertEqual(stuffer.stuff(b".\r\n"), b"..\r\n")
        self.assertEqual(stuffer.end(), b".\r\n")

    def test_boundaries(self) -> None:
        """
        A dot after a CRLF split over chunks, or just after a chunk that
        ended with CRLF, is stuffed.
        """
        stuffer = DotStuffer()
        out = [stuffer.stuff(c) for c in [b"a\r", b"\n.", b"\r\n", b".x\r\n"]]
        self.assertEqual(out, [b"a\r", b"\n..", b"\r\n", b"..x\r\n"])

    def test_midLineDot(self) -> None:
        stuffer = DotStuffer()
        self.assertEqual(stuffer.stuff(b"a.b\r\n"), b"a.b\r\n")
        self.assertEqual(stuffer.stuff(b"x"), b"x")

    def test_endAfterLine(self) -> None:
        stuffer = DotStuffer()
        stuffer.stuff(b"a\r\n")
        self.assertEqual(stuffer.end(), b".\r\n")

    def test_endMidLine(self) -> None:
        """
        A message that does not end with CRLF gets one before the dot.
        """
        stuffer = DotStuffer()
        stuffer.stuff(b"a\r\nb")
        self.assertEqual(stuffer.end(), b"\r\n.\r\n")

    def test_endAfterCR(self) -> None:
        stuffer = DotStuffer()
        stuffer.stuff(b"a\r")
        self.assertEqual(stuffer.end(), b"\r\n.\r\n")

    def test_emptyMessage(self) -> None:
        stuffer = DotStuffer()
        self.assertEqual(stuffer.stuff(b""), b"")
        self.assertEqual(stuffer.end(), b".\r\n")

    def test_bareLFDot(self) -> None:
        """
        Defence in depth: a dot after a bare LF is stuffed too.
        """
        self.assertEqual(DotStuffer().stuff(b"a\n.\n"), b"a\n..\n")

    @given(_crlfMessage, st.lists(st.integers(min_value=0), max_size=8),
           st.lists(st.integers(min_value=0), max_size=8))
    @settings(max_examples=300)
    def test_roundTrip(self, message: bytes, stuffCuts: list[int], scanCuts: list[int]) -> None:
        """
        Stuffing then scanning is the identity whatever the chunking of both
        sides, and the stuffed stream ends exactly at its end-of-data.
        """
        wire = stuffAll(message, stuffCuts)
        got, rest, scanner = scan(split(wire + b"NEXT", scanCuts))
        self.assertEqual(got, message)
        self.assertEqual(rest, b"NEXT")
        self.assertIsNone(scanner.verdict)
        self.assertEqual(scanner.size, len(message))


class DataScannerTests(SynchronousTestCase):
    """
    L{DataScanner} finds the real end-of-data only, unstuffs, counts and
    judges.
    """

    def test_simple(self) -> None:
        got, rest, scanner = scan([b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n"])
        self.assertEqual((got, rest), (b"Subject: x\r\n\r\nhi\r\n", b"QUIT\r\n"))
        self.assertTrue(scanner.done)

    def test_emptyBody(self) -> None:
        got, rest, scanner = scan([b".\r\n"])
        self.assertEqual((got, rest, scanner.size), (b"", b"", 0))

    def test_unstuff(self) -> None:
        got, rest, _ = scan([b"..\r\na\r\n..b\r\n.\r\n"])
        self.assertEqual(got, b".\r\na\r\n.b\r\n")

    def test_streamsEarly(self) -> None:
        """
        Bytes are emitted as they arrive; at most the bytes that could start
        an end-of-data are held back.
        """
        out: list[bytes] = []
        scanner = DataScanner(out.append, 10**6, 50)
        self.assertIsNone(scanner.feed(b"Subject: x\r\n\r\nabc"))
        self.assertEqual(b"".join(out), b"Subject: x\r\n\r\nabc")
        self.assertIsNone(scanner.feed(b"def\r\n."))
        self.assertEqual(b"".join(out), b"Subject: x\r\n\r\nabcdef")
        self.assertEqual(scanner.feed(b"\r\n"), b"")
        self.assertEqual(b"".join(out), b"Subject: x\r\n\r\nabcdef\r\n")

    def test_smugglingVariants(self) -> None:
        """
        None of the non-standard end-of-data variants ends the body; each
        is a bare CR/LF body that is refused at the real end.
        """
        for variant in [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n",
                        b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]:
            wire = b"a" + variant + b"MAIL FROM:<x>\r\nRCPT TO:<y>\r\nDATA\r\n"
            got, rest, scanner = scan([wire])
            self.assertIsNone(rest, variant)
            self.assertFalse(scanner.done)
            rest = scanner.feed(b"\r\n.\r\n")
            self.assertEqual(rest, b"")
            if b"\x00" not in variant:
                self.assertEqual(scanner.verdict, Refusal(replies.BARE_LF, "bare_lf"), variant)

    def test_bareLFNotEmitted(self) -> None:
        """
        Under C{reject}, nothing of a chunk with a bare LF (nor anything
        after it) is emitted, so the downstream never sees it.
        """
        got, rest, scanner = scan([b"a\r\n", b"b\n.\nc\r\n", b"d\r\n.\r\n"])
        self.assertEqual(got, b"a")
        self.assertEqual(scanner.verdict, Refusal(replies.BARE_LF, "bare_lf"))

    def test_normalize(self) -> None:
        got, rest, scanner = scan([b"a\nb\rc\r\r\n\n.\n.x\r\n.\r\n"], normalize=True)
        self.assertEqual(got, b"a\r\nb\r\nc\r\n\r\n\r\n\r\nx\r\n")
        self.assertEqual(rest, b"")
        self.assertIsNone(scanner.verdict)

    def test_tooBig(self) -> None:
        got, rest, scanner = scan([b"0123456789\r\n", b"x" * 100 + b"\r\n.\r\n"], maxSize=20)
        self.assertEqual(scanner.verdict, Refusal(replies.MESSAGE_TOO_BIG, "too_big"))
        self.assertEqual(rest, b"")
        self.assertEqual(got, b"0123456789")

    def test_exactlyMaxSize(self) -> None:
        _, _, scanner = scan([b"0123456789\r\n.\r\n"], maxSize=12)
        self.assertIsNone(scanner.verdict)

    def test_longLineUnlimited(self) -> None:
        """
        Without C{max_line_length} a line of any length is forwarded intact.
        """
        line = b"x" * 100_000 + b"\r\n"
        got, _, scanner = scan([line[:70_000], line[70_000:] + b".\r\n"])
        self.assertEqual(got, line)
        self.assertIsNone(scanner.verdict)

    def test_lineLength(self) -> None:
        """
        A line of C{maxLineLength} bytes with its CRLF passes, one byte more
        is refused wherever the chunks are cut; a stuffed dot does not
        count (RFC 5321 §4.5.3.1.6).
        """
        refused = Refusal(replies.LINE_TOO_LONG_IN_BODY, "line_too_long")
        for wire, verdict in [
            (b"a\r\n12345678\r\nb\r\n.\r\n", None),
            (b"..2345678\r\n12345678\r\n.\r\n", None),
            (b"12345678", None),  # an unfinished line within the limit
            (b"a\r\n123456789\r\nb\r\n.\r\n", refused),
            (b"123456789\r\n.\r\n", refused),
            (b"a\r\nb\r\n123456789\r\n.\r\n", refused),
            (b"a\r\n" + b"x" * 50 + b"\r\n.\r\n", refused),
        ]:
            for cut in range(len(wire) + 1):
                chunks = [wire[:cut], wire[cut:]]
                _, _, scanner = scan(chunks, maxLineLength=10)
                self.assertEqual(scanner.verdict, verdict, (wire, cut))

    def test_hops(self) -> None:
        headers = b"Received: a\r\nreceived: b\r\nX: y\r\nRECEIVED: c\r\n\r\nReceived: body\r\n.\r\n"
        _, _, scanner = scan([headers], maxHops=3)
        self.assertEqual(scanner.hops, 3)
        self.assertIsNone(scanner.verdict)
        _, _, scanner = scan([headers], maxHops=2)
        self.assertEqual(scanner.verdict, Refusal(replies.TOO_MANY_HOPS, "too_many_hops"))

    def test_hopsSplit(self) -> None:
        """
        A C{Received:} split between chunks is counted once.
        """
        wire = b"Received: a\r\nReceived: b\r\n\r\nReceived: c\r\n.\r\n"
        for i in range(len(wire)):
            _, _, scanner = scan([wire[:i], wire[i:]])
            self.assertEqual(scanner.hops, 2, i)

    def test_longLine(self) -> None:
        """
        A line far over any limit stays body text.
        """
        line = b"x" * 20000 + b"\r\nQUIT\r\n"
        got, rest, scanner = scan([line[:7000], line[7000:], b".\r\n"])
        self.assertEqual(got, line)
        self.assertEqual(rest, b"")

    @given(_bodyBytes, st.lists(st.integers(min_value=0), max_size=10), st.booleans(),
           st.integers(min_value=0, max_value=60), st.integers(min_value=0, max_value=3))
    @settings(max_examples=500)
    def test_anyChunking(self, wire: bytes, cuts: list[int], normalize: bool,
                         maxSize: int, maxHops: int) -> None:
        """
        Any chunking of any input yields the same message, the same rest,
        the same counts and the same verdict as one chunk.  Once refused,
        what was streamed before the verdict depends on the chunking, but it
        is always a prefix of the message and never has a bare CR or LF.
        """
        wire += b"\r\n.\r\nTAIL"
        whole = scan([wire], maxSize, maxHops, normalize)
        unlimited = scan([wire], 10**9, 10**9, normalize)
        for chunks in (split(wire, cuts), [wire[i:i + 1] for i in range(len(wire))]):
            got = scan(chunks, maxSize, maxHops, normalize)
            self.assertEqual(got[1], whole[1])
            if whole[2].verdict is None:
                self.assertEqual(got[0], whole[0])
            elif unlimited[2].verdict is None:
                self.assertTrue(unlimited[0].startswith(got[0]))
            crlf = got[0].count(b"\r\n")
            self.assertEqual((got[0].count(b"\r"), got[0].count(b"\n")), (crlf, crlf))
            self.assertEqual(
                (got[2].verdict, got[2].hops, got[2].size, got[2].done),
                (whole[2].verdict, whole[2].hops, whole[2].size, whole[2].done),
            )


class ChunkScannerTests(SynchronousTestCase):
    """
    C{stuffed=False}: BDAT chunks under the DATA rules, taken as they are.
    """

    @given(st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"\r\n")),
           st.lists(st.integers(min_value=0, max_value=300), max_size=5))
    @settings(max_examples=200)
    def test_asTheyAreAtEveryBoundary(self, body: bytes, cuts: list[int]) -> None:
        """
        Whatever the chunks, the emitted bytes are the body itself: dots and
        C{CRLF . CRLF} included, nothing ends it before L{finish}.
        """
        emitted: list[bytes] = []
        scanner = DataScanner(emitted.append, 10_000, 50, stuffed=False)
        points = sorted(min(c, len(body)) for c in cuts)
        for start, end in zip([0] + points, points + [len(body)]):
            self.assertIsNone(scanner.feed(body[start:end]))
        scanner.finish()
        self.assertEqual(b"".join(emitted), body)
        self.assertIsNone(scanner.verdict)
        self.assertEqual(scanner.size, len(body))

    def test_rulesAcrossChunks(self) -> None:
        """
        A CRLF split between two chunks is no bare CR; a bare CR at the very
        end is; C{Received:} headers and the size count as for DATA.
        """
        scanner = DataScanner(lambda b: None, 10_000, 1, stuffed=False)
        scanner.feed(b"a\r")
        scanner.feed(b"\nb\r\n")
        scanner.finish()
        self.assertIsNone(scanner.verdict)
        scanner = DataScanner(lambda b: None, 10_000, 1, stuffed=False)
        scanner.feed(b"a\r\nb\r")
        scanner.finish()
        self.assertEqual(scanner.verdict, Refusal(replies.BARE_LF, "bare_lf"))
        scanner = DataScanner(lambda b: None, 10_000, 1, stuffed=False)
        scanner.feed(b"Received: a\r\nRecei")
        scanner.feed(b"ved: b\r\n\r\n")
        scanner.finish()
        self.assertEqual(scanner.verdict, Refusal(replies.TOO_MANY_HOPS, "too_many_hops"))
        scanner = DataScanner(lambda b: None, 5, 1, stuffed=False)
        scanner.feed(b"123\r\n4")
        self.assertEqual(scanner.verdict, Refusal(replies.MESSAGE_TOO_BIG, "too_big"))
