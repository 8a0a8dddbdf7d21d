"""
Tests for L{smtprelay.protocol.replies}: strict parsing, bounded formatting.
"""

from __future__ import annotations

from hypothesis import given, strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.protocol.replies import MAX_REPLY_LINES, MalformedReply, Reply, forRcpt, reply

texts = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


class ParseTests(SynchronousTestCase):
    def test_multiLineWithEnhancedCode(self) -> None:
        got = Reply.fromLines([b"250-2.1.0 first", b"250 2.1.0 second"])
        self.assertEqual(got, Reply(250, "2.1.0", ("first", "second")))

    def test_withoutEnhancedCode(self) -> None:
        self.assertEqual(Reply.fromLines([b"220 mx ESMTP"]), Reply(220, None, ("mx ESMTP",)))

    def test_enhancedClassMustMatchCode(self) -> None:
        """
        C{250 5.1.1 x} is text, not an enhanced code that contradicts the
        reply code.
        """
        self.assertEqual(Reply.fromLines([b"250 5.1.1 x"]), Reply(250, None, ("5.1.1 x",)))

    def test_bareCode(self) -> None:
        self.assertEqual(Reply.fromLines([b"250"]), Reply(250, None, ("",)))

    def test_malformed(self) -> None:
        for lines in ([b"hello"], [b"25 ok"], [b"250-a", b"251 b"], [b"250-a"], [b"250 a", b"250 b"],
                      [b"600 x"], [b"2500 x"], []):
            self.assertRaises(MalformedReply, Reply.fromLines, lines)

    def test_repeatedReplies(self) -> None:
        """
        A reply seen again (the parse is remembered) is the same value,
        whether its lines come as a list or a tuple, with and without
        enhanced codes; a malformed one is refused every time.
        """
        for _ in range(2):
            self.assertEqual(Reply.fromLines([b"250 2.1.0 Ok"]), Reply(250, "2.1.0", ("Ok",)))
            self.assertEqual(Reply.fromLines((b"250 2.1.0 Ok",)), Reply(250, "2.1.0", ("Ok",)))
            self.assertEqual(Reply.fromLines([b"250 2.1.0 Ok"], enhancedCodes=False),
                             Reply(250, None, ("2.1.0 Ok",)))
            self.assertRaises(MalformedReply, Reply.fromLines, [b"25 ok"])
            self.assertEqual(Reply(250, None, ("a\x1b",)).sanitized(), Reply(250, "2.0.0", ("a?",)))
            self.assertEqual(Reply(250, None, ("é",)).sanitized(utf8=True), Reply(250, "2.0.0", ("é",)))
            self.assertEqual(Reply(250, "2.0.0", ("a", "b")).toBytes(), b"250-2.0.0 a\r\n250 2.0.0 b\r\n")


class FormatTests(SynchronousTestCase):
    def test_multiLine(self) -> None:
        self.assertEqual(Reply(250, "2.0.0", ("a", "b")).toBytes(), b"250-2.0.0 a\r\n250 2.0.0 b\r\n")

    def test_emptyText(self) -> None:
        self.assertEqual(reply(354, None).toBytes(), b"354\r\n")

    def test_sanitize(self) -> None:
        """
        Control characters and non-ASCII become C{?} (UTF-8 kept under
        SMTPUTF8), lines are bounded, and the enhanced code is filled in.
        """
        r = Reply(550, None, ("bad\r\n250 ok", "Grüße"))
        self.assertEqual(r.sanitized(), Reply(550, "5.0.0", ("bad??250 ok", "Gr??e")))
        self.assertEqual(r.sanitized(utf8=True).lines[1], "Grüße")
        self.assertEqual(len(Reply(250, None, ("x",) * 100).sanitized().lines), MAX_REPLY_LINES)

    def test_sanitizedLinesWithin512Bytes(self) -> None:
        """
        RFC 5321 §4.5.3.1.5: a relayed reply line is at most 512 bytes, code
        and CRLF included.  A longer downstream text is wrapped at a space
        onto continuation lines (a word longer than a line is cut), every
        line with the code and enhanced code.
        """
        words = " ".join(f"word{i:03d}" for i in range(100))
        r = Reply(550, "5.1.1", ("x" * 1000, words)).sanitized()
        self.assertEqual(
            r.toBytes(),
            b"550-5.1.1 " + b"x" * 500 + b"\r\n"
            b"550-5.1.1 " + b"x" * 500 + b"\r\n"
            b"550-5.1.1 " + " ".join(f"word{i:03d}" for i in range(62)).encode() + b"\r\n"
            b"550 5.1.1 " + " ".join(f"word{i:03d}" for i in range(62, 100)).encode() + b"\r\n",
        )

    @given(st.text(max_size=3000), st.booleans(), st.sampled_from([None, "5.1.1", "5.100.100"]))
    def test_anyTextWithin512Bytes(self, text: str, utf8: bool, enhanced: str | None) -> None:
        raw = Reply(550, enhanced, (text,)).sanitized(utf8).toBytes()
        lines = raw.split(b"\r\n")[:-1]
        self.assertTrue(all(len(line) + 2 <= 512 for line in lines), lines)
        self.assertTrue(all(line[:4] == b"550-" for line in lines[:-1]))
        self.assertEqual(lines[-1][:4].rstrip(), b"550")
        Reply.fromLines(lines)

    def test_tooManyRecipientsAtRcpt(self) -> None:
        """
        RFC 5321 §4.5.3.1.10: 552 5.5.3 to RCPT is a temporary condition;
        other 552s are left alone.
        """
        self.assertEqual(forRcpt(reply(552, "5.5.3", "Too many recipients")),
                         reply(452, "4.5.3", "Too many recipients"))
        full = reply(552, "5.2.2", "Mailbox full")
        self.assertEqual(forRcpt(full), full)

    def test_withSessionOnce(self) -> None:
        r = reply(451, "4.4.1", "No downstream").withSession("S1").withSession("S1")
        self.assertEqual(r.toBytes(), b"451 4.4.1 No downstream [S1]\r\n")

    @given(st.sampled_from([200, 220, 250, 354, 421, 451, 452, 550, 554, 599]), st.one_of(st.none(), st.tuples(st.integers(0, 999), st.integers(0, 999))),
           st.lists(texts, min_size=1, max_size=5))
    def test_roundTrip(self, code: int, enh: tuple[int, int] | None, lines: list[str]) -> None:
        """
        What we format, we parse back the same (texts that look like an
        enhanced code excepted, since they are ambiguous on the wire).
        """
        enhanced = None if enh is None or code // 100 == 3 else f"{code // 100}.{enh[0]}.{enh[1]}"
        original = Reply(code, enhanced, tuple(lines))
        if enhanced is None and any(line[:2] == f"{code // 100}." for line in lines):
            return
        raw = original.toBytes().split(b"\r\n")[:-1]
        self.assertEqual(Reply.fromLines(raw), original)
