"""
A configured target → the plain policy values of the engines that reach it,
its L{Failover} and its L{Route}; a listener's routing blocks → its
L{Router}.

The outbound client, its handshake, the failover and the relay session
never see the configuration tree: this module is where a C{target} block
and the routing blocks become what each of them needs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from smtprelay.config.model import Decision, Destinations, Handling, Reject, Routing, Target
from smtprelay.net.address import Address
from smtprelay.interfaces import Credentials
from smtprelay.net.endpoints import clientEndpoint
from smtprelay.app.tls import clientOptions
from smtprelay.observe.metrics import IMetrics
from smtprelay.outbound.handshake import EndpointFactory, Handshake
from smtprelay.outbound.policy import ClientPolicy, HandshakePolicy
from smtprelay.relay.failover import Failover, FailoverPolicy
from smtprelay.protocol.replies import reply
from smtprelay.relay.pool import ReusePolicy
from smtprelay.relay import routing
from smtprelay.relay.routing import Opener, Releaser, Route, Router


def clientPolicy(target: Target) -> ClientPolicy:
    """
    How C{target}'s connections talk.
    """
    return ClientPolicy(
        name=target.name,
        lmtp=target.protocol == "lmtp",
        hostname=target.hostname,
        commandTimeout=target.commandTimeout,
        submissionTimeout=target.submissionTimeout,
        dataTimeout=target.dataTimeout,
        chunking=target.chunking,
        forwardClientInfo=target.forwardClientInfo,
        debug=target.debug,
    )


def handshakePolicy(target: Target) -> HandshakePolicy:
    """
    C{target}'s TLS and authentication before a transaction.
    """
    auth = target.auth
    credentials = None
    if auth.mechanism in ("plain", "login"):
        assert auth.username is not None and auth.password is not None
        credentials = Credentials(auth.username, auth.password.reveal())
    return HandshakePolicy(
        connectTimeout=target.connectTimeout,
        attemptStartTLS=target.attemptStartTLS,
        requireTLS=target.requireTLS,
        insecureSkipVerify=target.tlsClient.insecureSkipVerify,
        auth=auth.mechanism,
        credentials=credentials,
    )


def failoverPolicy(target: Target) -> FailoverPolicy:
    """
    C{target}'s endpoints, back-off and connection reuse.
    """
    return FailoverPolicy(
        name=target.name,
        endpoints=target.endpoints,
        backoff=target.backoff,
        reuse=ReusePolicy(target.reuseConnections, target.reuseIdleTime, target.reuseTimeLimit),
    )


def makeFailover(
    target: Target,
    reactor: Any,
    loopToken: str = "",
    clock: IReactorTime | None = None,
    endpointFactory: EndpointFactory | None = None,
    metrics: IMetrics | None = None,
) -> Failover:
    """
    The failover of C{target}, with its handshake.

    @param loopToken: our greeting's loop token; a target that greets with
        it is ourselves.
    @param clock: timeouts and back-off (default: C{reactor}).
    @param endpointFactory: makes the client endpoint of an address
        (default: L{smtprelay.net.endpoints.clientEndpoint} on C{reactor});
        tests connect to fakes with it.
    """
    time: IReactorTime = clock if clock is not None else reactor

    def connect(address: Address, timeout: float, options: Any) -> IStreamClientEndpoint:
        return clientEndpoint(reactor, address, timeout, options)

    handshake = Handshake(
        target.name,
        clientPolicy(target),
        handshakePolicy(target),
        time,
        endpointFactory or connect,
        functools.partial(clientOptions, target.tlsClient),
        loopToken,
        metrics,
    )
    return Failover(failoverPolicy(target), handshake, time, metrics)


def targetRoute(target: Target, open: Opener, release: Releaser) -> Route:
    """
    The route to C{target} through its failover's C{open} and C{release}.
    """
    return Route(target.name, open, release, lmtp=target.protocol == "lmtp", lmtpSplit=target.lmtpSplit)


def makeRouter(delivery: Target | Routing, routeFor: Callable[[Target], Route]) -> Router:
    """
    The router of a listener's C{deliver_to}: one target, or routing blocks
    (a rule listed twice: the later one holds).

    @param routeFor: the route of each target (the service keeps one
        failover per target); called once per target, in file order.
    """
    if isinstance(delivery, Target):
        delivery = Routing((), delivery)
    routes: dict[int, Route] = {}

    def decided(decision: Decision) -> routing.Decision:
        if isinstance(decision, Reject):
            return reply(decision.code, decision.enhanced, decision.text)
        if id(decision) not in routes:
            routes[id(decision)] = routeFor(decision)
        return routes[id(decision)]

    def handled(handling: Handling) -> routing.Handling:
        if isinstance(handling, Destinations):
            rules = [(rule, decided(decision)) for rule, decision in handling.rules]
            return routing.ByRecipient(dict(rules), decided(handling.default))
        return decided(handling)

    sources = [(rule, handled(handling)) for rule, handling in delivery.sources]
    return Router(dict(sources), handled(delivery.default))
