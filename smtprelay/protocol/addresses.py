"""
Envelope addresses and ESMTP parameters (pure functions, bytes in and out).

This module parses the arguments of MAIL FROM / RCPT TO into a path and its
parameters, and converts internationalized addresses for a downstream that
lacks SMTPUTF8 (RFC 6531): domains become IDNA A-labels, a non-ASCII
local-part cannot be converted.
"""

from __future__ import annotations

import re

import idna

from smtprelay.protocol.replies import Refusal, Reply, reply


def downconvert(address: bytes) -> bytes | None:
    """
    Return C{address} in pure ASCII for a downstream without SMTPUTF8:
    unchanged when it is ASCII already, with its domain converted to A-labels
    when only the domain is internationalized, or L{None} when the local-part
    is not ASCII (or the domain is not a valid IDN) and no conversion exists.
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition(b"@")
    if not at:
        return None
    if not local.isascii():
        return None
    try:
        text = domain.decode("utf-8")
        labels = idna.encode(text, uts46=True)
    except (UnicodeError, idna.IDNAError):
        return None
    return local + b"@" + labels


def domainKey(domain: str) -> str:
    """
    A domain as routing rules compare it: lower-case IDNA A-labels
    (C{Bücher.Example} → C{xn--bcher-kva.example}); an address literal
    such as C{[192.0.2.1]} lower-cased.

    @raise ValueError: C{domain} is neither a valid host name nor a literal.
    """
    if domain.startswith("[") and domain.endswith("]") and len(domain) > 2:
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii").lower()
    except idna.IDNAError as e:
        raise ValueError(f'"{domain}" is not a valid domain ({e})') from None


def ruleKey(rule: str) -> str:
    """
    A routing rule (C{example.org} or C{user@example.org}) as lookups
    compare it: the domain by L{domainKey}, the local-part lower-cased
    (lookups ignore case, as Postfix's tables do).

    @raise ValueError: not a domain or an address with a domain.
    """
    local, at, domain = rule.rpartition("@")
    if at and not local:
        raise ValueError(f'"{rule}" has no local-part')
    key = domainKey(domain)
    return f"{local.lower()}@{key}" if at else key


def routingKeys(address: bytes) -> tuple[str, ...]:
    """
    The rule keys an envelope address matches, most specific first: the
    whole address, then its domain.  The null sender and an address
    without a domain (C{postmaster}) match no rule.
    """
    text = address.decode("utf-8", "replace")
    local, at, domain = text.rpartition("@")
    if not (at and local and domain):
        return ()
    try:
        key = domainKey(domain)
    except ValueError:
        key = domain.lower()
    return (f"{local.lower()}@{key}", key)


class EnvelopeError(ValueError):
    """
    A MAIL or RCPT argument was refused; C{reply} is what the client gets.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply

    @property
    def refusal(self) -> Refusal:
        """
        The refusal, counted as a C{syntax} rejection.
        """
        return Refusal(self.reply, "syntax")


MAIL_PARAMETERS = frozenset(
    {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH", "REQUIRETLS"}
)
"""The MAIL FROM parameters we take (others get C{555 5.5.4})."""

RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})
"""The RCPT TO parameters we take."""

_MAIL_SYNTAX = reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
_RCPT_SYNTAX = reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_SENDER = reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = reply(501, "5.1.3", "Bad recipient address syntax")
UTF8_UNDECLARED = reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")

_KEYWORD = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*\Z")
_VALUE = re.compile(rb"[\x21-\x3c\x3e-\x7e\x80-\xff]+\Z")
_XTEXT = re.compile(rb"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+\Z")
_NOTIFY = re.compile(rb"(?:NEVER|(?:SUCCESS|FAILURE|DELAY)(?:,(?:SUCCESS|FAILURE|DELAY))*)\Z")
_SIZE = re.compile(rb"[0-9]{1,20}\Z")
_PATH = re.compile(rb'<((?:"(?:[^"\\\r\n]|\\.)*"|[^<>"\r\n])*)>')
_SOURCE_ROUTE = re.compile(rb"@[^,:]*(?:,@[^,:]*)*:")
_ATOM = rb"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\x80-\xff-]+"
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_LABEL = rb"(?:[A-Za-z0-9\x80-\xff](?:[A-Za-z0-9\x80-\xff-]*[A-Za-z0-9\x80-\xff])?)"
_DOMAIN = rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
# A bare local part (no domain) is accepted and passed on unchanged, as
# Postfix accepts it; LMTP servers such as Dovecot take bare user names.
_MAILBOX = re.compile(rb"(?:" + _ATOM + rb"|" + _QUOTED + rb")(?:@" + _DOMAIN + rb")?\Z")


