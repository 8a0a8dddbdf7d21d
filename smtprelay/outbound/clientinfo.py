"""
The client's identity for a trusted downstream: Postfix's XFORWARD and
XCLIENT commands (C{forward_client_info}).

Pure functions from a L{ClientSession} and the attribute names the
downstream advertised to the command lines to send, in Postfix's encoding:
every value is xtext (RFC 3461), an unknown one is C{[UNAVAILABLE]}, an
IPv6 address has the C{IPv6:} prefix.  Only advertised attributes are
sent, and no command at all when none is.  The relay looks up no reverse
DNS, so C{NAME} is always C{[UNAVAILABLE]} (the downstream logs it as
C{unknown}, as it would the relay's own clients).
"""

from __future__ import annotations

from collections.abc import Sequence

from smtprelay.interfaces import ClientSession

UNAVAILABLE = "[UNAVAILABLE]"
"""The value of an attribute the relay does not know."""

MAX_COMMAND = 512
"""The longest command line, CRLF excluded (RFC 5321 §4.5.3.1.4)."""

MAX_VALUE = 240
"""The longest encoded value sent: two of them fit in one command line; a
longer one (a HELO name no DNS name could be) is sent as unavailable."""

XFORWARD_GROUPS = (("NAME", "ADDR", "PORT"), ("PROTO", "HELO", "IDENT", "SOURCE"))
"""The attributes of each XFORWARD command, in Postfix's order: where the
client is, then what it said."""

XCLIENT_ATTRIBUTES = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "LOGIN")
"""The XCLIENT attributes the relay knows."""


def xtext(value: str) -> str:
    """
    RFC 3461 xtext: printable ASCII other than C{+} and C{=} as it is,
    every other byte (of the UTF-8 encoding) as C{+HH}.
    """
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in value.encode("utf-8")
    )


def attributes(session: ClientSession) -> dict[str, str]:
    """
    Every attribute the relay knows of C{session}'s client, encoded.

    C{PROTO} is C{SMTP} after HELO and C{ESMTP} after EHLO or LHLO (the two
    names XCLIENT accepts); C{IDENT} is the session id (the id in the
    relay's C{Received:} header and logs); C{SOURCE} is C{REMOTE}: the
    message came over the network, not from a local submission.
    """
    host = session.clientHost
    values = {
        "NAME": None,
        "ADDR": (f"IPv6:{host}" if ":" in host else host) or None,
        "PORT": str(session.clientPort) if session.clientPort else None,
        "PROTO": None if session.heloName is None else "ESMTP" if session.esmtp else "SMTP",
        "HELO": session.heloName,
        "IDENT": session.id,
        "SOURCE": "REMOTE",
        "LOGIN": session.user,
    }
    encoded = {}
    for name, value in values.items():
        text = xtext(value) if value else UNAVAILABLE
        encoded[name] = text if len(text) <= MAX_VALUE else UNAVAILABLE
    return encoded


def advertised(argument: str) -> frozenset[str]:
    """
    The attribute names in an EHLO keyword's argument (C{XFORWARD NAME
    ADDR ...}), upper-cased.
    """
    return frozenset(argument.upper().split())


def xforwardCommands(session: ClientSession, offered: frozenset[str]) -> list[bytes]:
    """
    The XFORWARD commands for one transaction: one per group of
    L{XFORWARD_GROUPS} of which the downstream advertised an attribute.
    """
    known = attributes(session)
    return [
        line
        for group in XFORWARD_GROUPS
        for line in _commands(b"XFORWARD", [(n, known[n]) for n in group if n in offered])
    ]


def xclientCommands(session: ClientSession, offered: frozenset[str]) -> list[bytes]:
    """
    The XCLIENT commands for a session: the advertised attributes of
    L{XCLIENT_ATTRIBUTES}, in as few lines as fit.
    """
    known = attributes(session)
    return _commands(b"XCLIENT", [(n, known[n]) for n in XCLIENT_ATTRIBUTES if n in offered])


def _commands(verb: bytes, pairs: Sequence[tuple[str, str]]) -> list[bytes]:
    """
    C{verb NAME=VALUE ...} lines of at most L{MAX_COMMAND} bytes.
    """
    lines: list[bytes] = []
    line = verb
    for name, value in pairs:
        item = f" {name}={value}".encode("ascii")
        if len(line) + len(item) > MAX_COMMAND:
            lines.append(line)
            line = verb
        line += item
    if line != verb:
        lines.append(line)
    return lines
