"""
A configured target → the plain policy values of the engines that reach it,
and its L{Failover}.

The outbound client, its handshake and the failover never see the
configuration tree: this module is where a C{target} block becomes what
each of them needs.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint

from smtprelay.config.model import Address, Target
from smtprelay.interfaces import Credentials
from smtprelay.net.endpoints import clientEndpoint
from smtprelay.net.tls import ClientOptions
from smtprelay.observe.metrics import IMetrics
from smtprelay.outbound.handshake import EndpointFactory, Handshake
from smtprelay.outbound.policy import ClientPolicy, Endpoint, HandshakePolicy
from smtprelay.relay.failover import Failover, FailoverPolicy
from smtprelay.relay.pool import ReusePolicy


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

    def connect(address: Endpoint, timeout: float, options: Any) -> IStreamClientEndpoint:
        assert isinstance(address, Address)  # the endpoints of failoverPolicy(target)
        return clientEndpoint(reactor, address, timeout, options)

    handshake = Handshake(
        target.name,
        clientPolicy(target),
        handshakePolicy(target),
        time,
        endpointFactory or connect,
        lambda host: ClientOptions(target.tlsClient, host),
        loopToken,
        metrics,
    )
    return Failover(failoverPolicy(target), handshake, time, metrics)