def parseMail(argument: bytes) -> tuple[bytes, dict[str, str | None]]:
    """
    Parse the argument of C{MAIL} (C{FROM:<path> params}).

    The path may be bracketed or not, with a space after the colon (as
    Postfix allows); C{<>} is the null sender; a source route is dropped.

    @return: the reverse-path without brackets and the parameters
        (upper-cased keyword → value, L{None} when bare).
    @raise EnvelopeError: bad syntax (C{501 5.5.4}), bad address
        (C{501 5.1.7}), unknown parameter (C{555 5.5.4}), a non-ASCII address
        without C{SMTPUTF8} (C{553 5.6.7}).
    """
    path, rest = _splitPath(argument, b"FROM:", _MAIL_SYNTAX)
    params = _parameters(rest, MAIL_PARAMETERS)
    _checkAddress(path, "SMTPUTF8" in params, BAD_SENDER, allowEmpty=True)
    return path, params


def parseRcpt(argument: bytes, smtputf8: bool) -> tuple[bytes, dict[str, str | None]]:
    """
    Parse the argument of C{RCPT} (C{TO:<path> params}).

    @param smtputf8: the transaction declared C{SMTPUTF8}.
    @return: the forward-path without brackets, and the parameters.
    @raise EnvelopeError: as L{parseMail}, with C{501 5.1.3} for a bad
        address (the null path included; C{<postmaster>} is accepted).
    """
    path, rest = _splitPath(argument, b"TO:", _RCPT_SYNTAX)
    params = _parameters(rest, RCPT_PARAMETERS)
    if path.lower() != b"postmaster":
        _checkAddress(path, smtputf8, BAD_RECIPIENT, allowEmpty=False)
    return path, params


def _splitPath(argument: bytes, keyword: bytes, syntax: Reply) -> tuple[bytes, bytes]:
    argument = argument.lstrip(b" ")
    if argument[: len(keyword)].upper() != keyword:
        raise EnvelopeError(syntax)
    argument = argument[len(keyword):].lstrip(b" ")
    if argument.startswith(b"<"):
        m = _PATH.match(argument)
        if m is None:
            raise EnvelopeError(syntax)
        path, rest = m.group(1), argument[m.end():]
        if rest and not rest.startswith(b" "):
            raise EnvelopeError(syntax)
        path = _SOURCE_ROUTE.sub(b"", path, count=1) if path.startswith(b"@") else path
    else:
        path, _, rest = argument.partition(b" ")
        if not path or b">" in path:
            raise EnvelopeError(syntax)
    return path, rest


def _parameters(text: bytes, known: frozenset[str]) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for token in text.split():
        key, eq, value = token.partition(b"=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise EnvelopeError(reply(501, "5.5.4", "Bad parameter syntax"))
        name = key.decode("ascii").upper()
        if name not in known:
            raise EnvelopeError(_unsupported(token))
        if name in params:
            raise EnvelopeError(reply(501, "5.5.4", f"Duplicate {name} parameter"))
        params[name] = _checkParameter(name, value if eq else None)
    return params


def _unsupported(token: bytes) -> Reply:
    # Quoted in ASCII: a reply carries no raw 8-bit bytes.
    return reply(555, "5.5.4", "Unsupported option: " + token.decode("ascii", "backslashreplace"))


def _checkParameter(name: str, value: bytes | None) -> str | None:
    """
    Check one parameter's value on its bytes (an upper-cased keyword is
    compared to ASCII only: Unicode case folding, such as C{ı} to C{I},
    never makes a value valid) and return it as the handler gets it.
    """
    bad = EnvelopeError(reply(501, "5.5.4", f"Bad {name} parameter syntax"))
    if name in ("SMTPUTF8", "REQUIRETLS"):
        if value is not None:
            raise bad
        return None
    if value is None:
        raise bad
    upper = value.upper()
    if name == "SIZE":
        if not _SIZE.match(value):
            raise bad
    elif name == "BODY":
        if upper not in (b"7BIT", b"8BITMIME"):
            raise EnvelopeError(_unsupported(b"BODY=" + value))
        value = upper
    elif name == "RET":
        if upper not in (b"FULL", b"HDRS"):
            raise bad
        value = upper
    elif name == "NOTIFY":
        if not _NOTIFY.match(upper):
            raise bad
        value = upper
    elif name == "ORCPT":
        kind, semi, address = value.partition(b";")
        if not semi or not kind or not address or not kind.isascii():
            raise bad
    elif name in ("ENVID", "AUTH"):
        if not _XTEXT.match(value) and value != b"<>":
            raise bad
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise bad from None


def _checkAddress(path: bytes, smtputf8: bool, bad: Reply, allowEmpty: bool) -> None:
    if not path:
        if allowEmpty:
            return
        raise EnvelopeError(bad)
    if not path.isascii():
        try:
            path.decode("utf-8")
        except UnicodeDecodeError:
            raise EnvelopeError(bad) from None
        if not smtputf8:
            raise EnvelopeError(UTF8_UNDECLARED)
    if len(path) > 254 * 4 or not _MAILBOX.match(path):
        raise EnvelopeError(bad)
