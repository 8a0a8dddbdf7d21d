"""
Fuzzing the inbound engine through the whole relay in memory (to a fake
downstream): random commands, ESMTP parameters with non-ASCII and Unicode
case tricks (values whose Unicode upper case is ASCII: C{\\u0131} → I,
C{\\u017f} → S), random bytes, long lines, bodies, waits, and random
segmentation of everything the client sends.

Invariants after every step: the replies are well-formed and in step (one
final reply per command line, in order, whatever the segmentation), no
exception escapes and none is logged, the input buffer stays bounded; at
the end every session is closed within its deadline and nothing is leaked.
"""

from __future__ import annotations

from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.framing import MAX_INPUT_BUFFER
from smtprelay.testing.downstream import Script

from .fuzz_helpers import FUZZ_SETTINGS, FailureCatcher, collectEarlierGarbage, parseReplies
from .relay_stack import FIRST, LISTENER_DATA_TIMEOUT, READ_TIMEOUT, Client, RelayStack
from .server_helpers import Session

TRICKY = ["8b\u0131tmime", "\u017fUCCESS", "FA\u0130L", "\u017fuccess,delay", "7bit", "8BITMIME",
          "SUCCESS,DELAY", "NEVER", "full", "HDR\u017f", "rfc822;a@b.c", "utf-8;x@y", "", "=", "\u00e9"]
"""Parameter values: valid ones, Unicode that upper-cases to ASCII, junk."""

PARAM_NAMES = ["BODY", "NOTIFY", "RET", "ENVID", "ORCPT", "SIZE", "SMTPUTF8", "AUTH", "REQUIRETLS",
               "B\u00d6DY", "X-FOO", "body"]

TRICKY_PARAMETERS = [
    "BODY=8b\u0131tmime", "BODY=8BITMIME", "BODY=7bit", "NOTIFY=\u017fUCCESS", "NOTIFY=SUCCESS,DELAY",
    "NOTIFY=NEVER", "NOTIFY=FA\u0130LURE", "RET=FULL", "RET=HDR\u017f", "RET=hdrs", "ENVID=x\u00e9",
    "ORCPT=rfc822;a@b.c", "SIZE=100", "SIZE=99999999999999999999", "SIZE=-1", "SIZE=\u0661", "SMTPUTF8",
    "AUTH=<>", "REQUIRETLS", "B\u00d6DY=7BIT", "BODY", "NOTIFY=", "X-FOO=1",
]
"""Whole parameters: valid ones, values whose Unicode upper case is ASCII
(C{\\u0131} → I, C{\\u017f} → S), non-ASCII names, odd SIZEs."""

texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12))
parameters = st.lists(
    st.one_of(
        st.sampled_from(TRICKY_PARAMETERS),
        st.tuples(st.sampled_from(PARAM_NAMES), texts).map(lambda kv: f"{kv[0]}={kv[1]}"),
    ),
    max_size=3,
).map(lambda ps: "".join(" " + p for p in ps))
addresses = st.one_of(
    st.sampled_from(["s@example.org", "r@example.net", "", "\u00fc@b\u00fccher.example", '"a b"@c.d',
                     "no-domain", "a@[127.0.0.1]", "@x.y:a@b.c"]),
    st.text(max_size=20),
)


