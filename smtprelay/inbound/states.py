"""
The states of an inbound session, explicit: where the connection is
(L{Phase}), where its TLS is (L{TLS}) and where the mail transaction is
(L{Stage}); and L{commandRefusal}, the one place that says which command
may run in which state, and what the client gets otherwise.
"""

from __future__ import annotations

import enum

import attrs

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal


class Phase(enum.Enum):
    """
    The connection's life.
    """

    CONNECTING = "connecting"
    """Implicit TLS: the greeting waits for the handshake."""
    OPEN = "open"
    """Greeted: commands are read."""
    CLOSING = "closing"
    """The last reply is on its way; nothing more is read."""
    CLOSED = "closed"
    """The connection is gone."""


class TLS(enum.Enum):
    """
    The connection's TLS.
    """

    PLAIN = "plain"
    HANDSHAKE = "handshake"
    """STARTTLS or implicit TLS, not yet complete: no reply can be sent."""
    ACTIVE = "active"


class Stage(enum.Enum):
    """
    Where the mail transaction is.
    """

    HELLO = "hello"
    """No HELO/EHLO/LHLO yet (or again, after STARTTLS)."""
    READY = "ready"
    """Greeted; no transaction."""
    MAIL = "mail"
    """The sender is accepted, no recipient yet."""
    RCPT = "rcpt"
    """At least one recipient is accepted."""
    DATA = "data"
    """The DATA body is read (from its C{354} to the end of its reply)."""
    BDAT = "bdat"
    """The body comes in BDAT chunks."""


TRANSACTION = frozenset({Stage.MAIL, Stage.RCPT, Stage.DATA, Stage.BDAT})
"""The stages of a mail transaction (after a sender was accepted)."""


@attrs.frozen
class Facts:
    """
    What a session knows when a command comes, as far as it decides whether
    the command may run.

    @ivar esmtp: the client greeted with EHLO or LHLO.
    @ivar secure: TLS is active, or the client is on a unix socket.
    @ivar authenticated: the client authenticated.
    @ivar rcptTried: a RCPT of this transaction came (accepted or not).
    @ivar tlsOffered: STARTTLS is offered on this listener.
    @ivar authOffered: AUTH is enabled on this listener.
    """

    stage: Stage
    tls: TLS
    esmtp: bool
    secure: bool
    authenticated: bool
    rcptTried: bool
    tlsOffered: bool
    authOffered: bool


def commandRefusal(verb: bytes, argument: bytes, facts: Facts) -> Refusal | None:
    """
    Whether C{verb} may run now, before its own arguments are parsed.

    @param verb: the command, upper case.
    @param argument: its argument (commands that take none refuse one).
    @return: L{None} if it may, else the refusal the client gets, in the
        order Postfix checks them.
    """
    stage = facts.stage
    if verb == b"MAIL":
        if stage is Stage.HELLO:
            return replies.NEED_GREETING
        if stage in TRANSACTION:
            return replies.NESTED_MAIL
    elif verb == b"RCPT":
        if stage not in TRANSACTION:
            return replies.NEED_MAIL
    elif verb == b"DATA":
        if argument:
            return replies.DATA_SYNTAX
        if stage is Stage.BDAT:
            return replies.BDAT_IN_PROGRESS
        return _needRecipients(facts)
    elif verb == b"BDAT":
        if not facts.esmtp:
            return replies.NEED_EHLO
        return _needRecipients(facts)
    elif verb == b"STARTTLS":
        if not facts.tlsOffered:
            return replies.NOT_IMPLEMENTED
        if facts.tls is not TLS.PLAIN:
            return replies.TLS_ACTIVE
        if argument:
            return replies.STARTTLS_SYNTAX
        if stage in TRANSACTION:
            return replies.IN_TRANSACTION
    elif verb == b"AUTH":
        if not facts.authOffered:
            return replies.AUTH_DISABLED
        if not facts.esmtp:
            return replies.NEED_EHLO
        if not facts.secure:
            return replies.AUTH_NEEDS_TLS
        if facts.authenticated:
            return replies.AUTH_TWICE
        if stage in TRANSACTION:
            return replies.IN_TRANSACTION
    return None


def _needRecipients(facts: Facts) -> Refusal | None:
    """
    A body needs a transaction with an accepted recipient.
    """
    if facts.stage not in TRANSACTION:
        return replies.NEED_MAIL
    if facts.stage is Stage.MAIL:
        return replies.NO_RECIPIENT_ACCEPTED if facts.rcptTried else replies.NEED_RCPT
    return None
