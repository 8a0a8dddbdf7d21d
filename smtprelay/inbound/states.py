"""
The states of an inbound session, explicit: where the connection is
(L{Phase}), where its TLS is (L{TLS}) and where the mail transaction is
(L{Stage}); and L{commandRefusal}, the one place that says which command
may run in which state, and what the client gets otherwise.
"""

from __future__ import annotations

import enum
from typing import Protocol

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal


class Phase(enum.Enum):
    """
    The connection's life.

    @ivar closing: nothing more is read or answered (L{CLOSING}, L{CLOSED});
        a plain attribute, as the input loop asks at every step.
    """

    CONNECTING = "connecting"
    """Implicit TLS: the greeting waits for the handshake."""
    OPEN = "open"
    """Greeted: commands are read."""
    CLOSING = "closing"
    """The last reply is on its way; nothing more is read."""
    CLOSED = "closed"
    """The connection is gone."""

    def __init__(self, name: str) -> None:
        self.closing = name in ("closing", "closed")


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

    @ivar transaction: a sender was accepted (L{MAIL}, L{RCPT}, L{DATA},
        L{BDAT}).
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

    def __init__(self, name: str) -> None:
        self.transaction = name not in ("hello", "ready")


class Facts(Protocol):
    """
    What a session knows when a command comes, as far as it decides whether
    the command may run.  The session passes a live view of itself (nothing
    is copied per command).
    """

    @property
    def stage(self) -> Stage: ...

    @property
    def tls(self) -> TLS: ...

    @property
    def esmtp(self) -> bool:
        """The client greeted with EHLO or LHLO."""

    @property
    def secure(self) -> bool:
        """TLS is active, or the client is on a unix socket."""

    @property
    def authenticated(self) -> bool:
        """The client authenticated."""

    @property
    def rcptTried(self) -> bool:
        """A RCPT of this transaction came (accepted or not)."""

    @property
    def tlsOffered(self) -> bool:
        """STARTTLS is offered on this listener."""

    @property
    def authOffered(self) -> bool:
        """AUTH is enabled on this listener."""


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
        if stage.transaction:
            return replies.NESTED_MAIL
    elif verb == b"RCPT":
        if not stage.transaction:
            return replies.NEED_MAIL
    elif verb == b"DATA":
        if argument:
            return replies.DATA_SYNTAX
        if stage is Stage.BDAT:
            return replies.BDAT_IN_PROGRESS
        return _needRecipients(stage, facts)
    elif verb == b"BDAT":
        if not facts.esmtp:
            return replies.NEED_EHLO
        return _needRecipients(stage, facts)
    elif verb == b"STARTTLS":
        if not facts.tlsOffered:
            return replies.NOT_IMPLEMENTED
        if facts.tls is not TLS.PLAIN:
            return replies.TLS_ACTIVE
        if argument:
            return replies.STARTTLS_SYNTAX
        if stage.transaction:
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
        if stage.transaction:
            return replies.IN_TRANSACTION
    return None


def _needRecipients(stage: Stage, facts: Facts) -> Refusal | None:
    """
    A body needs a transaction with an accepted recipient.
    """
    if not stage.transaction:
        return replies.NEED_MAIL
    if stage is Stage.MAIL:
        return replies.NO_RECIPIENT_ACCEPTED if facts.rcptTried else replies.NEED_RCPT
    return None