def _line(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


commands = st.one_of(
    st.builds(lambda a, p: _line(f"MAIL FROM:<{a}>{p}"), addresses, parameters),
    st.builds(lambda a, p: _line(f"RCPT TO:<{a}>{p}"), addresses, parameters),
    st.builds(lambda p: _line(f"MAIL FROM:<s@example.org>{p}"), parameters),
    st.builds(lambda p: _line(f"RCPT TO:<r@example.net>{p}"), parameters),
    st.builds(lambda v, a: _line(f"{v} {a}"),
              st.sampled_from(["EHLO", "HELO", "LHLO", "ehlo", "VRFY", "EXPN", "HELP", "ETRN", "XCLIENT",
                               "AUTH", "STARTTLS", "BDAT", "MAIL", "RCPT", "mail from:", "rcpt to:"]),
              texts),
    st.sampled_from([b"RSET", b"NOOP", b"HELP", b"rset", b"", b" ", b"MAIL FROM:", b"RCPT TO:",
                     b"DATA x", b"AUTH PLAIN", b"STARTTLS"]),
    st.binary(max_size=40).map(lambda b: b"X" + b.replace(b"\r\n", b"")),
    st.integers(2000, 3000).map(lambda n: b"NOOP " + b"a" * n),
)
"""One command line, without its CRLF (never DATA or QUIT: rules of
their own send those, so that the model knows where a body starts)."""


def segments(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    C{data} cut at the given offsets (taken modulo its length).
    """
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


class InboundMachine(RuleBasedStateMachine):
    """
    One client session against the relay; the model counts the command
    lines sent, so it knows how many final replies must have come.
    """

    def __init__(self) -> None:
        super().__init__()
        self.catcher = FailureCatcher()
        self.stack = RelayStack(SynchronousTestCase(), {FIRST: Script()})
        self.client = Client(self.stack)
        self.expected = 1  # the greeting

    def send(self, data: bytes, cuts: list[int]) -> None:
        for piece in segments(data, cuts):
            if self.client.closed:
                break
            self.client.protocol.dataReceived(piece)
            self.stack.flush()
        self.stack.flush()
        self.client.exchange(b"", count=0)

    @property
    def replies(self) -> list[list[bytes]]:
        return parseReplies(self.client.output)

    @initialize(hello=st.sampled_from([b"EHLO client.example", b"HELO client.example", b"LHLO x", b""]))
    def greet(self, hello: bytes) -> None:
        """
        Most sessions start as clients do; some do not.
        """
        if hello:
            self.send(hello + b"\r\n", [])
            self.expected += 1

    @rule(group=st.lists(commands, min_size=1, max_size=6), cuts=st.lists(st.integers(0, 10_000), max_size=6))
    def pipelined(self, group: list[bytes], cuts: list[int]) -> None:
        """
        A group of commands, sent in random segments.
        """
        self.send(b"".join(line + b"\r\n" for line in group), cuts)
        self.expected += len(group)

    @precondition(lambda self: not self.client.closed)
    @rule(body=st.binary(max_size=300), cuts=st.lists(st.integers(0, 10_000), max_size=6))
    def data(self, body: bytes, cuts: list[int]) -> None:
        """
        DATA alone; if the relay says 354, a body and its dot in random
        segments (never containing an end-of-data of its own).
        """
        self.send(b"DATA\r\n", [])
        self.expected += 1
        if self.client.closed or not self.replies or self.replies[-1][-1][:3] != b"354":
            return
        while b"\r\n.\r\n" in body:
            body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
        if body.startswith(b".\r\n"):
            body = b"." + body
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.send(body + b".\r\n", cuts)
        self.expected += 1

    @rule(seconds=st.sampled_from([0, 1, 60, READ_TIMEOUT - 1, READ_TIMEOUT + 1]))
    def wait(self, seconds: float) -> None:
        wasOpen = not self.client.closed
        self.stack.clock.advance(seconds)
        self.stack.flush()
        self.client.exchange(b"", count=0)
        if wasOpen and self.client.closed:
            self.expected += 1  # 421 4.4.2 Timeout exceeded
            assert self.replies[-1][-1].startswith(b"421 4.4.2 "), self.replies[-1]
        elif wasOpen and seconds > READ_TIMEOUT:
            raise AssertionError("an idle session outlived read_timeout")

    @rule()
    def quit(self) -> None:
        self.send(b"QUIT\r\n", [])
        self.expected += 1
        assert self.client.closed, "QUIT did not close the session"

    @invariant()
    def inStep(self) -> None:
        replies = self.replies
        assert len(replies) <= self.expected, f"more replies than commands: {replies[-3:]}"
        if not self.client.closed:
            assert len(replies) == self.expected, (
                f"{self.expected} command lines, {len(replies)} replies; last: {replies[-2:]}"
            )

    @invariant()
    def bounded(self) -> None:
        assert len(self.client.protocol._input.data) <= MAX_INPUT_BUFFER

    @invariant()
    def nothingLogged(self) -> None:
        assert not self.catcher.failures, self.catcher.failures[0].getTraceback()

    def teardown(self) -> None:
        try:
            if not self.client.closed:
                self.stack.clock.advance(READ_TIMEOUT + LISTENER_DATA_TIMEOUT + 60)
                self.stack.flush()
                self.client.exchange(b"", count=0)
                assert self.client.closed, "the session outlived its deadlines"
            self.stack.assertQuiet()
            parseReplies(self.client.output)
        finally:
            self.catcher.remove()


class InboundFuzzTests(SynchronousTestCase):
    def test_stateful(self) -> None:
        """
        The inbound engine never crashes, desyncs or hangs (see
        L{InboundMachine}).
        """
        collectEarlierGarbage()
        run_state_machine_as_test(InboundMachine, settings=FUZZ_SETTINGS)


class UnicodeParameterTests(SynchronousTestCase):
    """
    Issue 14 B: ESMTP parameter values whose Unicode upper case is ASCII
    are not ASCII: a clear 5xx reply, the session in step, nothing logged.
    """

    def assertRefusedInStep(self, lines: list[bytes]) -> None:
        session = Session()
        session.send(b"EHLO client.example\r\n")
        out = session.send(b"".join(lines) + b"NOOP\r\n")
        replies = parseReplies(out)
        self.assertEqual(len(replies), len(lines) + 1, replies)
        self.assertEqual(replies[-2][-1][:1], b"5", replies)
        self.assertEqual(replies[-1][-1][:4], b"250 ")
        self.assertFalse(session.closed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bodyDotlessI(self) -> None:
        self.assertRefusedInStep(["MAIL FROM:<a@b.c> BODY=8b\u0131tmime\r\n".encode()])

    def test_notifyLongS(self) -> None:
        self.assertRefusedInStep([b"MAIL FROM:<a@b.c>\r\n",
                                  "RCPT TO:<r@d.e> NOTIFY=\u017fUCCESS\r\n".encode()])

    def test_retDottedI(self) -> None:
        self.assertRefusedInStep(["MAIL FROM:<a@b.c> RET=FULL\u0130\r\n".encode()])
