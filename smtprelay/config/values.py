"""
Scalar values of the configuration language: booleans, numbers, Go-style
durations, sizes, networks, host names and TLS protocol versions (endpoint
addresses: L{smtprelay.net.address.parseAddress}).

Each C{parseX} takes text and returns the model value or raises
L{ValueError} with a message fit to follow C{FILE:LINE: directive:}; each
C{formatX} is its inverse, used by C{--show}.  Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re

import idna

from smtprelay.net.address import IPNetwork

_TRUE = {"yes", "true", "on", "1"}
_FALSE = {"no", "false", "off", "0"}

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_NANOSECONDS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "μs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}

_SIZE = re.compile(r"([0-9]+)([BKMGT]?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

PROTOCOLS = ("tls1.0", "tls1.1", "tls1.2", "tls1.3")


def parseBool(text: str) -> bool:
    """
    C{yes/no true/false on/off 1/0}, in any case.
    """
    word = text.lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f'"{text}" is not a boolean (use yes or no)')


def formatBool(value: bool) -> str:
    return "yes" if value else "no"


def isNumber(text: str) -> bool:
    """
    Whether C{text} is a whole number in ASCII digits only (L{int} would
    also take C{+1}, C{1_000} or C{٣}).
    """
    return text.isascii() and text.isdigit()


def parseCount(text: str) -> int:
    """
    A whole number, as L{isNumber} spells one.
    """
    if not isNumber(text):
        raise ValueError(f'"{text}" is not a number')
    return int(text)


def parseDuration(text: str) -> float:
    """
    A Go duration such as C{5m}, C{1h30m}, C{1.5h} or C{250ms}, in seconds.
    C{0} alone needs no unit; there is no C{d} and no sign.
    """
    # Exact sums; fractions (with decimal, half a megabyte) is imported here
    # so that only reading a configuration file pays for it.
    from fractions import Fraction

    if text == "0":
        return 0.0
    if not text:
        raise ValueError("missing duration")
    nanoseconds = Fraction(0)
    pos = 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise ValueError(
                f'"{text}" is not a duration (use a number with a unit: '
                "h, m, s, ms, us or ns, as in 1h30m or 250ms)"
            )
        nanoseconds += Fraction(match.group(1)) * _NANOSECONDS[match.group(2)]
        pos = match.end()
    return float(nanoseconds / 10**9)


def formatDuration(seconds: float) -> str:
    """
    The shortest Go-style spelling of C{seconds} (to the nanosecond).
    """
    from fractions import Fraction

    nanoseconds = round(Fraction(seconds) * 10**9)
    if nanoseconds == 0:
        return "0"
    parts = []
    for unit, size in (
        ("h", 3600 * 10**9),
        ("m", 60 * 10**9),
        ("s", 10**9),
        ("ms", 10**6),
        ("us", 10**3),
        ("ns", 1),
    ):
        count, nanoseconds = divmod(nanoseconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def parseSize(text: str) -> int:
    """
    A size in bytes: a plain integer or one with a unit, C{100B}, C{512K},
    C{32M}, C{1G} (powers of 1024).
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f'"{text}" is not a size (use bytes or a unit: 512K, 32M, 1G)')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def formatSize(size: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def parseNetwork(text: str) -> IPNetwork:
    """
    A network in CIDR notation; a bare IP address is a single host.
    """
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f'"{text}" is not a network ({e})') from None


def parseProtocols(args: tuple[str, ...]) -> tuple[str, str | None]:
    """
    C{MIN [MAX]} TLS versions, each one of L{PROTOCOLS}.
    """
    if not 1 <= len(args) <= 2:
        raise ValueError("expected MIN [MAX], e.g. tls1.2 tls1.3")
    for arg in args:
        if arg not in PROTOCOLS:
            raise ValueError(f'unknown version "{arg}" (use {", ".join(PROTOCOLS)})')
    if len(args) == 2:
        if PROTOCOLS.index(args[0]) > PROTOCOLS.index(args[1]):
            raise ValueError(f"{args[0]} is newer than {args[1]}")
        return (args[0], args[1])
    return (args[0], None)


def toALabel(name: str) -> str:
    """
    A host name as an IDNA A-label (C{bücher.example} → C{xn--bcher-kva.example}).

    @raise ValueError: C{name} is not a valid host name.
    """
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f'"{name}" is not a valid host name ({e})') from None
