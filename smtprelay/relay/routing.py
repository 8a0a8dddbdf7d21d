"""
Choosing the target of each transaction (maddy's pipeline blocks, a subset).

A listener delivers either to one target or through routing blocks: the
sender's address or domain picks a C{source} block, whose recipients'
addresses or domains pick a C{destination} block.  L{Router} answers those
two questions for L{smtprelay.relay.session.RelaySession} with a L{Route} (a target
and the failover that reaches it), a rejection, or, at MAIL, the
L{Destinations} that will decide at each RCPT.  Lookups are exact: the
whole address first, then its domain, both without case, domains in IDNA
A-labels (L{smtprelay.protocol.addresses.routingKeys}).
"""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar, Union

import attrs
from twisted.internet.defer import Deferred

from smtprelay.protocol.addresses import routingKeys
from smtprelay.config.model import Decision, Destinations, Handling, Reject, Routing, Target
from smtprelay.interfaces import IDownstream
from smtprelay.protocol.replies import Reply, reply

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
    """

    target: Target
    open: Opener
    release: Releaser


SenderChoice = Union[Route, Reply, Destinations]
"""At MAIL: the transaction's route, its rejection, or routing by recipient."""


class Router:
    """
    The routing of one listener, with each target's L{Route}.

    @param delivery: the listener's C{deliverTo}.
    @param routeFor: the route of each target (the service keeps one
        failover per target).
    """

    def __init__(self, delivery: Target | Routing, routeFor: Callable[[Target], Route]) -> None:
        if isinstance(delivery, Target):
            delivery = Routing((), delivery)
        self._routing = delivery
        self._routes = {id(t): routeFor(t) for t in delivery.targets()}
        self._sources = dict(delivery.sources)
        self._destinations: dict[int, dict[str, Decision]] = {}

    @classmethod
    def single(cls, route: Route) -> Router:
        """
        Every transaction goes to C{route}.
        """
        return cls(route.target, lambda target: route)

    @property
    def only(self) -> Route | None:
        """
        The route of every transaction when the envelope does not matter
        (a listener with one C{deliver_to}), else L{None}.
        """
        default = self._routing.default
        if not self._routing.sources and isinstance(default, Target):
            return self._routes[id(default)]
        return None

    def bySender(self, sender: bytes) -> SenderChoice:
        """
        What MAIL FROM:<C{sender}> gets.
        """
        handling: Handling = _lookup(self._sources, sender, self._routing.default)
        if isinstance(handling, Destinations):
            return handling
        return self._decided(handling)

    def byRecipient(self, destinations: Destinations, recipient: bytes) -> Route | Reply:
        """
        Where RCPT TO:<C{recipient}> goes, under the C{destinations} that
        L{bySender} gave.
        """
        table = self._destinations.get(id(destinations))
        if table is None:
            table = self._destinations[id(destinations)] = dict(destinations.rules)
        return self._decided(_lookup(table, recipient, destinations.default))

    def _decided(self, decision: Decision) -> Route | Reply:
        if isinstance(decision, Reject):
            return reply(decision.code, decision.enhanced, decision.text)
        return self._routes[id(decision)]


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
