"""
Tests for the MAIL/RCPT argument parser of L{smtprelay.protocol.addresses}.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.protocol.addresses import EnvelopeError, downconvert, parseMail, parseRcpt


class ParseMailTests(SynchronousTestCase):
    good = [
        (b"FROM:<a@example.com>", b"a@example.com", {}),
        (b"from:<a@example.com>", b"a@example.com", {}),
        (b"FROM: <a@example.com>", b"a@example.com", {}),
        (b"FROM:a@example.com", b"a@example.com", {}),
        (b"FROM:<a>", b"a", {}),  # a bare local part, as Postfix accepts
        (b"FROM:<>", b"", {}),
        (b"FROM:<> SIZE=0", b"", {"SIZE": "0"}),
        (b"FROM:<@one.example,@two.example:a@example.com>", b"a@example.com", {}),
        (b'FROM:<"a b>c"@example.com>', b'"a b>c"@example.com', {}),
        (b"FROM:<a@[192.0.2.1]>", b"a@[192.0.2.1]", {}),
        (b"FROM:<a@example.com>  BODY=7bit  SMTPUTF8 AUTH=<>",
         b"a@example.com", {"BODY": "7BIT", "SMTPUTF8": None, "AUTH": "<>"}),
        (b"FROM:<\xc3\xa9@\xc3\xa9.example> SMTPUTF8", b"\xc3\xa9@\xc3\xa9.example", {"SMTPUTF8": None}),
    ]

    def test_good(self) -> None:
        for argument, path, params in self.good:
            self.assertEqual(parseMail(argument), (path, params), argument)

    bad = [
        (b"", 501, "5.5.4"),
        (b"FROM", 501, "5.5.4"),
        (b"FROM:", 501, "5.5.4"),
        (b"FROM:<a@example.com", 501, "5.5.4"),
        (b"FROM:<a@example.com>SIZE=1", 501, "5.5.4"),
        (b"FROM:<a@example.com> SIZE", 501, "5.5.4"),
        (b"FROM:<a@example.com> =1", 501, "5.5.4"),
        (b"FROM:<a@example.com> RET=ALL", 501, "5.5.4"),
        (b"FROM:<a@example.com> ENVID=a=b", 501, "5.5.4"),
        (b"FROM:<a@example.com> SMTPUTF8=yes", 501, "5.5.4"),
        (b"FROM:<a@example.com> NOTIFY=NEVER", 555, "5.5.4"),
        (b"FROM:<a@example.com> BODY=BINARYMIME", 555, "5.5.4"),
        (b"FROM:<a@>", 501, "5.1.7"),
        (b"FROM:<a@b..c>", 501, "5.1.7"),
        (b"FROM:<a@-b.c>", 501, "5.1.7"),
        (b"FROM:<a\x01@b.c>", 501, "5.1.7"),
        (b"FROM:<\xc3\xa9@b.c>", 553, "5.6.7"),
        (b"FROM:<\xff@b.c> SMTPUTF8", 501, "5.1.7"),
        # Unicode upper case of these is ASCII ("\u0131" -> "I", "\u017f" -> "S").
        (b"FROM:<a@b.c> BODY=8b\xc4\xb1tmime", 555, "5.5.4"),
        (b"FROM:<a@b.c> RET=HDR\xc5\xbf", 501, "5.5.4"),
        (b"FROM:<a@b.c> SIZE=\xd9\xa1", 501, "5.5.4"),
        (b"FROM:<a@b.c> ENVID=\xc3\xa9", 501, "5.5.4"),
        (b"FROM:<a@b.c> AUTH=\xff", 501, "5.5.4"),
    ]

    def test_bad(self) -> None:
        for argument, code, enhanced in self.bad:
            e = self.assertRaises(EnvelopeError, parseMail, argument)
            self.assertEqual((e.reply.code, e.reply.enhanced), (code, enhanced), argument)


class ParseRcptTests(SynchronousTestCase):
    def test_good(self) -> None:
        self.assertEqual(parseRcpt(b"TO:<alice>", False), (b"alice", {}))
        self.assertEqual(parseRcpt(b"TO:<b@example.net> NOTIFY=failure,delay ORCPT=rfc822;b@example.net", False),
                         (b"b@example.net", {"NOTIFY": "FAILURE,DELAY", "ORCPT": "rfc822;b@example.net"}))
        self.assertEqual(parseRcpt(b"TO:<postmaster>", False), (b"postmaster", {}))
        self.assertEqual(parseRcpt(b"TO:<\xc3\xa9@example.net>", True), (b"\xc3\xa9@example.net", {}))

    def test_bad(self) -> None:
        for argument, code, enhanced in [
            (b"TO:<>", 501, "5.1.3"),
            (b"FROM:<b@example.net>", 501, "5.5.4"),
            (b"TO:<b@example.net> ORCPT=rfc822", 501, "5.5.4"),
            (b"TO:<b@example.net> SIZE=1", 555, "5.5.4"),
            (b"TO:<\xc3\xa9@example.net>", 553, "5.6.7"),
            (b"TO:<r@d.e> NOTIFY=\xc5\xbfUCCESS", 501, "5.5.4"),
            (b"TO:<r@d.e> ORCPT=rfc822;\xff", 501, "5.5.4"),
        ]:
            e = self.assertRaises(EnvelopeError, parseRcpt, argument, False)
            self.assertEqual((e.reply.code, e.reply.enhanced), (code, enhanced), argument)

    def test_downconvertKept(self) -> None:
        self.assertEqual(downconvert("a@bücher.example".encode()), b"a@xn--bcher-kva.example")


_atom = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=10)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


class RoundTripTests(SynchronousTestCase):
    @given(_atom, st.lists(_label, min_size=1, max_size=4), st.integers(min_value=0, max_value=10**12),
           st.booleans(), st.sampled_from(["", " "]))
    def test_mailRoundTrip(self, local: str, labels: list[str], size: int, bracket: bool,
                           space: str) -> None:
        """
        Any well-formed address and parameters parse back to themselves.
        """
        address = f"{local}@{'.'.join(labels)}".encode()
        path = b"<" + address + b">" if bracket else address
        argument = b"FROM:" + space.encode() + path + f" SIZE={size}".encode()
        self.assertEqual(parseMail(argument), (address, {"SIZE": str(size)}))

    @given(st.binary(max_size=60))
    def test_neverCrashes(self, argument: bytes) -> None:
        """
        Garbage gives a reply, never another exception.
        """
        for parse in (parseMail, lambda a: parseRcpt(a, True)):
            try:
                path, params = parse(argument)
            except EnvelopeError as e:
                self.assertIn(e.reply.code, (501, 553, 555))
            else:
                self.assertIsInstance(path, bytes)
