"""
Envelope addresses and ESMTP parameters (pure functions, bytes in and out).

This module parses the arguments of MAIL FROM / RCPT TO into a path and its
parameters, and converts internationalized addresses for a downstream that
lacks SMTPUTF8 (RFC 6531): domains become IDNA A-labels, a non-ASCII
local-part cannot be converted.
"""

from __future__ import annotations

import idna


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
