"""
Choosing the target of each transaction (maddy's pipeline blocks, a subset).

A listener delivers either to one target or through routing tables: the
sender's address or domain picks a sender rule, whose recipients'
addresses or domains may pick their own (L{ByRecipient}).  L{Router}
answers those two questions for L{smtprelay.relay.session.RelaySession}
with a L{Route} (a target and the failover that reaches it), a rejection,
or, at MAIL, the L{ByRecipient} table that will decide at each RCPT.
Lookups are exact: the whole address first, then its domain, both without
case, domains in IDNA A-labels (L{smtprelay.protocol.addresses.routingKeys}).
L{smtprelay.app.targets} builds the tables from the configuration.
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping, TypeVar, Union

import attrs
from twisted.internet.defer import Deferred

from smtprelay.interfaces import IDownstream
from smtprelay.protocol.addresses import routingKeys
from smtprelay.protocol.replies import Reply

Opener = Callable[..., "Deferred[tuple[IDownstream, Reply | None]]"]
"""C{Failover.open}: C{(credentials=, mail=)} → (session, MAIL reply)."""

Releaser = Callable[[IDownstream], None]
"""C{Failover.release}: the relay is done with a downstream session."""

_T = TypeVar("_T")


@attrs.frozen(eq=False)
class Route:
    """
    A target and how to reach it: its failover's C{open} and C{release}.
    Routes are compared by identity: one per target.

    @ivar name: the target's name, for logs and metrics.
    @ivar lmtp: the target speaks LMTP.
    @ivar lmtpSplit: how an SMTP client's recipients reach an LMTP target
        (C{lmtp_split}): C{one_rcpt} per transaction, or all, with
        C{tempfail} when their outcomes differ.
    """

    name: str
    open: Opener
    release: Releaser
    lmtp: bool = False
    lmtpSplit: Literal["one_rcpt", "tempfail"] = "one_rcpt"


Decision = Union[Route, Reply]
"""Where a transaction or a recipient goes: a route, or a rejection."""


@attrs.frozen(eq=False)
class ByRecipient:
    """
    Routing by recipient: each recipient goes where its address's rule,
    else its domain's rule, else C{default} says.

    @ivar rules: a lower-case domain in A-labels or a lower-case
        C{local@domain} → its decision.
    """

    rules: Mapping[str, Decision]
    default: Decision


Handling = Union[Route, Reply, ByRecipient]
"""What a sender's transactions get: one route, a rejection, or routing by
recipient."""


class Router:
    """
    The routing of one listener.

    @param sources: a sender's address or domain rule → its handling.
    @param default: the handling of every other sender.
    """

    def __init__(self, sources: Mapping[str, Handling], default: Handling) -> None:
        self._sources = sources
        self._default = default

    @classmethod
    def single(cls, route: Route) -> Router:
        """
        Every transaction goes to C{route}.
        """
        return cls({}, route)

    @property
    def only(self) -> Route | None:
        """
        The route of every transaction when the envelope does not matter
        (a listener with one C{deliver_to}), else L{None}.
        """
        if not self._sources and isinstance(self._default, Route):
            return self._default
        return None

    def bySender(self, sender: bytes) -> Handling:
        """
        What MAIL FROM:<C{sender}> gets.
        """
        return _lookup(self._sources, sender, self._default)

    def byRecipient(self, table: ByRecipient, recipient: bytes) -> Decision:
        """
        Where RCPT TO:<C{recipient}> goes, under the C{table} that
        L{bySender} gave.
        """
        return _lookup(table.rules, recipient, table.default)


def _lookup(table: Mapping[str, _T], address: bytes, default: _T) -> _T:
    """
    The value of C{address}'s most specific rule in C{table}, else C{default}.
    """
    if not table:  # one deliver_to: no per-message IDNA work
        return default
    for key in routingKeys(address):
        if key in table:
            return table[key]
    return default
