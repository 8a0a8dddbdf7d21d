"""
Tests for L{smtprelay.outbound.clientinfo}: the XFORWARD and XCLIENT command lines,
byte for byte.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.outbound.clientinfo import MAX_COMMAND, advertised, attributes, xclientCommands, xforwardCommands, xtext
from smtprelay.interfaces import ClientSession

ALL_XFORWARD = advertised("NAME ADDR PROTO HELO SOURCE PORT IDENT")
ALL_XCLIENT = advertised("NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT")


def session(**kw: object) -> ClientSession:
    kw.setdefault("id", "S1D")
    kw.setdefault("protocol", "smtp")
    kw.setdefault("clientHost", "192.0.2.7")
    kw.setdefault("clientPort", 40123)
    kw.setdefault("heloName", "client.example")
    kw.setdefault("esmtp", True)
    return ClientSession(**kw)  # type: ignore[arg-type]  # keywords checked by attrs at run time


def xtextDecode(text: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "+":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out += text[i].encode("ascii")
            i += 1
    return bytes(out)


class XtextTests(SynchronousTestCase):
    def test_encoding(self) -> None:
        """
        C{+}, C{=}, space, controls and non-ASCII bytes are C{+HH}; other
        printable ASCII stays.
        """
        self.assertEqual(xtext("a+b=c d\x01é[1]"), "a+2Bb+3Dc+20d+01+C3+A9[1]")

    @given(st.text())
    def test_roundTrip(self, value: str) -> None:
        """
        Decoding gives back the UTF-8 bytes; the result is printable
        ASCII without spaces.
        """
        encoded = xtext(value)
        self.assertEqual(xtextDecode(encoded), value.encode("utf-8"))
        self.assertTrue(all(0x21 <= ord(c) <= 0x7E for c in encoded))


class XforwardTests(SynchronousTestCase):
    def test_allAttributes(self) -> None:
        """
        Two commands, in Postfix's groups: NAME (no reverse DNS:
        unavailable), ADDR and PORT; then PROTO, HELO, IDENT (the session
        id) and SOURCE.
        """
        self.assertEqual(xforwardCommands(session(), ALL_XFORWARD), [
            b"XFORWARD NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40123",
            b"XFORWARD PROTO=ESMTP HELO=client.example IDENT=S1D SOURCE=REMOTE",
        ])

    def test_onlyAdvertised(self) -> None:
        """
        Attributes the downstream did not advertise are not sent; a group
        with none is not sent at all.
        """
        self.assertEqual(xforwardCommands(session(), advertised("helo addr")), [
            b"XFORWARD ADDR=192.0.2.7", b"XFORWARD HELO=client.example",
        ])
        self.assertEqual(xforwardCommands(session(), advertised("PROTO")), [b"XFORWARD PROTO=ESMTP"])
        self.assertEqual(xforwardCommands(session(), advertised("")), [])

    def test_ipv6HeloUnixSocket(self) -> None:
        """
        IPv6 addresses get the C{IPv6:} prefix; a unix-socket client has no
        address or port; HELO (not EHLO) is the SMTP protocol; a HELO name
        is xtext.
        """
        self.assertEqual(
            xforwardCommands(session(clientHost="2001:db8::7", esmtp=False, heloName="a b+c"), ALL_XFORWARD), [
                b"XFORWARD NAME=[UNAVAILABLE] ADDR=IPv6:2001:db8::7 PORT=40123",
                b"XFORWARD PROTO=SMTP HELO=a+20b+2Bc IDENT=S1D SOURCE=REMOTE",
            ])
        self.assertEqual(xforwardCommands(session(clientHost="", clientPort=0), advertised("ADDR PORT")), [
            b"XFORWARD ADDR=[UNAVAILABLE] PORT=[UNAVAILABLE]",
        ])

    def test_overlongValueUnavailable(self) -> None:
        """
        A HELO name longer than any DNS name (the relay accepts long command
        lines) is sent as unavailable, so that every line fits in 512
        bytes.
        """
        [_, second] = xforwardCommands(session(heloName="h" * 300), ALL_XFORWARD)
        self.assertEqual(second, b"XFORWARD PROTO=ESMTP HELO=[UNAVAILABLE] IDENT=S1D SOURCE=REMOTE")
        self.assertEqual(attributes(session(heloName="h" * 240))["HELO"], "h" * 240)


class XclientTests(SynchronousTestCase):
    def test_oneLine(self) -> None:
        """
        The attributes the relay knows, that were advertised, in one line;
        LOGIN is the authenticated user, or unavailable.
        """
        self.assertEqual(xclientCommands(session(user="alice"), ALL_XCLIENT), [
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40123 PROTO=ESMTP HELO=client.example LOGIN=alice",
        ])
        self.assertEqual(xclientCommands(session(), advertised("ADDR LOGIN")), [
            b"XCLIENT ADDR=192.0.2.7 LOGIN=[UNAVAILABLE]",
        ])
        self.assertEqual(xclientCommands(session(), advertised("TTL TIMEOUT")), [])

    def test_longValuesSplit(self) -> None:
        """
        Long values are spread over several commands of at most 512 bytes
        each, in attribute order.
        """
        lines = xclientCommands(session(heloName="h" * 240, user="u" * 240), ALL_XCLIENT)
        self.assertEqual(lines, [
            b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40123 PROTO=ESMTP HELO=" + b"h" * 240,
            b"XCLIENT LOGIN=" + b"u" * 240,
        ])
        self.assertTrue(all(len(line) <= MAX_COMMAND for line in lines))
