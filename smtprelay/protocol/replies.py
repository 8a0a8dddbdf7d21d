"""
SMTP replies as values: parse, format, sanitize, classify.

A L{Reply} is a code, an optional RFC 3463 enhanced status code and one or
more text lines.  Parsing is strict (a downstream that sends garbage gets its
connection aborted by the caller); formatting always yields a well-formed,
bounded reply with C{NNN-} continuation lines and a CRLF after each line.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Sequence

import attrs

MAX_REPLY_LINE = 512
"""Longest reply line a sanitized reply has on the wire, code and CRLF
included (RFC 5321 §4.5.3.1.5)."""

MAX_REPLY_LINES = 32
"""A formatted reply never has more lines than this."""

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_REPLY_LINE = re.compile(rb"^([2-5][0-9][0-9])([ -])(.*)$", re.DOTALL)
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_UNPRINTABLE_UTF8 = re.compile(r"[\x00-\x1f\x7f]")


def _toTuple(lines: Iterable[str]) -> tuple[str, ...]:
    return tuple(lines)


class MalformedReply(ValueError):
    """
    A reply line from a peer is not C{NNN[ -]text}, or a multi-line reply
    mixes codes.
    """


_REMEMBERED = 512
"""Replies repeat (a downstream's C{250 2.1.0 Ok} to every MAIL, our own
C{354}): the parse, the sanitized copy and the wire bytes of the last few
hundred distinct ones are kept (a reply is a frozen value)."""


@attrs.frozen(cache_hash=True)
class Reply:
    """
    One SMTP/LMTP reply.

    @ivar code: the three-digit reply code.
    @ivar enhanced: the enhanced status code (C{"2.0.0"}) or L{None}.
    @ivar lines: the text lines, without code, enhanced code or CRLF.
    """

    code: int
    enhanced: str | None
    lines: tuple[str, ...] = attrs.field(converter=_toTuple, default=("",))

    @property
    def text(self) -> str:
        """
        All text lines joined with a space, for logs.
        """
        return " ".join(self.lines)

    @property
    def summary(self) -> str:
        """
        C{code enhanced text} on one line, for logs.
        """
        return f"{self.code} {self.enhanced or ''} {self.text}".strip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def withEnhanced(self) -> Reply:
        """
        Return this reply with an enhanced code, C{X.0.0} if it had none
        (RFC 3463 has none for 1xx and 3xx replies).
        """
        if self.enhanced is not None or self.code // 100 not in (2, 4, 5):
            return self
        return attrs.evolve(self, enhanced=f"{self.code // 100}.0.0")

    def withSession(self, session: str) -> Reply:
        """
        Return this reply with C{[session]} appended to its last line, so that
        a user can quote it to support.
        """
        if not session:
            return self
        lines = list(self.lines)
        tag = f"[{session}]"
        if tag in lines[-1]:
            return self
        lines[-1] = f"{lines[-1]} {tag}" if lines[-1] else tag
        return attrs.evolve(self, lines=tuple(lines))

    @functools.lru_cache(maxsize=_REMEMBERED)
    def sanitized(self, utf8: bool = False) -> Reply:
        """
        Return a copy fit to relay to a client: printable text (ASCII, or
        UTF-8 when C{utf8}), an enhanced code, every wire line within
        L{MAX_REPLY_LINE} bytes (a longer text line is wrapped onto
        continuation lines, at a space where it can be), and at most
        L{MAX_REPLY_LINES} lines (the rest is cut).
        """
        enhanced = self.enhanced
        if enhanced is not None and enhanced[0] != str(self.code)[0]:
            enhanced = None
        bounded = Reply(self.code, enhanced, self.lines).withEnhanced()
        # "NNN-" and "X.Y.Z " before the text, CRLF after it.
        budget = MAX_REPLY_LINE - 4 - len(bounded.enhanced or " ") - 1 - 2
        pattern = _UNPRINTABLE_UTF8 if utf8 else _UNPRINTABLE
        lines = [piece for line in self.lines for piece in _wrap(pattern.sub("?", line), budget)]
        return attrs.evolve(bounded, lines=tuple(lines[:MAX_REPLY_LINES]))

    @functools.lru_cache(maxsize=_REMEMBERED)
    def toBytes(self) -> bytes:
        """
        Format as wire bytes: every line C{NNN-}, the last C{NNN }, each with
        the enhanced code when there is one, each ending in CRLF.
        """
        prefix = f"{self.code:03d}"
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        last = len(self.lines) - 1
        out = []
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            out.append(f"{prefix}{sep}{enhanced}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    @classmethod
    def fromLines(cls, raw: Sequence[bytes], enhancedCodes: bool = True) -> Reply:
        """
        Parse the lines of one complete reply (without CRLF) as received.

        @param enhancedCodes: whether to split an enhanced code off the text
            (a server that advertises ENHANCEDSTATUSCODES; harmless otherwise
            because the pattern is strict).
        @raise MalformedReply: a line is not C{NNN[ -]...}, codes differ, or a
            continuation marker is wrong.
        """
        return cls._parse(tuple(raw), enhancedCodes)

    @classmethod
    @functools.lru_cache(maxsize=_REMEMBERED)
    def _parse(cls, raw: tuple[bytes, ...], enhancedCodes: bool) -> Reply:
        if not raw:
            raise MalformedReply("empty reply")
        code: bytes | None = None
        texts = []
        enhanced: str | None = None
        for i, line in enumerate(raw):
            m = _REPLY_LINE.match(line)
            if m is None:
                if len(line) == 3 and line.isdigit() and i == len(raw) - 1:
                    m = _REPLY_LINE.match(line + b" ")
                if m is None:
                    raise MalformedReply("not an SMTP reply line")
            if code is None:
                code = m.group(1)
            elif code != m.group(1):
                raise MalformedReply("mixed codes in a multi-line reply")
            last = i == len(raw) - 1
            if (m.group(2) == b" ") != last:
                raise MalformedReply("bad continuation marker")
            text = m.group(3).decode("utf-8", "replace")
            if enhancedCodes:
                em = _ENHANCED.match(text)
                if em is not None and em.group(1) == chr(code[0]):
                    enhanced = enhanced or text[: em.end()].strip()
                    text = text[em.end():]
            texts.append(text)
        assert code is not None
        return cls(int(code), enhanced, tuple(texts))


def _wrap(line: str, budget: int) -> list[str]:
    """
    C{line} in pieces of at most C{budget} UTF-8 bytes, broken at the last
    space that fits (which goes), or within a word too long for a line.
    """
    pieces = []
    while len(encoded := line.encode("utf-8")) > budget:
        head = encoded[:budget].decode("utf-8", "ignore")
        space = head.rfind(" ")
        if space > 0:
            pieces.append(head[:space])
            line = line[space + 1:]
        else:
            pieces.append(head)
            line = line[len(head):]
    pieces.append(line)
    return pieces


def forRcpt(reply_: Reply) -> Reply:
    """
    A downstream's reply to RCPT as the client gets it: C{552 5.5.3} (too
    many recipients) becomes C{452 4.5.3} with the same text, as RFC 5321
    §4.5.3.1.10 asks, so that the client sends the rest in another
    transaction instead of bouncing them.
    """
    if reply_.code == 552 and reply_.enhanced == "5.5.3":
        return attrs.evolve(reply_, code=452, enhanced="4.5.3")
    return reply_


@attrs.frozen
class Refusal:
    """
    A refusal the relay decides itself: the reply, and why.

    @ivar reason: the C{reason} label of C{smtprelay_rejections_total}
        (one of L{smtprelay.observe.metrics.REJECTION_REASONS}).
    """

    reply: Reply
    reason: str


def reply(code: int, enhanced: str | None, *lines: str) -> Reply:
    """
    Build a L{Reply}: C{reply(250, "2.0.0", "OK")}.
    """
    return Reply(code, enhanced, lines or ("",))


def joinReplies(replies: Iterable[Reply]) -> bytes:
    """
    Wire bytes of several replies in order (one write per pipelined group).
    """
    return b"".join(r.toBytes() for r in replies)


# Replies the relay itself gives.  Generic texts: they never leak
# internals.  Callers add the session id with Reply.withSession.
OK = reply(250, "2.0.0", "OK")
SENDER_OK = reply(250, "2.1.0", "OK")
MAIL_OK = reply(250, "2.1.0", "Ok")
RCPT_OK = reply(250, "2.1.5", "Ok")
ROUTED_ELSEWHERE = reply(
    451, "4.5.3", "Recipient routed elsewhere, send it in a separate transaction"
)
START_INPUT = reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = reply(221, "2.0.0", "Bye")
SHUTTING_DOWN = reply(421, "4.3.2", "Service shutting down")
NO_DOWNSTREAM = reply(451, "4.4.1", "No downstream server available")
DOWNSTREAM_LOST = reply(451, "4.4.2", "Downstream connection lost, try again later")
DOWNSTREAM_DNS = reply(451, "4.4.4", "Downstream address lookup failed")
DOWNSTREAM_NO_TLS = reply(451, "4.7.5", "No downstream server with TLS available")
DOWNSTREAM_CONFUSED = reply(451, "4.3.0", "Unexpected downstream reply")
DOWNSTREAM_AUTH = reply(454, "4.7.0", "Relay cannot authenticate downstream, try again later")
LOOP = reply(554, "5.4.6", "Mail loops back to myself")
TOO_MANY_HOPS = reply(554, "5.4.6", "Too many hops")
NO_VALID_RECIPIENTS = reply(554, "5.5.1", "No valid recipients")
AUTH_TEMPFAIL = reply(454, "4.7.0", "Temporary authentication failure")
AUTH_FAILED = reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = reply(235, "2.7.0", "Authentication successful")
BARE_LF = reply(550, "5.5.2", "Bare LF/CR not allowed")
MESSAGE_TOO_BIG = reply(552, "5.3.4", "Message size exceeds fixed limit")
LINE_TOO_LONG_IN_BODY = reply(552, "5.3.4", "Message has a line longer than allowed")
LMTP_SPLIT = reply(
    452, "4.5.3", "Too many recipients, send the rest in a new transaction"
)
LMTP_MIXED = reply(451, "4.3.0", "Recipients had different results, try again later")
CONVERSION_REQUIRED = reply(554, "5.6.3", "Conversion required but not supported")
UTF8_SENDER = reply(550, "5.6.7", "SMTPUTF8 is required but not supported downstream")
UTF8_RECIPIENT = reply(553, "5.6.7", "SMTPUTF8 is required but not supported downstream")
LOCAL_ERROR = reply(451, "4.3.0", "Local error in processing")
CANNOT_VRFY = reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP STARTTLS AUTH")
TLS_READY = reply(220, "2.0.0", "Ready to start TLS")
BDAT_RESET = reply(554, "5.5.0", "Transaction reset by the client before its last chunk")


def chunkReceived(size: int) -> Reply:
    """
    The reply to a BDAT chunk that is not the last: C{250 2.0.0 Ok: 11 octets}.
    """
    return reply(250, "2.0.0", f"Ok: {size} octets")


# Refusals the inbound session decides itself: each reply with its metric
# reason (REJECTION_REASONS), so that the two cannot drift apart.
NEED_GREETING = Refusal(reply(503, "5.5.1", "Error: send HELO/EHLO first"), "bad_sequence")
NEED_EHLO = Refusal(reply(503, "5.5.1", "Error: send EHLO first"), "bad_sequence")
NESTED_MAIL = Refusal(reply(503, "5.5.1", "Error: nested MAIL command"), "bad_sequence")
NEED_MAIL = Refusal(reply(503, "5.5.1", "Error: need MAIL command"), "bad_sequence")
NEED_RCPT = Refusal(reply(503, "5.5.1", "Error: need RCPT command"), "bad_sequence")
NO_RECIPIENT_ACCEPTED = Refusal(NO_VALID_RECIPIENTS, "bad_sequence")
IN_TRANSACTION = Refusal(reply(503, "5.5.1", "Error: MAIL transaction in progress"), "bad_sequence")
BDAT_IN_PROGRESS = Refusal(reply(503, "5.5.1", "Error: BDAT transaction in progress"), "bad_sequence")
TLS_ACTIVE = Refusal(reply(554, "5.5.1", "Error: TLS already active"), "bad_sequence")
AUTH_TWICE = Refusal(reply(503, "5.5.1", "Error: already authenticated"), "bad_sequence")
UNKNOWN_COMMAND = Refusal(reply(500, "5.5.2", "Error: command not recognized"), "unknown_command")
LMTP_ONLY = Refusal(reply(500, "5.5.1", "Error: this is an LMTP service, use LHLO"), "unknown_command")
NOT_IMPLEMENTED = Refusal(reply(502, "5.5.1", "Error: command not implemented"), "not_implemented")
AUTH_DISABLED = Refusal(reply(503, "5.5.1", "Error: authentication not enabled"), "not_implemented")
AUTH_MECHANISM = Refusal(reply(504, "5.5.4", "Unsupported authentication mechanism"), "not_implemented")
BAD_SYNTAX = Refusal(reply(500, "5.5.2", "Error: bad syntax"), "syntax")
BARE_IN_COMMAND = Refusal(reply(500, "5.5.2", "Error: bare <CR> or <LF> in command"), "syntax")
STARTTLS_SYNTAX = Refusal(reply(501, "5.5.4", "Syntax: STARTTLS"), "syntax")
DATA_SYNTAX = Refusal(reply(501, "5.5.4", "Syntax: DATA"), "syntax")
AUTH_SYNTAX = Refusal(reply(501, "5.5.4", "Syntax: AUTH mechanism"), "syntax")
BDAT_SYNTAX = Refusal(reply(501, "5.5.4", "Syntax: BDAT count [LAST]"), "syntax")
AUTH_UNDECODABLE = Refusal(reply(501, "5.5.2", "Cannot decode response"), "syntax")
AUTH_ABORTED = Refusal(reply(501, "5.7.0", "Authentication aborted"), "auth_aborted")
AUTH_NEEDS_TLS = Refusal(
    reply(538, "5.7.11", "Encryption required for requested authentication mechanism"), "tls_required"
)
STARTTLS_FIRST = Refusal(reply(530, "5.7.0", "Must issue a STARTTLS command first"), "tls_required")
AUTH_REQUIRED = Refusal(reply(530, "5.7.0", "Authentication required"), "auth_required")
RELAY_DENIED = Refusal(reply(554, "5.7.1", "Relay access denied"), "relay_denied")
TOO_BIG = Refusal(MESSAGE_TOO_BIG, "too_big")
BARE_LF_IN_BODY = Refusal(BARE_LF, "bare_lf")
HOPS_EXCEEDED = Refusal(TOO_MANY_HOPS, "too_many_hops")
BODY_LINE_TOO_LONG = Refusal(LINE_TOO_LONG_IN_BODY, "line_too_long")
TOO_MANY_RECIPIENTS = Refusal(reply(452, "4.5.3", "Too many recipients"), "too_many_recipients")
SYNC_ERROR = Refusal(reply(554, "5.5.0", "Error: SMTP protocol synchronization"), "sync")
LINE_TOO_LONG = Refusal(reply(500, "5.5.2", "Line too long"), "line_too_long")
TOO_MANY_ERRORS = Refusal(reply(421, "4.7.0", "Too many errors"), "too_many_errors")
TOO_MUCH_INPUT = Refusal(reply(421, "4.7.0", "Too much unread input"), "too_much_input")
TOO_MANY_AUTH_FAILURES = Refusal(reply(421, "4.7.0", "Too many authentication failures"), "too_many_auth_failures")
TOO_MANY_CONNECTIONS = Refusal(reply(421, "4.7.0", "Too many connections"), "too_many_connections")
TIMEOUT = Refusal(reply(421, "4.4.2", "Timeout exceeded"), "timeout")


def helloSyntax(verb: str) -> Refusal:
    """
    The refusal of C{EHLO}, C{HELO} or C{LHLO} without a hostname.
    """
    return Refusal(reply(501, "5.5.4", f"Syntax: {verb} hostname"), "syntax")
