"""
Which of a client's MAIL and RCPT parameters reach the downstream, and how
many final replies an LMTP transaction gets.

A parameter whose extension the downstream did not advertise is dropped
when dropping it is harmless (C{SIZE}, C{SMTPUTF8} for ASCII addresses,
DSN's C{RET}/C{ENVID}/C{NOTIFY}/C{ORCPT}, as Postfix's C{smtp} does) and
refused locally when the message would lose a promise (C{BODY=8BITMIME},
C{REQUIRETLS}).  C{AUTH=} is only passed on for a client that
authenticated.  Anything else goes as the client sent it.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Reply, reply

REQUIRETLS_UNAVAILABLE = reply(550, "5.7.30", "REQUIRETLS support required")
"""MAIL with REQUIRETLS to a downstream that cannot honour it (RFC 8689)."""

DSN_MAIL = ("RET", "ENVID")
"""DSN's MAIL parameters (RFC 3461)."""

DSN_RCPT = ("NOTIFY", "ORCPT")
"""DSN's RCPT parameters (RFC 3461)."""


@attrs.frozen
class Forwarded:
    """
    The parameters to send, and the DSN ones dropped because the
    downstream does not advertise DSN (for a debug line).
    """

    params: dict[str, str | None]
    droppedDSN: tuple[str, ...] = ()


def mailParameters(
    params: Mapping[str, str | None], capabilities: Mapping[str, str], *, tls: bool, authenticated: bool
) -> Forwarded | Reply:
    """
    The MAIL parameters the downstream gets, or the local reply that
    refuses the transaction without sending MAIL.

    @param capabilities: the downstream's EHLO/LHLO keywords.
    @param tls: the downstream connection is encrypted.
    @param authenticated: the client authenticated (its C{AUTH=} may be
        passed on).
    """
    out: dict[str, str | None] = {}
    dropped: list[str] = []
    for key, value in params.items():
        if key == "BODY":
            if (value or "").upper() == "8BITMIME" and "8BITMIME" not in capabilities:
                return replies.CONVERSION_REQUIRED
            out[key] = value
        elif key == "REQUIRETLS":
            if not tls or "REQUIRETLS" not in capabilities:
                return REQUIRETLS_UNAVAILABLE
            out[key] = value
        elif key in DSN_MAIL:
            if "DSN" in capabilities:
                out[key] = value
            else:
                dropped.append(key)
        elif key == "AUTH":
            if authenticated and key in capabilities:
                out[key] = value
        elif key in ("SIZE", "SMTPUTF8"):
            if key in capabilities:
                out[key] = value
        else:
            out[key] = value
    return Forwarded(out, tuple(dropped))


def rcptParameters(params: Mapping[str, str | None], capabilities: Mapping[str, str]) -> Forwarded:
    """
    The RCPT parameters the downstream gets.
    """
    if "DSN" in capabilities:
        return Forwarded(dict(params))
    return Forwarded(
        {k: v for k, v in params.items() if k not in DSN_RCPT},
        tuple(k for k in params if k in DSN_RCPT),
    )


def finalReplies(lmtp: bool, accepted: int) -> int:
    """
    How many replies end a transaction's body: one per accepted recipient
    in LMTP (RFC 2033 §4.2), at least one; one in SMTP.
    """
    return max(1, accepted) if lmtp else 1
